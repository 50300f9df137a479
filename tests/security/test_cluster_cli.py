"""The cluster CLI and on-disk identities: key permissions, revocation, bindings, nonce persistence."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from secmig.cli import main
from secmig.errors import AuthenticationError, SecurityError
from secmig.security import Cluster, Operation
from secmig.security.location import LocationAction, verify_location
from secmig.security.store import SqliteHostState


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_init_join_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """init, join, list and revoke work end to end, keys are 0600 and never printed."""
    root = tmp_path / "c"
    assert main(["cluster", "init", str(root), "--name", "lab"]) == 0
    assert main(["cluster", "join", "hv-a", "--mac", "52:54:00:AA:BB:01", "-c", str(root)]) == 0
    assert main(["cluster", "join", "hv-b", "-c", str(root)]) == 0
    assert main(["cluster", "revoke", "hv-b", "--reason", "decommissioned", "-c", str(root)]) == 0
    assert main(["cluster", "list", "-c", str(root)]) == 0
    out = capsys.readouterr().out
    assert "52:54:00:aa:bb:01" in out and "revoked" in out
    assert "PRIVATE KEY" not in out
    for key in (root / "authority.key", root / "hosts" / "hv-a" / "host.key"):
        assert _mode(key) == 0o600
        assert key.read_text().split("\n", 1)[0] not in out
    assert Cluster(root).revocations().is_revoked("hv-b")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input gives exit 2 and one line naming the value, no traceback."""
    root = tmp_path / "c"
    assert main(["cluster", "init", str(root)]) == 0
    capsys.readouterr()
    assert main(["cluster", "join", "hv-a", "--mac", "zz:00", "-c", str(root)]) == 2
    err = capsys.readouterr().err
    assert "zz:00" in err and "Traceback" not in err
    assert main(["cluster", "list", "-c", str(tmp_path / "nope")]) == 2


def test_cli_grant_and_check_binding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cluster bind` and `cluster grant` write signed files; `check-binding` says CONTINUE or DESTROY."""
    root = tmp_path / "c"
    main(["cluster", "init", str(root)])
    main(["cluster", "join", "hv-a", "-c", str(root)])
    main(["cluster", "join", "hv-b", "-c", str(root)])
    b = tmp_path / "b.json"
    g = tmp_path / "g.json"
    assert (
        main(["cluster", "bind", "vm-1", "--mac", "52:54:00:00:00:01", "--host", "hv-a", "-o", str(b), "-c", str(root)])
        == 0
    )
    assert (
        main(
            [
                "cluster",
                "grant",
                "migrate",
                "vm-1",
                "--from",
                "hv-a",
                "--to",
                "hv-b",
                "--binding",
                str(b),
                "-o",
                str(g),
                "-c",
                str(root),
            ]
        )
        == 0
    )
    base = ["cluster", "check-binding", str(b), "--vm", "vm-1", "--mac", "52:54:00:00:00:01", "-c", str(root)]
    assert main([*base, "--host", "hv-a"]) == 0
    assert main([*base, "--host", "hv-b"]) == 1
    assert "DESTROY" in capsys.readouterr().out


def test_group_readable_key_refused(tmp_path: Path) -> None:
    """A private key readable by others is refused on load, as ssh does."""
    c = Cluster.create(tmp_path / "c")
    c.join("hv-a")
    key = tmp_path / "c" / "hosts" / "hv-a" / "host.key"
    key.chmod(0o644)
    with pytest.raises(SecurityError):
        c.host_identity("hv-a")


def test_revoked_host_cannot_rejoin(tmp_path: Path) -> None:
    """Revocation is final for the host id."""
    c = Cluster.create(tmp_path / "c")
    c.join("hv-a")
    c.revoke("hv-a")
    with pytest.raises(AuthenticationError):
        c.join("hv-a")


def test_tampered_revocation_list_refused(tmp_path: Path) -> None:
    """Removing a host from revocations.json without the authority key is detected on every read."""
    c = Cluster.create(tmp_path / "c")
    c.join("hv-a")
    c.revoke("hv-a")
    path = tmp_path / "c" / "revocations.json"
    path.write_text(path.read_text().replace('"hv-a"', '"hv-z"'))
    with pytest.raises(AuthenticationError):
        c.trust()


def test_location_verdicts(tmp_path: Path) -> None:
    """The verification module: valid binding continues; wrong host, MAC, VM, stale epoch or forgery destroys."""
    c = Cluster.create(tmp_path / "c")
    c.join("hv-a")
    roots = c.trust().roots()
    b = c.issue_binding("vm-1", "52:54:00:00:00:01", "hv-a", epoch=3)
    ok = verify_location(b, roots, vm_id="vm-1", vm_mac="52:54:00:00:00:01", host_id="hv-a")
    assert ok.action is LocationAction.CONTINUE
    bad = [
        verify_location(b, roots, vm_id="vm-1", vm_mac="52:54:00:00:00:01", host_id="hv-x"),
        verify_location(b, roots, vm_id="vm-1", vm_mac="52:54:00:00:00:02", host_id="hv-a"),
        verify_location(b, roots, vm_id="vm-2", vm_mac="52:54:00:00:00:01", host_id="hv-a"),
        verify_location(b, roots, vm_id="vm-1", vm_mac="52:54:00:00:00:01", host_id="hv-a", latest_epoch=4),
        verify_location(None, roots, vm_id="vm-1", vm_mac="52:54:00:00:00:01", host_id="hv-a"),
    ]
    from dataclasses import replace

    bad.append(verify_location(replace(b, epoch=9), roots, vm_id="vm-1", vm_mac="52:54:00:00:00:01", host_id="hv-a"))
    assert all(v.action is LocationAction.DESTROY for v in bad)


def test_sqlite_nonce_store_survives_restart(tmp_path: Path) -> None:
    """A consumed nonce stays consumed after the host state is reopened."""
    path = tmp_path / "state.db"
    now = time.time()
    state = SqliteHostState(path)
    assert state.consume(b"n" * 16, int(now) + 60, now)
    state.close()
    state = SqliteHostState(path)
    assert not state.consume(b"n" * 16, int(now) + 60, now)
    assert state.consume(b"m" * 16, int(now) + 60, now)


def test_grant_signature_covers_next_binding(tmp_path: Path) -> None:
    """Swapping the next binding inside a grant breaks the grant's signature."""
    from dataclasses import replace

    from secmig.errors import AuthorizationError
    from secmig.security.grants import check_grant

    c = Cluster.create(tmp_path / "c")
    c.join("hv-a")
    c.join("hv-b")
    b = c.issue_binding("vm-1", "52:54:00:00:00:01", "hv-a")
    g = c.issue_grant(Operation.MIGRATE, "vm-1", "hv-a", "hv-b", current_binding=b)
    assert g.next_binding is not None
    forged = replace(g, next_binding=replace(g.next_binding, host_id="hv-c"))
    kwargs = {
        "now": time.time(),
        "operation": Operation.MIGRATE,
        "vm_id": "vm-1",
        "source_host": "hv-a",
        "destination_host": "hv-b",
        "current_binding": b,
    }
    check_grant(g, c.trust().roots(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(AuthorizationError):
        check_grant(forged, c.trust().roots(), **kwargs)  # type: ignore[arg-type]
