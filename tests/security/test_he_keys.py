"""The HE key ceremony run by the sites (fedoap.privacy.he_keys, ``fedoap he-keys``), attacked with real TenSEAL, real
scrypt/AES-GCM and real startup kits provisioned by NVFlare from the project file.

The attacks: the coordinator provisions (does it get a key?), the server or the coordinator tries to decrypt a real
update with the public context or with a key of its own, a secret context is pushed onto the server, the bundle is
opened with a wrong passphrase or after one flipped byte, files are written under umask 0, and the passphrase is
passed on the command line or too short. Each must fail, and leave no key behind where it should not be.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import yaml

from fedoap.cli import main as fedoap_main
from fedoap.deploy.poc import configure_poc, run_poc_key_ceremony
from fedoap.privacy.contexts import HE_CONTEXT_DIR_ENV, find_context_file
from fedoap.privacy.he import HEConfig, add_encrypted, create_contexts, decrypt_average, encrypt_update, load_context
from fedoap.privacy.he_keys import (
    MIN_PASSPHRASE_CHARS,
    PASSPHRASE_ENV,
    BundleError,
    init_site,
    install_public,
    join_site,
    key_id,
    open_bundle,
    seal_bundle,
)

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "poc_workspace" / "project.yml"
CLIENTS = ("brain", "liver", "breast")
SERVER, ADMIN = "localhost", "admin@coordinator.org"
PASSPHRASE = "blue kettle under the quiet bridge 7"
SECRET_NAME, PUBLIC_NAME = "client_context.tenseal", "server_context.tenseal"


@pytest.fixture(autouse=True)
def _no_simulation_keys(monkeypatch):
    """A deployed site reads only its own kit: no simulation folder, no passphrase in the environment."""
    monkeypatch.delenv(HE_CONTEXT_DIR_ENV, raising=False)
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory) -> Path:
    """Startup kits from the project file, provisioned by NVFlare as the coordinator would."""
    ws = tmp_path_factory.mktemp("provision")
    nvflare = Path(sys.executable).with_name("nvflare")
    subprocess.run([str(nvflare), "provision", "-p", str(PROJECT), "-w", str(ws)], check=True, capture_output=True,
                   timeout=120)
    (prod,) = sorted((ws / "fedoap").glob("prod_*"))
    return prod


@pytest.fixture
def kits(provisioned, tmp_path) -> Path:
    """A fresh copy of the kits for each test."""
    return Path(shutil.copytree(provisioned, tmp_path / "prod"))


@pytest.fixture
def passphrase_file(tmp_path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    path.chmod(0o600)
    return path


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"enc.w": rng.normal(0, 0.1, (48, 32)).astype(np.float32), "dca.b": rng.normal(0, 0.1, 9).astype(np.float32)}


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_provisioning_gives_the_coordinator_no_he_key(provisioned):
    for project in (PROJECT, ROOT / "poc_workspace" / "poc_project.yml"):
        builders = [b["path"] for b in yaml.safe_load(project.read_text())["builders"]]
        assert not [b for b in builders if "HEBuilder" in b], project
    assert not list(provisioned.rglob("*.tenseal"))  # nothing the provisioning machine could have kept a copy of


def test_sites_share_a_key_that_the_server_and_coordinator_cannot_use(kits, passphrase_file, tmp_path, capsys):
    transit = tmp_path / "transit"  # what travels through the coordinator: bundle and public context
    bundle, public = transit / "he_key.bundle", transit / PUBLIC_NAME
    assert fedoap_main(["he-keys", "init", str(kits / "brain"), "--bundle", str(bundle), "--public", str(public),
                        "--passphrase-file", str(passphrase_file)]) == 0
    key = re.search(r"key id: (\S+)", capsys.readouterr().out).group(1)
    for site in CLIENTS[1:]:
        assert fedoap_main(["he-keys", "join", str(kits / site), "--bundle", str(bundle),
                            "--passphrase-file", str(passphrase_file)]) == 0
        assert f"key id: {key}" in capsys.readouterr().out  # what the admins compare out of band
    assert fedoap_main(["he-keys", "install-public", str(kits / SERVER), "--public", str(public)]) == 0

    sites = {s: load_context(find_context_file("client", kits / s)) for s in CLIENTS}
    server = load_context(find_context_file("server", kits / SERVER))
    assert all(c.is_private() for c in sites.values()) and not server.is_private()

    # a site that joined from the bundle decrypts what the initiating site encrypted
    brain = _update(0)
    alone = decrypt_average(add_encrypted([encrypt_update(brain, 12, sites["brain"])], server), sites["liver"])
    for k in brain:
        np.testing.assert_allclose(alone[k], brain[k], atol=5e-4)

    # the federation: every site encrypts, the server adds, any site decrypts the weighted mean
    updates, weights = {s: _update(i) for i, s in enumerate(CLIENTS)}, {"brain": 12, "liver": 30, "breast": 7}
    total = add_encrypted([encrypt_update(updates[s], weights[s], sites[s]) for s in CLIENTS], server)
    mean = decrypt_average(total, sites["breast"])
    for k in brain:
        expected = sum(weights[s] * updates[s][k] for s in CLIENTS) / sum(weights.values())
        np.testing.assert_allclose(mean[k], expected, atol=5e-4)

    # the server, or the coordinator who sees all it sees, holds only the public context: it cannot decrypt ...
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_average(total, server)
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server, total.ciphertexts[0]).decrypt()
    # ... nor with a secret key of its own made with the same public parameters
    _, forged = create_contexts(HEConfig())
    with pytest.raises(ValueError, match="decryption check failed"):
        decrypt_average(total, forged)
    raw = np.asarray(ts.ckks_vector_from(ts.context_from(forged), total.ciphertexts[0]).decrypt())
    truth = sum(weights.values()) * np.concatenate([mean[k].ravel() for k in total.layout.keys])
    assert np.abs(raw[: truth.size] - truth).mean() > 1.0  # garbage, not the update

    # no file of the server's or the coordinator's kit, nor anything that travelled, holds the secret key
    secret = (kits / "brain" / "local" / SECRET_NAME).read_bytes()
    assert all((kits / s / "local" / SECRET_NAME).read_bytes() == secret for s in CLIENTS)
    for path in _files(kits / SERVER) + _files(kits / ADMIN) + _files(transit):
        data = path.read_bytes()
        assert secret not in data, path
        if path.suffix == ".tenseal":
            assert not ts.context_from(data).is_private(), path
    assert not [p for s in CLIENTS for p in (kits / s / "startup").glob("*.tenseal")]


def test_server_refuses_a_context_with_a_secret_key(kits, tmp_path, capsys):
    made = init_site(kits / "brain", tmp_path / "b.bundle", tmp_path / "p.tenseal", PASSPHRASE)
    server_file = kits / SERVER / "local" / PUBLIC_NAME
    with pytest.raises(ValueError, match="holds a secret key: refusing"):
        install_public(kits / SERVER, made.secret_context)
    assert fedoap_main(["he-keys", "install-public", str(kits / SERVER), "--public", str(made.secret_context)]) == 2
    assert "holds a secret key" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a TenSEAL context"):  # the sealed bundle is no context either
        install_public(kits / SERVER, made.bundle)
    # the secret may not land on the server, or in the coordinator's admin kit, by way of init or join either
    for kit, reason in ((kits / SERVER, "server's kit"), (kits / ADMIN, "not a client kit")):
        with pytest.raises(ValueError, match=reason):
            join_site(kit, made.bundle, PASSPHRASE)
        with pytest.raises(ValueError, match=reason):
            init_site(kit, tmp_path / "x.bundle", tmp_path / "x.tenseal", PASSPHRASE)
    assert not server_file.exists() and not list((kits / SERVER).rglob("*.tenseal"))
    assert not list((kits / ADMIN).rglob("*.tenseal"))
    with pytest.raises(ValueError, match="SITE_KIT .*nosuch does not exist"):
        init_site(kits / "nosuch", tmp_path / "y.bundle", tmp_path / "y.tenseal", PASSPHRASE)
    # after all that, the real public context installs, and the server's copy holds no secret
    install_public(kits / SERVER, made.public_context)
    assert not load_context(server_file).is_private()


def test_bundle_opens_only_with_the_passphrase_and_every_byte_intact(kits, passphrase_file, tmp_path, capsys):
    made = init_site(kits / "brain", tmp_path / "b.bundle", tmp_path / "p.tenseal", PASSPHRASE)
    sealed = made.bundle.read_bytes()
    secret = made.secret_context.read_bytes()
    assert secret not in sealed and len(sealed) > len(secret)
    liver_secret = kits / "liver" / "local" / SECRET_NAME

    wrong = "blue kettle under the quiet bridge 8"
    with pytest.raises(BundleError, match="wrong passphrase, or the bundle was altered"):
        join_site(kits / "liver", made.bundle, wrong)
    magic = len(b"fedoap-he-bundle/1\n")
    for where, offset in (("magic", 0), ("salt", magic + 3), ("nonce", magic + 16 + 5),
                          ("ciphertext", len(sealed) // 2), ("tag", len(sealed) - 1)):
        tampered = bytearray(sealed)
        tampered[offset] ^= 0x01
        (tmp_path / "t.bundle").write_bytes(bytes(tampered))
        with pytest.raises(BundleError, match="altered") as err:
            join_site(kits / "liver", tmp_path / "t.bundle", PASSPHRASE)
        assert "\n" not in str(err.value), where
    with pytest.raises(BundleError, match="not a fedoap HE key bundle"):
        open_bundle(sealed[: magic + 30], PASSPHRASE)
    assert not liver_secret.exists()  # nothing was written by a failed join

    bad = tmp_path / "bad_passphrase"
    bad.write_text(wrong)
    bad.chmod(0o600)
    assert fedoap_main(["he-keys", "join", str(kits / "liver"), "--bundle", str(made.bundle),
                        "--passphrase-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wrong passphrase" in err and wrong not in err
    assert not liver_secret.exists()

    path, key = join_site(kits / "liver", made.bundle, PASSPHRASE)
    assert path.read_bytes() == secret and key == made.key_id == key_id(secret)
    other = kits / "breast" / "local" / SECRET_NAME  # a site that already holds another key
    other.write_bytes(create_contexts(HEConfig())[1])
    with pytest.raises(FileExistsError, match="holds another key"):  # never replaced silently
        join_site(kits / "breast", made.bundle, PASSPHRASE)
    assert other.read_bytes() != secret


def test_secret_files_are_owner_only_even_with_umask_0(kits, tmp_path):
    previous = os.umask(0)
    try:
        made = init_site(kits / "brain", tmp_path / "out" / "b.bundle", tmp_path / "out" / "p.tenseal", PASSPHRASE)
        joined, _ = join_site(kits / "liver", made.bundle, PASSPHRASE)
        public = install_public(kits / SERVER, made.public_context)
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(made.secret_context) == mode(joined) == mode(made.bundle) == 0o600
    assert mode(made.public_context) == mode(public) == 0o644
    for site in ("brain", "liver", SERVER):  # written through a unique temporary file, none left behind
        assert not [p.name for p in (kits / site / "local").iterdir() if p.name.endswith(".tmp")]

    # a site does not use a secret context that others may read, and a new key is written 0600 again
    joined.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        find_context_file("client", kits / "liver")
    join_site(kits / "liver", made.bundle, PASSPHRASE, overwrite=True)
    assert mode(joined) == 0o600 and find_context_file("client", kits / "liver") == joined


def test_passphrase_only_from_a_private_file_or_the_environment(kits, tmp_path, capsys, monkeypatch):
    out = ["--bundle", str(tmp_path / "b.bundle"), "--public", str(tmp_path / "p.tenseal")]
    init = ["he-keys", "init", str(kits / "brain"), *out]
    for argv in ([*init, "--passphrase", PASSPHRASE], [*init, f"--passphrase={PASSPHRASE}"]):
        assert fedoap_main(argv) == 2
        err = capsys.readouterr().err
        assert "visible to every user" in err and "--passphrase-file" in err and PASSPHRASE not in err
    short = tmp_path / "short"
    short.write_text("x" * (MIN_PASSPHRASE_CHARS - 1))
    short.chmod(0o600)
    assert fedoap_main([*init, "--passphrase-file", str(short)]) == 2
    assert f"at least {MIN_PASSPHRASE_CHARS}" in capsys.readouterr().err
    readable = tmp_path / "readable"
    readable.write_text(PASSPHRASE)
    readable.chmod(0o644)
    assert fedoap_main([*init, "--passphrase-file", str(readable)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    assert fedoap_main(init) == 2  # neither a file nor the variable
    assert "no passphrase" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"at least {MIN_PASSPHRASE_CHARS}"):
        seal_bundle(b"anything", "short passphrase")
    assert not list(kits.rglob("*.tenseal")) and not (tmp_path / "b.bundle").exists()  # nothing written so far

    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    assert fedoap_main(init) == 0
    assert open_bundle((tmp_path / "b.bundle").read_bytes(), PASSPHRASE)
    assert fedoap_main(init) == 2  # a second init would replace the federation's key: only with --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_poc_ceremony_and_a_poc_provisioned_with_hebuilder(kits, tmp_path):
    written = run_poc_key_ceremony(kits, list(CLIENTS), SERVER)
    secrets = {s: written[s].read_bytes() for s in CLIENTS}
    assert len(set(secrets.values())) == 1 and ts.context_from(secrets["brain"]).is_private()
    assert all(stat.S_IMODE(written[s].stat().st_mode) == 0o600 for s in CLIENTS)
    assert written[SERVER] == kits / SERVER / "local" / PUBLIC_NAME
    assert not load_context(written[SERVER]).is_private()
    assert not [p for p in kits.rglob("*") if p.suffix == ".bundle"]  # the bundle never lands in the workspace

    # a POC whose project still provisions NVFlare's HEBuilder is refused, with the reason
    project = yaml.safe_load(PROJECT.read_text())
    project["builders"].append({"path": "nvflare.lighter.impl.he.HEBuilder", "args": {}})
    (tmp_path / "ws" / project["name"]).mkdir(parents=True)
    (tmp_path / "ws" / "project.yml").write_text(yaml.safe_dump(project))
    shutil.copytree(kits, tmp_path / "ws" / project["name"] / "prod_00")
    with pytest.raises(ValueError, match="HEBuilder, which gives the provisioner the secret key"):
        configure_poc(tmp_path / "ws", tmp_path / "data")
