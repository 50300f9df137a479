"""Admission of incoming migration connections: who gets a slot, for how long, and how much they may audit.

Before a peer has authenticated it has spent nothing but a TCP handshake, so nothing it can make the
agent hold may grow with how many connections it opens:

- **A cap on connections not yet authorized** (:data:`MAX_PENDING`). When a new one arrives at the cap,
  the oldest pending connection that has not sent a byte is dropped (else the oldest of all), so an idle
  flood costs the agent at most ``MAX_PENDING`` descriptors and never locks out a migration whose
  handshake is under way. Every eviction is counted.
- **A short handshake timeout** (:data:`PRE_AUTH_TIMEOUT_S`): a connection must be authorized within it.
- **A rate limit on audit rows from unauthenticated peers.** Every row a connection writes before its
  peer is authenticated goes through one shared budget (:data:`AUDIT_BUDGET` rows per
  :data:`AUDIT_INTERVAL_S`); rows over it are not written but counted, and one ``audit.rate_limited``
  summary row per interval records how many of each event were held back — counted, never silently dropped.
  Rows that can only follow a successful authentication (``handshake.ok``, ``grant.refused``) always pass,
  and ``handshake.ok`` marks the connection authenticated.

Must not: read or write the socket itself (it is given a callback that drops a connection), decide
anything about the protocol, or know drivers. Used by :class:`~secmig.agent.daemon.Agent` in
``_on_connection`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from secmig.errors import SecmigError
from secmig.security.audit import AuditSink, Decision, Detail

MAX_PENDING = 64
"""Connections accepted but not yet authorized, at most (each holds one descriptor and a TLS object)."""
PRE_AUTH_TIMEOUT_S = 5.0
"""A connection must be authorized within this (a local TLS handshake plus checks takes milliseconds)."""
AUDIT_BUDGET = 50
"""Audit rows from unauthenticated peers written per interval; the rest are counted in a summary row."""
AUDIT_INTERVAL_S = 10.0
_AUTHENTICATED_EVENTS = frozenset({"handshake.ok", "grant.refused"})
"""Rows that the protocol writes only once the peer's Vsignature, certificate and proof have been checked."""
SUMMARY_EVENT = "audit.rate_limited"


@dataclass(eq=False)
class Ticket:
    """One admitted connection: its slot, its audit gate, and how to drop it."""

    number: int
    peer: str
    drop: Callable[[], None]
    """Closes the connection at once (the agent passes ``transport.abort``)."""
    admission: Admission
    bytes_in: Callable[[], int] = lambda: 0
    """How many bytes the peer has sent (an idle connection is evicted first)."""
    authenticated: bool = False
    evicted: bool = False
    audit: _TicketAudit = field(init=False)

    def __post_init__(self) -> None:
        self.audit = _TicketAudit(self)

    def mark_authenticated(self) -> None:
        """The peer is authenticated: its rows go straight to the log from now on, and it leaves the cap."""
        self.authenticated = True
        self.admission._release(self)

    def release(self) -> None:
        """The connection ended: free its slot (idempotent)."""
        self.admission._release(self)


class _TicketAudit:
    """The audit sink a connection writes through: straight to the log once authenticated, else rate-limited."""

    def __init__(self, ticket: Ticket) -> None:
        self._ticket = ticket

    def record(self, event: str, decision: Decision, subject: str, detail: Detail | None = None) -> None:
        ticket = self._ticket
        if event == "handshake.ok" and decision is Decision.ALLOW:
            ticket.mark_authenticated()
        if ticket.authenticated or event in _AUTHENTICATED_EVENTS:
            ticket.admission.audit.record(event, decision, subject, detail)
        else:
            ticket.admission.record_unauthenticated(event, decision, subject, detail)


class Admission:
    """The migration listener's admission policy (one per agent)."""

    def __init__(
        self,
        audit: AuditSink,
        *,
        max_pending: int = MAX_PENDING,
        handshake_timeout_s: float = PRE_AUTH_TIMEOUT_S,
        audit_budget: int = AUDIT_BUDGET,
        audit_interval_s: float = AUDIT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_pending < 1 or handshake_timeout_s <= 0 or audit_budget < 0 or audit_interval_s <= 0:
            raise ValueError("admission limits must be positive")
        self.audit = audit
        self.max_pending = max_pending
        self.handshake_timeout_s = handshake_timeout_s
        self.audit_budget = audit_budget
        self.audit_interval_s = audit_interval_s
        self._clock = clock
        self._logger = logger or logging.getLogger("secmig.agent.admission")
        self._pending: dict[int, Ticket] = {}  # insertion order = age
        self._numbers = itertools.count(1)
        self.stats: Counter[str] = Counter()
        self._window_start = clock()
        self._window_rows = 0
        self._held_back: Counter[str] = Counter()
        self._flush_timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        """Connections admitted and not yet authorized."""
        return len(self._pending)

    def admit(self, peer: str, drop: Callable[[], None], bytes_in: Callable[[], int] = lambda: 0) -> Ticket:
        """A slot for a new connection from ``peer``; at the cap, the oldest idle (else oldest) one is dropped."""
        self.stats["admitted"] += 1
        if len(self._pending) >= self.max_pending:
            victim = next((t for t in self._pending.values() if t.bytes_in() == 0), None)
            victim = victim or next(iter(self._pending.values()))
            self._evict(victim)
        ticket = Ticket(next(self._numbers), peer, drop, self, bytes_in)
        self._pending[ticket.number] = ticket
        return ticket

    def _evict(self, ticket: Ticket) -> None:
        self._release(ticket)
        ticket.evicted = True
        self.stats["evicted"] += 1
        self.record_unauthenticated(
            "connection.evicted",
            Decision.REFUSE,
            ticket.peer,
            {"reason": f"{self.max_pending} connections were waiting for authorization"},
        )
        with contextlib.suppress(Exception):  # a transport already gone is already dropped
            ticket.drop()

    def _release(self, ticket: Ticket) -> None:
        self._pending.pop(ticket.number, None)

    # -- rate-limited audit ----------------------------------------------------------------------------

    def record_unauthenticated(self, event: str, decision: Decision, subject: str, detail: Detail | None) -> None:
        """Write a row caused by an unauthenticated peer if the interval's budget allows, else count it."""
        now = self._clock()
        if now - self._window_start >= self.audit_interval_s:
            self.flush()
            self._window_start, self._window_rows = now, 0
        if self._window_rows < self.audit_budget:
            self._window_rows += 1
            self.audit.record(event, decision, subject, detail)
            return
        self._held_back[event] += 1
        self.stats["audit_rows_held_back"] += 1
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (tests driving it directly): the next row or an explicit flush() writes it
        delay = max(0.0, self._window_start + self.audit_interval_s - self._clock())
        self._flush_timer = loop.call_later(delay, self._timer_flush)

    def _timer_flush(self) -> None:
        self._flush_timer = None
        try:
            self.flush()
        except SecmigError as err:  # the log is closed (agent stopping): say so, do not crash the loop
            self._logger.warning("cannot write the audit summary: %s", err)

    def flush(self) -> None:
        """Write one summary row for the rows held back so far (none when nothing was)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._held_back:
            return
        held, self._held_back = self._held_back, Counter()
        detail: Detail = {"rows": sum(held.values()), "interval_s": self.audit_interval_s}
        detail.update({f"event:{name}": count for name, count in sorted(held.items())})
        self.audit.record(SUMMARY_EVENT, Decision.INFO, "unauthenticated-peers", detail)

    def close(self) -> None:
        """Write what is held back; cancel the timer."""
        self.flush()
