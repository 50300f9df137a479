"""What a killed agent must not leave behind: copies of the host's private key for QEMU's TLS."""

from __future__ import annotations

import stat
from pathlib import Path

from agent_helpers import (
    host_config,
    run,
    running,
)

from secmig.agent.drivers.qemu import TLS_DIR, write_tls_dir
from secmig.security import Cluster
from secmig.security.pki import certificate_pem

_HASH_BITS = 22


def test_qemu_tls_key_copies_are_private_and_swept_at_start(cluster_dir: Path, cluster: Cluster, base: Path) -> None:
    """qemu-tls credentials go to a 0700 folder under the state dir, files 0600; a restart removes leftovers."""

    async def body() -> None:
        cfg = host_config(cluster_dir, "hv-a", base)
        identity = cluster.host_identity("hv-a")
        d = write_tls_dir(identity, certificate_pem(cluster.trust().ca_certificate), "client", cfg.state_dir)
        assert d.parent == cfg.state_dir / TLS_DIR
        for p in (d.parent, d):
            assert stat.S_IMODE(p.stat().st_mode) == 0o700
        assert sorted(f.name for f in d.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in d.iterdir())
        assert b"PRIVATE KEY" in (d / "client-key.pem").read_bytes()
        async with running(cfg):  # a killed agent's leftover is gone once it starts again
            assert not d.exists() and list((cfg.state_dir / TLS_DIR).iterdir()) == []

    run(body)
