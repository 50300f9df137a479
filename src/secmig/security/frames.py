"""The migration protocol's framing: every message is ``type (1 byte) | length (4 bytes, big-endian) | payload``.

Inside the TLS channel these frames carry the handshake documents and the memory. A page batch keeps
its parts in three contiguous arrays so that both ends touch each page with one slice and one hash
call and no per-page objects::

    round u32 | count u32 | page numbers count×u64 | SHA-256 digests count×32 | contents count×page_size

Decoders (and :class:`FrameReader`) read what the peer sent: they raise
:class:`~secmig.errors.RemoteProtocolError` and nothing else, whatever the bytes. Encoders build what
this end sends: a frame they cannot encode is this end's bug, a :class:`~secmig.errors.LocalProtocolError`.
This module is also the "plain framing" the channel benchmark compares TLS against.

Must not: know states, roles or TLS (who may send which frame when is :mod:`.state`'s table); no I/O.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from secmig.errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">BI")
HEADER_BYTES = HEADER.size
MAX_FRAME_PAYLOAD = 8 * 1024 * 1024 + 64 * 1024
"""Largest payload accepted: 8 MiB of pages plus their numbers and digests (bounds buffering per frame)."""
MAX_PAGE_SIZE = 2 * 1024 * 1024
MAX_PAGE_COUNT = 2**40
DIGEST_BYTES = 32
MAX_REASON_BYTES = 1024
_BATCH_HEAD = struct.Struct(">II")
_U32 = struct.Struct(">I")
_ROUND_END = struct.Struct(">IQ")
_MEMORY_TAG = b"secmig-memory/v1\x00"


class FrameType(enum.IntEnum):
    """Every frame the protocol knows; the state table in :mod:`.state` says who may send which when."""

    SOURCE_HELLO = 0x01
    DESTINATION_HELLO = 0x02
    AUTHORIZED = 0x03
    ROUND_START = 0x10
    PAGE_BATCH = 0x11
    ROUND_END = 0x12
    STOP_AND_COPY = 0x13
    DEVICE_STATE = 0x14
    COMMIT = 0x15
    COMMITTED = 0x16
    CONFIRM = 0x17
    PREPARED = 0x18
    ABORT = 0x1F


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


def page_digest(page: bytes | bytearray | memoryview) -> bytes:
    """The digest of one page's contents."""
    return hashlib.sha256(page).digest()


def page_digests(data: bytes | bytearray | memoryview, page_size: int) -> bytes:
    """Concatenated digests of consecutive pages of ``data``."""
    mv = memoryview(data)
    sha = hashlib.sha256
    return b"".join([sha(mv[off : off + page_size]).digest() for off in range(0, len(mv), page_size)])


def memory_digest_from_table(table: bytes | bytearray, page_size: int) -> bytes:
    """The digest of a whole memory, given the per-page digest table in page order."""
    count = len(table) // DIGEST_BYTES
    return hashlib.sha256(_MEMORY_TAG + struct.pack(">IQ", page_size, count) + bytes(table)).digest()


def memory_digest(memory: bytes | bytearray | memoryview, page_size: int) -> bytes:
    """The final memory digest both ends compare: a hash over every page's digest (so a page is hashed once)."""
    if len(memory) % page_size:
        raise LocalProtocolError(f"memory of {len(memory)} bytes is not a whole number of {page_size}-byte pages")
    return memory_digest_from_table(page_digests(memory, page_size), page_size)


def zero_page_table(page_size: int, page_count: int) -> bytearray:
    """A digest table for memory that is all zeros (where a destination starts): one allocation of
    ``32 × page_count`` bytes, made only once the claimed geometry is authorized."""
    return bytearray(page_digest(bytes(page_size))) * page_count


def encode_frame(frame_type: FrameType, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One frame on the wire."""
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise LocalProtocolError(f"frame payload of {len(payload)} bytes exceeds the cap of {MAX_FRAME_PAYLOAD}")
    return HEADER.pack(frame_type, len(payload)) + bytes(payload)


def encode_page_batch(
    round_no: int,
    page_numbers: tuple[int, ...] | list[int],
    data: bytes | bytearray | memoryview,
    page_size: int,
    digests: bytes | None = None,
) -> bytes:
    """A PAGE_BATCH frame; computes the digests when not given. LocalProtocolError when it cannot be built."""
    count = len(page_numbers)
    if count == 0 or len(data) != count * page_size:
        raise LocalProtocolError(f"{count} page numbers but {len(data)} bytes of {page_size}-byte pages")
    if digests is None:
        digests = page_digests(data, page_size)
    elif len(digests) != count * DIGEST_BYTES:
        raise LocalProtocolError("one 32-byte digest per page is required")
    length = _BATCH_HEAD.size + count * (8 + DIGEST_BYTES + page_size)
    if length > MAX_FRAME_PAYLOAD:
        raise LocalProtocolError(
            f"batch of {count} pages exceeds the frame cap; send at most {max_batch_pages(page_size)}"
        )
    with _encoding("page batch"):
        head = _BATCH_HEAD.pack(round_no, count) + struct.pack(f">{count}Q", *page_numbers)
    return b"".join((HEADER.pack(FrameType.PAGE_BATCH, length), head, digests, data))


@contextlib.contextmanager
def _encoding(what: str) -> Iterator[None]:
    """A number that does not fit its field is this end's bug: struct's error becomes LocalProtocolError."""
    try:
        yield
    except struct.error as err:
        raise LocalProtocolError(f"{what}: {err}") from err


def max_batch_pages(page_size: int) -> int:
    """The most pages of ``page_size`` bytes one PAGE_BATCH frame may carry."""
    return (MAX_FRAME_PAYLOAD - _BATCH_HEAD.size) // (8 + DIGEST_BYTES + page_size)


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A PAGE_BATCH payload split into its arrays (views into the payload, no copies)."""

    round_no: int
    page_numbers: tuple[int, ...]
    digests: memoryview
    data: memoryview


def decode_page_batch(payload: bytes | bytearray | memoryview, page_size: int, page_count: int) -> DecodedBatch:
    """Split a PAGE_BATCH payload; RemoteProtocolError when its shape or page numbers are wrong."""
    mv = memoryview(payload)
    if len(mv) < _BATCH_HEAD.size:
        raise RemoteProtocolError("page batch: shorter than its header")
    round_no, count = _BATCH_HEAD.unpack_from(mv)
    if count == 0 or len(mv) != _BATCH_HEAD.size + count * (8 + DIGEST_BYTES + page_size):
        raise RemoteProtocolError(f"page batch: length {len(mv)} does not fit {count} pages of {page_size} bytes")
    numbers_end = _BATCH_HEAD.size + 8 * count
    numbers = struct.unpack_from(f">{count}Q", mv, _BATCH_HEAD.size)
    if max(numbers) >= page_count:
        raise RemoteProtocolError(f"page batch: page number {max(numbers)} beyond the VM's {page_count} pages")
    digests_end = numbers_end + DIGEST_BYTES * count
    return DecodedBatch(round_no, numbers, mv[numbers_end:digests_end], mv[digests_end:])


def first_bad_page(batch: DecodedBatch, page_size: int) -> int | None:
    """Index of the first page whose contents do not match its digest, or None when all match."""
    data, digests, sha = batch.data, batch.digests, hashlib.sha256
    for i in range(len(batch.page_numbers)):
        if (
            sha(data[i * page_size : (i + 1) * page_size]).digest()
            != digests[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]
        ):
            return i
    return None


def decode_u32(payload: bytes | bytearray | memoryview, what: str) -> int:
    """A payload that is exactly one big-endian u32."""
    if len(payload) != _U32.size:
        raise RemoteProtocolError(f"{what}: expected 4 bytes, got {len(payload)}")
    value: int = _U32.unpack(payload)[0]
    return value


def encode_u32(value: int) -> bytes:
    """Payload of ROUND_START."""
    with _encoding("u32"):
        return _U32.pack(value)


def encode_round_end(round_no: int, pages: int) -> bytes:
    """Payload of ROUND_END."""
    with _encoding("round end"):
        return _ROUND_END.pack(round_no, pages)


def decode_round_end(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Payload of ROUND_END → (round, pages sent in it)."""
    if len(payload) != _ROUND_END.size:
        raise RemoteProtocolError(f"round end: expected {_ROUND_END.size} bytes, got {len(payload)}")
    round_no, pages = _ROUND_END.unpack(payload)
    return int(round_no), int(pages)


def decode_digest(payload: bytes | bytearray | memoryview, what: str) -> bytes:
    """A payload that is exactly one 32-byte digest."""
    if len(payload) != DIGEST_BYTES:
        raise RemoteProtocolError(f"{what}: expected a {DIGEST_BYTES}-byte digest, got {len(payload)} bytes")
    return bytes(payload)


def encode_abort(code: int, reason: str) -> bytes:
    """Payload of ABORT: a code byte and a UTF-8 reason, truncated to the cap."""
    if not 0 <= code <= 255:
        raise LocalProtocolError(f"abort code {code} does not fit a byte")
    return bytes([code]) + reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]


def decode_abort(payload: bytes | bytearray | memoryview) -> tuple[int, str]:
    """Payload of ABORT → (code, reason); undecodable text is replaced, not refused."""
    if not 1 <= len(payload) <= 1 + MAX_REASON_BYTES:
        raise RemoteProtocolError(f"abort: payload of {len(payload)} bytes")
    return payload[0], bytes(payload[1:]).decode("utf-8", "replace")


class FrameReader:
    """Cuts a byte stream into frames: the one frame reader, used by the connection and the benchmark.

    Bytes go straight into the buffer of the frame they belong to — header first, then a payload buffer of
    exactly the announced length — so a frame is never copied after it arrives, and a finished frame's
    payload is never reused (events may hold views into it). Two ways to fill it: :meth:`feed` copies
    bytes in; :meth:`buffer` and :meth:`advance` let a reader such as TLS decrypt directly into place.

    The named cap (h11's ``max_incomplete_event_size``): a header announcing more than
    ``max_payload_bytes`` is refused before anything is allocated, so the incomplete frame holds at most
    ``HEADER_BYTES + max_payload_bytes`` (:attr:`max_buffered_bytes`).
    """

    __slots__ = ("_error", "_got", "_header", "_payload", "_ready", "_type", "max_payload_bytes")

    def __init__(self, max_payload_bytes: int = MAX_FRAME_PAYLOAD) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._header = bytearray(HEADER_BYTES)
        self._payload: bytearray | None = None
        """The payload being filled; None while the header is."""
        self._type = FrameType.ABORT
        self._got = 0
        """Bytes of the header (or, once it is parsed, of the payload) received so far."""
        self._ready: deque[tuple[FrameType, bytearray]] = deque()
        self._error: RemoteProtocolError | None = None

    @property
    def max_buffered_bytes(self) -> int:
        """The most bytes an incomplete frame can hold."""
        return HEADER_BYTES + self.max_payload_bytes

    def buffer(self) -> memoryview:
        """Where the next bytes of the stream belong (never empty): the rest of the header or the payload."""
        if self._payload is None:
            return memoryview(self._header)[self._got :]
        return memoryview(self._payload)[self._got :]

    def advance(self, n: int) -> None:
        """``n`` bytes were written at the start of :meth:`buffer`; RemoteProtocolError on a bad header."""
        self._got += n
        if self._payload is None:
            if self._got < HEADER_BYTES:
                return
            self._type, length = parse_header(self._header, self.max_payload_bytes)
            self._payload, self._got = bytearray(length), 0
        if self._got == len(self._payload):
            self._ready.append((self._type, self._payload))
            self._payload, self._got = None, 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copied into their frames); a bad header is reported by :meth:`next_frame`."""
        src = memoryview(data).cast("B")
        while src and self._error is None:
            dst = self.buffer()
            n = min(len(dst), len(src))
            dst[:n] = src[:n]
            src = src[n:]
            try:
                self.advance(n)
            except RemoteProtocolError as err:
                self._error = err  # the stream cannot be cut any further

    def next_frame(self) -> tuple[FrameType, bytearray] | None:
        """The next complete frame, or None; RemoteProtocolError once the frames before a bad header are taken."""
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def read_from(self, recv_into: Callable[[memoryview], int]) -> tuple[FrameType, bytearray] | None:
        """The next complete frame, pulling bytes with ``recv_into`` (fills a view, returns 0 when it has none).

        It never asks for more than the current frame needs, so nothing is buffered beyond one frame.
        """
        while not self._ready:
            n = recv_into(self.buffer())
            if n == 0:
                return None
            self.advance(n)
        return self._ready.popleft()


def parse_header(header: bytes | bytearray | memoryview, max_payload: int = MAX_FRAME_PAYLOAD) -> tuple[FrameType, int]:
    """Check a frame header; RemoteProtocolError on an unknown type or a length over ``max_payload``."""
    ftype, length = HEADER.unpack_from(header)
    if ftype not in _KNOWN_TYPES:
        raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}")
    if length > max_payload:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds the cap of {max_payload}")
    return FrameType(ftype), length
