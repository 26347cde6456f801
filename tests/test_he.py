"""CKKS encryption of the shared update for an additions-only server (fedoap.privacy.he), with real TenSEAL.

Checks what the design promises: the encrypted weighted average equals the plaintext one, the server's context
cannot decrypt, the packed ciphertexts stay within 6x the float32 bytes, and bad inputs fail with a reason.
"""

from __future__ import annotations

import json
import math
import stat

import numpy as np
import pytest
import tenseal as ts
import torch

from fedoap.privacy import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    EncryptedUpdate,
    HEConfig,
    PackedLayout,
    add_encrypted,
    create_contexts,
    decrypt_average,
    encrypt_per_layer,
    encrypt_update,
    from_params,
    is_encrypted,
    load_context,
    pack,
    to_params,
    unpack,
    write_contexts,
)

SLOTS = HEConfig().slots


@pytest.fixture(scope="module")
def contexts() -> tuple[bytes, bytes]:
    return create_contexts(HEConfig())


@pytest.fixture(scope="module")
def server_ctx(contexts) -> ts.Context:
    return ts.context_from(contexts[0])


@pytest.fixture(scope="module")
def client_ctx(contexts) -> ts.Context:
    return ts.context_from(contexts[1])


def realistic_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """About 20k values at the scales of a trained conv net: conv weights, norm affine, biases, a 1-value bias."""
    return {
        "enc.conv1.weight": rng.normal(0, 0.05, (32, 16, 3, 3)).astype(np.float32),
        "enc.conv2.weight": rng.normal(0, 0.03, (64, 16, 3, 3)).astype(np.float32),
        "enc.norm.weight": rng.normal(1.0, 0.1, 64).astype(np.float32),
        "enc.norm.bias": rng.normal(0, 0.01, 64).astype(np.float32),
        "dca.to_q.weight": rng.normal(0, 0.02, (40, 150)).astype(np.float32),
        "dec.out.bias": np.array([0.3], np.float32),
    }


def perturbed(base: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A client's model: the global one after some local training."""
    return {
        k: (v + rng.normal(0, 0.1 * (np.abs(v).mean() + 1e-3), v.shape)).astype(np.float32) for k, v in base.items()
    }


def test_encrypted_weighted_average_matches_plaintext(server_ctx, client_ctx):
    rng = np.random.default_rng(0)
    base = realistic_params(rng)
    clients = [perturbed(base, rng) for _ in range(3)]
    weights = [10, 25, 7]

    updates = [encrypt_update(p, w, client_ctx) for p, w in zip(clients, weights)]
    aggregate = add_encrypted(updates, server_ctx)
    assert aggregate.weight == sum(weights) and aggregate.count == 3
    result = decrypt_average(aggregate, client_ctx)

    assert list(result) == sorted(base)
    worst = 0.0
    for key in base:
        expected = sum(w * c[key].astype(np.float64) for c, w in zip(clients, weights)) / sum(weights)
        assert result[key].dtype == np.float32 and result[key].shape == expected.shape
        rel = np.abs(result[key] - expected).max() / np.abs(expected).max()
        worst = max(worst, rel)
        assert rel < 1e-3, f"{key}: relative error {rel:.2e}"
    print(f"\nmax relative error (max|err| / max|value| per tensor) after a 3-client sum: {worst:.2e}")


def test_server_context_is_blind(contexts, server_ctx, client_ctx):
    server_bytes, _ = contexts
    assert not server_ctx.has_secret_key()
    assert client_ctx.has_secret_key()

    rng = np.random.default_rng(1)
    params = realistic_params(rng)
    update = encrypt_update(params, 12, client_ctx)
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server_ctx, update.ciphertexts[0]).decrypt()

    # the server adds with the serialized server context it got from provisioning
    aggregate = add_encrypted([update, encrypt_update(params, 3, client_ctx)], server_bytes)
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_average(aggregate, server_ctx)
    shipped = from_params(to_params(aggregate))  # what travels back to the clients
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server_ctx, shipped.ciphertexts[0]).decrypt()

    # no ciphertext carries plaintext values: look for runs of 4 values as float32/float64, raw and weighted
    flat, _ = pack(params)
    blobs = b"".join(update.ciphertexts) + b"".join(aggregate.ciphertexts)
    for start in range(0, flat.size - 4, 997):
        for values in (flat[start : start + 4], 12 * flat[start : start + 4]):
            assert values.astype(np.float32).tobytes() not in blobs
            assert values.astype(np.float64).tobytes() not in blobs
    np.testing.assert_allclose(
        decrypt_average(shipped, client_ctx)["enc.norm.weight"], params["enc.norm.weight"], atol=1e-4
    )


def many_layers(n_values: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A conv net's mix: each block a big conv weight plus small bias and norm vectors."""
    params, left, i = {}, n_values, 0
    while left > 0:
        for suffix, size in (("conv.weight", int(rng.integers(1000, 9000))), ("conv.bias", 32), ("norm.weight", 32)):
            size = min(size, left)
            if size:
                params[f"block{i}.{suffix}"] = rng.normal(0, 0.05, size).astype(np.float32)
                left -= size
        i += 1
    return params


def test_packing_uses_few_vectors_and_stays_within_6x(client_ctx, server_ctx):
    rng = np.random.default_rng(2)
    params = many_layers(100_000, rng)
    n = sum(v.size for v in params.values())
    assert n == 100_000

    update = encrypt_update(params, 1.0, client_ctx)
    assert len(update.ciphertexts) == math.ceil(n / SLOTS) == 25
    ratio = update.nbytes / (4 * n)
    agg_ratio = add_encrypted([update, update], server_ctx).nbytes / (4 * n)

    per_layer = encrypt_per_layer(params, client_ctx)
    per_layer_ratio = sum(map(len, per_layer)) / (4 * n)
    stock_server, stock_client = create_contexts(HEConfig(coeff_mod_bit_sizes=(60, 40, 40), global_scale_bits=40))
    stock = encrypt_per_layer(params, stock_client)
    stock_ratio = sum(map(len, stock)) / (4 * n)
    print(
        f"\n{n} values in {len(params)} tensors: packed {len(update.ciphertexts)} ciphertexts {ratio:.2f}x fp32 "
        f"(server sum {agg_ratio:.2f}x); per-layer same params {len(per_layer)} ciphertexts {per_layer_ratio:.2f}x; "
        f"per-layer NVFlare stock (60,40,40) {stock_ratio:.2f}x"
    )
    assert ratio <= 6.0 and agg_ratio <= 6.0
    assert len(per_layer) > 2 * len(update.ciphertexts)
    assert per_layer_ratio > 2 * ratio
    assert stock_ratio > 5 * ratio


def test_pack_unpack_round_trip_and_dtypes():
    params = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": np.array([1.5], np.float64),
        "c": np.zeros((0, 4)),
    }
    flat, layout = pack(params)
    assert flat.dtype == np.float64 and layout.keys == ["a", "b", "c"] and layout.shapes == [(1,), (2, 3), (0, 4)]
    np.testing.assert_array_equal(flat, [1.5, 0, 1, 2, 3, 4, 5])
    out = unpack(flat, layout)
    assert all(v.dtype == np.float32 for v in out.values())
    np.testing.assert_array_equal(out["b"], params["b"].numpy())
    assert PackedLayout.from_json(layout.to_json()) == layout
    json.loads(layout.to_json())

    with pytest.raises(ValueError, match="'n'.*int64"):
        pack({"n": np.array([3])})
    with pytest.raises(ValueError, match="'w' contains NaN"):
        pack({"w": np.array([np.nan])})
    with pytest.raises(ValueError, match="empty"):
        pack({})
    with pytest.raises(ValueError, match="7 values, layout expects 8"):
        unpack(np.zeros(7), PackedLayout(["x"], [(8,)]))
    with pytest.raises(ValueError, match="packed-layout JSON"):
        PackedLayout.from_json('{"keys": ["a"]}')


def test_layout_mismatch_between_clients_is_rejected(client_ctx, server_ctx):
    a = encrypt_update({"w": np.ones((2, 3)), "b": np.ones(1)}, 1, client_ctx)
    b = encrypt_update({"w": np.ones((3, 2)), "b": np.ones(1)}, 1, client_ctx)
    c = encrypt_update({"w": np.ones((2, 3)), "bias": np.ones(1)}, 1, client_ctx)
    with pytest.raises(ValueError, match=r"update 1 has a different layout.*'w' has shape \(3, 2\), expected \(2, 3\)"):
        add_encrypted([a, b], server_ctx)
    with pytest.raises(ValueError, match="update 2 has a different layout.*'b"):
        add_encrypted([a, a, c], server_ctx)
    with pytest.raises(ValueError, match="no encrypted updates"):
        add_encrypted([], server_ctx)


def test_overflow_and_foreign_keys_are_detected(client_ctx, server_ctx):
    limit = HEConfig().max_abs_sum
    with pytest.raises(ValueError, match="beyond the CKKS headroom"):
        encrypt_update({"w": np.full(4, 2.0)}, limit, client_ctx)
    # each client fits, their sum does not: it wraps around and must not decrypt silently to garbage
    big = [encrypt_update({"w": np.ones(SLOTS)}, 0.9 * limit, client_ctx) for _ in range(3)]
    with pytest.raises(ValueError, match="decryption check failed.*wrapped around"):
        decrypt_average(add_encrypted(big, server_ctx), client_ctx)
    # a client with another key pair spoils the sum, and that is detected too
    _, other_client = create_contexts(HEConfig())
    mixed = [encrypt_update({"w": np.ones(4)}, 5, client_ctx), encrypt_update({"w": np.ones(4)}, 5, other_client)]
    with pytest.raises(ValueError, match="another key pair"):
        decrypt_average(add_encrypted(mixed, server_ctx), client_ctx)
    with pytest.raises(ValueError, match="cannot encrypt"):
        encrypt_update({"w": np.ones(4)}, 1, server_ctx)
    with pytest.raises(ValueError, match="positive"):
        encrypt_update({"w": np.ones(4)}, 0, client_ctx)


def test_contexts_on_disk(tmp_path):
    from nvflare.lighter.constants import ProvFileName

    assert (SERVER_CONTEXT_FILE, CLIENT_CONTEXT_FILE) == (
        ProvFileName.SERVER_CONTEXT_TENSEAL,
        ProvFileName.CLIENT_CONTEXT_TENSEAL,
    )
    server_path, client_path = write_contexts(tmp_path / "kit")
    assert (server_path.name, client_path.name) == (SERVER_CONTEXT_FILE, CLIENT_CONTEXT_FILE)
    assert stat.S_IMODE(client_path.stat().st_mode) == 0o600
    assert not load_context(server_path).has_secret_key() and load_context(client_path).has_secret_key()
    assert load_context(client_path).global_scale == 2.0 ** HEConfig().global_scale_bits

    before = client_path.read_bytes()
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        write_contexts(tmp_path / "kit")
    server_path.unlink()  # one file left is enough to refuse, and nothing gets written
    with pytest.raises(FileExistsError, match=CLIENT_CONTEXT_FILE):
        write_contexts(tmp_path / "kit")
    assert not server_path.exists() and client_path.read_bytes() == before
    write_contexts(tmp_path / "kit", overwrite=True)
    assert client_path.read_bytes() != before

    bad = tmp_path / "broken" / CLIENT_CONTEXT_FILE
    bad.parent.mkdir()
    bad.write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match=f"{bad}.*not a valid TenSEAL context"):
        load_context(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.tenseal"):
        load_context(tmp_path / "nowhere.tenseal")


def test_config_validation_and_json():
    config = HEConfig(coeff_mod_bit_sizes=[60, 40], global_scale_bits=40)
    assert config.coeff_mod_bit_sizes == (60, 40) and config.max_abs_sum == 2.0**18
    assert HEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for kwargs, reason in [
        ({"poly_modulus_degree": 5000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (40,)}, "at least 2 primes"),
        ({"coeff_mod_bit_sizes": (61, 30)}, "20..60 bits"),
        ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 40, 40)}, "128-bit security"),
        ({"global_scale_bits": 39}, "global_scale_bits"),
        ({"global_scale_bits": 8}, "global_scale_bits"),
    ]:
        with pytest.raises(ValueError, match=reason):
            HEConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown HEConfig field"):
        HEConfig.from_dict({"scale": 3})


def test_to_params_from_params_round_trip(client_ctx, server_ctx):
    rng = np.random.default_rng(3)
    update = encrypt_update(realistic_params(rng), 9, client_ctx)
    params = to_params(update)
    assert is_encrypted(params) and not is_encrypted(realistic_params(rng))
    assert all(isinstance(v, np.ndarray) and v.dtype in (np.uint8, np.float64) for v in params.values())
    assert sum(k.startswith("__he__.ct.") for k in params) == len(update.ciphertexts)

    back = from_params(params)
    assert back == update  # ciphertext bytes, layout, weight, n_values and count all exact

    # the PyTorch Client API hands the arrays over as tensors
    as_torch = {k: torch.from_numpy(v) for k, v in params.items()}
    assert from_params(as_torch) == update
    assert list(decrypt_average(add_encrypted([from_params(as_torch)], server_ctx), client_ctx)) == update.layout.keys

    with pytest.raises(ValueError, match="n_values is 3 but the layout holds"):
        EncryptedUpdate(update.ciphertexts, update.layout, weight=9, n_values=3)
    with pytest.raises(ValueError, match="positive"):
        EncryptedUpdate(update.ciphertexts, update.layout, weight=-1, n_values=update.n_values)

    chunk = next(k for k in params if k.startswith("__he__.ct."))
    for broken, reason in [
        ({k: v for k, v in params.items() if k != "__he__.weight"}, "lacks its weight"),
        ({k: v for k, v in params.items() if k != "__he__.header"}, "no encrypted update"),
        ({k: v for k, v in params.items() if k != chunk}, "expected ciphertext chunks"),
        ({**params, "head.weight": np.ones(3, np.float32)}, "unexpected key 'head.weight'"),
        ({**params, chunk: params[chunk].astype(np.int16)}, "1-D uint8"),
        ({**params, "__he__.header": np.frombuffer(b"{not json", np.uint8)}, "malformed"),
        ({**params, "__he__.weight": np.array([1, 2], np.float64)}, "one float"),
    ]:
        with pytest.raises(ValueError, match=reason):
            from_params(broken)


def test_sites_read_contexts_from_local_never_from_the_provisioners_startup(tmp_path, monkeypatch):
    from fedoap.cli import main as fedoap_main
    from fedoap.privacy.contexts import HE_CONTEXT_DIR_ENV, find_context_file, local_context_path

    monkeypatch.delenv(HE_CONTEXT_DIR_ENV, raising=False)
    site = tmp_path / "brain"
    write_contexts(site / "startup")  # what NVFlare's HEBuilder left: a key the provisioner made, and holds
    with pytest.raises(FileNotFoundError, match=r"fedoap he-keys join SITE_KIT.*startup/client_context\.tenseal is "
                                                r"ignored: it was made by whoever provisioned"):
        find_context_file("client", site)
    with pytest.raises(FileNotFoundError, match="fedoap he-keys install-public SERVER_KIT"):
        find_context_file("server", site)

    # a simulation: `fedoap he-keys DIR` (the old form) and `fedoap he-keys simulation DIR`, read through the variable
    assert fedoap_main(["he-keys", str(tmp_path / "sim")]) == 0
    assert fedoap_main(["he-keys", "simulation", str(tmp_path / "sim2")]) == 0
    monkeypatch.setenv(HE_CONTEXT_DIR_ENV, str(tmp_path / "sim"))
    assert find_context_file("client", site) == tmp_path / "sim" / CLIENT_CONTEXT_FILE
    assert find_context_file("server", site) == tmp_path / "sim" / SERVER_CONTEXT_FILE
    assert load_context(tmp_path / "sim2" / CLIENT_CONTEXT_FILE).has_secret_key()

    # the site's own local/ comes first; a secret others may read is refused
    local = local_context_path("client", site)
    assert local == site / "local" / CLIENT_CONTEXT_FILE
    write_contexts(site / "local")
    assert find_context_file("client", site) == local
    local.chmod(0o640)
    with pytest.raises(ValueError, match=f"{local} holds the HE secret key but other users may read it"):
        find_context_file("client", site)
    with pytest.raises(ValueError, match="role must be"):
        find_context_file("admin", site)
