"""The HE key ceremony, run by the sites: the CKKS secret key is made at one site and reaches the others sealed under a
passphrase their admins share out of band, so neither the coordinator who provisions the kits nor the server holds it.

NVFlare's ``HEBuilder`` makes the secret key on the provisioning machine and copies it into every client's startup kit:
whoever provisions can decrypt every update. Instead:

1. one site (the initiator) runs ``fedoap he-keys init SITE_KIT --bundle B --public P --passphrase-file F``
   (:func:`init_site`): it makes the context with the project's CKKS setting (:func:`fedoap.privacy.he.create_contexts`),
   keeps the secret context in ``SITE_KIT/local/client_context.tenseal`` (0600), and writes the public context ``P``
   (no secret key, for the server) and the sealed bundle ``B`` (for the other sites);
2. every other site runs ``fedoap he-keys join SITE_KIT --bundle B --passphrase-file F`` (:func:`join_site`);
3. the server admin runs ``fedoap he-keys install-public SERVER_KIT --public P`` (:func:`install_public`), which
   refuses a context that holds a secret key.

``B`` and ``P`` may travel over any channel, the coordinator included; the passphrase must not travel with them. The
bundle is ``MAGIC | salt (16 B) | nonce (12 B) | AES-256-GCM ciphertext and tag``: the key is scrypt (N=2**17, r=8,
p=1: 128 MiB and about 0.5 s per try, which is what slows down guessing) of the passphrase and a random salt, and the
magic and salt are authenticated as associated data, so a wrong passphrase and any altered byte fail alike. Every
command prints the key id, a hash of the secret context: the site admins compare it to know they hold the same key.

What it does not change: every client site holds the same secret key (the server adds ciphertexts made under one
key), so a site that obtains another site's ciphertext, e.g. by colluding with the server, can decrypt it; and the
initiating site saw the key before anyone else.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tenseal as ts
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedoap.files import write_atomic
from fedoap.privacy.contexts import local_context_path
from fedoap.privacy.he import HEConfig, create_contexts

__all__ = [
    "PASSPHRASE_ENV",
    "MIN_PASSPHRASE_CHARS",
    "BundleError",
    "InitiatedKey",
    "read_passphrase",
    "seal_bundle",
    "open_bundle",
    "key_id",
    "init_site",
    "join_site",
    "install_public",
]

#: environment variable a site may hold the shared passphrase in (instead of a file)
PASSPHRASE_ENV = "FEDOAP_HE_PASSPHRASE"
#: shortest passphrase accepted: the bundle may be in the coordinator's hands, who can guess offline
MIN_PASSPHRASE_CHARS = 20

_MAGIC = b"fedoap-he-bundle/1\n"
_SALT_BYTES, _NONCE_BYTES, _TAG_BYTES = 16, 12, 16
_SCRYPT = {"n": 2**17, "r": 8, "p": 1}  # fixed by the format version: a bundle cannot ask for weaker ones


class BundleError(ValueError):
    """A sealed key bundle that does not open: not a bundle, a wrong passphrase or an altered byte."""


@dataclass(frozen=True)
class InitiatedKey:
    """What :func:`init_site` wrote: the secret context (stays at the site), the bundle and the public context."""

    secret_context: Path
    bundle: Path
    public_context: Path
    key_id: str


# ------------------------------------------------------------------------------------------------------ passphrase


def _check_passphrase(passphrase: str, source: str = "the passphrase") -> str:
    if not isinstance(passphrase, str):
        raise ValueError(f"{source} must be text, got {type(passphrase).__name__}")
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ValueError(f"{source} has {len(passphrase)} characters; at least {MIN_PASSPHRASE_CHARS} are needed, "
                         "since whoever carries the bundle can try passphrases offline")
    return passphrase


def read_passphrase(file: Optional[str | os.PathLike] = None, env: str = PASSPHRASE_ENV) -> str:
    """The shared passphrase from ``file`` (one line, readable by its owner only) or, without a file, from ``$env``.

    Never from a command-line argument: other users of the machine see those (``ps``, ``/proc``).

    Raises:
        ValueError: no file and no variable, a file other users may read, or a passphrase too short.
    """
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"passphrase file {path} does not exist")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ValueError(f"passphrase file {path} may be read by other users (mode {mode:04o}): "
                             f"run 'chmod 600 {path}'")
        text = path.read_text(encoding="utf-8")
        text = text[:-1] if text.endswith("\n") else text
        text = text[:-1] if text.endswith("\r") else text
        return _check_passphrase(text, f"the passphrase in {path}")
    text = os.environ.get(env)
    if not text:
        raise ValueError(f"no passphrase: give --passphrase-file FILE (mode 0600) or set ${env}")
    return _check_passphrase(text, f"the passphrase in ${env}")


# ---------------------------------------------------------------------------------------------------------- bundle


def _bundle_key(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, **_SCRYPT).derive(passphrase.encode("utf-8"))


def seal_bundle(secret_context: bytes, passphrase: str) -> bytes:
    """The secret context sealed for the other sites: AES-256-GCM under scrypt(passphrase, random salt)."""
    _check_passphrase(passphrase)
    salt, nonce = secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(_NONCE_BYTES)
    header = _MAGIC + salt
    return header + nonce + AESGCM(_bundle_key(passphrase, salt)).encrypt(nonce, bytes(secret_context), header)


def open_bundle(bundle: bytes, passphrase: str, source: str = "the bundle") -> bytes:
    """The secret context in a bundle made by :func:`seal_bundle`.

    Raises:
        BundleError: not a bundle, a wrong passphrase or an altered bundle (one line, naming ``source``), or a bundle
            whose content is not a TenSEAL context with a secret key.
    """
    _check_passphrase(passphrase)
    bundle = bytes(bundle)
    start = len(_MAGIC) + _SALT_BYTES
    if not bundle.startswith(_MAGIC) or len(bundle) < start + _NONCE_BYTES + _TAG_BYTES:
        raise BundleError(f"{source} is not a fedoap HE key bundle ({_MAGIC.strip().decode()}), or its header was "
                          "altered")
    header, nonce, sealed = bundle[:start], bundle[start:start + _NONCE_BYTES], bundle[start + _NONCE_BYTES:]
    try:
        secret = AESGCM(_bundle_key(passphrase, header[len(_MAGIC):])).decrypt(nonce, sealed, header)
    except InvalidTag:
        raise BundleError(f"cannot open {source}: wrong passphrase, or the bundle was altered on its way") from None
    try:
        private = ts.context_from(secret).is_private()
    except Exception:  # TenSEAL raises ValueError/RuntimeError from C++
        private = None
    if not private:
        raise BundleError(f"{source} opened but holds no TenSEAL context with a secret key")
    return secret


def key_id(secret_context: bytes) -> str:
    """A short hash of the secret context, for admins to compare out of band (it reveals nothing of the key)."""
    digest = hashlib.sha256(b"fedoap-he-key-id/1\0" + bytes(secret_context)).hexdigest()[:16]
    return "-".join(digest[i:i + 4] for i in range(0, 16, 4))


# ----------------------------------------------------------------------------------------------------------- files


def _kit(folder: str | os.PathLike, role: str) -> Path:
    """A participant's startup kit of that role, checked by the file NVFlare's provisioning puts in ``startup/``."""
    kit = Path(folder)
    option = "SITE_KIT" if role == "client" else "SERVER_KIT"
    if not kit.is_dir():
        raise ValueError(f"{option} {kit} does not exist (give the kit's folder, the one holding startup/ and local/)")
    if role == "client" and (kit / "startup" / "fed_server.json").is_file():
        raise ValueError(f"{option} {kit} is the server's kit (startup/fed_server.json): the server must never hold "
                         "the HE secret key; give a client site's kit")
    marker = kit / "startup" / ("fed_client.json" if role == "client" else "fed_server.json")
    if not marker.is_file():
        raise ValueError(f"{option} {kit} is not a {role} kit: {marker} is missing")
    (kit / "local").mkdir(exist_ok=True)
    return kit


def _distinct(**paths: Path) -> None:
    seen: dict[Path, str] = {}
    for name, path in paths.items():
        real = path.resolve()
        if real in seen:
            raise ValueError(f"{name} and {seen[real]} are the same file {path}: give different paths")
        seen[real] = name


def init_site(site_kit: str | os.PathLike, bundle_out: str | os.PathLike, public_out: str | os.PathLike,
              passphrase: str, config: HEConfig = HEConfig(), overwrite: bool = False) -> InitiatedKey:
    """Make the federation's CKKS key at this site: keep the secret context, write the bundle and public context.

    Args:
        site_kit: this client site's startup kit; the secret context goes to its ``local/`` (0600).
        bundle_out: the sealed secret context for the other sites (0600; safe to send, useless without the passphrase).
        public_out: the public context for the server (0644; no secret key).
        passphrase: shared by the site admins out of band (:func:`read_passphrase`).
        config: the CKKS setting (the project's, :class:`fedoap.privacy.he.HEConfig`, by default).
        overwrite: replace existing files. A new key means every site joins again and old ciphertexts are lost.

    Raises:
        ValueError: not a client kit (the server's, an admin's), a passphrase too short, or two outputs that coincide.
        FileExistsError: an output exists and ``overwrite`` is False (nothing is written then).
    """
    kit = _kit(site_kit, "client")
    secret_path, bundle_out, public_out = local_context_path("client", kit), Path(bundle_out), Path(public_out)
    _distinct(secret_context=secret_path, bundle=bundle_out, public=public_out)
    _check_passphrase(passphrase)
    if not overwrite:
        for path in (secret_path, bundle_out, public_out):
            if path.exists():
                raise FileExistsError(f"{path} exists; --overwrite replaces it (a new key: every site must join "
                                      "again and the server get the new public context)")
    public, secret = create_contexts(config)
    bundle = seal_bundle(secret, passphrase)
    for path in (bundle_out, public_out):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(secret_path, secret, 0o600)
    write_atomic(bundle_out, bundle, 0o600)
    write_atomic(public_out, public, 0o644)
    return InitiatedKey(secret_path, bundle_out, public_out, key_id(secret))


def join_site(site_kit: str | os.PathLike, bundle: str | os.PathLike, passphrase: str,
              overwrite: bool = False) -> tuple[Path, str]:
    """Import the federation's secret context from the initiator's bundle into this site's ``local/`` (0600).

    Joining again with the same bundle is a no-op.

    Returns:
        ``(path of the secret context, key id)``.

    Raises:
        ValueError: not a client kit. BundleError: wrong passphrase, altered bundle, not a bundle.
        FileNotFoundError: no bundle file. FileExistsError: the site holds another key and ``overwrite`` is False.
    """
    kit = _kit(site_kit, "client")
    bundle = Path(bundle)
    if not bundle.is_file():
        raise FileNotFoundError(f"bundle {bundle} does not exist")
    secret = open_bundle(bundle.read_bytes(), passphrase, source=f"bundle {bundle}")
    path = local_context_path("client", kit)
    if path.is_file() and not overwrite:
        held = path.read_bytes()
        if held != secret:
            raise FileExistsError(f"{path} holds another key (key id {key_id(held)}); --overwrite replaces it")
    write_atomic(path, secret, 0o600)
    return path, key_id(secret)


def install_public(server_kit: str | os.PathLike, public: str | os.PathLike, overwrite: bool = False) -> Path:
    """Install the public context into the server's ``local/``; refuse one that holds a secret key.

    Raises:
        ValueError: not the server's kit, not a TenSEAL context, or a context with a secret key.
        FileNotFoundError: no such file. FileExistsError: the server holds another context and ``overwrite`` is False.
    """
    kit = _kit(server_kit, "server")
    public = Path(public)
    if not public.is_file():
        raise FileNotFoundError(f"public context {public} does not exist")
    data = public.read_bytes()
    try:
        context = ts.context_from(data)
    except Exception as err:  # TenSEAL raises ValueError/RuntimeError from C++
        raise ValueError(f"--public {public} is not a TenSEAL context ({len(data)} bytes): {err}") from None
    if context.is_private() or context.has_secret_key():
        raise ValueError(f"--public {public} holds a secret key: refusing to install it on the server, which must "
                         "only get the public context 'fedoap he-keys init' writes with --public")
    path = local_context_path("server", kit)
    if path.is_file() and not overwrite and path.read_bytes() != data:
        raise FileExistsError(f"{path} holds another context; --overwrite replaces it")
    return write_atomic(path, data, 0o644)
