"""Every refusal the destination (or source) must make: each is audited and no page byte crosses the link."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from security_helpers import VM, Setup

from secmig.errors import LocalProtocolError
from secmig.security import Aborted, Authorized, Cluster, HostIdentity, Operation, PageBatch, Role, RoundStart
from secmig.security.credentials import Vsignature
from secmig.security.keys import generate_key, raw_public_key
from secmig.security.loopback import ConnectionPair

BIG_PAGE = 64 * 1024
"""Refusal tests use 64 KiB pages so 'less than one page crossed' is a strong bound on the whole exchange."""


def _refused(pair: ConnectionPair, *, destination_authorizes: bool = False) -> list[Aborted]:
    """Drive the handshake, then try to push a page anyway; return the Aborted events of both ends."""
    pair.pump()
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.source.send(RoundStart(0))
    with pytest.raises(LocalProtocolError):
        pair.source.send(PageBatch(0, (0,), bytes(BIG_PAGE)))
    events = pair.events[Role.SOURCE] + pair.events[Role.DESTINATION]
    refused_kinds = (PageBatch,) if destination_authorizes else (Authorized, PageBatch)
    assert not any(isinstance(e, refused_kinds) for e in pair.events[Role.DESTINATION])
    assert pair.destination.page_bytes_received == 0 and pair.source.page_bytes_sent == 0
    assert pair.bytes_sent(Role.SOURCE) < BIG_PAGE  # the whole exchange is smaller than one page
    return [e for e in events if isinstance(e, Aborted)]


def _big(setup: Setup) -> Setup:
    setup.page_size = BIG_PAGE
    setup.page_count = 16
    return setup


def _assert_audited(setup: Setup, event: str) -> None:
    records = setup.destination_audit.events() + setup.source_audit.events()
    assert f"{event}:refuse" in records, records


def _outsider(cluster: Cluster) -> HostIdentity:
    """A host that made its own key, self-signed certificate and Vsignature naming our cluster."""
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hv-a")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )
    t = int(time.time())
    cred = Vsignature(cluster.cluster_id, "hv-a", raw_public_key(key), (), 7, t, t + 86400).signed_by(key)
    return HostIdentity("hv-a", key, cert, cred)


def test_host_outside_cluster_refused(setup: Setup) -> None:
    """A self-certified host claiming a member's name fails TLS verification at the destination."""
    s = _big(setup)
    aborted = _refused(s.pair(s.grant(), source_identity=_outsider(s.cluster)))
    assert aborted
    _assert_audited(s, "handshake.failed")


def test_other_cluster_ca_refused(setup: Setup, tmp_path: Path) -> None:
    """A genuine member of another cluster (another CA) is refused."""
    other = Cluster.create(tmp_path / "other")
    stranger = other.join("hv-a")
    s = _big(setup)
    assert _refused(s.pair(s.grant(), source_identity=stranger))
    _assert_audited(s, "handshake.failed")


def test_revoked_host_refused(tmp_path: Path) -> None:
    """A revoked source is refused on its next handshake (the list is re-read for every use)."""
    cluster = Cluster.create(tmp_path / "c")
    for host in ("hv-a", "hv-b"):
        cluster.join(host)
    s = _big(Setup(cluster))
    grant = s.grant()
    cluster.revoke("hv-a", reason="compromised")
    aborted = _refused(s.pair(grant))
    assert any("revoked" in a.reason for a in aborted)
    _assert_audited(s, "handshake.failed")


def test_revoked_destination_refused_by_source(tmp_path: Path) -> None:
    """The source checks the destination too: a revoked destination gets no page."""
    cluster = Cluster.create(tmp_path / "c")
    for host in ("hv-a", "hv-b"):
        cluster.join(host)
    s = _big(Setup(cluster))
    grant = s.grant()
    cluster.revoke("hv-b")
    # The destination does not judge itself; the source's check is what stops the pages here.
    aborted = _refused(s.pair(grant), destination_authorizes=True)
    assert any("revoked" in a.reason for a in aborted)
    _assert_audited(s, "handshake.failed")


def test_expired_credential_refused(tmp_path: Path) -> None:
    """A Vsignature (and certificate) past its expiry is refused."""
    cluster = Cluster.create(tmp_path / "c")
    cluster.join("hv-a", validity_s=3600, now=time.time() - 7200)
    cluster.join("hv-b")
    s = _big(Setup(cluster))
    assert _refused(s.pair(s.grant()))
    _assert_audited(s, "handshake.failed")


def test_expired_vsignature_refused_at_application_layer(setup: Setup) -> None:
    """With TLS still valid, a destination whose clock is past the Vsignature's expiry refuses it."""
    s = _big(setup)
    far = time.time() + 400 * 86400
    aborted = _refused(s.pair(s.grant(), destination_clock=lambda: far))
    assert any("expired" in a.reason for a in aborted)
    _assert_audited(s, "handshake.failed")


def test_swapped_vsignature_refused(setup: Setup) -> None:
    """A member presenting another member's Vsignature (not its TLS key) is refused."""
    s = _big(setup)
    a = s.cluster.host_identity("hv-a")
    c = s.cluster.host_identity("hv-c")
    forged = HostIdentity("hv-a", a.key, a.certificate, c.vsignature)
    aborted = _refused(s.pair(s.grant(), source_identity=forged))
    assert any("TLS certificate" in x.reason for x in aborted)
    _assert_audited(s, "handshake.failed")


def test_missing_grant_refused(setup: Setup) -> None:
    """No grant, no pages."""
    s = _big(setup)
    aborted = _refused(s.pair(None))
    assert any("no grant" in a.reason for a in aborted)
    _assert_audited(s, "grant.refused")


def test_expired_grant_refused(setup: Setup) -> None:
    """A grant past its expiry is refused."""
    s = _big(setup)
    aborted = _refused(s.pair(s.grant(ttl_s=60, now=time.time() - 120)))
    assert any("expired" in a.reason for a in aborted)
    _assert_audited(s, "grant.refused")


def test_replayed_grant_refused(setup: Setup) -> None:
    """A grant used once is refused the second time, even in a fresh, valid TLS session."""
    s = _big(setup)
    grant = s.grant()
    first = s.pair(grant)
    first.pump()
    assert any(isinstance(e, Authorized) for e in first.events[Role.DESTINATION])
    aborted = _refused(s.pair(grant))
    assert any("replay" in a.reason for a in aborted)
    _assert_audited(s, "grant.refused")


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"vm_id": "vm-other"}, "VM"),
        ({"destination_host": "hv-c"}, "destination"),
        ({"operation": Operation.COPY}, "presented for migrate"),
    ],
    ids=["other-vm", "other-destination", "other-operation"],
)
def test_mismatched_grant_refused(setup: Setup, override: dict[str, object], reason: str) -> None:
    """A grant for another VM, destination or operation is refused."""
    s = _big(setup)
    if "vm_id" in override:
        other_binding = s.cluster.issue_binding("vm-other", "52:54:00:00:00:99", s.source_host)
        grant = s.grant(current_binding=other_binding, **override)
    elif override.get("operation") is Operation.COPY:
        grant = s.grant(**override)
    else:
        grant = s.grant(**override)
    aborted = _refused(s.pair(grant))
    assert any(reason in a.reason for a in aborted), aborted
    _assert_audited(s, "grant.refused")


def test_stale_binding_refused(setup: Setup) -> None:
    """A binding older than the epoch the destination already accepted is refused (binding replay)."""
    s = _big(setup)
    s.bindings.record(s.binding(epoch=5))
    aborted = _refused(s.pair(s.grant()))
    assert any("older" in a.reason for a in aborted)
    _assert_audited(s, "grant.refused")


def test_operator_outside_policy_refused(setup: Setup, tmp_path: Path) -> None:
    """A delegated operator may grant only what its policy rule allows."""
    cluster = Cluster.create(tmp_path / "c")
    for host in ("hv-a", "hv-b"):
        cluster.join(host)
    cluster.add_operator("ops", [Operation.COPY])
    s = _big(Setup(cluster))
    binding = s.binding()
    grant = cluster.issue_grant(Operation.MIGRATE, VM, "hv-a", "hv-b", issuer="ops", current_binding=binding)
    aborted = _refused(s.pair(grant, binding))
    assert any("may not" in a.reason for a in aborted)
    _assert_audited(s, "grant.refused")


def test_operator_within_policy_accepted(tmp_path: Path) -> None:
    """A delegated operator's grant inside its policy rule authorizes the migration."""
    cluster = Cluster.create(tmp_path / "c")
    for host in ("hv-a", "hv-b"):
        cluster.join(host)
    cluster.add_operator("ops", [Operation.MIGRATE], vms=["vm-*"])
    s = Setup(cluster)
    binding = s.binding()
    grant = cluster.issue_grant(Operation.MIGRATE, VM, "hv-a", "hv-b", issuer="ops", current_binding=binding)
    pair = s.pair(grant, binding)
    pair.pump()
    assert any(isinstance(e, Authorized) for e in pair.events[Role.DESTINATION])
