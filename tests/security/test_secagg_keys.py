"""The sites' identity keys and roster for secure aggregation (fedoap.privacy.secagg_keys), with real Ed25519 keys and
real files.

The attacks: a key file other users may read, a second init that would silently replace a site's identity, a roster
carried through the server with one site's key replaced by the server's own (the swap), a roster that drops a site,
rosters that are malformed or writable by others, and a simulation folder that would shadow a deployed site's own
files. Each must fail with one line naming the file, or the signature check must fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedoap.privacy.secagg_keys import (
    IDENTITY_FILE,
    ROSTER_FILE,
    ROSTER_FORMAT,
    SECAGG_DIR_ENV,
    SecAggKeyError,
    check_roster_has,
    fingerprint,
    init_identity,
    load_identity,
    load_roster,
    parse_entries,
    public_entry,
    public_key,
    public_raw,
    roster_fingerprint,
    simulation_keys,
    write_roster,
)

SITES = ("brain", "liver", "breast")


@pytest.fixture(autouse=True)
def _no_simulation_folder(monkeypatch):
    """A deployed site reads only its own local/: no simulation folder unless a test sets one."""
    monkeypatch.delenv(SECAGG_DIR_ENV, raising=False)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _kit(tmp_path: Path, name: str) -> Path:
    kit = tmp_path / name
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "fed_client.json").write_text("{}")
    return kit


def _roster_doc(sites: dict) -> str:
    return json.dumps({"format": ROSTER_FORMAT, "sites": sites})


def _x25519_public() -> bytes:
    """What a site signs each round: its fresh X25519 public key."""
    return X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw)


# ----------------------------------------------------------------------------------------------------------- identity


def test_init_makes_an_owner_only_ed25519_key_and_refuses_to_replace_it(tmp_path):
    old = os.umask(0)  # the most permissive umask cannot widen the key file
    try:
        kit = _kit(tmp_path, "brain")
        path, entry = init_identity(kit, "brain")
    finally:
        os.umask(old)
    assert path == kit / "local" / IDENTITY_FILE
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    key = load_identity(kit, "brain")
    assert isinstance(key, Ed25519PrivateKey)
    assert entry == f"brain={public_raw(key).hex()}" == public_entry(kit, "brain")
    assert parse_entries([entry]) == {"brain": public_raw(key).hex()}

    before = path.read_bytes()
    with pytest.raises(SecAggKeyError, match="exists; --overwrite") as err:
        init_identity(kit, "brain")
    assert str(path) in _one_line(err)
    assert path.read_bytes() == before and _mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [IDENTITY_FILE]  # no temporary file left behind

    path2, entry2 = init_identity(kit, "brain", overwrite=True)
    assert path2 == path and entry2 != entry and _mode(path) == 0o600
    assert public_entry(kit, "brain") == entry2


def test_init_refuses_the_servers_kit_a_missing_kit_and_bad_names(tmp_path):
    server = tmp_path / "server"
    (server / "startup").mkdir(parents=True)
    (server / "startup" / "fed_server.json").write_text("{}")
    with pytest.raises(SecAggKeyError, match="server's kit"):
        init_identity(server, "localhost")
    assert not (server / "local" / IDENTITY_FILE).exists()
    with pytest.raises(SecAggKeyError, match="does not exist"):
        init_identity(tmp_path / "typo", "brain")
    kit = _kit(tmp_path, "brain")
    for name in ("", "../brain", "a=b", "two words", ".hidden", "-x"):
        with pytest.raises(SecAggKeyError, match="not a site name"):
            init_identity(kit, name)
    assert not (kit / "local").exists()


def test_an_identity_readable_by_others_is_refused(tmp_path):
    kit = _kit(tmp_path, "brain")
    path, _ = init_identity(kit, "brain")
    for mode in (0o640, 0o604, 0o644):
        path.chmod(mode)
        with pytest.raises(SecAggKeyError, match=f"mode {mode:04o}") as err:
            load_identity(kit, "brain")
        assert f"chmod 600 {path}" in _one_line(err)
        with pytest.raises(SecAggKeyError, match="other users"):
            public_entry(kit, "brain")
    path.chmod(0o600)
    assert isinstance(load_identity(kit, "brain"), Ed25519PrivateKey)


def test_an_identity_that_is_not_an_unencrypted_ed25519_key_is_refused(tmp_path):
    kit = _kit(tmp_path, "brain")
    path, _ = init_identity(kit, "brain")
    others = {
        "not an unencrypted PKCS8": b"garbage\n",
        "not an Ed25519": generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "not an unencrypted": Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase")),
    }
    for reason, data in others.items():
        path.write_bytes(data)
        path.chmod(0o600)
        with pytest.raises(SecAggKeyError, match=reason) as err:
            load_identity(kit, "brain")
        assert str(path) in _one_line(err) and "fedoap secagg-keys init" in str(err.value)


def test_a_missing_identity_names_where_it_looked_and_the_commands(tmp_path, monkeypatch):
    kit = _kit(tmp_path, "brain")
    with pytest.raises(SecAggKeyError) as err:
        load_identity(kit, "brain")
    message = _one_line(err)
    assert str(kit / "local" / IDENTITY_FILE) in message
    assert "fedoap secagg-keys init" in message and "fedoap secagg-keys simulation" in message
    monkeypatch.setenv(SECAGG_DIR_ENV, str(tmp_path / "sim"))
    with pytest.raises(SecAggKeyError) as err:
        load_identity(kit, "brain")
    assert str(tmp_path / "sim" / "brain" / IDENTITY_FILE) in _one_line(err)


# ------------------------------------------------------------------------------------------------------------- roster


def _three_sites(tmp_path: Path) -> tuple[dict[str, Path], dict[str, str]]:
    kits = {s: _kit(tmp_path, s) for s in SITES}
    entries = parse_entries(init_identity(kits[s], s)[1] for s in SITES)
    return kits, entries


def test_the_roster_round_trips_and_every_site_holds_the_same_one(tmp_path):
    kits, entries = _three_sites(tmp_path)
    text = "# collected by the admins, fingerprints compared by phone\n\n" + "\n".join(
        f"  {line}  " for line in (f"{s}={entries[s].upper()}" for s in SITES)) + "\n"
    assert parse_entries(text.splitlines()) == entries  # lowercase, whitespace and comments ignored
    paths = [write_roster(kits[s], entries) for s in SITES]
    for s, path in zip(SITES, paths):
        assert path == kits[s] / "local" / ROSTER_FILE and _mode(path) == 0o644
        assert json.loads(path.read_text()) == {"format": ROSTER_FORMAT, "sites": dict(sorted(entries.items()))}
    rosters = [load_roster(kits[s]) for s in SITES]
    assert all(r == {s: bytes.fromhex(h) for s, h in entries.items()} for r in rosters)
    assert rosters[0].path == paths[0]
    assert len({roster_fingerprint(r) for r in rosters}) == 1  # the one value the admins compare
    for s in SITES:
        check_roster_has(rosters[0], SITES, own=(s, load_identity(kits[s], s)))

    # the fingerprint an admin can recompute without fedoap: sha256sum of the raw key
    raw = bytes.fromhex(entries["brain"])
    assert fingerprint(raw).replace("-", "") == hashlib.sha256(raw).hexdigest()[:32]
    assert len({fingerprint(bytes.fromhex(h)) for h in entries.values()}) == 3
    swapped = dict(entries, liver=entries["brain"][::-1])
    assert roster_fingerprint({s: bytes.fromhex(h) for s, h in swapped.items()}) != roster_fingerprint(rosters[0])


@pytest.mark.parametrize("sites, match", [
    ({"brain": "ab" * 31}, "31 bytes"),
    ({"brain": "ab" * 33}, "33 bytes"),
    ({"brain": "zz" * 32}, "not hex"),
    ({"brain": 12}, "not hex"),
    ({"brain": "ab" * 32, "liver": "ab" * 32}, "same public key"),
    ({"../etc": "ab" * 32}, "not a site name"),
    ({}, "names no site"),
])
def test_a_malformed_roster_is_refused_naming_the_file(tmp_path, sites, match):
    kit = _kit(tmp_path, "brain")
    path = kit / "local" / ROSTER_FILE
    path.parent.mkdir()
    path.write_text(_roster_doc(sites))
    with pytest.raises(SecAggKeyError, match=match) as err:
        load_roster(kit)
    assert str(path) in _one_line(err) and "fedoap secagg-keys roster" in str(err.value)
    if sites:  # write_roster refuses the same entries
        with pytest.raises(SecAggKeyError, match=match):
            write_roster(kit, sites)


@pytest.mark.parametrize("text, match", [
    (json.dumps({"format": "fedoap-secagg-roster/2", "sites": {"brain": "ab" * 32}}), "format 'fedoap-secagg-r"),
    (json.dumps({"sites": {"brain": "ab" * 32}}), "format None"),
    (json.dumps([["brain", "ab" * 32]]), "format 'list'"),
    (json.dumps({"format": ROSTER_FORMAT, "sites": [["brain", "ab" * 32]]}), "'sites' must map"),
    ('{"format": "%s", "sites": {"brain": "%s", "brain": "%s"}}' % (ROSTER_FORMAT, "ab" * 32, "cd" * 32),
     "'brain' appears twice"),
    ("brain=" + "ab" * 32, "not JSON"),
    ("", "not JSON"),
])
def test_a_roster_of_unknown_format_is_refused_naming_the_file(tmp_path, text, match):
    kit = _kit(tmp_path, "brain")
    path = kit / "local" / ROSTER_FILE
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(SecAggKeyError, match=match) as err:
        load_roster(kit)
    assert str(path) in _one_line(err)


def test_a_roster_others_may_change_is_refused(tmp_path):
    kits, entries = _three_sites(tmp_path)
    path = write_roster(kits["brain"], entries)
    for mode in (0o664, 0o646):
        path.chmod(mode)
        with pytest.raises(SecAggKeyError, match="changed by other users") as err:
            load_roster(kits["brain"])
        assert str(path) in _one_line(err)
    path.chmod(0o444)
    assert set(load_roster(kits["brain"])) == set(SITES)


@pytest.mark.parametrize("lines, match", [
    (["brain " + "ab" * 32], "is not SITE=HEX"),
    (["brain=" + "ab" * 32, "brain=" + "cd" * 32], "line 2: site brain is named twice"),
    (["=" + "ab" * 32], "not a site name"),
    (["brain=" + "ab" * 16], "16 bytes"),
    (["brain=0x" + "ab" * 32], "not hex"),
    (["", "# nothing"], "no SITE=HEX entry"),
])
def test_bad_entries_are_one_line_errors_naming_the_line(lines, match):
    with pytest.raises(SecAggKeyError, match=match) as err:
        parse_entries(lines, source="entries.txt")
    assert _one_line(err).startswith("entries.txt")


def test_the_local_folder_comes_before_the_simulation_folder(tmp_path, monkeypatch):
    kits, entries = _three_sites(tmp_path)
    sim = simulation_keys(tmp_path / "sim", SITES)
    monkeypatch.setenv(SECAGG_DIR_ENV, str(sim))
    own = load_identity(kits["brain"], "brain")
    assert public_raw(own).hex() == entries["brain"]  # the site's own key, not the simulation's
    bare = tmp_path / "bare"  # no local/: the simulation folder
    bare.mkdir()
    assert public_raw(load_identity(bare, "liver")) == load_roster(sim)["liver"]
    assert load_roster(bare).path == sim / ROSTER_FILE
    write_roster(kits["brain"], entries)
    assert load_roster(kits["brain"]).path == kits["brain"] / "local" / ROSTER_FILE
    assert load_roster(kits["brain"])["liver"] == bytes.fromhex(entries["liver"])

    # a local file that is unusable is refused, never skipped for the simulation folder's
    (kits["brain"] / "local" / IDENTITY_FILE).chmod(0o644)
    with pytest.raises(SecAggKeyError, match="other users"):
        load_identity(kits["brain"], "brain")
    (kits["brain"] / "local" / ROSTER_FILE).write_text("{}")
    with pytest.raises(SecAggKeyError, match="not a fedoap-secagg-roster/1"):
        load_roster(kits["brain"])


# ------------------------------------------------------------------------------------------- what the roster guards


def test_check_roster_has_catches_a_missing_site_and_the_swap(tmp_path):
    kits, entries = _three_sites(tmp_path)
    path = write_roster(kits["brain"], {s: entries[s] for s in ("brain", "liver")})
    roster = load_roster(kits["brain"])
    brain = load_identity(kits["brain"], "brain")
    with pytest.raises(SecAggKeyError, match="has no key for breast") as err:
        check_roster_has(roster, SITES, own=("brain", brain))
    assert str(path) in _one_line(err)
    with pytest.raises(SecAggKeyError, match="no key for breast"):
        public_key(roster, "breast")

    # the server relays the entries and puts its own key in the place of liver's: liver's check catches it
    server_key = Ed25519PrivateKey.generate()
    write_roster(kits["liver"], dict(entries, liver=public_raw(server_key).hex()))
    swapped = load_roster(kits["liver"])
    check_roster_has(swapped, SITES)  # every site is named: only the identity check sees it
    liver = load_identity(kits["liver"], "liver")
    with pytest.raises(SecAggKeyError, match="the roster's key for liver is not this site's identity key") as err:
        check_roster_has(swapped, SITES, own=("liver", liver))
    message = _one_line(err)
    assert fingerprint(public_raw(liver)) in message and fingerprint(public_raw(server_key)) in message
    # ... and a site whose own identity is not in the roster at all
    with pytest.raises(SecAggKeyError, match="no key for lung"):
        check_roster_has(swapped, SITES, own=("lung", Ed25519PrivateKey.generate()))


def test_simulation_keys_sign_and_verify_between_three_sites(tmp_path, monkeypatch):
    folder = simulation_keys(tmp_path / "sim", SITES)
    assert folder == tmp_path / "sim" and _mode(folder) == 0o700
    for s in SITES:
        assert _mode(folder / s / IDENTITY_FILE) == 0o600 and _mode(folder / s) == 0o700
    assert _mode(folder / ROSTER_FILE) == 0o644
    monkeypatch.setenv(SECAGG_DIR_ENV, str(folder))
    workspace = tmp_path / "simulator_workspace"  # what the simulator gives a site: no local/ of its own
    workspace.mkdir()
    roster = load_roster(workspace)
    assert set(roster) == set(SITES)
    identities = {s: load_identity(workspace, s) for s in SITES}
    for s in SITES:
        check_roster_has(roster, SITES, own=(s, identities[s]))

    for round_ in range(2):
        for s in SITES:
            message = b"fedoap-secagg/1|round=%d|%s|" % (round_, s.encode()) + _x25519_public()
            signature = identities[s].sign(message)
            public_key(roster, s).verify(signature, message)  # raises if it does not verify
            Ed25519PublicKey.from_public_bytes(roster[s]).verify(signature, message)
            for other in SITES:
                if other != s:
                    with pytest.raises(InvalidSignature):
                        public_key(roster, other).verify(signature, message)
            with pytest.raises(InvalidSignature):
                public_key(roster, s).verify(signature, message[:-1] + bytes([message[-1] ^ 1]))

    # running it again keeps every key; overwrite makes new ones; a roster always names exactly the sites given
    again = load_roster(simulation_keys(folder, SITES))
    assert dict(again) == dict(roster)
    renewed = load_roster(simulation_keys(folder, SITES, overwrite=True))
    assert all(renewed[s] != roster[s] for s in SITES)
    assert set(load_roster(simulation_keys(folder, SITES[:2]))) == set(SITES[:2])
    for bad, match in (([], "at least one site"), (["brain", "brain"], "named twice"), (["a/b"], "not a site name")):
        with pytest.raises(SecAggKeyError, match=match):
            simulation_keys(tmp_path / "other", bad)
