"""The cluster's X.509 side: a CA certificate for the authority key and a TLS certificate per hypervisor.

TLS 1.3 authenticates hosts with these; the Vsignature (see :mod:`.credentials`) names the same public
key, so the application handshake can insist that the TLS peer and the Vsignature holder are one key.
Pure: builds and checks objects, writes nothing.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secmig.security.keys import raw_public_key

CLOCK_SKEW_S = 300
"""Certificates start this much before their issue time so a host whose clock is a little behind accepts them."""


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def host_uri(cluster_id: str, host_id: str) -> str:
    """The SAN URI that names a hypervisor in its certificate."""
    return f"secmig://{cluster_id}/host/{host_id}"


def make_ca_certificate(
    key: Ed25519PrivateKey, cluster_id: str, name: str, issued_at: float, expires_at: float
) -> x509.Certificate:
    """A self-signed CA certificate for the cluster authority key (path length 0: it signs hosts only)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secmig"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} cluster CA {cluster_id}"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(issued_at - CLOCK_SKEW_S))
        .not_valid_after(_utc(expires_at))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )


def make_host_certificate(
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    host_key: Ed25519PublicKey,
    cluster_id: str,
    host_id: str,
    serial: int,
    issued_at: float,
    expires_at: float,
) -> x509.Certificate:
    """A hypervisor's TLS certificate: usable as client and server, since either side may migrate."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(host_key)
        .serial_number(serial)
        .not_valid_before(_utc(issued_at - CLOCK_SKEW_S))
        .not_valid_after(_utc(expires_at))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # digitalSignature only, as RFC 8410 requires of an Ed25519 key. Not critical: QEMU before 10.0.7
        # refuses a critical key usage without keyEncipherment for its TLS peers (qemu-tls data plane),
        # which an Ed25519 key must not carry; a non-critical one it only warns about.
        .add_extension(_key_usage(cert_sign=False), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(host_uri(cluster_id, host_id))]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, None)
    )


def certificate_raw_key(cert: x509.Certificate) -> bytes | None:
    """The raw Ed25519 public key a certificate carries, or None if it carries another kind of key."""
    pub = cert.public_key()
    return raw_public_key(pub) if isinstance(pub, Ed25519PublicKey) else None


def certificate_host_id(cert: x509.Certificate) -> str | None:
    """The host id in a certificate's common name, or None."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


def certificate_pem(cert: x509.Certificate) -> bytes:
    """PEM text of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)
