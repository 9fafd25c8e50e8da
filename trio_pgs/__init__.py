"""trio-pgs: persistent servers for trio, after Elixir's PersistentGenServer."""

from ._calls import current_caller as current_caller
from ._diskcache_store import DiskCacheStore as DiskCacheStore
from ._errors import ActivationFailed as ActivationFailed
from ._errors import AlreadyStarted as AlreadyStarted
from ._errors import CallCycleError as CallCycleError
from ._errors import ConflictError as ConflictError
from ._errors import OutcomeUnknown as OutcomeUnknown
from ._errors import PersistenceError as PersistenceError
from ._errors import RequestError as RequestError
from ._errors import ServerCrashed as ServerCrashed
from ._errors import ServerNotFound as ServerNotFound
from ._errors import ServerQuarantined as ServerQuarantined
from ._errors import StateEncodingError as StateEncodingError
from ._errors import SupervisorEscalated as SupervisorEscalated
from ._errors import SupervisorNotRunning as SupervisorNotRunning
from ._errors import TrioPGSError as TrioPGSError
from ._errors import UnknownKind as UnknownKind
from ._errors import UnknownRequest as UnknownRequest
from ._events import EventType as EventType
from ._events import ServerEvent as ServerEvent
from ._ledger import Caller as Caller
from ._memory_store import MemoryStore as MemoryStore
from ._postgres_store import PostgresStore as PostgresStore
from ._ref import ServerRef as ServerRef
from ._results import NoReply as NoReply
from ._results import Reply as Reply
from ._results import Stop as Stop
from ._server import Persistence as Persistence
from ._server import PersistentServer as PersistentServer
from ._server import Restart as Restart
from ._shaping import ephemeral as ephemeral
from ._store import Claim as Claim
from ._store import Delete as Delete
from ._store import Put as Put
from ._store import Record as Record
from ._store import Store as Store
from ._store import SupportsClaims as SupportsClaims
from ._store import SupportsCommitEach as SupportsCommitEach
from ._store import SupportsKinds as SupportsKinds
from ._store import SupportsReportingScan as SupportsReportingScan
from ._supervisor import PersistentSupervisor as PersistentSupervisor
from ._supervisor import SupervisorStatistics as SupervisorStatistics

__version__ = "0.1.0"
