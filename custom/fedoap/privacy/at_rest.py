"""What a site writes stays private at rest: owner-only files, replaced atomically, optionally AES-256-GCM encrypted.

A site's outputs (its personalized model, overlays of patient images, per-image scores) are as sensitive as its data.
:func:`write_private` creates every such file readable by its owner only (0600, whatever the umask) and replaces it
atomically: the bytes go to a unique temporary file in the same folder (``tempfile.mkstemp``, 0600 from the moment it
exists), are flushed to disk, then renamed over the target, so a reader sees the old file or the new one, never half
of one, and a failure leaves the old file and no temporary file behind.

A site that also wants its files unreadable to someone who copies them (a backup, a shared disk, an administrator of
the storage) creates a key with :func:`create_key` at ``<workspace>/local/fedoap_at_rest.key``
(:data:`AT_REST_KEY_FILE`; NVFlare's ``local/`` folder holds the site's own configuration and is never sent).
:func:`save_private` then encrypts with AES-256-GCM (``cryptography``'s ``AESGCM``): a random 96-bit nonce per file,
authenticated, so a wrong key or a changed byte is detected. File layout::

    MAGIC (7 bytes, b"\\x89FEDOAP") | VERSION (1 byte) | nonce (12 bytes) | ciphertext | tag (16 bytes)

The magic and version, followed by the file's *context* (its purpose, by default its plain file name), are the
associated data: a file moved into the place of another (overlays renamed as the model, say) fails to decrypt too.
The magic starts no JSON or npz (``PK``) file, nor a safetensors file (read as its header length, it would declare
a header of 94 petabytes), so :func:`load_private` tells an encrypted file from a plain one by its header, never by
its name.

Random nonces bound one key to about 2**32 files (NIST SP 800-38D); a site writes a handful per job.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedoap.files import PRIVATE_FILE_MODE, make_private_dir, write_atomic

__all__ = [
    "AT_REST_KEY_FILE",
    "KEY_BYTES",
    "AtRestError",
    "make_private_dir",
    "write_private",
    "create_key",
    "load_key",
    "site_key_path",
    "find_site_key",
    "encrypt",
    "decrypt",
    "is_encrypted",
    "save_private",
    "load_private",
]

#: the site key's file name, in the site's ``local/`` folder
AT_REST_KEY_FILE = "fedoap_at_rest.key"
#: AES-256: the key file holds exactly this many raw bytes
KEY_BYTES = 32

_MAGIC = b"\x89FEDOAP"
_VERSION = 1
_HEADER = _MAGIC + bytes([_VERSION])
_NONCE_BYTES = 12
_TAG_BYTES = 16


class AtRestError(ValueError):
    """A file or key for private storage that cannot be used: wrong key, tampered or foreign file, unsafe key file."""


# ------------------------------------------------------------------------------------------------- owner-only files


def _as_bytes(name: str, data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name} must be bytes, got {type(data).__name__}")
    return bytes(data)


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` as an owner-only (0600) file, atomically (:func:`fedoap.files.write_atomic`); a
    missing parent folder is created 0700.

    Raises:
        ValueError: ``data`` is not bytes.
        OSError: the folder cannot be written.
    """
    data = _as_bytes("data", data)
    path = Path(path)
    make_private_dir(path.parent)
    return write_atomic(path, data, PRIVATE_FILE_MODE)


# --------------------------------------------------------------------------------------------------------- the key


def site_key_path(workspace_root: str | os.PathLike) -> Path:
    """Where a site keeps its at-rest key: ``<workspace_root>/local/fedoap_at_rest.key``."""
    return Path(workspace_root) / "local" / AT_REST_KEY_FILE


def create_key(path: str | os.PathLike) -> Path:
    """A new random AES-256 key (``os.urandom``) in a new owner-only file; the folder is created 0700 if missing.

    Raises:
        AtRestError: ``path`` exists already (overwriting it would make every file encrypted with it unreadable).
    """
    path = Path(path)
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        raise AtRestError(f"at-rest key file {path} already exists; refusing to overwrite it (files encrypted with "
                          "it could no longer be read)") from None
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        os.write(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def load_key(path: str | os.PathLike) -> bytes:
    """Read a key made by :func:`create_key`.

    Raises:
        AtRestError: the file is missing, not a regular file, accessible to group or others (``chmod 600`` it and
            consider the key exposed), or not exactly 32 bytes.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise AtRestError(f"at-rest key file {path} cannot be read: {err.strerror}") from None
    try:
        info = os.fstat(fd)  # the mode of the file actually opened, not of whatever the name points to later
        if not stat.S_ISREG(info.st_mode):
            raise AtRestError(f"at-rest key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise AtRestError(f"at-rest key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others "
                              "can access it; it must be readable by its owner only (chmod 600), and the key may "
                              "already be exposed")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise AtRestError(f"at-rest key file {path} must hold exactly {KEY_BYTES} raw bytes, it holds "
                          f"{'more' if len(key) > KEY_BYTES else len(key)}")
    return key


def find_site_key(workspace_root: str | os.PathLike) -> Optional[bytes]:
    """The site's at-rest key if ``<workspace_root>/local/fedoap_at_rest.key`` exists, else None (files are then
    written owner-only but in clear).

    Raises:
        AtRestError: the key file exists but is unsafe or malformed (see :func:`load_key`): a site that asked for
            encryption must never fall back to clear text.
    """
    path = site_key_path(workspace_root)
    if not os.path.lexists(path):
        return None
    return load_key(path)


# ------------------------------------------------------------------------------------------------------ encryption


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes (AES-256), got "
                         f"{len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__}"
                         f"{' bytes' if isinstance(key, (bytes, bytearray)) else ''}")
    return bytes(key)


def _associated_data(context: object) -> bytes:
    if not isinstance(context, str) or not context:
        raise ValueError(f"context must be a non-empty string naming the file's purpose, got {context!r}")
    return _HEADER + context.encode("utf-8")


def is_encrypted(blob: bytes) -> bool:
    """Whether ``blob`` starts with the header of :func:`encrypt` (any version)."""
    return bytes(blob[: len(_MAGIC)]) == _MAGIC


def encrypt(data: bytes, key: bytes, context: str) -> bytes:
    """AES-256-GCM with a random nonce; ``context`` (the file's purpose or name) is authenticated, not stored.

    Raises:
        ValueError: ``data`` is not bytes, the key is not 32 bytes, or ``context`` is empty.
    """
    data = _as_bytes("data", data)
    aad = _associated_data(context)
    nonce = os.urandom(_NONCE_BYTES)
    return _HEADER + nonce + AESGCM(_check_key(key)).encrypt(nonce, data, aad)


def decrypt(blob: bytes, key: bytes, context: str) -> bytes:
    """Inverse of :func:`encrypt`.

    Raises:
        AtRestError: ``blob`` is not one of our files, has an unknown version, is truncated, or does not
            authenticate (a wrong key, a changed byte, or a file written for another context).
    """
    return _decrypt(blob, key, context, where=context)


def _decrypt(blob: bytes, key: bytes, context: str, where: str) -> bytes:
    """:func:`decrypt`, with errors that start with ``where`` (the context, or the file's path)."""
    blob = _as_bytes("blob", blob)
    aad = _associated_data(context)
    key = _check_key(key)
    if not is_encrypted(blob):
        raise AtRestError(f"{where}: not a fedoap encrypted file (no {_MAGIC!r} header)")
    version = blob[len(_MAGIC)] if len(blob) > len(_MAGIC) else None
    if version != _VERSION:
        raise AtRestError(f"{where}: encrypted-file version {version} is not supported (expected {_VERSION})")
    if len(blob) < len(_HEADER) + _NONCE_BYTES + _TAG_BYTES:
        raise AtRestError(f"{where}: encrypted file is truncated ({len(blob)} bytes)")
    nonce = blob[len(_HEADER): len(_HEADER) + _NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(_HEADER) + _NONCE_BYTES:], aad)
    except InvalidTag:
        raise AtRestError(f"{where}: decryption failed: wrong key, or the file was changed or written for another "
                          "purpose") from None


def save_private(path: str | os.PathLike, data: bytes, key: Optional[bytes] = None,
                 context: Optional[str] = None) -> Path:
    """Write ``data`` owner-only and atomically (:func:`write_private`), AES-256-GCM encrypted when ``key`` is given.

    Args:
        context: what the file is, bound to the ciphertext; by default the file name, so a renamed file (or one put
            in another's place) does not decrypt.
    """
    if key is not None:
        data = encrypt(data, key, context or Path(path).name)
    return write_private(path, data)


def load_private(path: str | os.PathLike, key: Optional[bytes] = None, context: Optional[str] = None) -> bytes:
    """Read a file written by :func:`save_private`; whether it is encrypted is read from its header.

    With a key, the file must be encrypted: a plain file in its place (someone downgraded it) is refused.

    Raises:
        AtRestError: the file is encrypted and no key was given (names the key file it needs), it is plain but a key
            was given, or decryption fails (see :func:`decrypt`).
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    blob = path.read_bytes()
    if is_encrypted(blob):
        if key is None:
            raise AtRestError(f"{path} is encrypted at rest; reading it needs the site's key "
                              f"local/{AT_REST_KEY_FILE} (in the workspace of the site that wrote it)")
        return _decrypt(blob, key, context or path.name, where=str(path))
    if key is not None:
        raise AtRestError(f"{path} is not encrypted, but a key was given: refusing a plain file where an encrypted "
                          "one is expected")
    return blob
