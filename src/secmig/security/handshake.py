"""The application handshake: its messages, the session proof, and who decides that an operation may run.

- Codecs (h11's ``_readers.py``/``_writers.py``): SOURCE_HELLO carries the source's Vsignature, its
  proof, the request (operation, VM, memory geometry, the digest of the manifest it will send), the
  grant and the VM's location binding;
  DESTINATION_HELLO carries the destination's Vsignature and proof; AUTHORIZED carries nothing.
  Decoders read the peer's bytes and raise :class:`~secmig.errors.RemoteProtocolError` only.
- The *proof*: a host key's signature over the session's RFC 9266 ``tls-exporter`` value and its role,
  so a Vsignature cannot be replayed into another TLS session. :func:`check_peer` checks it together
  with the Vsignature and the TLS certificate.
- The :class:`Authorizer`: the destination's decision whether an authenticated source may run the
  operation it asks for. The connection takes one injected; :class:`GrantAuthorizer` is the default and
  the paper's policy (a signed, single-use grant that matches the VM's current location binding).

Must not: move protocol states, send frames, audit or touch TLS objects — the connection
(:mod:`.protocol`) does those and passes in the values a check needs (certificate, exporter, clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from secmig.errors import AuthenticationError, AuthorizationError, DocumentFormatError, RemoteProtocolError
from secmig.security import frames
from secmig.security.cluster import ClusterTrust, HostIdentity
from secmig.security.credentials import LocationBinding, Vsignature, doc_id
from secmig.security.encoding import (
    SIGNATURE_BYTES,
    JsonObject,
    b64decode,
    b64encode,
    canonical_json,
    get_int,
    get_obj,
    get_str,
    parse_json_object,
    sign_document,
    verify_document,
)
from secmig.security.events import Authorized, MigrationRequest
from secmig.security.grants import Grant, NonceStore, check_binding_signature, check_grant
from secmig.security.keys import public_key_from_raw
from secmig.security.location import BindingRegistry
from secmig.security.pki import certificate_host_id, certificate_raw_key
from secmig.security.policy import Operation
from secmig.security.state import Role

PROOF_KIND = "handshake-proof"


# -- the session proof ---------------------------------------------------------------------------------


def _proof_payload(role: Role, cred: Vsignature, exporter: bytes) -> JsonObject:
    return {"role": role.value, "cluster_id": cred.cluster_id, "host_id": cred.host_id, "exporter": exporter.hex()}


def sign_proof(identity: HostIdentity, role: Role, exporter: bytes) -> bytes:
    """``identity``'s proof that it plays ``role`` in the TLS session whose exporter value is ``exporter``."""
    return sign_document(identity.key, PROOF_KIND, _proof_payload(role, identity.vsignature, exporter))


def check_peer(
    trust: ClusterTrust,
    cred: Vsignature,
    proof: bytes,
    *,
    role: Role,
    certificate: x509.Certificate | None,
    exporter: bytes,
    now: float,
) -> None:
    """Vsignature valid and unrevoked, same key and host as the TLS certificate, proof bound to this session.

    ``role`` is the role the peer plays; raises AuthenticationError naming the check that failed.
    """
    trust.check_member(cred, now)
    if (
        certificate is None
        or certificate_raw_key(certificate) != cred.public_key
        or certificate_host_id(certificate) != cred.host_id
    ):
        raise AuthenticationError(f"host {cred.host_id!r}: Vsignature does not match the TLS certificate")
    if not verify_document(
        public_key_from_raw(cred.public_key), PROOF_KIND, _proof_payload(role, cred, exporter), proof
    ):
        raise AuthenticationError(f"host {cred.host_id!r}: proof is not bound to this TLS session")


# -- messages ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceHello:
    """What the source presents: who it is (not yet checked) and its request with its credentials."""

    vsignature: Vsignature
    proof: bytes
    request: MigrationRequest


@dataclass(frozen=True, slots=True)
class DestinationHello:
    """What the destination presents: who it is (not yet checked)."""

    vsignature: Vsignature
    proof: bytes


def encode_source_hello(vsignature: Vsignature, proof: bytes, request: MigrationRequest) -> bytes:
    """Payload of SOURCE_HELLO."""
    doc: JsonObject = {
        "vsignature": vsignature.to_json(),
        "proof": b64encode(proof),
        "request": {
            "operation": request.operation.value,
            "vm_id": request.vm_id,
            "page_size": request.page_size,
            "page_count": request.page_count,
            "manifest_digest": None if request.manifest_digest is None else b64encode(request.manifest_digest),
        },
        "grant": None if request.grant is None else request.grant.to_json(),
        "binding": None if request.binding is None else request.binding.to_json(),
    }
    return canonical_json(doc)


def decode_source_hello(payload: bytes | bytearray) -> SourceHello:
    """Payload of SOURCE_HELLO → its parts, parsed but not checked; RemoteProtocolError when malformed."""
    try:
        doc = parse_json_object(bytes(payload), "source hello")
        cred = Vsignature.from_json(get_obj(doc, "vsignature"))
        proof = b64decode(doc.get("proof"), "proof", SIGNATURE_BYTES)
        req = get_obj(doc, "request")
        try:
            operation = Operation(get_str(req, "operation", max_len=16))
        except ValueError as err:
            raise RemoteProtocolError("source hello: unknown operation") from err
        vm_id = doc_id(req, "vm_id")  # the one strict id format, before the id is used (audited, stored)
        page_size = get_int(req, "page_size", minimum=1)
        page_count = get_int(req, "page_count", minimum=1)
        if page_size > frames.MAX_PAGE_SIZE or page_count > frames.MAX_PAGE_COUNT:
            raise RemoteProtocolError(f"source hello: {page_count} pages of {page_size} bytes is out of range")
        md = req.get("manifest_digest")
        manifest_digest = None if md is None else b64decode(md, "manifest_digest", 32)
        grant_doc, binding_doc = doc.get("grant"), doc.get("binding")
        if not (grant_doc is None or isinstance(grant_doc, dict)) or not (
            binding_doc is None or isinstance(binding_doc, dict)
        ):
            raise RemoteProtocolError("source hello: grant and binding must be objects or null")
        grant = None if grant_doc is None else Grant.from_json(grant_doc)
        binding = None if binding_doc is None else LocationBinding.from_json(binding_doc)
    except DocumentFormatError as err:
        raise RemoteProtocolError(f"malformed frame: {err}") from err
    return SourceHello(
        cred, proof, MigrationRequest(operation, vm_id, page_size, page_count, grant, binding, manifest_digest)
    )


def encode_destination_hello(vsignature: Vsignature, proof: bytes) -> bytes:
    """Payload of DESTINATION_HELLO."""
    return canonical_json({"vsignature": vsignature.to_json(), "proof": b64encode(proof)})


def decode_destination_hello(payload: bytes | bytearray) -> DestinationHello:
    """Payload of DESTINATION_HELLO → its parts, parsed but not checked; RemoteProtocolError when malformed."""
    try:
        doc = parse_json_object(bytes(payload), "destination hello")
        cred = Vsignature.from_json(get_obj(doc, "vsignature"))
        proof = b64decode(doc.get("proof"), "proof", SIGNATURE_BYTES)
    except DocumentFormatError as err:
        raise RemoteProtocolError(f"malformed frame: {err}") from err
    return DestinationHello(cred, proof)


def decode_authorized(payload: bytes | bytearray) -> None:
    """Payload of AUTHORIZED: nothing."""
    if payload:
        raise RemoteProtocolError("AUTHORIZED carries no payload")


# -- authorization -------------------------------------------------------------------------------------


class Authorizer(Protocol):
    """The destination's authorization policy, injected into the connection.

    ``authorize`` runs once the source is authenticated; it refuses with a
    :class:`~secmig.errors.SecurityError` (the connection audits it and aborts with AUTHORIZATION) and
    may keep state (a used nonce). ``committed`` runs when the destination confirms the commit.
    """

    def authorize(self, hello: SourceHello, *, destination_host: str, trust: ClusterTrust, now: float) -> None:
        """Return when the authenticated source of ``hello`` may run its operation here; raise otherwise."""
        ...

    def committed(self, authorized: Authorized) -> None:
        """The authorized operation was committed at this destination."""
        ...


class GrantAuthorizer:
    """The paper's policy: a valid, unused grant for exactly this operation, VM and pair of hosts, presented
    with the VM's current, signed location binding. On commit, the VM's next binding is recorded."""

    def __init__(self, nonces: NonceStore, bindings: BindingRegistry) -> None:
        self.nonces = nonces
        self.bindings = bindings

    def authorize(self, hello: SourceHello, *, destination_host: str, trust: ClusterTrust, now: float) -> None:
        """Binding (signed, places the VM on the source, not older than seen), grant (covering the memory
        claimed, so nothing proportional to an oversized claim is ever allocated), then its nonce."""
        roots, request = trust.roots(), hello.request
        source_host, vm_id, binding = hello.vsignature.host_id, request.vm_id, request.binding
        if binding is None:
            raise AuthorizationError(f"VM {vm_id!r}: no location binding presented")
        try:
            check_binding_signature(binding, roots)
        except AuthenticationError as err:
            raise AuthorizationError(str(err)) from err
        if binding.vm_id != vm_id or binding.host_id != source_host:
            raise AuthorizationError(
                f"VM {vm_id!r}: binding places VM {binding.vm_id!r} on {binding.host_id!r}, "
                f"not on the source {source_host!r}"
            )
        latest = self.bindings.latest_epoch(vm_id)
        if latest is not None and binding.epoch < latest:
            raise AuthorizationError(
                f"VM {vm_id!r}: binding epoch {binding.epoch} is older than accepted epoch {latest}"
            )
        grant = request.grant
        check_grant(
            grant,
            roots,
            now=now,
            operation=request.operation,
            vm_id=vm_id,
            source_host=source_host,
            destination_host=destination_host,
            current_binding=binding,
            manifest_digest=request.manifest_digest,
            memory_bytes=request.page_size * request.page_count,
        )
        assert grant is not None  # check_grant refuses None
        # Last, so that a refused use does not burn a grant that is otherwise valid.
        if not self.nonces.consume(grant.nonce, grant.expires_at, now):
            raise AuthorizationError(f"grant for {request.operation.value} of VM {vm_id!r}: already used (replay)")

    def committed(self, authorized: Authorized) -> None:
        """Record the VM's next location binding, which makes the one it arrived with stale."""
        if authorized.next_binding is not None:
            self.bindings.record(authorized.next_binding)
