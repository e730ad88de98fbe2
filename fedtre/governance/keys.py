"""Ed25519 signing keys for committee members and trusts' data guardians.

A private key is a PKCS#8 PEM file, owner-only (0600), that never leaves its holder. Its public
half travels as one line of text, ``ed25519:<base64>``, which nodes pin in their own config.
A key is named in signatures by its *key id*: the first 16 hex digits of the SHA-256 of the raw
public key (a name to look the key up by, never trusted on its own: the signature is checked
against the pinned key it names).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtre.errors import ConfigError
from fedtre.pki import write_file

PREFIX = "ed25519:"


class KeyFileError(ConfigError):
    """A key file or public-key text is missing or malformed."""


@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # 32 bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    @property
    def text(self) -> str:
        return PREFIX + base64.b64encode(self.raw).decode("ascii")

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    @staticmethod
    def parse(text: str, where: str = "key") -> PublicKey:
        if not isinstance(text, str) or not text.startswith(PREFIX):
            raise KeyFileError(f"{where}: a public key is written 'ed25519:<base64>'")
        try:
            raw = base64.b64decode(text[len(PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{where}: the public key is not valid base64") from None
        if len(raw) != 32:
            raise KeyFileError(f"{where}: an Ed25519 public key is 32 bytes")
        return PublicKey(raw)


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def generate(path: Path) -> SigningKey:
    """A new key at ``path`` (0600, never overwritten) and its public half beside it (.pub)."""
    key = SigningKey(Ed25519PrivateKey.generate())
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(path, pem, private=True, overwrite=False)
    write_file(public_path(path), (key.public.text + "\n").encode(), private=False, overwrite=False)
    return key


def public_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def load(path: Path) -> SigningKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the signing key {path}: {exc.strerror or exc}") from exc
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key (make one with 'fedtre committee key')")
    return SigningKey(private)
