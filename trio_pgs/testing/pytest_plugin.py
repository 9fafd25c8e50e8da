"""pytest fixtures for testing persistent servers (needs pytest-trio).

Enable them in your ``conftest.py``::

    pytest_plugins = ["trio_pgs.testing.pytest_plugin"]

then ask for ``pgs_store`` (a fresh `FaultyStore` over a `MemoryStore`, healthy until
you tell it otherwise) and ``pgs_supervisor`` (a `PersistentSupervisor` open on it for
the test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .._supervisor import PersistentSupervisor
from ._faults import FaultyStore


@pytest.fixture
def pgs_store() -> FaultyStore:
    """A new `FaultyStore` over a new `MemoryStore`, healthy until told otherwise."""
    return FaultyStore()


@pytest.fixture
async def pgs_supervisor(pgs_store: FaultyStore) -> AsyncIterator[PersistentSupervisor]:
    """A `PersistentSupervisor` named ``"pgs-test"``, open on ``pgs_store`` for the test."""
    async with PersistentSupervisor(store=pgs_store, name="pgs-test") as supervisor:
        yield supervisor
