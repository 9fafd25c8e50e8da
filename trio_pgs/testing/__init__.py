"""Tools for testing persistent servers: a fault-injecting store and helpers.

The pytest fixtures live in `trio_pgs.testing.pytest_plugin`.
"""

from .._errors import SimulatedCrash as SimulatedCrash
from .._memory_store import MemoryStore as MemoryStore
from ._faults import FaultStatistics as FaultStatistics
from ._faults import FaultyStore as FaultyStore
from ._faults import InjectedFault as InjectedFault
from ._helpers import crash as crash
from ._helpers import hibernate as hibernate
from ._helpers import wait_all_idle as wait_all_idle
