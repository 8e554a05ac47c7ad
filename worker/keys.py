"""Node keys: Ed25519 key pairs, fingerprints, TLS certificates, auth proofs.

Each node has one Ed25519 key pair. Peers pin each other by *fingerprint*::

    fingerprint = "SHA256:" + unpadded standard base64(sha256(raw 32-byte public key))

The listener proves its key through TLS: its self-signed certificate is made
from the node key, and the connector compares the certificate's public key
with its pin after the handshake. The connector proves its key with an `Auth`
message on the control stream: an Ed25519 signature over `auth_transcript`,
which binds the listener's fresh nonce, both fingerprints, the network and the
endpoint (docs/protocol.md, "Authentication").

The controller's ``l3ptp keygen`` uses `generate_private_key`,
`save_private_key` and `fingerprint`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from l3ptp.ipc.constants import AUTH_LABEL

__all__ = [
    "BadKey",
    "auth_transcript",
    "fingerprint",
    "fingerprint_of_certificate",
    "generate_private_key",
    "generate_reality_key",
    "load_private_key",
    "load_reality_key_raw",
    "private_key_from_raw",
    "private_key_raw",
    "public_key_raw",
    "reality_public_key",
    "save_private_key",
    "self_signed_certificate",
    "sign_auth",
    "verify_auth",
]

PUBLIC_KEY_LEN = 32
PRIVATE_KEY_FILE_MODE = 0o600
#: Self-signed certificates are valid from one day back (clock skew) for ten
#: years; validity is never checked (CERT_NONE + pin), but X.509 needs dates.
_CERT_BACKDATE = datetime.timedelta(days=1)
_CERT_LIFETIME = datetime.timedelta(days=3650)


class BadKey(ValueError):
    """A key file or key bytes could not be used."""


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_raw(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte raw private key (seed), as carried in `WorkerConfig.private_key`."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_key_from_raw(raw: bytes) -> Ed25519PrivateKey:
    if len(raw) != PUBLIC_KEY_LEN:
        raise BadKey("an Ed25519 private key is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """``SHA256:<43 base64 chars>`` of the raw 32-byte public key."""
    raw = key if isinstance(key, bytes) else public_key_raw(key)
    if len(raw) != PUBLIC_KEY_LEN:
        raise BadKey("an Ed25519 public key is 32 bytes")
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii").rstrip("=")


def save_private_key(key: Ed25519PrivateKey | X25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write the key as unencrypted PKCS#8 PEM, created with mode 0600.

    Refuses to overwrite an existing file (raises FileExistsError).
    """
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_KEY_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_KEY_FILE_MODE)
        os.write(fd, pem)
    finally:
        os.close(fd)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a PEM private key file written by `save_private_key`.

    Raises `BadKey` if the file is readable by group or others, or holds
    anything but an unencrypted Ed25519 key.
    """
    key = _load_pem(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(f"{os.fspath(path)}: not an Ed25519 key")
    return key


def generate_reality_key() -> X25519PrivateKey:
    """A new REALITY key (X25519; docs/protocol.md, "REALITY")."""
    return X25519PrivateKey.generate()


def reality_public_key(key: X25519PrivateKey) -> str:
    """The public half as the configuration's `public_key` wants it: base64 of the 32 raw bytes."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_reality_key_raw(path: str | os.PathLike[str]) -> bytes:
    """The raw 32-byte X25519 private key of a REALITY key file (PEM, mode 0600, as `save_private_key` writes)."""
    key = _load_pem(path)
    if not isinstance(key, X25519PrivateKey):
        raise BadKey(f"{os.fspath(path)}: not an X25519 key (make one with `l3ptp keygen --reality`)")
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _load_pem(path: str | os.PathLike[str]) -> Any:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise BadKey(f"{os.fspath(path)}: key file must not be accessible by group or others")
        data = f.read(64 * 1024)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"{os.fspath(path)}: not an unencrypted PEM private key") from exc


def self_signed_certificate(key: Ed25519PrivateKey, common_name: str = "l3ptp") -> x509.Certificate:
    """A self-signed X.509 certificate for `key`, used as the listener's TLS cert."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CERT_BACKDATE)
        .not_valid_after(now + _CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, None)
    )


def fingerprint_of_certificate(cert: x509.Certificate) -> str | None:
    """Fingerprint of an Ed25519 certificate's public key; None for other key types."""
    public = cert.public_key()
    if not isinstance(public, Ed25519PublicKey):
        return None
    return fingerprint(public)


def auth_transcript(
    nonce: bytes, listener_fingerprint: str, connector_fingerprint: str, network_id: str, endpoint_id: int
) -> bytes:
    """The bytes the connector signs (docs/protocol.md, "Authentication").

    AUTH_LABEL || 0x00 || nonce(32) || listener fp || 0x00 || connector fp ||
    0x00 || network_id || 0x00 || endpoint_id as u16 big-endian. The 0x00
    separators make the concatenation unambiguous (none of the strings may
    contain NUL).
    """
    parts = (listener_fingerprint, connector_fingerprint, network_id)
    if any("\0" in p for p in parts):
        raise BadKey("transcript fields must not contain NUL")
    return b"".join(
        (
            AUTH_LABEL,
            b"\0",
            nonce,
            listener_fingerprint.encode(),
            b"\0",
            connector_fingerprint.encode(),
            b"\0",
            network_id.encode(),
            b"\0",
            endpoint_id.to_bytes(2, "big"),
        )
    )


def sign_auth(key: Ed25519PrivateKey, transcript: bytes) -> bytes:
    return key.sign(transcript)


def verify_auth(public_key: bytes, signature: bytes, transcript: bytes) -> bool:
    """True only for a valid Ed25519 signature; never raises on outside bytes."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, transcript)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
