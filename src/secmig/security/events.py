"""Events of the migration protocol: what :meth:`MigrationConnection.send` takes and ``next_event`` returns.

Frozen, slotted dataclasses, one per message, in the paper's vocabulary (round, dirty pages,
stop-and-copy). Which side may send which event in which state is decided in one table in
:mod:`.state`, not here (:class:`Role` lives there and is re-exported here).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from secmig.errors import (
    AuthenticationError,
    AuthorizationError,
    IntegrityError,
    MigrationAborted,
    RemoteProtocolError,
    SecmigError,
)
from secmig.security.credentials import LocationBinding
from secmig.security.grants import Grant
from secmig.security.policy import Operation
from secmig.security.state import Role as Role

Buffer = bytes | bytearray | memoryview


class AbortCode(enum.IntEnum):
    """Why a migration was aborted; travels in the ABORT frame."""

    AUTHENTICATION = 1
    AUTHORIZATION = 2
    INTEGRITY = 3
    PROTOCOL = 4
    REQUESTED = 5
    """The local application asked for it (a policy, the monitor, an operator)."""


_CODE_ERRORS: dict[AbortCode, type[SecmigError]] = {
    AbortCode.AUTHENTICATION: AuthenticationError,
    AbortCode.AUTHORIZATION: AuthorizationError,
    AbortCode.INTEGRITY: IntegrityError,
    AbortCode.PROTOCOL: RemoteProtocolError,
    AbortCode.REQUESTED: MigrationAborted,
}


@dataclass(frozen=True, slots=True)
class MigrationRequest:
    """What the source asks for: the operation, the VM and its memory geometry, with its credentials."""

    operation: Operation
    vm_id: str
    page_size: int
    page_count: int
    grant: Grant | None
    binding: LocationBinding | None
    """The VM's current location binding (the source host, current epoch)."""
    manifest_digest: bytes | None = None
    """SHA-256 of the manifest the source will send first (the driver and the VM definition)."""


@dataclass(frozen=True, slots=True)
class Authorized:
    """Both ends are authenticated and the operation is authorized: pages may now flow."""

    peer_host: str
    operation: Operation
    vm_id: str
    page_size: int
    page_count: int
    next_binding: LocationBinding | None
    manifest_digest: bytes | None = None
    """The manifest digest the grant binds (None: the grant binds none); the first round must match it."""
    grant_nonce: bytes | None = None
    """The grant's nonce: names this move in the location register (None without a grant)."""
    current_binding: LocationBinding | None = None
    """The binding the source presented: where the move starts from (its epoch is fenced at commit)."""


@dataclass(frozen=True, slots=True)
class RoundStart:
    """A pre-copy round begins (round 0 is the full copy)."""

    round_no: int


@dataclass(frozen=True, slots=True)
class PageBatch:
    """Pages and their contents. Sending: ``digests`` is computed when empty. Received: already verified."""

    round_no: int
    page_numbers: tuple[int, ...]
    data: Buffer
    digests: Buffer = b""


@dataclass(frozen=True, slots=True)
class RoundEnd:
    """A round ends; ``pages`` is how many pages it carried (filled in when sending; the destination checks it)."""

    round_no: int
    pages: int = 0


@dataclass(frozen=True, slots=True)
class StopAndCopy:
    """The VM is paused on the source; the last dirty pages follow."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """CPU and device state of the paused VM (opaque bytes)."""

    data: Buffer


@dataclass(frozen=True, slots=True)
class Commit:
    """The source's final memory digest; the destination must match it before it may resume the VM."""

    memory_digest: bytes


@dataclass(frozen=True, slots=True)
class Prepared:
    """The destination's vote: it matched the memory digest and holds the VM loaded and paused.

    It cannot be taken back; the VM runs nowhere until the source confirms (or the register decides)."""

    memory_digest: bytes = b""


@dataclass(frozen=True, slots=True)
class Confirm:
    """The source's word that the location register holds the new epoch: the destination may resume."""

    memory_digest: bytes = b""


@dataclass(frozen=True, slots=True)
class Committed:
    """The destination resumed the VM (after CONFIRM): the move is over.

    Sent by a destination that has not voted yet, it is its vote *and* this final word, sent on its own
    as soon as CONFIRM arrives (for in-memory tests and the lab, which run no register)."""

    memory_digest: bytes = b""


@dataclass(frozen=True, slots=True)
class Abort:
    """Ask to abort (sendable by either end at any time before the end)."""

    reason: str
    code: AbortCode = AbortCode.REQUESTED


@dataclass(frozen=True, slots=True)
class Aborted:
    """The migration was aborted, by this end (a refused check) or by the peer; the VM stays on the source."""

    code: AbortCode
    reason: str
    by_peer: bool

    def as_error(self) -> SecmigError:
        """The exception of the tree that matches ``code``, for callers that prefer raising."""
        who = "peer" if self.by_peer else "local"
        return _CODE_ERRORS[self.code](f"migration aborted ({who}): {self.reason}")


@dataclass(frozen=True, slots=True)
class NeedData:
    """No complete event yet: feed more bytes with ``receive_data``."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The migration is over (committed or aborted); nothing more will come."""


NEED_DATA = NeedData()
CONNECTION_CLOSED = ConnectionClosed()

SendableEvent = (
    RoundStart | PageBatch | RoundEnd | StopAndCopy | DeviceState | Commit | Prepared | Confirm | Committed | Abort
)
ReceivedEvent = (
    Authorized
    | RoundStart
    | PageBatch
    | RoundEnd
    | StopAndCopy
    | DeviceState
    | Commit
    | Prepared
    | Confirm
    | Committed
    | Aborted
    | NeedData
    | ConnectionClosed
)
