"""TLS 1.3 with mutual authentication through memory BIOs: bytes in, bytes out, no sockets.

Why pyOpenSSL and not stdlib ``ssl``: the application handshake signs the TLS *exporter* value (RFC 8446
§7.5) so that a Vsignature proof is bound to this one TLS session. CPython's ``SSLObject`` has no
``export_keying_material`` (cpython gh-82133 is still open), and its only channel binding,
``tls-unique``, is undefined for TLS 1.3 (RFC 9266 §1; cpython gh-95341). pyOpenSSL, from the same pyca
project as ``cryptography``, exposes ``SSL_export_keying_material`` and memory BIOs, so we use the
standard RFC 9266 ``tls-exporter`` binding: label ``EXPORTER-Channel-Binding``, empty context, 32 bytes.

Everything pyOpenSSL-specific stays in this module. Failures are reported as :class:`TlsFailure`, which
says whether our certificate check refused the peer, the peer sent an alert, or the bytes were bad.

**Decrypted bytes.** A VM's pages are plaintext only after this layer, and a destroyed VM must leave none
behind. pyOpenSSL's own ``recv_into`` decrypts into a temporary C buffer it frees without zeroing (then
copies); :meth:`TlsChannel.recv_into` instead has OpenSSL decrypt straight into the caller's buffer (the
frame reader's payload, which the consumer zeroes with :func:`scrub` once the pages are in the VM's
memory), and every session sets OpenSSL's ``SSL_OP_CLEANSE_PLAINTEXT`` so the record layer wipes its
own copy as soon as it was handed over. What Python cannot promise: that no *other* copy exists — a
``bytes`` object made from the data (a device state, a relay's socket buffer), memory the kernel
swapped out (nothing is locked), and objects the garbage collector frees, which Python's allocators
return unzeroed. Only buffers we own are zeroed; code that handles pages must not copy them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509

from secmig.security.cluster import HostIdentity

EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
"""RFC 9266's label for the ``tls-exporter`` channel binding."""
EXPORTER_BYTES = 32
_READ_CHUNK = 16 * 1024 + 256
"""A TLS record carries at most 16 KiB of plaintext; reading more per call only allocates more."""
_BIO_CHUNK = 2 * 1024 * 1024
_OP_CLEANSE_PLAINTEXT = 0x2
"""OpenSSL 3's ``SSL_OP_CLEANSE_PLAINTEXT`` (pyOpenSSL does not name it): wipe decrypted records once read."""
_OPENSSL_3 = 0x30000000


def _direct_read() -> Any:
    """pyOpenSSL's cffi binding, for ``SSL_read`` into a caller's buffer (None when it is not where it was)."""
    lib, ffi = getattr(SSL, "_lib", None), getattr(SSL, "_ffi", None)
    if lib is None or ffi is None or not hasattr(lib, "SSL_read") or not hasattr(ffi, "from_buffer"):
        return None
    return lib, ffi


_DIRECT = _direct_read()


def scrub(data: bytes | bytearray | memoryview) -> bool:
    """Zero the writable buffer behind ``data`` (a bytearray, or any view of one: the *whole* bytearray).

    Returns False when there is nothing we may write (``bytes`` are immutable: such a copy stays until
    Python frees it, unzeroed)."""
    target = data.obj if isinstance(data, memoryview) else data
    if not isinstance(target, bytearray) or not target:
        return False
    n = len(target)
    ctypes.memset((ctypes.c_char * n).from_buffer(target), 0, n)
    return True

# X509_V_ERR_* codes we name in refusals; others are reported by number.
_VERIFY_ERRORS = {
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "certificate is not issued by this cluster's CA",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsuitable certificate purpose",
}


class TlsFailure(Exception):
    """The TLS layer failed; ``kind`` is ``verify`` (we refused the peer), ``alert`` (the peer refused us)
    or ``protocol`` (malformed or tampered records). Internal: the connection turns it into an event or a
    RemoteProtocolError."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class _Verification:
    error: str | None = None


class TlsChannel:
    """One end of a TLS 1.3 session with memory BIOs (the source is the TLS client)."""

    def __init__(self, identity: HostIdentity, ca_certificate: x509.Certificate, *, server: bool) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        # Every migration is a full handshake with certificates: no tickets, no resumption, no cache.
        ctx.set_options(SSL.OP_NO_TICKET)
        if _DIRECT is not None and _DIRECT[0].OpenSSL_version_num() >= _OPENSSL_3:
            ctx.set_options(_OP_CLEANSE_PLAINTEXT)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.use_certificate(identity.certificate)
        ctx.use_privatekey(identity.key)
        ctx.check_privatekey()
        store = ctx.get_cert_store()
        assert store is not None  # a fresh context always has a store
        store.add_cert(X509.from_cryptography(ca_certificate))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        self._verification = _Verification()
        self._conn = SSL.Connection(ctx, None)
        if server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
        self.established = False

    def _verify(self, conn: SSL.Connection, cert: X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok and self._verification.error is None:
            subject = cert.get_subject().CN or "?"
            reason = _VERIFY_ERRORS.get(errnum, f"certificate verification error {errnum}")
            self._verification = _Verification(f"peer certificate {subject!r} refused: {reason}")
        return bool(ok)

    def _failure(self, err: SSL.Error) -> TlsFailure:
        if self._verification.error is not None:
            return TlsFailure("verify", self._verification.error)
        reasons = [str(part[2]) for part in err.args[0]] if err.args and isinstance(err.args[0], list) else []
        text = "; ".join(r for r in reasons if r) or err.__class__.__name__
        # OpenSSL names a received alert "sslv3/tlsv1/tlsv13 alert <description>".
        kind = (
            "alert"
            if any(" alert " in f" {r} " or r.startswith(("sslv3 alert", "tlsv1", "tlsv13")) for r in reasons)
            else "protocol"
        )
        return TlsFailure(kind, f"TLS: {text}")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes that arrived from the peer."""
        if data:
            self._conn.bio_write(bytes(data))

    def handshake(self) -> bool:
        """Advance the handshake; True once it is complete. Raises TlsFailure."""
        if self.established:
            return True
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as err:
            raise self._failure(err) from err
        self.established = True
        return True

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt application data (pyOpenSSL writes at most one record per call, so loop)."""
        mv = memoryview(data)
        try:
            while mv:
                n = self._conn.send(mv)
                mv = mv[n:]
        except SSL.Error as err:
            raise self._failure(err) from err

    def recv_into(self, buf: memoryview) -> int:
        """Decrypt into ``buf`` (OpenSSL writes there directly: no other plaintext copy); 0 when no complete
        record is buffered. Raises TlsFailure."""
        n = min(len(buf), _READ_CHUNK)
        try:
            if _DIRECT is None or buf.readonly or not buf.contiguous:
                return self._conn.recv_into(buf, n)
            lib, ffi = _DIRECT
            ssl = self._conn._ssl  # pyOpenSSL copies through an unzeroed buffer
            result = int(lib.SSL_read(ssl, ffi.from_buffer(buf), n))
            self._conn._raise_ssl_error(ssl, result)  # the error mapping recv_into uses
            return result
        except SSL.WantReadError:
            return 0
        except SSL.ZeroReturnError as err:
            raise TlsFailure("protocol", "TLS: peer closed the session") from err
        except SSL.Error as err:
            raise self._failure(err) from err

    def outgoing(self) -> bytes:
        """All bytes waiting to go to the peer (records, alerts)."""
        chunks = []
        while True:
            try:
                chunk = self._conn.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.Error:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def exporter(self) -> bytes:
        """The RFC 9266 ``tls-exporter`` channel binding of this session."""
        value = self._conn.export_keying_material(EXPORTER_LABEL, EXPORTER_BYTES, b"")
        return bytes(value)

    def peer_certificate(self) -> x509.Certificate | None:
        """The verified peer certificate."""
        return self._conn.get_peer_certificate(as_cryptography=True)

    def version(self) -> str:
        """The negotiated protocol version, e.g. ``TLSv1.3``."""
        return str(self._conn.get_protocol_version_name())
