"""Tools for testing persistent servers and stores: a fault-injecting store, helpers,
and the store conformance kit `check_store`.

The pytest fixtures live in `trio_pgs.testing.pytest_plugin`.
"""

from .._errors import SimulatedCrash as SimulatedCrash
from .._memory_store import MemoryStore as MemoryStore
from ._conformance import check_store as check_store
from ._faults import FaultStatistics as FaultStatistics
from ._faults import FaultyStore as FaultyStore
from ._faults import InjectedFault as InjectedFault
from ._helpers import crash as crash
from ._helpers import hibernate as hibernate
from ._helpers import wait_all_idle as wait_all_idle
