"""An in-memory link between two migration connections, for tests, the benchmark and the simulator.

Like h11's ``tests/helpers.py: ConnectionPair``: it moves ``data_to_send()`` of each end into the
other's ``receive_data``, records every chunk per direction (so tests can assert what crossed the wire),
and can pass each chunk through a ``tamper`` function to model an attacker on the link.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from secmig.security.events import CONNECTION_CLOSED, NEED_DATA, ReceivedEvent, Role, SendableEvent
from secmig.security.protocol import MigrationConnection

Tamper = Callable[[Role, bytes], bytes]
"""Given the sending role and a chunk, return what the other end receives."""


@dataclass
class ConnectionPair:
    """Two connections joined by a recording, optionally tampering, in-memory link."""

    source: MigrationConnection
    destination: MigrationConnection
    tamper: Tamper | None = None
    wire: dict[Role, list[bytes]] = field(default_factory=lambda: {Role.SOURCE: [], Role.DESTINATION: []})
    events: dict[Role, list[ReceivedEvent]] = field(default_factory=lambda: {Role.SOURCE: [], Role.DESTINATION: []})

    def end(self, role: Role) -> MigrationConnection:
        """The connection playing ``role``."""
        return self.source if role is Role.SOURCE else self.destination

    def deliver(self, sender: Role, data: bytes) -> None:
        """Put ``data`` from ``sender`` on the link."""
        if not data:
            return
        if self.tamper is not None:
            data = self.tamper(sender, data)
        self.wire[sender].append(data)
        self.end(sender.peer).receive_data(data)

    def send(self, role: Role, event: SendableEvent) -> None:
        """``role`` sends ``event``; its bytes go on the link."""
        self.deliver(role, self.end(role).send(event))

    def pump(self, max_steps: int = 10_000) -> list[ReceivedEvent]:
        """Move bytes and collect events until both ends are idle; returns the new events (both ends)."""
        new: list[ReceivedEvent] = []
        for _ in range(max_steps):
            progressed = False
            for role in (Role.SOURCE, Role.DESTINATION):
                conn = self.end(role)
                out = conn.data_to_send()
                if out:
                    self.deliver(role, out)
                    progressed = True
                event = conn.next_event()
                if event is not NEED_DATA and event is not CONNECTION_CLOSED:
                    self.events[role].append(event)
                    new.append(event)
                    progressed = True
                out = conn.data_to_send()
                if out:
                    self.deliver(role, out)
                    progressed = True
            if not progressed:
                return new
        raise RuntimeError("link did not settle")  # pragma: no cover - a protocol bug, not an input

    def bytes_sent(self, role: Role) -> int:
        """Total bytes ``role`` put on the link."""
        return sum(len(c) for c in self.wire[role])
