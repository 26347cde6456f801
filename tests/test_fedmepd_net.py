"""Tests of FedMEPD (Liu et al., arXiv:2603.04887): the network (fedoap.networks.fedmepd_net) and its pure rules
(fedoap.methods.fedmepd_rules). Small 16^3 volumes and channels (4, 8, 16): the whole file runs in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from fedoap.methods.fedmepd_rules import (
    FilterPersonalization,
    assign_to_anchors,
    class_prototypes,
    cluster_means,
    ema,
    filter_cosines,
    kmeans,
    kmeans_anchors,
    owner_mean,
    state_delta,
)
from fedoap.networks.fedmepd_net import BRATS_MODALITIES, FedMEPDNet, FilterGroup

SMALL = {"channels": (4, 8, 16)}
SIZE = 16


def _net(**kwargs) -> FedMEPDNet:
    torch.manual_seed(0)
    return FedMEPDNet(**{**SMALL, **kwargs})


def _volume(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _set_random_anchors(net: FedMEPDNet) -> None:
    gen = torch.Generator().manual_seed(2)
    net.set_anchors([torch.randn(a.shape, generator=gen) for a in net.anchor_tensors()])


# ---------------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize(
    "present",
    [
        [True, False, False, False],
        [False, True, False, True],
        [True, True, True, True],
    ],
    ids=["one", "two", "all"],
)
@pytest.mark.parametrize("anchors", [False, True], ids=["no_anchors", "anchors"])
def test_missing_modalities_forward_backward(present, anchors):
    net = _net()
    if anchors:
        _set_random_anchors(net)
    x = _volume()
    for m, has in enumerate(present):  # an absent modality's channel is never read, even if it is garbage
        if not has:
            x[:, m] = float("nan")
    out = net(x, present=torch.tensor(present))
    assert out.shape == (2, 3, SIZE, SIZE, SIZE)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for m, name in enumerate(BRATS_MODALITIES):
        grads = [p.grad for p in net.encoders[name].parameters()]
        if present[m]:
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(bool(g.abs().sum() > 0) for g in grads)
        else:
            assert all(g is None or bool((g == 0).all()) for g in grads)
    attention_grads = [p.grad for p in net.attention.parameters()]
    if anchors:
        assert any(g is not None and bool(g.abs().sum() > 0) for g in attention_grads)
    else:
        assert all(g is None for g in attention_grads)


def test_per_sample_mask_equals_separate_samples():
    net = _net()
    _set_random_anchors(net)
    net.eval()
    x = _volume()
    present = torch.tensor([[True, False, True, False], [True, True, True, True]])
    x[0, 1] = float("nan")  # sample 0 has no T1ce: not read
    together = net(x, present=present)
    assert torch.isfinite(together).all()
    for b in range(2):
        alone = net(x[b : b + 1], present=present[b])
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-4, atol=1e-5)
    # an encoder that no sample has gets no gradient; a per-sample-absent one only gets the other samples' gradient
    net.zero_grad(set_to_none=True)
    net(x, present=torch.tensor([[True, False, False, False], [True, False, True, False]])).sum().backward()
    assert all(p.grad is None for p in net.encoders["t1ce"].parameters())
    assert all(p.grad is None for p in net.encoders["t2"].parameters())
    assert all(p.grad is not None for p in net.encoders["t1"].parameters())


def test_fused_features_are_the_mean_over_present_encoders():
    net = _net()
    x = _volume(1)
    with torch.no_grad():
        fused = net.features(x, torch.tensor([True, False, True, False]))
        flair = net.encoders["flair"](x[:, 0:1])
        t1 = net.encoders["t1"](x[:, 2:3])
    assert [tuple(f.shape) for f in fused] == [(1, 4, 16, 16, 16), (1, 8, 8, 8, 8), (1, 16, 4, 4, 4)]
    for f, a, b in zip(fused, flair, t1):
        torch.testing.assert_close(f, (a + b) / 2)


def test_anchor_attention_switch():
    net = _net()
    x = _volume(1)
    assert not net.anchors_initialized
    with pytest.raises(ValueError, match="no anchors"):
        net(x, use_anchors=True)
    plain = net(x)
    _set_random_anchors(net)
    assert net.anchors_initialized
    assert not torch.allclose(net(x), plain)
    torch.testing.assert_close(net(x, use_anchors=False), plain)
    server = _net(anchor_attention=False)
    _set_random_anchors(server)
    torch.testing.assert_close(server(x), server(x, use_anchors=False))
    # the anchors travel in the state dict (buffers), with their flag
    other = _net()
    other.load_state_dict(net.state_dict())
    assert other.anchors_initialized


def test_anchor_shapes_and_set_anchors_checks():
    net = _net()
    assert [tuple(a.shape) for a in net.anchor_tensors()] == [(4, 4, 4), (4, 4, 8), (4, 4, 16)]
    assert net.anchor_keys == ["anchors.initialized", "anchors.scale_0", "anchors.scale_1", "anchors.scale_2"]
    assert not any(a.requires_grad for a in net.anchor_tensors())
    assert all(not k.startswith("anchors.") for k, _ in net.named_parameters())
    net2 = _net(anchor_classes=2, anchors_per_class=3)
    assert [tuple(a.shape) for a in net2.anchor_tensors()] == [(2, 3, 4), (2, 3, 8), (2, 3, 16)]
    with pytest.raises(ValueError, match="scales"):
        net.set_anchors([torch.zeros(4, 4, 4)])
    with pytest.raises(ValueError, match="shape"):
        net.set_anchors([torch.zeros(4, 4, 4), torch.zeros(4, 4, 8), torch.zeros(4, 4, 15)])
    bad = [torch.zeros(a.shape) for a in net.anchor_tensors()]
    bad[1][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        net.set_anchors(bad)
    assert not net.anchors_initialized


def test_key_naming_and_filter_groups():
    net = _net()
    keys = set(net.state_dict())
    for m in BRATS_MODALITIES:
        enc = net.encoder_keys(m)
        assert enc and all(k.startswith(f"encoders.{m}.") for k in enc)
    assert net.modality_keys() == {m: net.encoder_keys(m) for m in BRATS_MODALITIES}
    with pytest.raises(ValueError, match="unknown modality"):
        net.encoder_keys("dwi")
    parts = [set(net.encoder_keys(m)) for m in BRATS_MODALITIES]
    parts += [set(net.decoder_keys), set(net.local_keys), set(net.anchor_keys)]
    assert sum(len(p) for p in parts) == len(keys) and set().union(*parts) == keys
    assert set(net.shared_keys) == keys - set(net.local_keys) - set(net.anchor_keys)
    assert all(k.startswith("attention.") for k in net.local_keys)

    groups = net.decoder_filter_groups()
    covered = [key for g in groups for key, _ in g.members]
    assert sorted(covered) == net.decoder_keys  # every decoder key exactly once
    state = net.state_dict()
    for g in groups:
        assert isinstance(g, FilterGroup)
        assert all(state[key].shape[dim] == g.filters for key, dim in g.members)
    deconv = [g for g in groups if g.name.endswith("deconv")]
    assert deconv and all(g.members[0][1] == 1 for g in deconv)  # ConvTranspose3d: (in, out, k, k, k)
    assert groups[-1].name == "decoder.head" and groups[-1].filters == 3


def test_constructor_and_input_checks():
    with pytest.raises(ValueError):
        FedMEPDNet(channels=(4,))
    with pytest.raises(ValueError):
        FedMEPDNet(channels=(4, 8), heads=3)
    with pytest.raises(ValueError):
        FedMEPDNet(in_modalities=2, modality_names=("a", "a"))
    assert FedMEPDNet(in_modalities=2, channels=(4, 8)).modalities == ("m0", "m1")
    net = _net()
    with pytest.raises(ValueError, match="at least one present"):
        net(_volume(1), present=torch.tensor([False] * 4))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 4, 18, 16, 16))
    with pytest.raises(ValueError, match="present must have shape"):
        net(_volume(2), present=torch.ones(3, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- owner mean
def test_owner_mean_hand_computed():
    modality_keys = {m: [f"encoders.{m}.w"] for m in BRATS_MODALITIES}
    site_a = {
        "encoders.flair.w": torch.tensor([1.0, 2.0]),
        "encoders.t1ce.w": torch.tensor([4.0, 8.0]),
        "decoder.w": torch.tensor([0.0, 4.0]),
    }
    site_b = {
        "encoders.flair.w": torch.tensor([100.0, 100.0]),  # B does not own FLAIR: ignored
        "encoders.t1ce.w": torch.tensor([8.0, 0.0]),
        "decoder.w": torch.tensor([4.0, 0.0]),
    }
    out = owner_mean([(site_a, 1.0, {"flair", "t1ce"}), (site_b, 3.0, {"t1ce"})], modality_keys)
    assert set(out) == {"encoders.flair.w", "encoders.t1ce.w", "decoder.w"}  # T1, T2: nobody has them
    torch.testing.assert_close(out["encoders.flair.w"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out["encoders.t1ce.w"], torch.tensor([7.0, 2.0]))  # (1*a + 3*b) / 4
    torch.testing.assert_close(out["decoder.w"], torch.tensor([3.0, 1.0]))


def test_owner_mean_checks_and_network_keys():
    modality_keys = {m: [f"encoders.{m}.w"] for m in BRATS_MODALITIES}
    ok = {"encoders.flair.w": torch.ones(2), "decoder.w": torch.ones(2)}
    with pytest.raises(ValueError, match="at least one"):
        owner_mean([], modality_keys)
    with pytest.raises(ValueError, match="weight"):
        owner_mean([(ok, 0.0, {"flair"})], modality_keys)
    with pytest.raises(ValueError, match="unknown modalities"):
        owner_mean([(ok, 1.0, {"dwi"})], modality_keys)
    with pytest.raises(ValueError, match="lacks"):
        owner_mean([(ok, 1.0, {"flair", "t2"})], modality_keys)
    with pytest.raises(ValueError, match="disagrees"):
        owner_mean([(ok, 1.0, {"flair"}), ({"encoders.flair.w": torch.ones(2)}, 1.0, {"flair"})], modality_keys)
    # on the network's real keys: a site that sends only its own encoders and the decoder
    net = _net()
    shared = net.shared_state_dict()
    mine = {k: v for k, v in shared.items() if k.startswith(("encoders.flair.", "decoder."))}
    out = owner_mean([(mine, 2.0, {"flair"})], net.modality_keys())
    assert set(out) == set(mine)
    net.load_shared_state_dict(out)


# ---------------------------------------------------------------------------------------------------- personalization
GROUPS = [
    ("layer", (("layer.weight", 0), ("layer.bias", 0))),
    FilterGroup("up", (("up.weight", 1),), 2),  # a transposed convolution: filters along dim 1
]


def test_filter_cosines_hand_computed():
    server = {
        "layer.weight": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]),
        "layer.bias": torch.tensor([0.0, 0.0, 0.0]),
        "up.weight": torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]]),  # (in=2, out=2, k=1)
    }
    site = {
        "layer.weight": torch.tensor([[-1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]),
        "layer.bias": torch.tensor([0.0, 2.0, 0.0]),
        "up.weight": torch.tensor([[[1.0], [0.0]], [[1.0], [-2.0]]]),
    }
    cos = filter_cosines(server, site, GROUPS)
    # layer: filter 0: (1,0,0).(-1,0,0) = -1; filter 1: (1,1,0).(1,1,2) = 2 / (sqrt2 sqrt6); filter 2: zero update
    expected = torch.tensor([-1.0, 2.0 / (2.0**0.5 * 6.0**0.5), 0.0], dtype=torch.float64)
    torch.testing.assert_close(cos["layer"], expected)
    # up: filter 0 = weight[:, 0]: (1,0).(1,1) = 1/sqrt2; filter 1 = weight[:, 1]: (0,2).(0,-2) = -1
    torch.testing.assert_close(cos["up"], torch.tensor([2.0**-0.5, -1.0], dtype=torch.float64))


def test_filter_personalization_counter_rule_and_state():
    rule = FilterPersonalization(patience=3)
    # filter 0: - - + - - -  -> counters 1 2 0 1 2 3: personal exactly at round 6
    # filter 1: - - - + - +  -> personal at round 3, stays personal (counter frozen at 3)
    # filter 2: 0 - 0 - 0 -  -> a zero cosine resets: never personal
    seq = [
        [-0.5, -0.1, 0.0],
        [-0.2, -0.3, -0.4],
        [0.3, -0.9, 0.0],
        [-0.1, 0.5, -1.0],
        [-0.7, -0.5, 0.0],
        [-0.2, 0.8, -0.3],
    ]
    expected_counters = [[1, 1, 0], [2, 2, 1], [0, 3, 0], [1, 3, 1], [2, 3, 0], [3, 3, 1]]
    expected_personal = [
        [False, False, False],
        [False, False, False],
        [False, True, False],
        [False, True, False],
        [False, True, False],
        [True, True, False],
    ]
    for r, (cos, counters, personal) in enumerate(zip(seq, expected_counters, expected_personal)):
        masks = rule.update({"layer": torch.tensor(cos)})
        assert rule.counters["layer"].tolist() == counters, f"round {r + 1}"
        assert masks["layer"].tolist() == personal, f"round {r + 1}"
        if r == 2:  # state round-trips mid-way and the copy continues identically
            saved = rule.state_dict()
            copy = FilterPersonalization(patience=99)
            copy.load_state_dict(saved)
            assert copy.patience == 3
    for cos in seq[3:]:
        copy.update({"layer": torch.tensor(cos)})
    assert copy.counters["layer"].tolist() == rule.counters["layer"].tolist()
    assert copy.personal["layer"].tolist() == rule.personal["layer"].tolist()
    # the saved state is a copy, unaffected by later updates
    assert saved["counters"]["layer"].tolist() == [0, 3, 0]
    # and it survives the site checkpoint format (safetensors + JSON, no pickle)
    from fedoap.site.checkpoint import decode_state, encode_state

    restored = FilterPersonalization()
    restored.load_state_dict(decode_state(encode_state(rule.state_dict()), "test"))
    assert restored.patience == 3
    assert restored.counters["layer"].tolist() == rule.counters["layer"].tolist()
    assert restored.personal["layer"].tolist() == rule.personal["layer"].tolist()
    with pytest.raises(ValueError, match="filters"):
        rule.update({"layer": torch.zeros(2)})
    with pytest.raises(ValueError):
        FilterPersonalization(patience=0)
    with pytest.raises(ValueError):
        rule.load_state_dict({"patience": 3, "counters": {"a": torch.zeros(2)}, "personal": {}})


def test_filter_personalization_merge_keeps_personal_filters():
    rule = FilterPersonalization(patience=1)
    rule.update({"layer": torch.tensor([-1.0, 1.0, 0.5]), "up": torch.tensor([1.0, -1.0])})
    server = {
        "layer.weight": torch.zeros(3, 2),
        "layer.bias": torch.zeros(3),
        "up.weight": torch.zeros(2, 2, 1),
        "other": torch.zeros(1),
    }
    local = {
        "layer.weight": torch.ones(3, 2),
        "layer.bias": torch.ones(3),
        "up.weight": torch.ones(2, 2, 1),
    }
    merged = rule.merge(server, local, GROUPS)
    assert merged["layer.weight"].tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert merged["layer.bias"].tolist() == [1.0, 0.0, 0.0]
    assert merged["up.weight"][:, 0].flatten().tolist() == [0.0, 0.0]
    assert merged["up.weight"][:, 1].flatten().tolist() == [1.0, 1.0]
    assert merged["other"].tolist() == [0.0]
    assert server["layer.weight"].sum() == 0  # inputs untouched


def test_personalization_on_the_network():
    net = _net()
    groups = net.decoder_filter_groups()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    site_update = {k: torch.randn(v.shape, generator=gen) for k, v in before.items() if k.startswith("decoder.")}
    server_update = {k: -v for k, v in site_update.items()}  # every cosine is -1
    cos = filter_cosines(server_update, site_update, groups)
    assert set(cos) == {g.name for g in groups}
    assert all(torch.allclose(c, torch.full_like(c, -1.0)) for c in cos.values())
    rule = FilterPersonalization(patience=2)
    rule.update(cos)
    assert not any(m.any() for m in rule.personal_masks().values())
    rule.update(cos)
    assert all(m.all() for m in rule.personal_masks().values())
    new_global = {k: v + 1.0 for k, v in before.items() if k.startswith("decoder.")}
    torch.testing.assert_close(state_delta(new_global, before)["decoder.head.bias"], torch.ones(3))
    merged = rule.merge(new_global, net.state_dict(), groups)
    for k in merged:  # every filter personal: the site keeps all its decoder values
        torch.testing.assert_close(merged[k], before[k])


# ---------------------------------------------------------------------------------------------------- anchors
def test_ema_hand_computed():
    old, new = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(ema(old, new, 0.75), torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(ema(old, new, 1.0), old)
    torch.testing.assert_close(ema(old, new, 0.0), new)
    torch.testing.assert_close(ema(old, new), torch.tensor([1.002, 2.004]))  # default momentum 0.999
    with pytest.raises(ValueError):
        ema(old, new, 1.5)
    with pytest.raises(ValueError):
        ema(old, torch.zeros(3), 0.5)


def test_kmeans_two_obvious_clusters_and_determinism():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20, 3, generator=gen) * 0.1
    b = torch.randn(30, 3, generator=gen) * 0.1 + 10.0
    points = torch.cat([a, b])
    centroids, labels = kmeans(points, 2, 30, torch.Generator().manual_seed(5))
    order = torch.argsort(centroids[:, 0])
    torch.testing.assert_close(centroids[order[0]], a.mean(0))
    torch.testing.assert_close(centroids[order[1]], b.mean(0))
    assert (labels[:20] == order[0]).all() and (labels[20:] == order[1]).all()
    torch.testing.assert_close(assign_to_anchors(points, centroids), labels)

    noise = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    first = kmeans_anchors({0: noise[:30], 1: noise[30:]}, k=3, iters=10, seed=7, return_labels=True)
    second = kmeans_anchors({0: noise[:30], 1: noise[30:]}, k=3, iters=10, seed=7, return_labels=True)
    assert first[0].shape == (2, 3, 4)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][c], second[1][c]) for c in (0, 1))
    # the anchors are the means of their clusters
    for c, pts in ((0, noise[:30]), (1, noise[30:])):
        torch.testing.assert_close(cluster_means(pts, first[1][c], 3), first[0][c])
    # fewer points than clusters: the points, repeated
    few, few_labels = kmeans(torch.tensor([[1.0], [2.0]]), 3)
    assert few.flatten().tolist() == [1.0, 2.0, 1.0] and few_labels.tolist() == [0, 1]
    with pytest.raises(ValueError):
        kmeans_anchors({1: noise}, k=2)
    with pytest.raises(ValueError):
        kmeans(torch.zeros(0, 3), 2)


def test_cluster_means_fallback_for_empty_cluster():
    pts = torch.tensor([[0.0], [2.0], [10.0]])
    fallback = torch.tensor([[-1.0], [-2.0], [-3.0]])
    out = cluster_means(pts, torch.tensor([0, 0, 2]), 3, fallback=fallback)
    assert out.flatten().tolist() == [1.0, -2.0, 10.0]


def test_class_prototypes_and_server_anchor_pipeline():
    # features 2^3: value = the x index (0 or 1) in channel 0, constant 5 in channel 1
    feat = torch.zeros(1, 2, 2, 2, 2)
    feat[:, 0, 1] = 1.0
    feat[:, 1] = 5.0
    regions = torch.zeros(1, 3, 4, 4, 4)
    regions[:, 0, 2:] = 1.0  # WT: the upper half in x
    regions[:, 1, 2:, :2] = 1.0  # TC: a quarter inside it
    protos, present = class_prototypes(feat, regions)
    assert present.tolist() == [[True, True, True, False]]  # background, WT, TC, ET (absent)
    torch.testing.assert_close(protos[0, 0], torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(protos[0, 1], torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(protos[0, 2], torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(protos[0, 3], torch.tensor([0.0, 0.0]))

    # server: full-modal fused features -> per-class prototypes -> k-means anchors -> the site's buffers
    net = _net(anchors_per_class=2)
    x = _volume(3)
    labels = torch.zeros(3, 3, SIZE, SIZE, SIZE)
    labels[:, 0, 4:12, 4:12, 4:12] = 1.0
    labels[:, 1, 6:10, 6:10, 6:10] = 1.0
    labels[:, 2, 7:9, 7:9, 7:9] = 1.0
    with torch.no_grad():
        fused = net.features(x)
    anchors = []
    for s, f in enumerate(fused):
        p, ok = class_prototypes(f, labels)
        per_class = {c: p[ok[:, c], c] for c in range(p.shape[1])}
        anchors.append(kmeans_anchors(per_class, k=2, iters=30, seed=s))
    net.set_anchors(anchors)
    out = net(x, present=torch.tensor([False, True, False, False]))
    assert torch.isfinite(out).all()
