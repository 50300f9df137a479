"""Canonical encoding of signed documents: what exactly gets signed, and strict parsing of what comes back.

Every signed object in secmig (Vsignature, revocation list, location binding, grant, audit head) is a JSON
object whose *payload* is signed with Ed25519 over ``DOMAIN || kind || 0x00 || canonical_json(payload)``.
The kind prefix is domain separation: a signature made for one kind of document can never verify as
another kind, nor as an X.509 structure (DER starts with 0x30, ``DOMAIN`` with ``s``).

:class:`SignedDocument` holds what every kind of document shares (sign, verify, to and from JSON), so
a kind declares only its fields. Parsers here raise :class:`DocumentFormatError` only; callers wrap it
into the error that fits where the bytes came from (:class:`~secmig.errors.ConfigError` for files,
``RemoteProtocolError`` for the wire). Must not: read files, know which key a kind must be signed by
(the checks in :mod:`.credentials` and :mod:`.grants` decide that). No I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secmig.errors import DocumentFormatError

DOMAIN = b"secmig/v1\x00"
"""Prefix of every signing input; bump the version to invalidate every old signature at once."""

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAX_DOCUMENT_BYTES = 64 * 1024
"""Largest signed document we parse: a grant with its binding is well under 2 KiB."""

JsonObject = dict[str, Any]


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, ASCII only, no NaN — the same bytes on every host."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signing_input(kind: str, payload: Mapping[str, Any]) -> bytes:
    """The exact bytes an Ed25519 signature over a document of ``kind`` covers."""
    return DOMAIN + kind.encode("ascii") + b"\x00" + canonical_json(payload)


def sign_document(key: Ed25519PrivateKey, kind: str, payload: Mapping[str, Any]) -> bytes:
    """Sign ``payload`` as a document of ``kind``."""
    return key.sign(signing_input(kind, payload))


def verify_document(key: Ed25519PublicKey, kind: str, payload: Mapping[str, Any], signature: bytes) -> bool:
    """True when ``signature`` is ``key``'s signature of ``payload`` as a document of ``kind``."""
    try:
        key.verify(signature, signing_input(kind, payload))
    except InvalidSignature:
        return False
    return True


def b64encode(data: bytes) -> str:
    """Standard base64 text, as stored in documents."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, field: str, length: int | None = None) -> bytes:
    """Strict base64 (no stray characters), optionally of an exact decoded length."""
    if not isinstance(text, str):
        raise DocumentFormatError(f"{field}: expected base64 text")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise DocumentFormatError(f"{field}: invalid base64") from err
    if length is not None and len(raw) != length:
        raise DocumentFormatError(f"{field}: expected {length} bytes, got {len(raw)}")
    return raw


def parse_json_object(data: bytes | str, what: str) -> JsonObject:
    """Parse bytes into a JSON object, refusing oversize input, duplicates-free by construction."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentFormatError(f"{what}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise DocumentFormatError(f"{what}: not valid JSON") from err
    if not isinstance(obj, dict):
        raise DocumentFormatError(f"{what}: expected a JSON object")
    return obj


def get_str(obj: Mapping[str, Any], field: str, *, max_len: int = 256) -> str:
    """A required string field."""
    value = obj.get(field)
    if not isinstance(value, str) or len(value) > max_len:
        raise DocumentFormatError(f"{field}: expected a string of at most {max_len} characters")
    return value


def get_int(obj: Mapping[str, Any], field: str, *, minimum: int = 0) -> int:
    """A required integer field (booleans are not integers here)."""
    value = obj.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value >= 2**63:
        raise DocumentFormatError(f"{field}: expected an integer >= {minimum}")
    return value


def get_obj(obj: Mapping[str, Any], field: str) -> JsonObject:
    """A required nested object."""
    value = obj.get(field)
    if not isinstance(value, dict):
        raise DocumentFormatError(f"{field}: expected an object")
    return value


def get_str_list(obj: Mapping[str, Any], field: str, *, max_items: int = 64) -> tuple[str, ...]:
    """A required list of strings."""
    value = obj.get(field)
    if not isinstance(value, list) or len(value) > max_items or not all(isinstance(v, str) for v in value):
        raise DocumentFormatError(f"{field}: expected a list of at most {max_items} strings")
    return tuple(value)


class SignedDocument:
    """Base of every signed document kind: a frozen, slotted dataclass with a ``KIND``, its signed fields
    (:meth:`payload`, parsed back by :meth:`parse_payload`) and a last field ``signature``.

    On the wire and on disk a document is ``{"payload": {...}, "signature": base64}``. Parsing never
    verifies: callers check the signature with the key that matters for them (:meth:`verify`).
    """

    __slots__ = ()
    KIND: ClassVar[str]
    """Domain separation: what this kind of document's signatures are made for."""
    signature: bytes

    def payload(self) -> JsonObject:
        """The signed fields."""
        raise NotImplementedError

    @classmethod
    def parse_payload(cls, payload: JsonObject) -> Self:
        """The unsigned document whose :meth:`payload` is ``payload``; raises DocumentFormatError."""
        raise NotImplementedError

    def signed_by(self, key: Ed25519PrivateKey) -> Self:
        """This document with ``key``'s signature."""
        signature = sign_document(key, self.KIND, self.payload())
        return dataclasses.replace(self, signature=signature)  # type: ignore[type-var]

    def verify(self, key: Ed25519PublicKey) -> bool:
        """True when the signature is ``key``'s over this document's payload."""
        return verify_document(key, self.KIND, self.payload(), self.signature)

    def to_json(self) -> JsonObject:
        """The document as stored and sent."""
        return {"payload": self.payload(), "signature": b64encode(self.signature)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Self:
        """Parse (not verify) a document; raises DocumentFormatError."""
        unsigned = cls.parse_payload(get_obj(obj, "payload"))
        signature = b64decode(obj.get("signature"), "signature", SIGNATURE_BYTES)
        return dataclasses.replace(unsigned, signature=signature)  # type: ignore[type-var]
