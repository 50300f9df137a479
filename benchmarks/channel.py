"""Page-batch throughput of the migration channel: TLS 1.3 MigrationConnections vs the same framing in plain text.

Both paths do the same work per page — frame it with its SHA-256 digest, cut frames out of the byte
stream, verify every page digest on receipt — and the secure path adds TLS (AES-GCM) and the protocol
state machine. Two measurements:

- *both ends on one core*: bytes / (time in the source end + time in the destination end). Every page
  is hashed twice (SHA-256 at the source, again at the destination) and encrypted and decrypted on the
  same core, so this is the pessimistic figure.
- *per end (two hosts)*: bytes / the slower end's time — what a pipelined transfer between two machines
  would sustain, each end on its own core. (Two Python threads in one process do worse than either:
  every per-page hash releases and re-takes the GIL, and the hand-offs dominate.)

Run: ``python benchmarks/channel.py [--mib 512] [--batch-pages 256]``. Prints MB/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from secmig.security import (
    Cluster,
    MemoryAuditSink,
    MemoryBindingRegistry,
    MemoryNonceStore,
    MigrationConnection,
    MigrationRequest,
    Operation,
    PageBatch,
    Role,
    RoundStart,
    frames,
)
from secmig.security.events import NEED_DATA
from secmig.security.loopback import ConnectionPair

PAGE = 4096


def _secure_pair(root: Path, page_count: int) -> ConnectionPair:
    cluster = Cluster.create(root / "c")
    cluster.join("hv-a")
    cluster.join("hv-b")
    binding = cluster.issue_binding("vm-bench", "52:54:00:00:00:01", "hv-a")
    grant = cluster.issue_grant(Operation.MIGRATE, "vm-bench", "hv-a", "hv-b", current_binding=binding)
    request = MigrationRequest(Operation.MIGRATE, "vm-bench", PAGE, page_count, grant, binding)
    src = MigrationConnection.source(cluster.host_identity("hv-a"), cluster.trust(), request, audit=MemoryAuditSink())
    dst = MigrationConnection.destination(
        cluster.host_identity("hv-b"),
        cluster.trust(),
        nonces=MemoryNonceStore(),
        bindings=MemoryBindingRegistry(),
        audit=MemoryAuditSink(),
    )
    pair = ConnectionPair(src, dst)
    pair.pump()
    pair.send(Role.SOURCE, RoundStart(0))
    pair.pump()
    return pair


def _batches(memory: bytes, batch_pages: int) -> list[tuple[tuple[int, ...], memoryview]]:
    mv = memoryview(memory)
    step = batch_pages * PAGE
    return [(tuple(range(off // PAGE, (off + step) // PAGE)), mv[off : off + step]) for off in range(0, len(mv), step)]


Timing = tuple[int, float, float]
"""(bytes received, seconds spent in the source end, seconds spent in the destination end)."""


def secure_run(pair: ConnectionPair, batches: list[tuple[tuple[int, ...], memoryview]]) -> Timing:
    """Push every batch through the two TLS ends in one thread, timing each end separately."""
    src, dst = pair.source, pair.destination
    received, t_src, t_dst = 0, 0.0, 0.0
    clock = time.perf_counter
    for numbers, data in batches:
        t0 = clock()
        wire = src.send(PageBatch(0, numbers, data))
        t1 = clock()
        dst.receive_data(wire)
        while (ev := dst.next_event()) is not NEED_DATA:
            assert isinstance(ev, PageBatch)
            received += len(ev.data)
        t2 = clock()
        t_src, t_dst = t_src + t1 - t0, t_dst + t2 - t1
    return received, t_src, t_dst


def plain_run(batches: list[tuple[tuple[int, ...], memoryview]], page_count: int) -> Timing:
    """The same framing and digest checks without TLS or the state machine."""
    reader = frames.FrameReader()
    received, t_src, t_dst = 0, 0.0, 0.0
    clock = time.perf_counter
    for numbers, data in batches:
        t0 = clock()
        wire = frames.encode_page_batch(0, numbers, data, PAGE)
        t1 = clock()
        reader.feed(wire)
        while (frame := reader.next_frame()) is not None:
            batch = frames.decode_page_batch(frame[1], PAGE, page_count)
            if frames.first_bad_page(batch, PAGE) is not None:
                raise SystemExit("plain framing: digest mismatch")
            received += len(batch.data)
        t2 = clock()
        t_src, t_dst = t_src + t1 - t0, t_dst + t2 - t1
    return received, t_src, t_dst


def _best(runs: list[Timing]) -> tuple[float, float]:
    """(one-core rate, two-host rate) in bytes/s, best of the runs.

    One core: both ends share a thread, bytes / (source time + destination time). Two hosts: each end
    on its own machine, so a pipelined transfer runs at the pace of the slower end.
    """
    one = max(n / (ts + td) for n, ts, td in runs)
    two = max(n / max(ts, td) for n, ts, td in runs)
    return one, two


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="memory moved per measurement (MiB)")
    ap.add_argument("--batch-pages", type=int, default=256, help="pages per PAGE_BATCH frame")
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    args = ap.parse_args(argv)
    page_count = args.mib * 1024 * 1024 // PAGE
    memory = os.urandom(page_count * PAGE)
    batches = _batches(memory, min(args.batch_pages, frames.max_batch_pages(PAGE)))
    with tempfile.TemporaryDirectory() as tmp:
        secure_runs = [secure_run(_secure_pair(Path(tmp) / str(i), page_count), batches) for i in range(args.repeats)]
    plain_runs = [plain_run(batches, page_count) for _ in range(args.repeats)]
    assert all(n == len(memory) for n, _, _ in secure_runs + plain_runs)
    secure, plain = _best(secure_runs), _best(plain_runs)
    print(
        f"page-batch throughput: {args.mib} MiB of {PAGE}-byte pages, "
        f"{len(batches[0][0])} pages per batch, best of {args.repeats}"
    )
    print(f"{'':28} {'secure (TLS 1.3)':>18} {'plain framing':>15} {'ratio':>7}")
    for i, label in enumerate(("both ends on one core", "per end (two hosts)")):
        print(f"{label:28} {secure[i] / 1e6:13.0f} MB/s {plain[i] / 1e6:10.0f} MB/s {secure[i] / plain[i]:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
