"""Defining rules of FedRep, FedDP, SioBN and PN (methods that share part of the model or change its normalization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedoap.data import SliceSet
from fedoap.methods import METHODS, get_method
from fedoap.methods.fedrep import FedRep
from fedoap.training import LocalTrainer, TrainConfig

TINY = {"channels": [2, 4, 4, 8], "bottleneck_channels": 8}


def tiny_split(n: int = 6, size: int = 32, seed: int = 0) -> SliceSet:
    g = np.random.default_rng(seed)
    images = g.random((n, 1, size, size), dtype=np.float32)
    labels = (g.random((n, 1, size, size)) > 0.7).astype(np.float32)
    return SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(n)])


def tiny_trainer(method, dp=None, split_seed: int = 0, **config) -> LocalTrainer:
    torch.manual_seed(0)
    model = method.build_model(dict(TINY))
    split = tiny_split(seed=split_seed)
    return LocalTrainer(model, method, split, split, TrainConfig(batch_size=2, augment=False, **config), dp=dp)


def test_the_four_methods_are_registered():
    assert {"fedrep", "feddp", "siobn", "pn"} <= set(METHODS)
    for name in ("fedrep", "feddp", "siobn", "pn"):
        assert METHODS[name].name == name and METHODS[name].__doc__


# -- FedRep ------------------------------------------------------------------------------------------------------------
class RecordingFedRep(FedRep):
    """FedRep that keeps a copy of every parameter before each step of a round and at its end."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def _snap(self, model: nn.Module) -> None:
        self.snapshots.append({k: p.detach().clone() for k, p in model.named_parameters()})

    def begin_step(self, model, step, steps_per_round):
        self._snap(model)
        super().begin_step(model, step, steps_per_round)

    def end_round(self, model):
        self._snap(model)
        super().end_round(model)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], keys) -> set[str]:
    return {k for k in keys if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("head_fraction, local_epochs, head_steps", [(0.5, 2, 3), (10 / 11, 2, 5), (0.2, 1, 1)])
def test_fedrep_trains_the_head_then_the_body_and_never_both(head_fraction, local_epochs, head_steps):
    method = RecordingFedRep(head_fraction=head_fraction)
    trainer = tiny_trainer(method, local_epochs=local_epochs, lr=1e-2)
    trainer.load_shared(trainer.shared_params())
    steps = trainer.train_round()["steps"]
    assert steps == 3 * local_epochs and method.head_steps(steps) == head_steps
    keys = list(method.snapshots[0])
    head = {k for k in keys if k.startswith("head.")}
    body = set(keys) - head
    assert head == {"head.weight", "head.bias"}
    for step in range(steps):  # snapshot `step` is the state before that step, `step + 1` the state after it
        changed = _changed(method.snapshots[step], method.snapshots[step + 1], keys)
        if step < head_steps:
            assert changed and changed <= head, f"step {step}: the head phase moved {sorted(changed - head)[:3]}"
        else:
            assert changed and changed <= body, f"step {step}: the body phase moved {sorted(changed & head)}"
    # the phases together moved everything (AdamW moves every parameter that has a gradient)
    assert _changed(method.snapshots[0], method.snapshots[-1], keys) == set(keys)


def test_fedrep_never_shares_the_head_and_restores_training_of_every_parameter():
    method = FedRep()
    trainer = tiny_trainer(method, finetune_epochs=1)
    keys = set(trainer.model.state_dict())
    assert set(trainer.shared_keys) == keys - {"head.weight", "head.bias"}
    assert set(trainer.shared_params()) == set(trainer.shared_keys)
    trainer.load_shared(trainer.shared_params())
    trainer.train_round()
    assert all(p.requires_grad for p in trainer.model.parameters())  # end_round: the fine-tuning trains everything
    # one fine-tuning epoch (the trainer's loop, outside the rounds: no begin_step) moves head and body alike
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    trainer._epoch(method.finetune_loss(), trainer._finetune_optimizer())
    after = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    assert _changed(before, after, before) == set(before)


def test_fedrep_phase_boundary_follows_head_fraction():
    method = FedRep(head_fraction=0.75)
    assert [method.head_steps(n) for n in (1, 2, 3, 4, 8, 100)] == [0, 1, 2, 3, 6, 75]
    assert FedRep().head_steps(11) == 10  # the authors' 10 head epochs per body epoch
    assert FedRep(head_fraction=0.01).head_steps(10) == 1 and FedRep(head_fraction=0.99).head_steps(10) == 9
    model = get_method("fedrep", head_fraction=0.5).build_model(dict(TINY))
    m = FedRep(head_fraction=0.5)
    m.begin_step(model, 1, 4)  # head phase
    assert [k for k, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    m.begin_step(model, 2, 4)  # body phase
    assert all(p.requires_grad != k.startswith("head.") for k, p in model.named_parameters())
    m.end_round(model)
    assert all(p.requires_grad for p in model.parameters())
    for bad in (0, 1, 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="head_fraction"):
            FedRep(head_fraction=bad)
    with pytest.raises(ValueError, match="steps_per_round"):
        FedRep().head_steps(0)


def test_fedrep_refuses_dp_sgd():
    from fedoap.privacy.dp import DPSGDConfig

    assert "Opacus" in FedRep().dp_sgd_conflict
    with pytest.raises(ValueError, match="freezes the body and the head"):
        tiny_trainer(FedRep(), dp=DPSGDConfig(noise_multiplier=1.0))


# -- SioBN -------------------------------------------------------------------------------------------------------------
STAT_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def test_siobn_model_has_batch_norm_and_sends_affine_weights_but_never_a_running_statistic():
    method = get_method("siobn")
    model = method.build_model(dict(TINY))
    norms = {type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))}
    assert norms == {nn.BatchNorm2d, nn.GroupNorm}  # BatchNorm in every conv block; the attention keeps GroupNorm
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(n.startswith("encoder.") for n in bn) and any(n.startswith("adapter.") for n in bn)
    keys = set(model.state_dict())
    stats = {f"{n}{s}" for n in bn for s in STAT_SUFFIXES}
    affine = {f"{n}.{p}" for n in bn for p in ("weight", "bias")}
    shared = set(method.shared_keys(model))
    assert stats <= keys and not shared & stats
    assert affine <= shared
    assert shared == keys - stats  # everything else is shared, the attention's GroupNorm included


def test_siobn_round_trip_keeps_each_sites_running_statistics_and_averages_the_rest():
    sites = [tiny_trainer(get_method("siobn"), split_seed=seed) for seed in (0, 1)]
    for site in sites:
        site.load_shared(site.shared_params())
        site.train_round()
    updates = [site.shared_params() for site in sites]
    assert not any(k.endswith(STAT_SUFFIXES) for u in updates for k in u)
    local = [{k: v.clone() for k, v in s.model.state_dict().items() if k.endswith(STAT_SUFFIXES)} for s in sites]
    key = "encoder.conv_0.conv_0.adn.N.running_mean"
    assert not torch.equal(local[0][key], local[1][key])  # different data, different statistics
    assert int(local[0]["encoder.conv_0.conv_0.adn.N.num_batches_tracked"]) == 3
    average = {k: (updates[0][k] + updates[1][k]) / 2 for k in updates[0]}
    for site, stats in zip(sites, local):
        site.load_shared(average)
        state = site.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in stats.items())  # running statistics untouched
        assert torch.equal(state["encoder.conv_0.conv_0.adn.N.weight"], average["encoder.conv_0.conv_0.adn.N.weight"])
    # same shared weights, own statistics: the two sites' eval-mode outputs differ
    x = torch.from_numpy(tiny_split(n=2, seed=5).images)
    with torch.no_grad():
        outs = [s.model.eval()(x) for s in sites]
    assert not torch.allclose(outs[0], outs[1])


def test_siobn_refuses_a_model_without_batch_norm_and_dp_sgd():
    from fedoap.networks import FedOAPNet
    from fedoap.privacy.dp import DPSGDConfig

    with pytest.raises(ValueError, match="BatchNorm"):
        get_method("siobn").shared_keys(FedOAPNet(**TINY))
    assert "BatchNorm" in get_method("siobn").dp_sgd_conflict
    with pytest.raises(ValueError, match="BatchNorm"):
        tiny_trainer(get_method("siobn"), dp=DPSGDConfig(noise_multiplier=1.0))


# -- PN ----------------------------------------------------------------------------------------------------------------
def test_population_norm_uses_its_learned_statistics_not_the_batch():
    from fedoap.networks.population_norm import PopulationNorm

    layer = PopulationNorm(2, eps=1e-5)
    with torch.no_grad():
        layer.population_mean.copy_(torch.tensor([1.0, -2.0]))
        layer.population_var.copy_(torch.tensor([4.0, 0.25]))
        layer.weight.copy_(torch.tensor([3.0, 1.0]))
        layer.bias.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[[[3.0]], [[-1.0]]], [[[1.0]], [[0.0]]]])  # (2, 2, 1, 1)
    expected = torch.tensor([[[[(3 - 1) / (4 + 1e-5) ** 0.5 * 3 + 0.5]], [[(-1 + 2) / (0.25 + 1e-5) ** 0.5]]],
                             [[[0.5]], [[(0 + 2) / (0.25 + 1e-5) ** 0.5]]]])
    torch.testing.assert_close(layer.train()(x), expected)
    torch.testing.assert_close(layer.eval()(x), expected)  # no train/eval difference: nothing estimated per batch
    torch.testing.assert_close(layer(x[:1]), expected[:1])  # a sample's output does not depend on its batch
    layer(x).sum().backward()
    assert layer.population_mean.grad is not None and layer.population_var.grad.abs().sum() > 0
    with torch.no_grad():
        layer.population_var.fill_(-0.5)  # a gradient step may cross zero: |var| keeps the layer defined
    assert torch.isfinite(layer(x)).all()
    for bad in ({"num_features": 0}, {"num_features": 2, "eps": 0.0}):
        with pytest.raises(ValueError):
            PopulationNorm(**bad)


def test_pn_model_normalizes_with_population_norm_and_shares_every_weight_including_the_statistics():
    from fedoap.networks.population_norm import PopulationNorm

    method = get_method("pn")
    model = method.build_model(dict(TINY))
    layers = [n for n, m in model.named_modules() if isinstance(m, PopulationNorm)]
    assert layers and not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    keys = set(model.state_dict())
    assert list(model.buffers()) == [] and keys == {n for n, _ in model.named_parameters()}
    assert {f"{n}.population_{s}" for n in layers for s in ("mean", "var")} <= set(method.shared_keys(model))
    assert set(method.shared_keys(model)) == keys
    model.eval()
    x = torch.from_numpy(tiny_split(n=3).images)
    with torch.no_grad():  # one image alone or in a batch: the same output (up to float32 rounding of outputs ~1)
        torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-4, atol=1e-4)


def test_pn_trains_under_dp_sgd_and_moves_the_population_statistics():
    from fedoap.privacy.dp import DPSGDConfig

    method = get_method("pn")
    assert method.dp_sgd_conflict is None
    trainer = tiny_trainer(method, dp=DPSGDConfig(noise_multiplier=1.0))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.load_shared(trainer.shared_params())
    trainer.train_round()
    after = trainer.model.state_dict()
    key = "encoder.conv_0.conv_0.adn.N.population_var"
    assert key in after and not torch.equal(before[key], after[key])



@pytest.mark.parametrize("conv_init", ["he", "pytorch"])
def test_pn_starts_from_the_benchmark_he_initialization_unless_told_otherwise(conv_init):
    """With PyTorch's default initialization the identity-initialized PN network passes no gradient to its encoder
    (the fast preset's Dice 0.083); He initialization, the benchmark's and the default, does."""
    method = get_method("pn") if conv_init == "he" else get_method("pn", conv_init=conv_init)
    torch.manual_seed(0)
    model = method.build_model({"channels": [8, 16, 32, 64], "bottleneck_channels": 128})
    assert model.conv_init == conv_init
    conv = model.encoder["down_3"].convs.conv_0.conv
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    he_std = (2 / fan_out) ** 0.5
    assert (abs(float(conv.weight.std()) / he_std - 1) < 0.2) == (conv_init == "he")
    split = tiny_split(n=4)
    loss = method.train_loss()(model(torch.from_numpy(split.images)), torch.from_numpy(split.labels))
    loss.backward()
    encoder = sum(float(p.grad.norm()) for k, p in model.named_parameters() if k.startswith("encoder.down_3"))
    assert (encoder > 1e-4) == (conv_init == "he")
    with pytest.raises(ValueError, match="conv_init"):
        get_method("pn", conv_init="xavier")

# -- FedDP -------------------------------------------------------------------------------------------------------------
def test_feddp_keeps_only_the_query_projection_local_unlike_fedoap():
    method = get_method("feddp")
    model = method.build_model(dict(TINY))
    keys = set(model.state_dict())
    shared = set(method.shared_keys(model))
    assert keys - shared == {"dca.to_q.weight", "dca.to_q.bias"}
    fedoap_local = keys - set(get_method("fedoap").shared_keys(get_method("fedoap").build_model(dict(TINY))))
    # FedOAP also keeps the query branch, the adapter and the head local: FedDP shares them
    for prefix in ("query_branch.", "adapter.", "head."):
        assert any(k.startswith(prefix) for k in fedoap_local)
        assert all(k in shared for k in keys if k.startswith(prefix))


def _with_query(model: nn.Module, query: dict[str, torch.Tensor]) -> nn.Module:
    import copy

    twin = copy.deepcopy(model).eval()
    twin.load_state_dict({**model.state_dict(), **query})
    return twin


def test_feddp_calibration_weights_bce_by_the_sites_disagreement():
    method = get_method("feddp", calibration_weight=0.7)
    torch.manual_seed(0)
    model = method.build_model(dict(TINY))
    g = torch.Generator().manual_seed(1)
    queries = {site: {"dca.to_q.weight": torch.randn(8, 8, 1, 1, generator=g),
                      "dca.to_q.bias": torch.randn(8, generator=g)} for site in ("a", "b", "c")}
    method.receive_statistics(model, {s: {k: v.flatten().tolist() for k, v in q.items()} for s, q in queries.items()})
    images = torch.from_numpy(tiny_split(n=3).images)
    labels = torch.from_numpy(tiny_split(n=3, seed=4).labels)
    with torch.no_grad():
        probs = torch.stack([torch.sigmoid(_with_query(model, q)(images)) for q in queries.values()])
    u = probs.std(dim=0)
    u = u / u.max()
    torch.testing.assert_close(method.inconsistency(model, images), u)
    assert float(u.min()) >= 0 and float(u.max()) == pytest.approx(1.0)

    loss_fn = method.finetune_loss()
    model.train()
    loss = method.finetune_step_loss(model, images, labels, loss_fn)
    logits = model(images)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    expected = loss_fn(logits, labels) + 0.7 * (u * bce).mean()
    torch.testing.assert_close(loss, expected)
    assert model.training  # the sites' models are evaluated in eval mode, the fine-tuned model stays in train mode

    # identical query weights everywhere: no disagreement, no calibration term; one site: no term either
    same = {s: {k: v.flatten().tolist() for k, v in queries["a"].items()} for s in ("a", "b")}
    method.receive_statistics(model, same)
    assert float(method.inconsistency(model, images).abs().max()) == 0.0
    method.receive_statistics(model, {"a": same["a"]})
    assert method.inconsistency(model, images) is None
    plain = loss_fn(model(images), labels)
    torch.testing.assert_close(method.finetune_step_loss(model, images, labels, loss_fn), plain)


def test_feddp_sites_models_are_frozen_when_the_fine_tuning_starts():
    method = get_method("feddp")
    torch.manual_seed(0)
    model = method.build_model(dict(TINY))
    g = torch.Generator().manual_seed(2)
    stats = {s: {"dca.to_q.weight": torch.randn(64, generator=g).tolist(),
                 "dca.to_q.bias": torch.randn(8, generator=g).tolist()} for s in ("a", "b")}
    method.receive_statistics(model, stats)
    images = torch.from_numpy(tiny_split(n=2).images)
    first = method.inconsistency(model, images)
    with torch.no_grad():  # a fine-tuning step moves the live model ...
        model.encoder["conv_0"].conv_0.conv.weight.add_(0.5)
    torch.testing.assert_close(method.inconsistency(model, images), first)  # ... not the sites' frozen models
    method.begin_round(model, {})  # new global weights: the reference is taken again
    assert not torch.allclose(method.inconsistency(model, images), first)


def test_feddp_sends_its_query_weights_and_calibrates_with_every_sites():
    sites = [tiny_trainer(get_method("feddp"), split_seed=seed, finetune_epochs=1, lr=1e-2) for seed in (0, 1)]
    statistics = {}
    for name, site in zip(("a", "b"), sites):
        assert site.method.site_statistics(site.train_set) is None  # nothing before the first round
        site.load_shared(site.shared_params())
        site.train_round()
        sent = site.method.site_statistics(site.train_set)
        q = site.model.state_dict()
        assert set(sent) == {"dca.to_q.weight", "dca.to_q.bias"}
        assert sent["dca.to_q.weight"] == q["dca.to_q.weight"].flatten().tolist()
        assert not any(k.startswith("dca.to_q") for k in site.shared_params())
        statistics[name] = sent
    assert statistics["a"] != statistics["b"]  # trained locally on different data
    for site in sites:
        site.method.receive_statistics(site.model, statistics)
        images = torch.from_numpy(site.train_set.images[:2])
        u = site.method.inconsistency(site.model, images)
        assert u is not None and float(u.max()) == pytest.approx(1.0)
        assert site.finetune()["best_val_dice"] >= 0.0
    with pytest.raises(ValueError, match="expected 64"):
        sites[0].method.receive_statistics(sites[0].model,
                                           {"a": {"dca.to_q.weight": [0.0] * 3, "dca.to_q.bias": [0.0] * 8}})
    with pytest.raises(ValueError, match="query weights"):
        sites[0].method.receive_statistics(sites[0].model, {"a": {"dca.to_q.weight": [0.0] * 64}})


def test_feddp_arguments_and_privacy_switches():
    assert get_method("feddp").calibration_weight == 1.0
    assert get_method("feddp").dp_sgd_conflict is None and get_method("feddp").shares_statistics
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="calibration_weight"):
            get_method("feddp", calibration_weight=bad)
