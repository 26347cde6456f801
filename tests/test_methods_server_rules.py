"""FedAWA, FedLWS and FedRDN: each one's defining rule on hand-made examples.

FedAWA: the server learns the aggregation weights by gradient descent on its objective of the client vectors (checked
against a hand derivation and an independent reimplementation of the authors' direct computation), the weights favour
what the objective says, and the logits carry over from round to round. FedLWS: each layer of the weighted mean is
shrunk by ``||x|| / (||x|| + tau ||m - x||)`` (hand-computed). FedRDN: a training batch is normalized with another
site's statistics (predictable with the seeded generator), evaluation with the site's own, and the own statistics are
never shared.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedoap.data import SliceSet
from fedoap.server.controller import SharedParamsFedAvg
from fedoap.server.rules import FedAWARule, FedLWSRule, UpdateRejected, WeightedMean, check_rule, rule_for_job
from fedoap.server.rules.fedlws import layer_groups
from fedoap.losses import BCEDiceLoss
from fedoap.methods import METHODS, FedAvg, FedAWA, FedLWS, FedRDN, get_method
from fedoap.networks.site_normalized_net import INPUT_STATISTICS_KEYS, SiteNormalizedNet
from fedoap.privacy.dp import DPSGDConfig
from fedoap.training import LocalTrainer, TrainConfig

TINY = {"channels": [2, 4, 4, 8], "bottleneck_channels": 8}


def test_the_three_methods_are_registered_and_their_server_rules_need_plaintext():
    assert {"fedawa", "fedlws", "fedrdn"} <= set(METHODS)
    assert FedAWA().server_rule is FedAWARule and FedLWS().server_rule is FedLWSRule
    assert FedRDN().server_rule is WeightedMean
    for rule in (FedAWARule, FedLWSRule):
        assert rule.reference == "broadcast" and not rule.linear
        with pytest.raises(ValueError, match="needs the global model in clear"):
            check_rule(rule, {}, ["w"], he=True)
    assert FedAWARule(AWA_GLOBAL).state() == {"logits": {}} and FedLWSRule(LWS_GLOBAL).state() == {}
    model = FedAvg().build_model(TINY)
    for method in (FedAWA(), FedLWS()):  # FedAvg's sharing, loss and local training; nothing refused but HE
        assert method.shared_keys(model) == FedAvg().shared_keys(model)
        assert isinstance(method.train_loss(), BCEDiceLoss)
        assert method.dp_sgd_conflict is None and not method.shares_statistics


# -- FedAWA -----------------------------------------------------------------------------------------------------------
# x = (1, 0, 0): a and b move the same way, c the opposite way by the same amount (equal cosine distances, so only
# the agreement term tells them apart)
AWA_GLOBAL = {"w": np.array([1.0, 0.0], np.float32), "b": np.array([0.0], np.float32)}
AWA_SITES = {
    "a": ({"w": np.array([1.0, 0.1], np.float32), "b": np.array([0.0], np.float32)}, 1.0),
    "b": ({"w": np.array([1.0, 0.1], np.float32), "b": np.array([0.0], np.float32)}, 1.0),
    "c": ({"w": np.array([1.0, -0.1], np.float32), "b": np.array([0.0], np.float32)}, 2.0),
}


def awa_round(sites=AWA_SITES, reference=AWA_GLOBAL, **args) -> FedAWARule:
    agg = FedAWARule(reference, **args)
    for site, (params, weight) in sites.items():
        agg.add(site, params, weight)
    return agg


def flat(params) -> torch.Tensor:
    """Authors' layout: one vector per model (keys in the reference's order)."""
    return torch.cat([torch.as_tensor(np.asarray(params[k], np.float64)).reshape(-1) for k in ("w", "b")])


def reference_fedawa(global_params, sites, logits, epochs, lr, optimizer="adam", distance="cos",
                     aggregate_with="last_forward"):
    """Independent reimplementation of the authors' direct computation: stacked vectors, softmax logits, the loss
    sum_k p_k ||tau_k - sum_j p_j tau_j|| + sum_k p_k d(x, x_k), the optimizer built afresh, aggregation with the last
    forward pass's weights. Returns (weights used, logits after, aggregate vector)."""
    x = flat(global_params)
    stacked = torch.stack([flat(p) for p, _ in sites.values()])
    t = torch.as_tensor(logits, dtype=torch.float64).detach().clone().requires_grad_(True)
    opt = (torch.optim.Adam([t], lr=lr, betas=(0.5, 0.999)) if optimizer == "adam"
           else torch.optim.SGD([t], lr=lr, momentum=0.9, weight_decay=5e-4))
    for _ in range(epochs):
        p = torch.softmax(t, dim=0)
        if distance == "cos":
            cost = 1 - F.cosine_similarity(x.unsqueeze(0), stacked, dim=-1, eps=1e-8)
        else:
            cost = ((x.unsqueeze(0) - stacked).abs() ** 2).mean(-1)
        updates = stacked - x
        mean_update = p @ updates
        loss = (p * torch.norm(updates - mean_update, dim=1)).sum() + (p * cost).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        used = p.detach()
    if aggregate_with == "updated":
        used = torch.softmax(t.detach(), dim=0)
    return used, t.detach(), (used @ stacked) / used.sum()


def test_fedawa_first_round_by_hand():
    lr = 1e-3
    agg = awa_round(server_lr=lr)
    out = agg.result()
    # logits start at the normalized sample weights p = (1/4, 1/4, 1/2); with one step, the weights that aggregate
    # are those of its forward pass: softmax(p)
    p = np.array([0.25, 0.25, 0.5])
    lam = np.exp(p) / np.exp(p).sum()
    np.testing.assert_allclose([agg.weights[s] for s in "abc"], lam, rtol=1e-12)
    expected_w = sum(l * AWA_SITES[s][0]["w"].astype(np.float64) for l, s in zip(lam, "abc"))
    np.testing.assert_allclose(out["w"], expected_w, rtol=1e-6)
    assert out["w"].dtype == np.float32 and out["b"].shape == (1,)
    # Adam's first step moves every logit by lr against the sign of its gradient: c disagrees with the weighted mean
    # update (which points the way of a and b), so its logit goes down, a's and b's up
    np.testing.assert_allclose([agg.logits[s] for s in "abc"], p + lr * np.array([1, 1, -1]), rtol=1e-6)
    assert agg.state() == {"logits": agg.logits}


@pytest.mark.parametrize("args", [
    {},
    {"server_epochs": 7, "server_lr": 0.05, "aggregate_with": "updated"},
    {"server_epochs": 5, "server_lr": 0.01, "server_optimizer": "sgd", "reg_distance": "euc"},
    {"server_epochs": 20, "server_lr": 0.1, "logit_init": "log_weights", "gamma": 0.9},
])
def test_fedawa_matches_an_independent_reimplementation_over_two_rounds(args):
    kwargs = {"server_epochs": 1, "server_lr": 1e-3, "server_optimizer": "adam", "reg_distance": "cos",
              "aggregate_with": "last_forward", **args}
    gamma = kwargs.pop("gamma", 1.0)
    logit_init = kwargs.pop("logit_init", "weights")
    p = np.array([0.25, 0.25, 0.5])
    logits = p if logit_init == "weights" else np.log(p)
    reference = AWA_GLOBAL
    sites = AWA_SITES
    agg = FedAWARule(AWA_GLOBAL, **kwargs, gamma=gamma, logit_init=logit_init)  # one object for the job
    for _ in range(2):
        agg.reset(reference)
        for site, (params, weight) in sites.items():
            agg.add(site, params, weight)
        out = agg.result()
        used, logits, aggregate = reference_fedawa(
            reference, sites, logits, kwargs["server_epochs"], kwargs["server_lr"], kwargs["server_optimizer"],
            kwargs["reg_distance"], kwargs["aggregate_with"])
        # (the Gram-matrix norms agree with the direct ones to rounding; Adam's normalized steps keep it small)
        np.testing.assert_allclose([agg.weights[s] for s in "abc"], used.numpy(), rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose([agg.logits[s] for s in "abc"], logits.numpy(), rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(np.concatenate([out["w"], out["b"]]), gamma * aggregate.numpy(), rtol=1e-6,
                                   atol=1e-7)
        # next round: the sites start from the new global model and move again (c now agrees more)
        reference = out
        sites = {"a": ({"w": out["w"] + [0.0, 0.05], "b": out["b"] + 0.1}, 1.0),
                 "b": ({"w": out["w"] + [0.02, 0.05], "b": out["b"]}, 1.0),
                 "c": ({"w": out["w"] + [0.0, 0.01], "b": out["b"] - 0.05}, 2.0)}


def objective(agg: FedAWARule, lam: np.ndarray) -> float:
    updates = np.stack([u.astype(np.float64) for u in agg._updates])
    mean = lam @ updates
    return float(lam @ np.linalg.norm(updates - mean, axis=1) + lam @ np.asarray(agg._distance))


def test_fedawa_weights_favour_the_sites_that_agree_and_lower_the_objective():
    agg = awa_round(server_epochs=300, server_lr=0.05, aggregate_with="updated")
    out = agg.result()
    lam = np.array([agg.weights[s] for s in "abc"])
    start = np.exp([0.25, 0.25, 0.5]) / np.exp([0.25, 0.25, 0.5]).sum()
    # c started with the largest weight (twice the samples); it disagrees with a and b and ends lowest
    assert lam[0] == pytest.approx(lam[1]) and lam[2] < 0.1 < start[2]
    assert objective(agg, lam) < 0.5 * objective(agg, start)
    assert out["w"][1] > 0.08  # the aggregate follows a and b (FedAvg with these weights: 0)


def test_fedawa_regularizer_favours_the_site_that_stays_closer_to_the_global_model():
    # two sites, equal samples, updates at right angles to x: the agreement term is symmetric, the cosine distance
    # 1 - cos(x, x_k) is larger for the site that moved further
    sites = {"near": ({"w": np.array([1.0, 0.1], np.float32), "b": np.zeros(1, np.float32)}, 1.0),
             "far": ({"w": np.array([1.0, -0.3], np.float32), "b": np.zeros(1, np.float32)}, 1.0)}
    agg = awa_round(sites, server_epochs=50, server_lr=0.05)
    agg.result()
    assert agg._distance[1] > agg._distance[0]
    assert agg.weights["near"] > 0.5 > agg.weights["far"]


def test_fedawa_logits_carry_over_through_the_controller_s_rule_and_rounds_without_updates():
    controller = SharedParamsFedAvg(num_rounds=3, min_clients=3, shared_keys=["w", "b"], method="fedawa",
                                    method_args={"server_lr": 0.01})
    rule = controller._job_rule(AWA_GLOBAL)  # one object for the whole job, the method's arguments passed on
    assert isinstance(rule, FedAWARule) and rule.server_lr == 0.01
    rule.reset(AWA_GLOBAL)
    for site, (params, weight) in AWA_SITES.items():
        rule.add(site, params, weight)
    out = rule.result()
    first_logits, first_state = dict(rule.logits), rule.state()
    rule.reset(out)  # a round in which no update was accepted: the logits pass through unchanged
    assert rule.count == 0 and rule.state() == first_state
    resumed = FedAWARule(out, server_lr=0.01)  # a rule restored from the state carries on the same way
    resumed.load_state(first_state)
    for third in (rule, resumed):
        third.reset(out)
        for site, (params, weight) in AWA_SITES.items():
            third.add(site, params, weight)
        third.result()
    # one step per round: this round aggregates with softmax of the logits the first round learned
    carried = np.array([first_logits[s] for s in "abc"])
    np.testing.assert_allclose([rule.weights[s] for s in "abc"], np.exp(carried) / np.exp(carried).sum(), rtol=1e-12)
    assert rule.logits["c"] < first_logits["c"] < 0.5
    assert resumed.weights == rule.weights and resumed.logits == rule.logits


def test_fedawa_arguments_and_bad_updates():
    for bad in ({"server_epochs": 0}, {"server_lr": -1.0}, {"server_optimizer": "rmsprop"}, {"reg_distance": "l1"},
                {"gamma": 0.0}, {"logit_init": "uniform"}, {"aggregate_with": "best"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FedAWA(**bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            FedAWARule(AWA_GLOBAL, **bad)
    with pytest.raises(ValueError, match="state must be"):
        FedAWARule(AWA_GLOBAL).load_state({"logits": {"a": float("nan")}})
    agg = FedAWARule(AWA_GLOBAL)
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        agg.add("x", {"w": np.array([np.nan, 0.0]), "b": np.zeros(1)}, 1)
    assert agg.add("y", {"w": np.ones(2), "b": np.zeros(1), "head": np.ones(1)}, 1) == ["head"]
    with pytest.raises(ValueError, match="no client update"):
        FedAWARule(AWA_GLOBAL).result()


# -- FedLWS -----------------------------------------------------------------------------------------------------------
LWS_GLOBAL = {
    "enc.conv.weight": np.array([3.0, 0.0], np.float32), "enc.conv.bias": np.array([4.0], np.float32),  # ||x|| = 5
    "head.weight": np.array([0.0, 2.0], np.float32),  # ||x|| = 2
    "dec.norm.weight": np.array([1.0], np.float32),
    "zero.bias": np.array([0.0], np.float32),  # all-zero layer
}
LWS_SITES = {  # weights 1 and 3: p = (1/4, 3/4)
    "a": {"enc.conv.weight": [3.0, 0.0], "enc.conv.bias": [4.0], "head.weight": [1.0, 2.0],
          "dec.norm.weight": [1.5], "zero.bias": [0.1]},
    "b": {"enc.conv.weight": [3.0, 0.4], "enc.conv.bias": [4.0], "head.weight": [-1.0, 2.0],
          "dec.norm.weight": [1.5], "zero.bias": [0.3]},
}


def lws_round(**args) -> tuple[FedLWSRule, dict]:
    agg = FedLWSRule(LWS_GLOBAL, **args)
    for site, weight in (("a", 1), ("b", 3)):
        agg.add(site, {k: np.asarray(v, np.float32) for k, v in LWS_SITES[site].items()}, weight)
    return agg, agg.result()


def test_fedlws_shrinks_each_layer_of_the_weighted_mean_by_hand():
    agg, out = lws_round(beta=0.5, min_tau=0.01, max_tau=0.2)
    # enc.conv: u_a = 0, u_b = (0, 0.4, 0); mean update (0, 0.2, 0): spread (0.2 + 0.2) / 2 = 0.2, tau = 0.5 * 0.2;
    # m = (3, 0.3 | 4): ||m - x|| = 0.3; gamma = 5 / (5 + 0.1 * 0.3)
    g_enc = 5 / (5 + 0.1 * 0.3)
    # head: u_a = (1, 0), u_b = (-1, 0); mean (0, 0): spread 1, tau = 0.5 clipped to 0.2; m = (-0.5, 2):
    # ||m - x|| = 0.5; gamma = 2 / (2 + 0.2 * 0.5)
    g_head = 2 / (2 + 0.2 * 0.5)
    # dec.norm: the same update on both sites: spread 0, tau = min_tau; m = 1.5; gamma = 1 / (1 + 0.01 * 0.5)
    g_norm = 1 / (1 + 0.01 * 0.5)
    assert agg.gammas == pytest.approx({"enc.conv": g_enc, "head": g_head, "dec.norm": g_norm, "zero": 1.0})
    assert agg.taus == pytest.approx({"enc.conv": 0.1, "head": 0.2, "dec.norm": 0.01, "zero": 0.05})
    np.testing.assert_allclose(out["enc.conv.weight"], g_enc * np.array([3.0, 0.3]), rtol=1e-6)
    np.testing.assert_allclose(out["enc.conv.bias"], [g_enc * 4.0], rtol=1e-6)
    np.testing.assert_allclose(out["head.weight"], g_head * np.array([-0.5, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(out["dec.norm.weight"], [g_norm * 1.5], rtol=1e-6)
    np.testing.assert_allclose(out["zero.bias"], [0.25], rtol=1e-6)  # not shrunk: its global norm is zero
    assert all(v.dtype == np.float32 for v in out.values())


def test_fedlws_with_every_key_a_layer_and_the_authors_defaults():
    agg, out = lws_round(beta=0.5, layers="key")
    # enc.conv.weight alone: ||x|| = 3, ||m - x|| = 0.3, tau 0.1; enc.conv.bias did not move: gamma 1
    assert agg.gammas["enc.conv.weight"] == pytest.approx(3 / (3 + 0.1 * 0.3))
    assert agg.gammas["enc.conv.bias"] == pytest.approx(1.0)
    np.testing.assert_allclose(out["enc.conv.bias"], [4.0])
    agg, _ = lws_round()  # beta 0.03: enc.conv's tau = 0.03 * 0.2 = 0.006, clipped up to 0.01
    assert agg.taus["enc.conv"] == pytest.approx(0.01) and agg.taus["head"] == pytest.approx(0.03)
    assert layer_groups(["a.conv.bias", "a.conv.weight", "b.weight"]) == {"a.conv": ["a.conv.bias", "a.conv.weight"],
                                                                          "b": ["b.weight"]}


def test_fedlws_server_args_reach_the_aggregator_and_are_checked():
    method = get_method("fedlws", beta=0.5, max_tau=0.3)
    agg = rule_for_job(method.server_rule, method.server_rule_args(), LWS_GLOBAL)
    assert (agg.beta, agg.min_tau, agg.max_tau, agg.layers) == (0.5, 0.01, 0.3, "module")
    for bad in ({"beta": -1.0}, {"min_tau": 0.3, "max_tau": 0.2}, {"layers": "bias"}):
        with pytest.raises(ValueError):
            FedLWS(**bad)
        with pytest.raises(ValueError):
            FedLWSRule(LWS_GLOBAL, **bad)


# -- FedRDN -----------------------------------------------------------------------------------------------------------
def split(n: int = 6, size: int = 32, seed: int = 0) -> SliceSet:
    g = np.random.default_rng(seed)
    images = (0.2 + 0.6 * g.random((n, 1, size, size))).astype(np.float32)
    labels = (g.random((n, 1, size, size)) > 0.7).astype(np.float32)
    return SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(n)])


class InputRecorder:
    """Records what the backbone's first block receives (the normalized images)."""

    def __init__(self, model: SiteNormalizedNet) -> None:
        self.inputs: list[torch.Tensor] = []
        model.encoder["conv_0"].register_forward_pre_hook(lambda _, args: self.inputs.append(args[0].detach().clone()))


OTHERS = {"site-x": {"mean": [10.0], "std": [2.0]}, "site-y": {"mean": [-3.0], "std": [0.5]}}


def test_fedrdn_site_statistics_by_hand_and_own_statistics_from_round_zero():
    images = np.array([[[[0.0, 1.0], [2.0, 3.0]]], [[[4.0, 4.0], [4.0, 4.0]]]], np.float32)
    stats = FedRDN().site_statistics(SliceSet(images=images, labels=np.zeros_like(images), case_ids=["a", "b"]))
    # per-image means 1.5 and 4, per-image (unbiased) stds sqrt(5/3) and 0: their means
    assert stats["mean"] == pytest.approx([2.75]) and stats["std"] == pytest.approx([math.sqrt(5 / 3) / 2])
    method = FedRDN()
    torch.manual_seed(0)
    model = method.build_model(TINY)
    assert isinstance(model, SiteNormalizedNet)
    data = split()
    trainer = LocalTrainer(model, method, data, data, TrainConfig(batch_size=2, augment=False))
    own = method.site_statistics(data)
    assert model.input_mean.tolist() == pytest.approx(own["mean"]) and model.input_std.tolist() == pytest.approx(
        own["std"])
    # round 0, nothing received yet: the training batch is normalized with the own statistics
    recorder = InputRecorder(model)
    images = torch.from_numpy(data.images[:2])
    method.step_loss(model, images, torch.from_numpy(data.labels[:2]), trainer.loss_fn)
    torch.testing.assert_close(recorder.inputs[-1], (images - own["mean"][0]) / own["std"][0])


def test_fedrdn_never_shares_its_own_statistics():
    method = FedRDN()
    model = method.build_model(TINY)
    keys = method.shared_keys(model)
    assert not set(INPUT_STATISTICS_KEYS) & set(keys)
    assert set(keys) | set(INPUT_STATISTICS_KEYS) == set(model.state_dict())
    data = split()
    trainer = LocalTrainer(model, method, data, data, TrainConfig(batch_size=2, augment=False))
    assert not set(INPUT_STATISTICS_KEYS) & set(trainer.shared_params())
    with pytest.raises(ValueError, match="not a shared parameter"):  # nor accepts them from the server
        trainer.load_shared({"input_mean": torch.zeros(1)})


@pytest.mark.parametrize("paired", [False, True])
def test_fedrdn_training_batch_uses_the_drawn_site_statistics(paired):
    method = FedRDN(paired=paired)
    model = method.build_model(TINY)
    data = split()
    method.begin_training(model, data)
    stats = {"site-own": method.site_statistics(data), **OTHERS}
    method.receive_statistics(model, stats)
    recorder = InputRecorder(model)
    method.generator.manual_seed(123)
    predict = torch.Generator().manual_seed(123)
    pool = [stats[s] for s in sorted(stats)]
    images = torch.from_numpy(data.images[:4])
    for _ in range(6):
        i = int(torch.randint(3, (1,), generator=predict))
        j = i if paired else int(torch.randint(3, (1,), generator=predict))
        method.step_loss(model, images, torch.from_numpy(data.labels[:4]), BCEDiceLoss())
        expected = (images - pool[i]["mean"][0]) / pool[j]["std"][0]
        torch.testing.assert_close(recorder.inputs[-1], expected)


def test_fedrdn_per_image_draws_normalize_each_image_with_its_own_draw():
    method = FedRDN(per_image=True, paired=True)
    model = method.build_model(TINY)
    data = split()
    method.begin_training(model, data)
    method.receive_statistics(model, OTHERS)
    recorder = InputRecorder(model)
    method.generator.manual_seed(7)
    which = torch.randint(2, (4,), generator=torch.Generator().manual_seed(7)).tolist()
    images = torch.from_numpy(data.images[:4])
    method.step_loss(model, images, torch.from_numpy(data.labels[:4]), BCEDiceLoss())
    pool = [OTHERS["site-x"], OTHERS["site-y"]]
    expected = torch.stack([(images[b] - pool[k]["mean"][0]) / pool[k]["std"][0] for b, k in enumerate(which)])
    torch.testing.assert_close(recorder.inputs[-1], expected)


def test_fedrdn_trains_with_other_sites_statistics_and_evaluates_with_its_own():
    method = FedRDN(paired=True)
    torch.manual_seed(0)
    model = method.build_model(TINY)
    data = split(n=4)
    trainer = LocalTrainer(model, method, data, data, TrainConfig(batch_size=2, augment=False, finetune_epochs=1))
    method.receive_statistics(model, OTHERS)  # a pool without this site: every training batch is foreign
    recorder = InputRecorder(model)
    predict = torch.Generator().set_state(method.generator.get_state())
    trainer.train_round()
    assert len(recorder.inputs) == 2
    train_images = torch.from_numpy(data.images)
    for normalized in recorder.inputs:
        k = int(torch.randint(2, (1,), generator=predict))
        stats = OTHERS[["site-x", "site-y"][k]]
        raw = normalized * stats["std"][0] + stats["mean"][0]  # undo the drawn normalization: training images
        assert all(torch.isclose(img, train_images, atol=1e-5).flatten(1).all(1).any() for img in raw)
    # evaluation (and fine-tuning, and the unseen organ) go through model(images): the own statistics
    recorder.inputs.clear()
    trainer.evaluate(data)
    own = method.site_statistics(data)
    torch.testing.assert_close(recorder.inputs[0], (train_images - own["mean"][0]) / own["std"][0])
    recorder.inputs.clear()
    trainer.finetune()
    assert all((x * own["std"][0] + own["mean"][0]).min() > 0.19 for x in recorder.inputs)  # images in [0.2, 0.8]


def test_fedrdn_refuses_dp_and_skips_unusable_statistics():
    method = FedRDN()
    assert method.shares_statistics and method.dp_sgd_conflict is not None
    model = method.build_model(TINY)
    data = split()
    with pytest.raises(ValueError, match="'fedrdn'"):
        LocalTrainer(model, method, data, data, TrainConfig(batch_size=2), dp=DPSGDConfig(noise_multiplier=1.0))
    method.receive_statistics(model, {"bad-len": {"mean": [0.0, 1.0], "std": [1.0, 1.0]},
                                      "bad-std": {"mean": [0.0], "std": [0.0]}, "no-std": {"mean": [0.0]},
                                      **OTHERS})
    assert method._means.flatten().tolist() == [10.0, -3.0]
    for bad in ({"seed": 1.5}, {"paired": 1}, {"per_image": "yes"}):
        with pytest.raises(ValueError):
            FedRDN(**bad)
    with pytest.raises(ValueError, match="std > 0"):
        model.set_input_statistics([0.0], [0.0])
