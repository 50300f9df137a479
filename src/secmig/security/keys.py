"""Ed25519 keys on disk: generated here, written 0600, loaded with a permission check, never printed.

Private keys are only ever held in :class:`cryptography` key objects, whose ``repr`` shows no key
material; nothing in secmig formats a private key except :func:`write_private_key`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secmig.errors import ConfigError, SecurityError

PRIVATE_KEY_MODE = 0o600


def generate_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key from the OS CSPRNG."""
    return Ed25519PrivateKey.generate()


def raw_public_key(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a public key (of a private key's public half)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """Inverse of :func:`raw_public_key`; ``ValueError`` when ``raw`` is not 32 bytes."""
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """A short, printable name for a public key: ``sha256:`` and the first 16 hex digits."""
    raw = key if isinstance(key, bytes) else raw_public_key(key)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` as PKCS#8 PEM, created 0600 from the start (never world-readable, even briefly)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_MODE)
    except FileExistsError as err:
        raise ConfigError(f"{path}: a key already exists; refusing to overwrite it") from err
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    # The umask may have narrowed the mode further, never widened it; set it exactly anyway.
    os.chmod(path, PRIVATE_KEY_MODE)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, refusing one that group or others can read (as ssh does)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read private key: {err.strerror}") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"{path}: private key is accessible by group or others (mode {mode & 0o777:o})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: not a PEM private key") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    return key
