"""What a site and the server write stays private at rest: every file owner-only, replaced atomically, encrypted with
the site's key, and never a pickle that runs code when opened. Real files, the real ``cryptography`` and
``safetensors`` libraries; each test mounts the attack and asserts it fails."""

from __future__ import annotations

import json
import os
import pickle
import stat
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedoap.server.controller import ENCRYPTED_CHECKPOINT, encrypted_checkpoint_bytes, load_encrypted_checkpoint
from fedoap.site.outputs import (
    MODEL_FORMAT,
    find_site_outputs,
    load_detail,
    load_overlays,
    load_personalized_model,
    site_output_paths,
    write_site_outputs,
)
from fedoap.jsonio import write_json
from fedoap.networks import FedOAPNet
from fedoap.privacy.at_rest import (
    AT_REST_KEY_FILE,
    AtRestError,
    create_key,
    decrypt,
    encrypt,
    find_site_key,
    load_key,
    load_private,
    save_private,
    site_key_path,
    write_private,
)


@pytest.fixture(autouse=True)
def open_umask():
    """A umask that lets everyone read everything: the code itself must set 0600/0700."""
    old = os.umask(0o000)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class PlantsMarker:
    """A pickle that creates a folder when it is loaded: what an attacker puts where a model used to be."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def site(tmp_path):
    """A site's workspace with an at-rest key, and what `personalize` writes."""
    root = tmp_path / "site-1"
    key_file = create_key(site_key_path(root))
    torch.manual_seed(0)
    net = FedOAPNet(channels=[4, 8, 16, 32], bottleneck_channels=64)
    rng = np.random.default_rng(0)
    overlays = {"image": rng.random((3, 16, 16), dtype=np.float32), "label": rng.random((3, 16, 16)) > 0.5,
                "pred": rng.random((3, 16, 16)) > 0.5}
    detail = {"site": "site-1", "test_per_image_dice": [0.91, 0.42, float("nan")], "metrics": {"test_dice": 0.66}}
    return root, key_file, net.state_dict(), overlays, detail


def write(site, out_dir, key):
    _, _, state, overlays, detail = site
    return write_site_outputs(out_dir, state_dict=state, overlays=overlays, detail=detail, key=key,
                              model_metadata={"method": "fedoap"})


# ------------------------------------------------------------------------------------------------ modes: 0600/0700


def test_every_file_a_site_writes_is_owner_only(site, tmp_path):
    key = find_site_key(site[0])
    for out_dir, k in ((tmp_path / "job" / "clear" / "fedoap", None), (tmp_path / "job" / "enc" / "fedoap", key)):
        paths = write(site, out_dir, k)
        for path in (paths.model, paths.overlays, paths.detail):
            assert mode(path) == 0o600, path
        assert mode(out_dir) == mode(out_dir.parent) == 0o700  # folders it had to create
    assert mode(site[1]) == 0o600 and mode(site[1].parent) == 0o700  # the key and the local/ folder it made


def test_write_private_and_private_json_are_owner_only(tmp_path):
    path = write_private(tmp_path / "new" / "blob.bin", b"secret")
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and path.read_bytes() == b"secret"
    private = write_json(tmp_path / "private.json", {"dice": [0.5]}, private=True)
    assert mode(private) == 0o600 and json.loads(private.read_text()) == {"dice": [0.5]}
    shared = write_json(tmp_path / "report.json", {"dice": 0.5})  # a report meant to be shared keeps the umask's mode
    assert mode(shared) == 0o666


def test_existing_world_readable_file_is_replaced_by_an_owner_only_one(tmp_path):
    path = tmp_path / "personalized.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    write_json(path, {"dice": 1.0}, private=True)
    assert mode(path) == 0o600


def test_the_temp_file_is_owner_only_before_it_gets_its_name(tmp_path, monkeypatch):
    real_replace, seen = os.replace, []

    def replace_and_look(src, dst):
        seen.append((Path(src).name, mode(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_and_look)
    write_private(tmp_path / "overlays.npz", b"patient image")
    write_json(tmp_path / "personalized.json", {"dice": 0.5}, private=True)
    assert [m for _, m in seen] == [0o600, 0o600]
    assert all(name.startswith(".") and name.endswith(".tmp") for name, _ in seen)


# ---------------------------------------------------------------------------------------------------- atomicity


def _folder(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_failed_rename_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = write_private(tmp_path / "model.safetensors", b"old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_private(path, b"new")
    with pytest.raises(OSError, match="disk full"):
        write_json(tmp_path / "model.safetensors", {"a": 1})
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and _folder(tmp_path) == ["model.safetensors"]


def test_data_that_cannot_be_serialized_leaves_every_file_as_it_was(site, tmp_path):
    path = write_json(tmp_path / "results.json", {"ok": True})
    for private in (False, True):
        with pytest.raises(TypeError):
            write_json(path, {"ok": object()}, private=private)
    assert json.loads(path.read_text()) == {"ok": True}

    out_dir = tmp_path / "fedoap"
    paths = write(site, out_dir, None)
    before = {p: p.read_bytes() for p in (paths.model, paths.overlays, paths.detail)}
    _, _, state, overlays, detail = site
    with pytest.raises(ValueError, match="dtype object"):  # would be stored as pickle
        write_site_outputs(out_dir, state_dict=state, overlays={**overlays, "pred": np.array([object()])},
                           detail=detail, key=find_site_key(site[0]))
    assert {p: p.read_bytes() for p in before} == before
    assert _folder(out_dir) == sorted(p.name for p in before)


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    path = tmp_path / "fedoap_history.json"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(25):
                write_json(path, {"writer": n, "i": i, "pad": "x" * 2000}, private=n == 1)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(path.read_text())["i"] == 24 and _folder(tmp_path) == ["fedoap_history.json"]


def test_a_planted_temp_file_link_is_never_followed(tmp_path):
    """A predictable temp name (``results.json.tmp``) lets whoever can write the folder link it to a file of their
    choice, which the writer would then overwrite."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in ("results.json", "overlays.npz"):
        (tmp_path / f"{name}.tmp").symlink_to(victim)
    write_json(tmp_path / "results.json", {"dice": 0.5})
    write_private(tmp_path / "overlays.npz", b"patient image")
    assert victim.read_text() == "keep me"


# --------------------------------------------------------------------------------------------------- encryption


def test_a_copied_file_is_unreadable_without_the_key(site, tmp_path):
    key = find_site_key(site[0])
    paths = write(site, tmp_path / "fedoap", key)
    assert all(p.name.endswith(".enc") for p in (paths.model, paths.overlays, paths.detail))
    assert find_site_outputs(tmp_path / "fedoap") == paths
    # nothing of the content is visible in the bytes
    assert b"test_per_image_dice" not in paths.detail.read_bytes()
    assert site[3]["image"].tobytes()[:64] not in paths.overlays.read_bytes()
    with pytest.raises(ValueError):
        np.load(paths.overlays, allow_pickle=False)
    for load, path in ((load_personalized_model, paths.model), (load_overlays, paths.overlays),
                       (load_detail, paths.detail)):
        with pytest.raises(AtRestError, match=AT_REST_KEY_FILE):  # says which key it needs
            load(path)
    # with the key, everything comes back
    assert load_detail(paths.detail, key)["test_per_image_dice"] == [0.91, 0.42, None]
    np.testing.assert_array_equal(load_overlays(paths.overlays, key)["image"], site[3]["image"])


def test_wrong_key_fails(site, tmp_path):
    paths = write(site, tmp_path / "fedoap", find_site_key(site[0]))
    other = load_key(create_key(tmp_path / "other" / AT_REST_KEY_FILE))
    for load, path in ((load_personalized_model, paths.model), (load_overlays, paths.overlays),
                       (load_detail, paths.detail)):
        with pytest.raises(AtRestError, match="wrong key"):
            load(path, other)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_a_flipped_byte_is_detected(tmp_path, where):
    key = os.urandom(32)
    path = save_private(tmp_path / "overlays.npz.enc", b"patient image" * 100, key=key, context="overlays")
    blob = bytearray(path.read_bytes())
    index = {"nonce": 8, "ciphertext": 8 + 12 + 50, "tag": len(blob) - 1}[where]
    blob[index] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(AtRestError, match="changed"):
        load_private(path, key=key, context="overlays")


def test_a_file_put_in_another_files_place_does_not_decrypt(site, tmp_path):
    key = find_site_key(site[0])
    paths = write(site, tmp_path / "fedoap", key)
    os.replace(paths.overlays, paths.detail)  # same key, same folder, wrong purpose
    with pytest.raises(AtRestError, match="another purpose"):
        load_detail(paths.detail, key)
    blob = encrypt(b"x", key, "model")
    with pytest.raises(AtRestError):
        decrypt(blob, key, "overlays")


def test_a_plain_file_in_place_of_an_encrypted_one_is_refused(site, tmp_path):
    key = find_site_key(site[0])
    paths = write(site, tmp_path / "fedoap", key)
    paths.detail.write_text(json.dumps({"metrics": {"test_dice": 1.0}}))  # a forged, unencrypted result
    with pytest.raises(AtRestError, match="not encrypted"):
        load_detail(paths.detail, key)


def test_foreign_truncated_and_future_files_are_refused(tmp_path):
    key = os.urandom(32)
    with pytest.raises(AtRestError, match="not a fedoap encrypted file"):
        decrypt(b"PK\x03\x04" + os.urandom(60), key, "overlays")
    blob = encrypt(b"data", key, "overlays")
    with pytest.raises(AtRestError, match="truncated"):
        decrypt(blob[:30], key, "overlays")
    with pytest.raises(AtRestError, match="version"):
        decrypt(blob[:7] + b"\x02" + blob[8:], key, "overlays")
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt(b"data", key[:16], "overlays")


def test_writing_encrypted_outputs_removes_the_clear_copies(site, tmp_path):
    out_dir = tmp_path / "fedoap"
    clear = write(site, out_dir, None)
    enc = write(site, out_dir, find_site_key(site[0]))
    assert enc == site_output_paths(out_dir, encrypted=True)
    assert _folder(out_dir) == sorted(p.name for p in (enc.model, enc.overlays, enc.detail))
    assert not any(p.exists() for p in (clear.model, clear.overlays, clear.detail))


# ------------------------------------------------------------------------------------------------------ the key


@pytest.mark.parametrize("unsafe", [0o640, 0o604, 0o620, 0o644])
def test_a_key_file_others_can_access_is_refused(tmp_path, unsafe):
    path = create_key(tmp_path / "local" / AT_REST_KEY_FILE)
    os.chmod(path, unsafe)
    with pytest.raises(AtRestError, match=f"{path}.*{unsafe:04o}"):
        load_key(path)
    with pytest.raises(AtRestError, match="chmod 600"):  # a site that asked for encryption never falls back to clear
        find_site_key(tmp_path)


def test_key_file_is_created_once_owner_only_and_checked(tmp_path):
    assert find_site_key(tmp_path) is None  # no key: files are owner-only, in clear
    path = create_key(site_key_path(tmp_path))
    key = path.read_bytes()
    assert mode(path) == 0o600 and len(key) == 32 and find_site_key(tmp_path) == key
    with pytest.raises(AtRestError, match="refusing to overwrite"):
        create_key(path)
    assert path.read_bytes() == key
    short = tmp_path / "short.key"
    short.write_bytes(key.hex().encode())  # a hex key, not raw bytes
    os.chmod(short, 0o600)
    with pytest.raises(AtRestError, match=f"{short}.*exactly 32 raw bytes"):
        load_key(short)
    with pytest.raises(AtRestError, match="cannot be read"):
        load_key(tmp_path / "missing.key")


# ----------------------------------------------------------------------------------------------- no pickle at all


@pytest.mark.parametrize("encrypted", [False, True])
def test_model_round_trips_as_safetensors_without_pickle(site, tmp_path, encrypted):
    key = find_site_key(site[0]) if encrypted else None
    paths = write(site, tmp_path / "fedoap", key)
    state = site[2]
    loaded = load_personalized_model(paths.model, key)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert not zipfile.is_zipfile(paths.model)  # torch.save writes a zip holding data.pkl
    if not encrypted:  # safetensors alone opens it: an 8-byte header length, then a JSON header, then raw tensors
        with safe_open(paths.model, framework="pt") as f:
            assert f.metadata()["fedoap_format"] == MODEL_FORMAT and f.metadata()["method"] == "fedoap"
            assert sorted(f.keys()) == sorted(state)


def test_a_planted_pickle_never_runs(site, tmp_path):
    paths = write(site, tmp_path / "fedoap", None)
    marker = tmp_path / "pwned"
    paths.model.write_bytes(pickle.dumps(PlantsMarker(marker)))
    with pytest.raises(ValueError, match="not a safetensors"):
        load_personalized_model(paths.model)
    np.savez(paths.overlays.with_suffix(".tmp.npz"), pred=np.array([PlantsMarker(marker)], dtype=object))
    os.replace(paths.overlays.with_suffix(".tmp.npz"), paths.overlays)
    with pytest.raises(ValueError, match="npz archive of plain arrays"):
        load_overlays(paths.overlays)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ the server checkpoint


def test_server_checkpoint_round_trips_without_pickle(tmp_path):
    from fedoap.privacy.he import (add_encrypted, create_contexts, decrypt_average, encrypt_update, from_params,
                                   to_params)

    server_ctx, client_ctx = create_contexts()
    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.float32)}
    aggregate = to_params(add_encrypted([encrypt_update(params, 2.0, client_ctx),
                                         encrypt_update(params, 3.0, client_ctx)], server_ctx))
    path = write_private(tmp_path / "app_server" / ENCRYPTED_CHECKPOINT, encrypted_checkpoint_bytes(aggregate, 4))
    assert mode(path) == 0o600 and not zipfile.is_zipfile(path)
    saved = load_encrypted_checkpoint(path)
    assert saved["round"] == 4 and saved["encrypted_shared"].keys() == aggregate.keys()
    for name, array in aggregate.items():
        np.testing.assert_array_equal(saved["encrypted_shared"][name], array)
    average = decrypt_average(from_params(saved["encrypted_shared"]), client_ctx)
    for name, value in params.items():
        np.testing.assert_allclose(average[name], value, atol=1e-2)

    path.write_bytes(pickle.dumps({"round": 4, "encrypted_shared": aggregate}))  # the old pickle format
    with pytest.raises(ValueError, match=f"{path}.*not a safetensors checkpoint"):
        load_encrypted_checkpoint(path)
