"""Keeping parts of a state out of the store: `ephemeral` fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

#: The attrs metadata key that marks a field as never persisted.
EPHEMERAL = "trio_pgs.ephemeral"


def ephemeral(*, default: Any = attrs.NOTHING, factory: Callable[[], Any] | None = None) -> Any:
    """An attrs field that is never persisted and gets its default back on activation.

    Use it for what only makes sense in memory: connections, caches, tasks' handles::

        @attrs.define
        class Room:
            messages: list[str] = attrs.Factory(list)
            listeners: set[Any] = trio_pgs.ephemeral(factory=set)

    A default (or factory) is required: it is what the field holds after every
    activation.
    """
    if (default is attrs.NOTHING) == (factory is None):
        raise TypeError("ephemeral() needs exactly one of default= or factory=")
    if factory is not None:
        return attrs.field(factory=factory, metadata={EPHEMERAL: True})
    return attrs.field(default=default, metadata={EPHEMERAL: True})


def _ephemeral_names(cls: type) -> list[str]:
    return [field.name for field in attrs.fields(cls) if field.metadata.get(EPHEMERAL)]


def _has_ephemeral(cls: Any) -> bool:
    return attrs.has(cls) and bool(_ephemeral_names(cls))


def with_ephemeral_hooks(converter: cattrs.Converter) -> cattrs.Converter:
    """A copy of *converter* that leaves ephemeral fields out of the stored form and
    gives them their defaults when structuring."""
    converter = converter.copy()

    def unstructure(cls: Any) -> Callable[[Any], Any]:
        omitted = {name: override(omit=True) for name in _ephemeral_names(cls)}
        return make_dict_unstructure_fn(cls, converter, **omitted)  # type: ignore[arg-type]

    def structure(cls: Any) -> Callable[[Any, Any], Any]:
        omitted = {name: override(omit=True) for name in _ephemeral_names(cls)}
        return make_dict_structure_fn(cls, converter, **omitted)  # type: ignore[arg-type]

    converter.register_unstructure_hook_factory(_has_ephemeral, unstructure)
    converter.register_structure_hook_factory(_has_ephemeral, structure)
    return converter
