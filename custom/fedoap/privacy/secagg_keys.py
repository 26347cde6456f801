"""The sites' identity keys for secure aggregation: each site signs its per-round X25519 public keys with an Ed25519
key made at the site itself, and checks the others' signatures against a roster its admin installed, so the server,
which relays every key, cannot put its own keys in the place of a site's and unmask that site's update.

NVFlare's provisioning makes every participant's TLS key on the coordinator's machine, so those keys prove nothing
against the coordinator. Instead:

1. every client site runs ``fedoap secagg-keys init SITE_KIT --site NAME`` (:func:`init_identity`): a new Ed25519
   key in ``SITE_KIT/local/secagg_identity.pem`` (PKCS8 PEM, mode 0600, never sent anywhere); it prints the site's
   roster entry ``NAME=HEX`` (the raw public key, 32 bytes in hex) and its :func:`fingerprint`;
2. the entries travel over any channel (the coordinator's included); the site admins compare the fingerprints out of
   band (a call, a meeting), which is what catches an entry swapped on its way;
3. every participant, the server too, installs the same entries with ``fedoap secagg-keys roster KIT --entry
   SITE=HEX ...`` or ``--entries-file FILE`` (:func:`write_roster`: ``KIT/local/secagg_roster.json``, public, so
   0644); :func:`roster_fingerprint` is one value, equal at two sites if and only if they hold the same roster.

At run time a site loads its identity (:func:`load_identity`) and the roster (:func:`load_roster`) and checks, before
the first round, that the roster names every participant and holds its own public key for itself
(:func:`check_roster_has`). A simulated federation has no kits: ``fedoap secagg-keys simulation DIR --sites a,b,c``
(:func:`simulation_keys`) writes ``DIR/<site>/secagg_identity.pem`` and ``DIR/secagg_roster.json`` and
``FEDOAP_SECAGG_DIR=DIR`` points every process at that folder; a deployed site's ``local/`` always comes first.

What it does not change: whoever controls a site's machine holds its identity key, and a roster that every admin
accepted without comparing fingerprints is only as trustworthy as the channel it came by.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedoap.files import PRIVATE_FILE_MODE, make_private_dir, write_atomic

__all__ = [
    "SECAGG_DIR_ENV",
    "IDENTITY_FILE",
    "ROSTER_FILE",
    "ROSTER_FORMAT",
    "PUBLIC_KEY_BYTES",
    "SecAggKeyError",
    "Roster",
    "fingerprint",
    "roster_fingerprint",
    "public_raw",
    "identity_path",
    "roster_path",
    "init_identity",
    "public_entry",
    "parse_entries",
    "write_roster",
    "load_identity",
    "load_roster",
    "public_key",
    "check_roster_has",
    "simulation_keys",
]

#: simulation: a folder holding ``<site>/secagg_identity.pem`` and ``secagg_roster.json``
SECAGG_DIR_ENV = "FEDOAP_SECAGG_DIR"
#: a site's identity key, ``<workspace root>/local/secagg_identity.pem``: PKCS8 PEM, unencrypted, mode 0600
IDENTITY_FILE = "secagg_identity.pem"
#: the roster, ``<workspace root>/local/secagg_roster.json``: ``{"format": ROSTER_FORMAT, "sites": {name: hex}}``
ROSTER_FILE = "secagg_roster.json"
ROSTER_FORMAT = "fedoap-secagg-roster/1"
#: an Ed25519 public key, raw
PUBLIC_KEY_BYTES = 32

_LOCAL = "local"
_ROSTER_MODE = 0o644  # public keys only; what matters is that nobody but the owner can *change* it
_SITE_NAME = re.compile(r"[A-Za-z0-9@_][A-Za-z0-9@._-]*")  # NVFlare's site names; never a path, never "NAME=..."
_HEX = re.compile(r"[0-9A-Fa-f]*")
_FINGERPRINT_HEX = 32  # 128 bits: finding another key with the same fingerprint costs about 2**128 tries

_INIT_CMD = "fedoap secagg-keys init SITE_KIT --site NAME"
_ROSTER_CMD = "fedoap secagg-keys roster KIT --entry SITE=HEX ... (or --entries-file FILE)"
_SIM_HINT = (f"for a simulated federation run 'fedoap secagg-keys simulation DIR --sites a,b,c' and set "
             f"{SECAGG_DIR_ENV}=DIR")


class SecAggKeyError(ValueError):
    """An identity key or roster that is missing, unsafe or malformed; the message (one line) names the file and the
    command that makes or fixes it."""


class Roster(dict):
    """``site name -> raw 32-byte Ed25519 public key``, remembering the file it was read from (None: made in memory),
    so errors about it can name that file."""

    path: Optional[Path] = None


# ------------------------------------------------------------------------------------------------------ small parts


def _check_site(site: object, source: str = "site") -> str:
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        raise SecAggKeyError(f"{source} {site!r} is not a site name: letters, digits and @ . _ - only, not starting "
                             "with '.' or '-' (the names of the project file)")
    return site


def _public_from_hex(text: object, where: str) -> bytes:
    if not isinstance(text, str) or not _HEX.fullmatch(text) or len(text) % 2:
        raise SecAggKeyError(f"{where}: the public key is not hex ({str(text)[:80]!r})")
    raw = bytes.fromhex(text)
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SecAggKeyError(f"{where}: the public key has {len(raw)} bytes, an Ed25519 public key has "
                             f"{PUBLIC_KEY_BYTES} ({2 * PUBLIC_KEY_BYTES} hex digits)")
    return raw


def public_raw(identity: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of an identity's public key (what the roster holds, in hex)."""
    return identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_raw: bytes) -> str:
    """A hash of a public key for admins to compare out of band: the first 128 bits of its SHA-256, in groups of four
    hex digits (``sha256sum`` of the raw 32 bytes gives the same digits, so no fedoap is needed to check it).

    Raises:
        SecAggKeyError: not 32 bytes.
    """
    if not isinstance(public_raw, (bytes, bytearray)) or len(public_raw) != PUBLIC_KEY_BYTES:
        got = f"{len(public_raw)} bytes" if isinstance(public_raw, (bytes, bytearray)) else type(public_raw).__name__
        raise SecAggKeyError(f"a fingerprint is taken of a raw {PUBLIC_KEY_BYTES}-byte Ed25519 public key, got {got}")
    digest = hashlib.sha256(bytes(public_raw)).hexdigest()[:_FINGERPRINT_HEX]
    return "-".join(digest[i:i + 4] for i in range(0, _FINGERPRINT_HEX, 4))


def roster_fingerprint(roster: Mapping[str, bytes]) -> str:
    """One hash of a whole roster (names and keys, in name order): equal at two sites if and only if they hold the
    same roster, so admins compare one value instead of one per site."""
    lines = "".join(f"{name}={bytes(roster[name]).hex()}\n" for name in sorted(roster))
    digest = hashlib.sha256(b"fedoap-secagg-roster/1\0" + lines.encode("utf-8")).hexdigest()[:_FINGERPRINT_HEX]
    return "-".join(digest[i:i + 4] for i in range(0, _FINGERPRINT_HEX, 4))


def _entry(site: str, identity: Ed25519PrivateKey) -> str:
    return f"{site}={public_raw(identity).hex()}"


def identity_path(workspace_root: str | os.PathLike) -> Path:
    """``<workspace_root>/local/secagg_identity.pem``: where a deployed site keeps its identity key."""
    return Path(workspace_root) / _LOCAL / IDENTITY_FILE


def roster_path(workspace_root: str | os.PathLike) -> Path:
    """``<workspace_root>/local/secagg_roster.json``: where a deployed site keeps its roster."""
    return Path(workspace_root) / _LOCAL / ROSTER_FILE


def _workspace(workspace_root: str | os.PathLike) -> Path:
    root = Path(workspace_root)
    if not root.is_dir():
        raise SecAggKeyError(f"SITE_KIT {root} does not exist (give the site's folder, the one holding startup/ and "
                             "local/)")
    if (root / "startup" / "fed_server.json").is_file():
        raise SecAggKeyError(f"SITE_KIT {root} is the server's kit (startup/fed_server.json): identity keys are the "
                             "client sites'; the server only relays them")
    return root


def _pem(identity: Ed25519PrivateKey) -> bytes:
    return identity.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())


def _write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` owner-only with ``data``; fails if it exists, even if another process makes it meanwhile."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        raise SecAggKeyError(f"{path} exists; --overwrite replaces it (a new identity: every site's roster must get "
                             f"the new entry, '{_ROSTER_CMD}')") from None
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _read_checked(path: Path, what: str, fix: str, forbidden: int, unsafe: str, limit: int = -1) -> bytes:
    """The bytes of a regular file whose mode (of the file actually opened, not of a path that may change) has none
    of the ``forbidden`` bits.

    Raises:
        SecAggKeyError: unreadable, not a regular file, or ``forbidden`` bits set (``unsafe`` says what to do; the mode
            is appended first).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise SecAggKeyError(f"{what} {path} cannot be read: {err.strerror}; {fix}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecAggKeyError(f"{what} {path} is not a regular file; {fix}")
        if info.st_mode & forbidden:
            raise SecAggKeyError(f"{what} {path} {unsafe.format(mode=f'{stat.S_IMODE(info.st_mode):04o}')}")
        return f.read(limit)


def _read_identity(path: Path) -> Ed25519PrivateKey:
    """The key in an identity file (owner-only)."""
    data = _read_checked(path, "identity key", f"'{_INIT_CMD}' makes it", 0o077,
                         f"may be read by other users (mode {{mode}}): run 'chmod 600 {path}', and consider the key "
                         f"exposed ('{_INIT_CMD} --overwrite' and a new roster entry)", limit=64 * 1024)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:  # not PEM, encrypted, or not a key cryptography can read
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SecAggKeyError(f"identity key {path} is not an unencrypted PKCS8 PEM key ({reason}); "
                             f"'{_INIT_CMD} --overwrite' makes a new one") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggKeyError(f"identity key {path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 key; "
                             f"'{_INIT_CMD} --overwrite' makes one")
    return key


# --------------------------------------------------------------------------------------------------------- identity


def init_identity(workspace_root: str | os.PathLike, site: str, overwrite: bool = False) -> tuple[Path, str]:
    """Make this site's Ed25519 identity key in ``<workspace_root>/local/secagg_identity.pem`` (0600; ``local/``
    is created 0700 if missing).

    Returns:
        ``(path, "site=HEX")``: the file and the roster entry to send to the other sites' admins.

    Raises:
        SecAggKeyError: a bad site name, a workspace that does not exist or is the server's, or an identity that
            exists and ``overwrite`` is False (nothing is written then).
    """
    site = _check_site(site, "--site")
    root = _workspace(workspace_root)
    path = identity_path(root)
    make_private_dir(path.parent)
    identity = Ed25519PrivateKey.generate()
    if overwrite:
        write_atomic(path, _pem(identity), PRIVATE_FILE_MODE)
    else:
        _write_new_private(path, _pem(identity))
    return path, _entry(site, identity)


def _identity_candidates(workspace_root: str | os.PathLike, site: str) -> list[Path]:
    candidates = [identity_path(workspace_root)]
    if os.environ.get(SECAGG_DIR_ENV):
        candidates.append(Path(os.environ[SECAGG_DIR_ENV]) / site / IDENTITY_FILE)
    return candidates


def load_identity(workspace_root: str | os.PathLike, site: str) -> Ed25519PrivateKey:
    """This site's identity key: ``<workspace_root>/local/secagg_identity.pem`` (deployed), else
    ``$FEDOAP_SECAGG_DIR/<site>/secagg_identity.pem`` (simulation). A file found first is used or refused, never
    skipped for the next one.

    Raises:
        SecAggKeyError: neither exists (the message lists where it looked and which command makes the key), or the
            file is readable by group or others, not a regular file, or not an unencrypted Ed25519 PKCS8 PEM key.
    """
    site = _check_site(site)
    candidates = _identity_candidates(workspace_root, site)
    for path in candidates:
        if os.path.lexists(path):
            return _read_identity(path)
    looked = ", ".join(str(p) for p in candidates)
    raise SecAggKeyError(f"secure aggregation is on but site {site} has no identity key {IDENTITY_FILE} (looked in: "
                         f"{looked}); run '{_INIT_CMD}' at the site; {_SIM_HINT}")


def public_entry(workspace_root: str | os.PathLike, site: str) -> str:
    """The roster entry ``site=HEX`` of the site's existing identity (found as :func:`load_identity` finds it)."""
    return _entry(_check_site(site, "--site"), load_identity(workspace_root, site))


# ----------------------------------------------------------------------------------------------------------- roster


def parse_entries(lines: Iterable[str], source: str = "the entries") -> dict[str, str]:
    """``site=HEX`` lines (command-line arguments, or the lines of a file) as ``{site: lowercase hex}``; blank lines
    and lines starting with ``#`` are skipped, spaces around either part are ignored.

    Raises:
        SecAggKeyError: a line that is not ``site=HEX``, a bad name, a key that is not 32 bytes of hex, a site named
            twice, or no entry at all (one line naming ``source`` and the line number).
    """
    entries: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{source}, line {number}"
        name, sep, key = (part.strip() for part in text.partition("="))
        if not sep:
            raise SecAggKeyError(f"{where}: {text[:80]!r} is not SITE=HEX (the line 'fedoap secagg-keys init' "
                                 "printed)")
        _check_site(name, f"{where}: site")
        if name in entries:
            raise SecAggKeyError(f"{where}: site {name} is named twice")
        entries[name] = _public_from_hex(key, f"{where} ({name})").hex()
    if not entries:
        raise SecAggKeyError(f"{source}: no SITE=HEX entry (one per site, as 'fedoap secagg-keys init' printed them)")
    return entries


def _validated(entries: Mapping[str, object], source: str) -> Roster:
    roster = Roster()
    owners: dict[bytes, str] = {}
    for name, key in entries.items():
        _check_site(name, f"{source}: site")
        raw = _public_from_hex(key, f"{source} ({name})")
        if raw in owners:
            raise SecAggKeyError(f"{source}: sites {owners[raw]} and {name} have the same public key: each site "
                                 f"makes its own ('{_INIT_CMD}')")
        owners[raw] = name
        roster[name] = raw
    if not roster:
        raise SecAggKeyError(f"{source}: the roster names no site")
    return roster


def write_roster(workspace_root: str | os.PathLike, entries: Mapping[str, str]) -> Path:
    """Validate ``entries`` (``{site: hex}``, e.g. from :func:`parse_entries`) and write them, atomically, to
    ``<workspace_root>/local/secagg_roster.json`` (0644: public keys only), replacing any roster there.

    Raises:
        SecAggKeyError: no entry, a bad name, a key that is not 32 bytes of hex, two sites with the same key.
    """
    roster = _validated(entries, "the roster entries")
    root = Path(workspace_root)
    if not root.is_dir():
        raise SecAggKeyError(f"SITE_KIT {root} does not exist (give the site's folder, the one holding startup/ and "
                             "local/)")
    path = roster_path(root)
    make_private_dir(path.parent)
    return write_atomic(path, _roster_document(roster), _ROSTER_MODE)


def _roster_document(roster: Mapping[str, bytes]) -> bytes:
    document = {"format": ROSTER_FORMAT, "sites": {name: bytes(roster[name]).hex() for name in sorted(roster)}}
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _no_duplicate_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for name, value in pairs:
        if name in seen:
            raise SecAggKeyError(f"{name!r} appears twice")
        seen[name] = value
    return seen


def _read_roster(path: Path) -> Roster:
    fix = f"'{_ROSTER_CMD}' writes it"
    data = _read_checked(path, "roster", fix, 0o022,
                         f"may be changed by other users (mode {{mode}}), who could put their keys in it: run "
                         f"'chmod 644 {path}' and compare its fingerprint with the other sites' again")
    try:
        document = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_names)
    except SecAggKeyError as err:
        raise SecAggKeyError(f"roster {path}: {err}; {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SecAggKeyError(f"roster {path} is not JSON ({str(err).splitlines()[0]}); {fix}") from None
    if not isinstance(document, dict) or document.get("format") != ROSTER_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise SecAggKeyError(f"roster {path} is not a {ROSTER_FORMAT} roster (format {found!r}); {fix}")
    sites = document.get("sites")
    if not isinstance(sites, dict):
        raise SecAggKeyError(f"roster {path}: 'sites' must map site names to hex public keys; {fix}")
    try:
        roster = _validated(sites, f"roster {path}")
    except SecAggKeyError as err:
        raise SecAggKeyError(f"{err}; {fix}") from None
    roster.path = path
    return roster


def load_roster(workspace_root: str | os.PathLike) -> Roster:
    """The roster: ``<workspace_root>/local/secagg_roster.json`` (deployed), else ``$FEDOAP_SECAGG_DIR/
    secagg_roster.json`` (simulation), as ``{site: raw 32-byte public key}`` (a :class:`Roster`, a dict that knows
    its file). A file found first is used or refused, never skipped for the next one.

    Raises:
        SecAggKeyError: neither exists (the message lists where it looked and which command writes it); a file that
            others may change, that is not JSON, not of format ``fedoap-secagg-roster/1``, names a site twice or
            badly, holds a key that is not 32 bytes of hex, or gives two sites the same key.
    """
    candidates = [roster_path(workspace_root)]
    if os.environ.get(SECAGG_DIR_ENV):
        candidates.append(Path(os.environ[SECAGG_DIR_ENV]) / ROSTER_FILE)
    for path in candidates:
        if os.path.lexists(path):
            return _read_roster(path)
    looked = ", ".join(str(p) for p in candidates)
    raise SecAggKeyError(f"secure aggregation is on but no roster {ROSTER_FILE} was found (looked in: {looked}); "
                         f"collect every site's entry, compare fingerprints out of band and run '{_ROSTER_CMD}'; "
                         f"{_SIM_HINT}")


def public_key(roster: Mapping[str, bytes], site: str) -> Ed25519PublicKey:
    """The roster's public key for ``site``, to verify that site's signatures with.

    Raises:
        SecAggKeyError: the roster names no such site.
    """
    if site not in roster:
        source = f"the roster {roster.path}" if getattr(roster, "path", None) else "the roster"
        raise SecAggKeyError(f"{source} has no key for {site}; collect its entry, compare fingerprints and run "
                             f"'{_ROSTER_CMD}' again")
    return Ed25519PublicKey.from_public_bytes(bytes(roster[site]))


def check_roster_has(roster: Mapping[str, bytes], sites: Iterable[str],
                     own: Optional[tuple[str, Ed25519PrivateKey]] = None) -> None:
    """Check that the roster holds a key for every site in ``sites`` and, with ``own=(site, identity)``, that its key
    for this site is this site's identity key (a roster whose entry for this site was replaced, by whoever carried
    the entries, would let that party sign keys in this site's name to the others).

    Raises:
        SecAggKeyError: a site missing from the roster, or the roster's key for this site is not its identity key.
    """
    source = f"the roster {roster.path}" if getattr(roster, "path", None) else "the roster"
    wanted = list(sites)
    if own is not None:
        wanted.append(own[0])
    missing = sorted({s for s in wanted if s not in roster})
    if missing:
        raise SecAggKeyError(f"{source} has no key for {', '.join(missing)} (it names {', '.join(sorted(roster))}); "
                             f"collect their entries, compare fingerprints and run '{_ROSTER_CMD}' again")
    if own is not None:
        site, identity = own
        mine = public_raw(identity)
        if bytes(roster[site]) != mine:
            raise SecAggKeyError(f"the roster's key for {site} is not this site's identity key ({source} has "
                                 f"fingerprint {fingerprint(bytes(roster[site]))}, this site's key "
                                 f"{fingerprint(mine)}): the entries were altered on their way or the identity "
                                 f"was remade; compare fingerprints with the other admins and run '{_ROSTER_CMD}' "
                                 "again")


# ------------------------------------------------------------------------------------------------------- simulation


def simulation_keys(folder: str | os.PathLike, sites: Sequence[str], overwrite: bool = False) -> Path:
    """Identity keys and a roster for a simulated federation (the NVFlare simulator has no site kits):
    ``folder/<site>/secagg_identity.pem`` (0600, folders 0700) for every site and ``folder/secagg_roster.json``
    naming exactly ``sites``. Identities already there are kept (unless ``overwrite``), so running it again on the
    same folder changes no key; the roster is always rewritten. Never for a deployment: one machine holds every key.

    Returns:
        ``folder``, the value of ``$FEDOAP_SECAGG_DIR`` for every process of the simulation.

    Raises:
        SecAggKeyError: no site, a bad or repeated site name, or an identity there that cannot be used.
    """
    sites = [_check_site(s) for s in sites]
    if not sites:
        raise SecAggKeyError("simulation keys: give at least one site (--sites a,b,c)")
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        raise SecAggKeyError(f"simulation keys: site {', '.join(repeated)} is named twice in --sites")
    folder = make_private_dir(folder)
    entries = {}
    for site in sites:
        path = folder / site / IDENTITY_FILE
        if os.path.lexists(path) and not overwrite:
            identity = _read_identity(path)
        else:
            make_private_dir(path.parent)
            identity = Ed25519PrivateKey.generate()
            write_atomic(path, _pem(identity), PRIVATE_FILE_MODE)
        entries[site] = public_raw(identity).hex()
    write_atomic(folder / ROSTER_FILE, _roster_document(_validated(entries, "the simulated roster")), _ROSTER_MODE)
    return folder
