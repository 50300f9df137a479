"""The location register: grants only against the current epoch, one decision per move, stale bindings refused."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_helpers import PAGE, VM, VM_MAC, Setup, run_precopy

from secmig.errors import AuthorizationError, LocalProtocolError, RegisterConflict, RegisterUnavailable
from secmig.security import Cluster, Operation, State
from secmig.security.handshake import GrantAuthorizer
from secmig.security.protocol import MigrationConnection
from secmig.security.register import Move, MoveOutcome, RegisterAuthorizer, RegisterClient, RegisterService
from secmig.security.register import SqliteRegister as Register


@pytest.fixture
def fresh(tmp_path: Path) -> Cluster:
    """A cluster of its own (the register is per cluster folder)."""
    cluster = Cluster.create(tmp_path / "c")
    for host in ("hv-a", "hv-b", "hv-c"):
        cluster.join(host)
    return cluster


def _move(cluster: Cluster, dst: str, current: object) -> Move:
    grant = cluster.issue_grant(Operation.MIGRATE, VM, "hv-a", dst, current_binding=current)  # type: ignore[arg-type]
    assert grant.next_binding is not None
    return Move(current, grant.next_binding, grant.nonce)  # type: ignore[arg-type]


def test_one_decision_per_move_and_one_move_per_epoch(fresh: Cluster) -> None:
    """Two grants from epoch 0: the first commit moves the VM, the second is refused; resolve agrees with both."""
    b0 = fresh.issue_binding(VM, VM_MAC, "hv-a")
    to_b, to_c = _move(fresh, "hv-b", b0), _move(fresh, "hv-c", b0)
    reg = fresh.location_register()
    assert reg.commit(to_b, "hv-a") == to_b.next
    assert reg.commit(to_b, "hv-a") == to_b.next  # idempotent: a retried commit gets the same answer
    with pytest.raises(RegisterConflict):
        reg.commit(to_c, "hv-a")
    assert reg.resolve(to_b, "hv-b") is MoveOutcome.MOVED
    assert reg.resolve(to_c, "hv-c") is MoveOutcome.STAYED
    assert reg.current(VM) == to_b.next


def test_resolve_first_fences_the_commit(fresh: Cluster) -> None:
    """A destination in doubt that asks first records STAYED: the source's late commit is refused."""
    move = _move(fresh, "hv-b", fresh.issue_binding(VM, VM_MAC, "hv-a"))
    reg = fresh.location_register()
    assert reg.resolve(move, "hv-b") is MoveOutcome.STAYED
    with pytest.raises(RegisterConflict):
        reg.commit(move, "hv-a")
    with pytest.raises(AuthorizationError):
        reg.resolve(move, "hv-c")  # a host that takes no part in the move cannot decide it


def test_authority_grants_only_against_the_current_binding(fresh: Cluster) -> None:
    """Once the VM moved, a grant presenting its old binding is refused by the authority."""
    b0 = fresh.issue_binding(VM, VM_MAC, "hv-a")
    fresh.location_register().commit(_move(fresh, "hv-b", b0), "hv-a")
    with pytest.raises(RegisterConflict, match="stale"):
        fresh.issue_grant(Operation.MIGRATE, VM, "hv-a", "hv-c", current_binding=b0)


def test_stale_binding_is_refused_at_a_host_that_never_saw_the_vm(fresh: Cluster) -> None:
    """A grant issued at epoch 0, used after the VM moved on, is refused at a fresh host before any page."""
    setup = Setup(fresh, destination_host="hv-c")
    b0 = setup.binding()
    stale_grant = fresh.issue_grant(Operation.MIGRATE, VM, "hv-a", "hv-c", current_binding=b0)
    fresh.location_register().commit(_move(fresh, "hv-b", b0), "hv-a")  # meanwhile, the VM went to hv-b
    pair = setup.pair(stale_grant, b0)
    pair.destination = MigrationConnection.destination(
        fresh.host_identity("hv-c"),
        fresh.trust,
        audit=setup.destination_audit,
        authorizer=RegisterAuthorizer(GrantAuthorizer(setup.nonces, setup.bindings), fresh.location_register()),
    )
    pair.pump()
    with pytest.raises(LocalProtocolError):  # the source, refused, may not send a page
        run_precopy(pair, bytearray(setup.page_count * PAGE), PAGE, rounds=1)
    assert pair.destination.state is State.ABORTED and pair.destination.page_bytes_received == 0
    assert "grant.refused:refuse" in setup.destination_audit.events()


@pytest.fixture
def service(fresh: Cluster) -> Iterator[tuple[Cluster, tuple[str, int]]]:
    """The register served over TLS by the authority in a thread of its own (real TCP)."""
    fresh.join("register")
    loop = asyncio.new_event_loop()
    svc = RegisterService(Register(fresh.root / "register.db"), fresh.host_identity("register"), fresh.trust)
    server = loop.run_until_complete(svc.serve("127.0.0.1", 0))
    address = server.sockets[0].getsockname()[:2]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield fresh, (str(address[0]), int(address[1]))
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_register_over_tls_decides_like_the_file(service: tuple[Cluster, tuple[str, int]]) -> None:
    """A host in another namespace reaches the register over mutual TLS; a revoked host is refused."""
    cluster, address = service
    b0 = cluster.issue_binding(VM, VM_MAC, "hv-a")
    move = _move(cluster, "hv-b", b0)

    def client(host: str) -> RegisterClient:
        return RegisterClient(address, "register", cluster.host_identity(host), cluster.trust)

    assert client("hv-b").current(VM) == b0
    with pytest.raises(AuthorizationError):
        client("hv-b").commit(move, "ignored: the TLS certificate names the caller")
    assert client("hv-a").commit(move, "hv-a") == move.next
    assert client("hv-b").resolve(move, "hv-b") is MoveOutcome.MOVED
    cluster.revoke("hv-c")
    with pytest.raises((AuthorizationError, RegisterUnavailable)):
        client("hv-c").current(VM)
    with pytest.raises(RegisterUnavailable):
        RegisterClient(address, "hv-a", cluster.host_identity("hv-b"), cluster.trust).current(VM)  # wrong name
