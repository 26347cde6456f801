"""Tests of fedoap.networks.FedOAPNet (FedOAP, arXiv:2511.18847): shapes, partition, Opacus readiness."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedoap.networks import (
    LOCAL_ONLY_PREFIXES,
    SHARED_PARTITIONS,
    DecoupledCrossAttention,
    FedOAPNet,
    SpatialAdapter,
)

SMALL = {"channels": (4, 8, 8, 16), "bottleneck_channels": 16}

# module "groups" of the state dict: the top-level child, or the child of ``dca``
ALL_GROUPS = {
    "encoder",
    "query_branch",
    "kv_branch",
    "dca.to_q",
    "dca.to_k",
    "dca.to_v",
    "dca.to_out",
    "dca.norm",
    "decoder",
    "adapter",
    "head",
}
EXPECTED_SHARED_GROUPS = {
    "authors": {"encoder", "kv_branch", "dca.to_k", "dca.to_v", "dca.to_out", "dca.norm", "decoder"},
    "kv_only": {"kv_branch", "dca.to_k", "dca.to_v"},
}


def small_net(**kwargs) -> FedOAPNet:
    torch.manual_seed(0)
    return FedOAPNet(**{**SMALL, **kwargs})


def group_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "dca" else parts[0]


# ----------------------------------------------------------------------------- shapes / arguments
@pytest.mark.parametrize(
    "in_ch, out_ch, h, w, heads", [(1, 1, 32, 32, 1), (2, 3, 64, 48, 2), (1, 1, 16, 32, 4)]
)
def test_output_shape(in_ch, out_ch, h, w, heads):
    net = small_net(in_channels=in_ch, out_channels=out_ch, heads=heads)
    out = net(torch.randn(2, in_ch, h, w))
    assert out.shape == (2, out_ch, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 1, 40, 32), (1, 1, 32, 24), (1, 1, 8, 8)])
def test_spatial_size_not_divisible_by_16(shape):
    net = small_net()
    with pytest.raises(ValueError, match=r"divisible by 16.*" + str(shape[2])):
        net(torch.randn(*shape))


def test_single_token_input_rejected():
    with pytest.raises(ValueError, match="more than one attention token"):
        small_net()(torch.randn(2, 1, 16, 16))


@pytest.mark.parametrize("shape", [(1, 2, 32, 32), (1, 32, 32), (1, 1, 1, 32, 32)])
def test_wrong_input_rank_or_channels(shape):
    with pytest.raises(ValueError):
        small_net()(torch.randn(*shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0},
        {"in_channels": True},
        {"out_channels": -1},
        {"out_channels": 1.5},
        {"channels": (4, 8, 8)},
        {"channels": (4, 8, 8, 16, 32)},
        {"channels": "abcd"},
        {"channels": (4, 8, 0, 16)},
        {"channels": (4, 8, 8.5, 16)},
        {"channels": 16},
        {"bottleneck_channels": 0},
        {"bottleneck_channels": 1},
        {"attention_dim": 0},
        {"heads": 0},
        {"heads": 3},  # does not divide the bottleneck width 16
        {"attention_dim": 12, "heads": 5},
        {"partition": "nope"},
        {"partition": None},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"dropout": "0.1"},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        FedOAPNet(**{**SMALL, **kwargs})


def test_constructor_args_stored_unchanged_and_recreatable():
    channels = [4, 8, 8, 16]  # a list: must be stored as given, not converted
    kwargs = dict(
        in_channels=2,
        out_channels=3,
        channels=channels,
        bottleneck_channels=16,
        attention_dim=8,
        heads=2,
        partition="kv_only",
        dropout=0.1,
        use_cross_attention=True,
        use_adapter=True,
    )
    net = FedOAPNet(**kwargs)
    params = list(inspect.signature(FedOAPNet.__init__).parameters)[1:]
    assert set(params) == set(kwargs)
    for name, value in kwargs.items():
        assert getattr(net, name) is value or getattr(net, name) == value
        assert type(getattr(net, name)) is type(value)
    assert net.channels is channels

    # an exporter re-creates the model from the attributes
    clone = FedOAPNet(**{name: getattr(net, name) for name in params})
    clone.load_state_dict(net.state_dict())  # same keys and shapes
    assert clone.shared_keys == net.shared_keys

    defaults = FedOAPNet()
    assert defaults.attention_dim is None and defaults.channels == (16, 32, 64, 128)


# ----------------------------------------------------------------------------- attention
def test_tokens_are_positions_at_one_sixteenth_resolution():
    net = small_net(heads=2)
    captured = {}
    handle = net.dca.register_forward_hook(lambda mod, args, out: captured.update(args=args, out=out))
    b, h, w = 2, 64, 32
    net(torch.randn(b, 1, h, w))
    handle.remove()
    q_feat, kv_feat = captured["args"]
    assert q_feat.shape == kv_feat.shape == (b, 16, h // 16, w // 16)
    out, attention = net.dca(q_feat, kv_feat, return_attention=True)
    tokens = (h // 16) * (w // 16)
    assert attention.shape == (b, 2, tokens, tokens)
    assert torch.allclose(attention.sum(-1), torch.ones(b, 2, tokens))
    assert torch.allclose(out, captured["out"])


@pytest.mark.parametrize("heads", [1, 2])
def test_dca_matches_formula(heads):
    torch.manual_seed(1)
    dca = DecoupledCrossAttention(channels=8, attention_dim=6 if heads == 2 else None, heads=heads)
    xq, xkv = torch.randn(2, 8, 3, 2), torch.randn(2, 8, 3, 2)
    d = dca.inner_dim
    dh = d // heads

    def proj(conv, x):  # (B, C, h, w) -> (B, heads, dh, N)
        return conv(x).reshape(2, heads, dh, 6)

    q, k, v = proj(dca.to_q, xq), proj(dca.to_k, xkv), proj(dca.to_v, xkv)
    a = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(dh), dim=-1)
    ctx = torch.einsum("bhdj,bhij->bhdi", v, a).reshape(2, d, 3, 2)
    expected = dca.norm(dca.to_out(ctx) + xq)
    assert isinstance(dca.norm, nn.GroupNorm) and dca.norm.num_groups == 8
    assert torch.allclose(dca(xq, xkv), expected, atol=1e-6)


def test_dca_arguments_and_inputs():
    for kwargs in ({"channels": 0}, {"channels": 8, "heads": 3}, {"channels": 8, "num_groups": 3}):
        with pytest.raises(ValueError):
            DecoupledCrossAttention(**kwargs)
    assert DecoupledCrossAttention(48).norm.num_groups == 24  # largest divisor of 48 that is <= 32
    assert DecoupledCrossAttention(1024).norm.num_groups == 32
    dca = DecoupledCrossAttention(8)
    with pytest.raises(ValueError):
        dca(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 4))
    with pytest.raises(ValueError):
        dca(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2))


def test_spatial_adapter_matches_formula():
    torch.manual_seed(2)
    adapter = SpatialAdapter(4)
    for p in adapter.parameters():  # non-trivial affine parameters
        nn.init.normal_(p)
    x = torch.randn(2, 4, 8, 8)

    def conv_in(block, inp):
        conv, norm = block.conv, block.adn.N
        return F.instance_norm(conv(inp), weight=norm.weight, bias=norm.bias, eps=norm.eps)

    expected = F.relu(conv_in(adapter.conv_2, F.relu(conv_in(adapter.conv_1, x))) + conv_in(adapter.skip, x))
    assert torch.allclose(adapter(x), expected, atol=1e-5)
    assert adapter.skip.conv.kernel_size == (1, 1) and adapter.conv_1.conv.kernel_size == (3, 3)


# ----------------------------------------------------------------------------- partition
@pytest.mark.parametrize("partition", sorted(SHARED_PARTITIONS))
def test_exact_shared_set(partition):
    net = small_net(partition=partition)
    keys = list(net.state_dict())
    assert {group_of(k) for k in keys} == ALL_GROUPS
    assert {group_of(k) for k in net.shared_keys} == EXPECTED_SHARED_GROUPS[partition]
    assert {group_of(k) for k in net.local_keys} == ALL_GROUPS - EXPECTED_SHARED_GROUPS[partition]
    expected_prefixes = tuple(p + "." for p in EXPECTED_SHARED_GROUPS[partition])
    assert net.shared_keys == sorted(k for k in keys if k.startswith(expected_prefixes))


@pytest.mark.parametrize("partition", sorted(SHARED_PARTITIONS))
def test_local_path_never_shared(partition):
    net = small_net(partition=partition)
    never = ("query_branch.", "dca.to_q.", "adapter.", "head.")
    assert set(LOCAL_ONLY_PREFIXES) == {p[:-1] for p in never}
    assert not [k for k in net.shared_keys if k.startswith(never)]
    local = set(net.local_keys)
    assert all(k in local for k in net.state_dict() if k.startswith(never))
    # and at the level of the declared prefixes
    for shared_prefix in SHARED_PARTITIONS[partition]:
        for local_prefix in LOCAL_ONLY_PREFIXES:
            assert not (shared_prefix + ".").startswith(local_prefix + ".")
            assert not (local_prefix + ".").startswith(shared_prefix + ".")


@pytest.mark.parametrize("partition", sorted(SHARED_PARTITIONS))
def test_shared_and_local_cover_state_dict(partition):
    net = small_net(partition=partition)
    state = net.state_dict()
    shared, local = set(net.shared_keys), set(net.local_keys)
    assert shared | local == set(state)
    assert not shared & local
    assert shared and local
    assert net.shared_keys == sorted(net.shared_keys) and net.local_keys == sorted(net.local_keys)
    sd = net.shared_state_dict()
    assert set(sd) == shared
    assert all(torch.equal(sd[k], state[k]) for k in sd)
    assert set(net.local_state_dict()) == local


def test_no_buffers_in_state_dict():
    net = small_net()
    assert list(net.buffers()) == []
    assert set(net.state_dict()) == {n for n, _ in net.named_parameters()}


def test_is_shared_key_prefix_boundaries():
    assert FedOAPNet.is_shared_key("dca.to_k.weight", "kv_only")
    assert FedOAPNet.is_shared_key("dca.to_k", "kv_only")
    assert not FedOAPNet.is_shared_key("dca.to_kx.weight", "kv_only")
    assert not FedOAPNet.is_shared_key("dca.to_kx.weight", "authors")
    assert not FedOAPNet.is_shared_key("kv_branchy.convs.weight", "kv_only")
    assert not FedOAPNet.is_shared_key("encoderx.weight", "authors")
    assert FedOAPNet.is_shared_key("encoder.conv_0.conv_0.conv.weight", "authors")
    assert not FedOAPNet.is_shared_key("encoder.conv_0.conv_0.conv.weight", "kv_only")
    assert not FedOAPNet.is_shared_key("dca.to_q.weight", "authors")
    with pytest.raises(ValueError):
        FedOAPNet.is_shared_key("head.weight", "unknown")


def test_load_shared_state_dict_touches_only_shared():
    sender = small_net()
    torch.manual_seed(123)
    receiver = FedOAPNet(**SMALL)
    local_before = {k: v.clone() for k, v in receiver.local_state_dict().items()}
    receiver.load_shared_state_dict(sender.shared_state_dict())
    for k, v in receiver.state_dict().items():
        if k in local_before:
            assert torch.equal(v, local_before[k])
        else:
            assert torch.equal(v, sender.state_dict()[k])
    with pytest.raises(ValueError, match="unexpected"):
        receiver.load_shared_state_dict(sender.state_dict())  # contains local keys
    partial = sender.shared_state_dict()
    partial.pop(sender.shared_keys[0])
    with pytest.raises(ValueError, match="missing"):
        receiver.load_shared_state_dict(partial)


# ----------------------------------------------------------------------------- data flow / gradients
@pytest.mark.parametrize(
    "param",
    [
        "query_branch.convs.conv_1.conv.weight",
        "dca.to_q.weight",
        "kv_branch.convs.conv_1.conv.weight",
        "dca.to_k.weight",
        "dca.to_v.weight",
        "adapter.conv_2.conv.weight",
    ],
)
def test_branch_weights_change_output(param):
    net = small_net()
    x = torch.randn(2, 1, 64, 64)
    weight = dict(net.named_parameters())[param]
    with torch.no_grad():
        before = net(x)
        weight.add_(torch.randn_like(weight))
        after = net(x)
    assert (after - before).abs().max() > 1e-4


def test_backward_reaches_every_parameter():
    net = small_net(heads=2)
    out = net(torch.randn(2, 1, 32, 32))
    F.binary_cross_entropy_with_logits(out, (torch.rand_like(out) > 0.8).float()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert net.head.weight.grad.abs().sum() > 0
    assert net.dca.to_q.weight.grad.abs().sum() > 0
    assert net.dca.to_k.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Opacus readiness
def test_no_inplace_activation():
    net = small_net()
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert relus
    assert not [m for m in net.modules() if getattr(m, "inplace", False)]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_validator_and_per_sample_gradients():
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    net = small_net().double()
    assert ModuleValidator.validate(net, strict=False) == []

    reference = small_net().double()
    reference.load_state_dict(net.state_dict())
    gsm = GradSampleModule(net, loss_reduction="sum")
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    gsm(x).sum().backward()
    reference(x[1:2]).sum().backward()
    for name, p in net.named_parameters():
        ref = dict(reference.named_parameters())[name].grad
        assert p.grad_sample.shape == (3, *p.shape), name
        assert torch.allclose(p.grad_sample[1], ref, atol=1e-8, rtol=1e-6), name


@pytest.mark.parametrize("cross_attention, adapter", [(False, True), (True, False), (False, False)])
def test_ablation_switches_remove_the_module_and_keep_the_partition_rules(cross_attention, adapter):
    full = FedOAPNet(channels=[4, 8, 8, 16], bottleneck_channels=16)
    net = FedOAPNet(channels=[4, 8, 8, 16], bottleneck_channels=16, use_cross_attention=cross_attention,
                    use_adapter=adapter)
    keys = set(net.state_dict())
    assert any(k.startswith(("dca.", "query_branch.")) for k in keys) == cross_attention
    assert any(k.startswith("adapter.") for k in keys) == adapter
    assert keys <= set(full.state_dict())  # an ablation only removes modules
    assert set(net.shared_keys) == {k for k in full.shared_keys if k in keys}
    assert "kv_branch.convs.conv_0.conv.weight" in net.shared_keys  # without DCA, the bottleneck is the shared kv branch
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="use_adapter must be True or False"):
        FedOAPNet(use_adapter=1)
