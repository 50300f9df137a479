"""The security core's sans-IO :class:`~secmig.security.protocol.MigrationConnection` over asyncio streams.

Shaped like qemu.qmp's ``AsyncProtocol``: a :class:`Runstate` with guards, one reader task that turns
bytes into protocol events and puts them on a bounded queue (so a slow consumer pushes back on the
TCP window instead of buffering a VM's memory), and a ``send`` that encrypts and drains. Every byte in
and out is counted. The channel never interprets events; the migration drivers do.

What it must not do: decide anything about security. Every check is the connection's.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable

from secmig.errors import ChannelClosed, RemoteProtocolError, StateError
from secmig.security.events import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Aborted,
    Authorized,
    ReceivedEvent,
    SendableEvent,
)
from secmig.security.protocol import MigrationConnection

READ_CHUNK = 1 << 20
QUEUE_EVENTS = 16
"""Events buffered ahead of the consumer (each at most one 8 MiB frame)."""


class Runstate(enum.Enum):
    """Where a channel is."""

    IDLE = "idle"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"
    CLOSED = "closed"


class SecureChannel:
    """One migration's authenticated channel over a TCP stream."""

    def __init__(
        self,
        conn: MigrationConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        logger: logging.Logger,
        *,
        idle_timeout_s: float = 30.0,
        on_bytes: Callable[[int, int], None] | None = None,
    ) -> None:
        self.conn = conn
        self.logger = logger
        self.runstate = Runstate.IDLE
        self.bytes_in = 0
        self.bytes_out = 0
        self._reader = reader
        self._writer = writer
        self._idle_timeout_s = idle_timeout_s
        self._on_bytes = on_bytes
        self._events: asyncio.Queue[ReceivedEvent | BaseException] = asyncio.Queue(QUEUE_EVENTS)
        self._reader_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader task (the source's first flush sends its ClientHello)."""
        if self.runstate is not Runstate.IDLE:
            raise StateError(f"channel is {self.runstate.value}, not idle")
        self.runstate = Runstate.RUNNING
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"reader {self.logger.name}")

    async def close(self) -> None:
        """Flush what the connection still has to say (an ABORT, an alert), then close the socket."""
        if self.runstate in (Runstate.DISCONNECTING, Runstate.CLOSED):
            return
        self.runstate = Runstate.DISCONNECTING
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(self._flush(), 2.0)
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)
        self.runstate = Runstate.CLOSED
        self.logger.debug("closed: %d bytes in, %d bytes out", self.bytes_in, self.bytes_out)

    # -- bytes ----------------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._write_lock:
            self._writer.write(data)
            self.bytes_out += len(data)
            if self._on_bytes is not None:
                self._on_bytes(0, len(data))
            await self._writer.drain()

    async def _flush(self) -> None:
        await self._write(self.conn.data_to_send())

    async def _read_loop(self) -> None:
        conn = self.conn
        try:
            await self._flush()  # the source's ClientHello
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as err:
                    await self._flush()  # the connection queued an ABORT for the peer
                    await self._events.put(err)
                    return
                out = conn.data_to_send()
                if out:
                    await self._write(out)
                if event is NEED_DATA:
                    try:
                        data = await asyncio.wait_for(self._reader.read(READ_CHUNK), self._idle_timeout_s)
                    except TimeoutError:
                        await self._events.put(ChannelClosed(f"peer silent for {self._idle_timeout_s:.0f} s"))
                        return
                    self.bytes_in += len(data)
                    if data and self._on_bytes is not None:
                        self._on_bytes(len(data), 0)
                    conn.receive_data(data)
                    continue
                if event is CONNECTION_CLOSED:
                    await self._events.put(ChannelClosed("migration ended"))
                    return
                self.logger.debug("<- %s", type(event).__name__)
                await self._events.put(event)
        except (OSError, ConnectionError) as err:
            await self._events.put(ChannelClosed(f"connection lost: {err}"))

    # -- events ---------------------------------------------------------------------------------------

    async def next_event(self, timeout_s: float | None = None) -> ReceivedEvent:
        """The next protocol event; raises RemoteProtocolError or ChannelClosed when the channel failed."""
        item = await (self._events.get() if timeout_s is None else asyncio.wait_for(self._events.get(), timeout_s))
        if isinstance(item, BaseException):
            # Leave the failure in place for anyone else still waiting.
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(item)
            raise item
        return item

    async def send(self, event: SendableEvent) -> None:
        """Send one event (LocalProtocolError from the connection when the state forbids it)."""
        if self.runstate is not Runstate.RUNNING:
            raise StateError(f"channel is {self.runstate.value}: cannot send {type(event).__name__}")
        data = self.conn.send(event)
        try:
            await self._write(data)
        except (OSError, ConnectionError) as err:
            raise ChannelClosed(f"connection lost while sending: {err}") from err

    async def authorized(self, timeout_s: float) -> Authorized:
        """Wait for the handshake's outcome: the Authorized event, or the refusal as an exception."""
        try:
            event = await self.next_event(timeout_s)
        except TimeoutError as err:
            raise ChannelClosed(f"no handshake within {timeout_s:.0f} s") from err
        if isinstance(event, Authorized):
            return event
        if isinstance(event, Aborted):
            raise event.as_error()
        raise RemoteProtocolError(f"expected the handshake to end, got {type(event).__name__}")
