"""Signed packages (optional): the cloud signs each progressive package's digest with an Ed25519 key, and a device
given the public key refuses a manifest without a valid signature.

The signature covers the package digest (proto/manifest.py ``package_digest_of``), which covers every field of
the manifest, every chunk's SHA-256 and the final weights' SHA-256: so it covers the model, and a package can
travel through any mirror or cache. Keys are PEM files (``openssl genpkey -algorithm ed25519 -out key.pem``;
``openssl pkey -in key.pem -pubout -out key.pub``).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.config import ConfigError


class SignatureError(ValueError):
    """A manifest is unsigned, or its signature does not verify under the configured public key."""


class Signer:
    """Signs package digests with an Ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def from_file(cls, path: str, key: str = "delivery_signing_key") -> "Signer":
        """Load a PEM private key; ConfigError naming ``key`` when it is unreadable or not Ed25519."""
        try:
            loaded = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"config key '{key}': cannot load an unencrypted PEM private key from {path!r} "
                              f"({err})") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ConfigError(f"config key '{key}': {path!r} is not an Ed25519 key")
        return cls(loaded)

    def sign(self, package_digest: str) -> bytes:
        """The 64-byte signature of the digest's 32 bytes."""
        return self._key.sign(bytes.fromhex(package_digest))


class Verifier:
    """Checks package digests' signatures with an Ed25519 public key."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_file(cls, path: str, key: str = "delivery_public_key") -> "Verifier":
        """Load a PEM public key; ConfigError naming ``key`` when it is unreadable or not Ed25519."""
        try:
            loaded = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"config key '{key}': cannot load a PEM public key from {path!r} ({err})") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise ConfigError(f"config key '{key}': {path!r} is not an Ed25519 public key")
        return cls(loaded)

    def verify(self, package_digest: str, signature: bytes) -> None:
        """Raise SignatureError unless ``signature`` is the key's signature of ``package_digest``."""
        if not signature:
            raise SignatureError("manifest.signature: unsigned, and this device requires a signed package")
        try:
            self._key.verify(signature, bytes.fromhex(package_digest))
        except (InvalidSignature, ValueError):
            raise SignatureError("manifest.signature: does not verify under delivery_public_key") from None
