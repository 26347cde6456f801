"""The site boundary with real TenSEAL and the real clip-and-noise: what leaves a site, in which order, and what the
server can do with it."""

import pytest
import torch

from fedoap.server.rules import EncryptedSum, UpdateRejected
from fedoap.site.privacy import SitePrivacy
from fedoap.networks import FedOAPNet
from fedoap.privacy.dp import UpdateDPConfig
from fedoap.privacy.he import HE_KEY_PREFIX, create_contexts, decrypt_average, from_params, load_context


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    server, client = create_contexts()
    folder = tmp_path_factory.mktemp("keys")
    (folder / "s").write_bytes(server)
    (folder / "c").write_bytes(client)
    return load_context(folder / "s"), load_context(folder / "c")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FedOAPNet(channels=[4, 8, 8, 16], bottleneck_channels=16)


def _trained(shared, shift):
    return {k: v + shift * torch.ones_like(v) for k, v in shared.items()}


def test_only_shared_parameters_leave_the_site_and_only_as_ciphertext(contexts, net):
    _, client_ctx = contexts
    glob = net.shared_state_dict()
    payload, _ = SitePrivacy(he_context=client_ctx).outgoing(_trained(glob, 0.01), glob, weight=12)
    assert all(k.startswith(HE_KEY_PREFIX) for k in payload)
    assert all(v.dtype in (torch.uint8, torch.float64) for v in payload.values())
    update = from_params(payload)
    assert update.layout.keys == sorted(net.shared_keys)
    assert not set(update.layout.keys) & set(net.local_keys)  # query path, adapter and head never leave


def test_noise_is_added_to_plaintext_before_encryption(contexts, net):
    server_ctx, client_ctx = contexts
    glob = net.shared_state_dict()
    local = _trained(glob, 0.05)
    dp = UpdateDPConfig(clip_norm=0.5, noise_multiplier=0.2)
    payload, metrics = SitePrivacy(he_context=client_ctx, update_dp=dp).outgoing(local, glob, weight=3)
    inside = decrypt_average(from_params(payload), client_ctx)  # what the ciphertext holds, divided by the weight

    update = {k: (local[k] - glob[k]).double() for k in glob}
    norm = float(torch.sqrt(sum(u.square().sum() for u in update.values())))
    assert norm > 0.5  # the update is clipped
    residual = torch.cat([(torch.as_tensor(inside[k]).double() - glob[k].double() - update[k] * 0.5 / norm).flatten()
                          for k in glob])
    # what is left after removing the clipped update is the Gaussian noise, std sigma * C = 0.1, drawn in plaintext
    # (CKKS adds only ~1e-3 of error)
    assert abs(float(residual.std()) - 0.1) < 0.005 and abs(float(residual.mean())) < 0.005
    assert "dp_update_norm" not in metrics and "dp_update_scale" not in metrics  # they would undo the clipping
    assert metrics["dp_update_epsilon"] > 0


def test_server_sums_ciphertexts_into_the_weighted_mean(contexts, net):
    server_ctx, client_ctx = contexts
    assert not server_ctx.has_secret_key()
    glob = net.shared_state_dict()
    agg = EncryptedSum(glob, server_ctx)
    locals_, weights = [_trained(glob, s) for s in (0.1, -0.2, 0.3)], [10, 30, 5]
    for i, (local, w) in enumerate(zip(locals_, weights)):
        payload, _ = SitePrivacy(he_context=client_ctx).outgoing(local, glob, weight=w)
        assert agg.add(f"site-{i}", {**payload, "head.conv.weight": torch.zeros(1)}, w) == ["head.conv.weight"]
    aggregate = agg.result()
    with pytest.raises(ValueError):  # the server's own context cannot decrypt what it holds
        decrypt_average(from_params(aggregate), server_ctx)
    mean = decrypt_average(from_params(aggregate), client_ctx)
    for key in glob:
        expected = sum(w * loc[key] for loc, w in zip(locals_, weights)) / sum(weights)
        scale = max(float(expected.abs().max()), 1e-3)
        assert float((torch.as_tensor(mean[key]) - expected).abs().max()) / scale < 1e-3


def test_server_rejects_plaintext_foreign_layouts_and_wrong_weights(contexts, net):
    server_ctx, client_ctx = contexts
    glob = net.shared_state_dict()
    agg = EncryptedSum(glob, server_ctx)
    with pytest.raises(UpdateRejected, match="plaintext update"):
        agg.add("a", glob, 5)
    partial = {k: v for k, v in list(glob.items())[1:]}
    payload, _ = SitePrivacy(he_context=client_ctx).outgoing(partial, partial, weight=5)
    with pytest.raises(UpdateRejected, match="exactly the shared parameters"):
        agg.add("b", payload, 5)
    payload, _ = SitePrivacy(he_context=client_ctx).outgoing(glob, glob, weight=5)
    with pytest.raises(UpdateRejected, match="differs from the sample count"):
        agg.add("c", payload, 6)
    assert agg.count == 0


def test_encrypted_broadcast_needs_a_context(contexts, net):
    server_ctx, client_ctx = contexts
    glob = net.shared_state_dict()
    payload, _ = SitePrivacy(he_context=client_ctx).outgoing(glob, glob, weight=2)
    with pytest.raises(ValueError, match="encryption is off"):
        SitePrivacy().incoming(payload)
    assert SitePrivacy().incoming(glob).keys() == glob.keys()  # round 0: the public initialization in clear
