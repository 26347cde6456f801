"""Each method's defining rule: what it shares, which losses it uses, and what the trainer adds to its local loss."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedoap.data import SliceSet
from fedoap.losses import BCEDiceLoss, PerturbedBoundaryLoss
from fedoap.methods import METHODS, FedAvg, FedBN, FedPer, FedProx, LocalOnly, get_method
from fedoap.methods.fedbn import NORM_TYPES
from fedoap.privacy.dp import DPSGDConfig
from fedoap.server.rules import FedNovaRule, NoAggregation, WeightedMean
from fedoap.training import LocalTrainer, TrainConfig

MODEL_ARGS = {"channels": [4, 8, 16, 32], "bottleneck_channels": 64}


def test_registry_and_unknown_method():
    assert {"fedoap", "fedavg"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("partition", ["authors", "kv_only"])
def test_fedoap_shares_its_partition_and_fine_tunes_with_pbl(partition):
    method = get_method("fedoap", partition=partition)
    model = method.build_model(MODEL_ARGS)
    shared = method.shared_keys(model)
    assert shared == model.shared_keys
    assert not any(k.startswith(("query_branch.", "dca.to_q.", "adapter.", "head.")) for k in shared)
    assert isinstance(method.finetune_loss(), PerturbedBoundaryLoss)
    assert isinstance(get_method("fedoap", use_pbl=False).finetune_loss(), BCEDiceLoss)


def test_fedavg_shares_every_parameter():
    method = get_method("fedavg")
    model = method.build_model(MODEL_ARGS)
    assert method.shared_keys(model) == sorted(model.state_dict())
    assert isinstance(method.finetune_loss(), BCEDiceLoss)


# -- the baselines, and the trainer's two hooks (begin_round, regularizer) ---------------------------------------------
def test_registry_has_the_baselines():
    assert {"fedprox", "fedbn", "fedper", "local"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.__doc__ and cls.name == name


def tiny_split(n: int = 6, size: int = 32) -> SliceSet:
    g = np.random.default_rng(0)
    images = g.random((n, 1, size, size), dtype=np.float32)
    labels = (g.random((n, 1, size, size)) > 0.7).astype(np.float32)
    return SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(n)])


def tiny_trainer(method, dp=None, **config) -> LocalTrainer:
    torch.manual_seed(0)
    model = method.build_model({"channels": [2, 4, 4, 8], "bottleneck_channels": 8})
    split = tiny_split()
    return LocalTrainer(model, method, split, split, TrainConfig(batch_size=2, augment=False, **config), dp=dp)


def test_fedprox_regularizer_is_half_mu_squared_distance_with_gradient_mu_times_difference():
    mu = 0.3
    method = FedProx(mu=mu)
    model = nn.Linear(2, 1)
    w_g, b_g = torch.tensor([[1.0, -2.0]]), torch.tensor([0.5])
    method.begin_round(model, {"weight": w_g, "bias": b_g})
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
        model.bias.copy_(torch.tensor([-0.5]))
    reg = method.regularizer(model)
    # ||w - w_g||^2 = 2^2 + 2^2 + 1^2 = 9
    torch.testing.assert_close(reg, torch.tensor(mu / 2 * 9.0))
    reg.backward()
    torch.testing.assert_close(model.weight.grad, mu * (model.weight.detach() - w_g))
    torch.testing.assert_close(model.bias.grad, mu * (model.bias.detach() - b_g))
    # the anchor is a copy: changing the received tensors later does not move it
    w_g.add_(100.0)
    torch.testing.assert_close(method.regularizer(model), torch.tensor(mu / 2 * 9.0))


def test_fedprox_term_is_zero_right_after_the_round_starts():
    trainer = tiny_trainer(FedProx(mu=1.0))
    server = {k: v + 0.01 for k, v in trainer.shared_params().items()}
    trainer.load_shared(server)  # begin_round takes the anchor from what was received
    reg = trainer.method.regularizer(trainer.model)
    assert reg is not None and float(reg.detach()) == 0.0
    with torch.no_grad():
        trainer.model.head.weight.add_(1.0)  # mu/2 * (one unit on every coordinate of one tensor)
    reg = trainer.method.regularizer(trainer.model)
    assert float(reg.detach()) == pytest.approx(0.5 * trainer.model.head.weight.numel())


def test_fedprox_arguments():
    assert FedProx().mu == 1e-3  # FL-MedSegBench's value
    assert FedProx().has_regularizer and not FedProx(mu=0.0).has_regularizer
    assert FedProx().regularizer(nn.Linear(2, 1)) is None  # no anchor before the first round
    for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="mu"):
            FedProx(mu=bad)
    model = FedProx().build_model(MODEL_ARGS)
    assert FedProx().shared_keys(model) == FedAvg().shared_keys(model)


def test_fedbn_keeps_every_normalization_layer_local_and_shares_every_convolution():
    method = get_method("fedbn")
    model = method.build_model(MODEL_ARGS)
    shared = set(method.shared_keys(model))
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    assert {type(m) for _, m in norms} == {nn.InstanceNorm2d, nn.GroupNorm}  # what FedOAPNet normalizes with
    norm_keys = {f"{n}.{k}" for n, m in norms for k in m.state_dict()}
    assert "dca.norm.weight" in norm_keys and any(k.endswith("adn.N.weight") for k in norm_keys)
    assert not shared & norm_keys
    assert shared | norm_keys == set(model.state_dict())
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(f"{n}.weight" in shared for n in convs)


def test_fedbn_keeps_batch_norm_statistics_and_layer_norm_local():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 1))
    assert FedBN().shared_keys(model) == ["0.bias", "0.weight", "4.bias", "4.weight"]


def test_fedper_never_shares_the_head_and_shares_the_rest():
    method = get_method("fedper")
    model = method.build_model(MODEL_ARGS)
    keys = set(model.state_dict())
    shared = set(method.shared_keys(model))
    head = {k for k in keys if k.startswith("head.")}
    assert head == {"head.weight", "head.bias"}
    assert shared == keys - head
    both = set(FedPer(personal_prefixes=["adapter", "head"]).shared_keys(model))
    assert both == keys - head - {k for k in keys if k.startswith("adapter.")}


def test_fedper_prefixes_match_on_dot_boundaries_and_must_exist():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.header = nn.Linear(2, 2)

    assert FedPer().shared_keys(Net()) == ["header.bias", "header.weight"]
    with pytest.raises(ValueError, match="match no parameter"):
        FedPer(personal_prefixes=["hed"]).shared_keys(Net())
    for bad in ([], "head", [""], ["head."], [3]):
        with pytest.raises(ValueError):
            FedPer(personal_prefixes=bad)


def test_local_only_shares_nothing_and_loads_an_empty_broadcast():
    method = get_method("local")
    assert isinstance(method, LocalOnly) and method.server_rule is NoAggregation
    trainer = tiny_trainer(method)
    assert trainer.shared_keys == [] and trainer.shared_params() == {}
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.load_shared({})
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.train_round()["steps"] == 3


def distance_to(model: nn.Module, anchor: dict[str, torch.Tensor]) -> float:
    return sum(float((p.detach() - anchor[k]).pow(2).sum()) for k, p in model.named_parameters()) ** 0.5


def test_a_strong_proximal_term_keeps_the_round_near_the_global_weights():
    distances = {}
    for mu in (0.0, 1e6):
        trainer = tiny_trainer(FedProx(mu=mu), local_epochs=3, lr=1e-2)
        anchor = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.load_shared(trainer.shared_params())
        trainer.train_round()
        distances[mu] = distance_to(trainer.model, anchor)
    assert distances[0.0] > 0 and distances[1e6] < 0.5 * distances[0.0]


class CountingProx(FedProx):
    """FedProx that counts the calls of its regularizer."""

    def __init__(self, mu: float = 1e-3) -> None:
        super().__init__(mu)
        self.calls = 0

    def regularizer(self, model):
        self.calls += 1
        return super().regularizer(model)


def test_the_regularizer_is_added_in_every_round_step_and_never_in_fine_tuning():
    method = CountingProx(mu=1.0)
    trainer = tiny_trainer(method, local_epochs=2, finetune_epochs=2)
    trainer.load_shared(trainer.shared_params())
    steps = trainer.train_round()["steps"]
    assert steps == 6 and method.calls == steps
    trainer.finetune()
    assert method.calls == steps


def test_dp_sgd_is_refused_for_a_method_with_a_regularizer():
    dp = DPSGDConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="'fedprox' adds a regularizer"):
        tiny_trainer(FedProx(), dp=dp)

    class Custom(FedAvg):  # overriding regularizer is enough: has_regularizer follows by default
        name = "custom"

        def regularizer(self, model):
            return None

    assert Custom().has_regularizer and not FedAvg().has_regularizer
    with pytest.raises(ValueError, match="regularizer"):
        tiny_trainer(Custom(), dp=dp)
    assert tiny_trainer(FedProx(mu=0.0), dp=dp).dp is not None  # mu = 0 is FedAvg: no term, DP-SGD is fine


# -- FedNova and FedGS ------------------------------------------------------------------------------------------------
from fedoap.methods import FedGS, FedNova  # noqa: E402
from fedoap.methods.fedgs import GradientScaledAdamW, small_lesion_factor  # noqa: E402


def test_fednova_and_fedgs_share_everything_and_say_how_the_server_combines():
    assert {"fednova", "fedgs"} <= set(METHODS)
    model = FedAvg().build_model(MODEL_ARGS)
    for method in (FedNova(), FedGS()):
        assert method.shared_keys(model) == FedAvg().shared_keys(model)
        assert isinstance(method.train_loss(), BCEDiceLoss)
    assert FedNova().server_rule is FedNovaRule and FedNova().weight_by == "samples"
    assert FedGS().server_rule is WeightedMean and FedGS().weight_by == "steps"
    assert FedNova().dp_sgd_conflict is None and FedAvg().dp_sgd_conflict is None
    assert "step" in FedGS().dp_sgd_conflict and not FedGS().has_regularizer


def masks(areas, height=32, width=32):
    """One mask per area: the first ``area`` pixels of the image are lesion."""
    labels = torch.zeros(len(areas), 1, height, width)
    for i, area in enumerate(areas):
        labels[i, 0].view(-1)[:area] = 1.0
    return labels


def test_fedgs_factor_on_known_lesion_sizes():
    # 32 x 32 = 1024 pixels, batch of 4: area 1 (1024/1 = 1024 >= 150: small), area 4 (256: small),
    # area 7 (146.3 < 150: not small), area 0 (empty: no lesion). With l = 1000:
    # log_1000(1024) = 1.0034333, tanh(1.0034333^2) = 0.7644678; log_1000(256) = 0.8027467, tanh(0.6444) = 0.5678895
    # p = 1 + (2/4) * (0.7644678 + 0.5678895) = 1.6661787
    labels = masks([1, 4, 7, 0])
    expected = 1 + 2 / 4 * (math.tanh(math.log(1024, 1000) ** 2) + math.tanh(math.log(256, 1000) ** 2))
    assert small_lesion_factor(labels) == pytest.approx(expected, rel=1e-12)
    assert small_lesion_factor(labels) == pytest.approx(1.6661787, abs=1e-7)
    assert FedGS().batch_step_scale(labels) == pytest.approx(expected, rel=1e-12)
    # l = 100: the same lesions weigh more (1 + 0.5 * (0.99... + 0.87...))
    assert small_lesion_factor(labels, log_base=100) == pytest.approx(1.9371814, abs=1e-7)
    # (B, H, W) works too, and the value does not depend on where the lesion lies
    assert small_lesion_factor(labels[:, 0]) == pytest.approx(expected)
    assert small_lesion_factor(labels.flip(-1)) == pytest.approx(expected)


def test_fedgs_small_lesion_threshold_is_inclusive():
    # 30 x 40 = 1200 pixels: area 8 gives exactly 150 (small), area 9 gives 133.3 (not small)
    assert small_lesion_factor(masks([8], 30, 40)) == pytest.approx(1 + 2 * math.tanh(math.log(150, 1000) ** 2))
    assert small_lesion_factor(masks([9], 30, 40)) == 1.0
    assert small_lesion_factor(masks([9], 30, 40), small_threshold=120) > 1.0


def test_fedgs_factor_is_one_without_small_lesions():
    assert small_lesion_factor(masks([0, 0, 0])) == 1.0  # empty masks are not lesions
    assert small_lesion_factor(masks([200, 7, 1024])) == 1.0  # only large lesions
    assert small_lesion_factor(masks([0, 300])) == 1.0
    with pytest.raises(ValueError, match="shape"):
        small_lesion_factor(torch.zeros(2, 2, 8, 8))


def test_fedgs_arguments():
    method = FedGS()
    assert (method.log_base, method.small_threshold) == (1000.0, 150.0)
    assert method.reset_optimizer_state and not method.accumulate_weight_decay
    for kwargs in ({"log_base": 1.0}, {"log_base": float("nan")}, {"small_threshold": 0}, {"log_base": "10"},
                   {"reset_optimizer_state": 1}, {"accumulate_weight_decay": "no"}):
        with pytest.raises(ValueError):
            FedGS(**kwargs)


def manual_adamw_run(grads, scales, lr, weight_decay, x0, betas=(0.9, 0.999), eps=1e-8, decay_in_update=False):
    """AdamW by hand in float64: returns the final parameter and the accumulated scaled update."""
    b1, b2 = betas
    x, m, v, update = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    for t, (g, s) in enumerate(zip(grads, scales), start=1):
        if decay_in_update:
            update += s * lr * weight_decay * x
        x = x * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        move = lr * m_hat / (v_hat.sqrt() + eps)
        x = x - move
        update += s * move
    return x, update


@pytest.mark.parametrize("decay_in_update", [False, True])
def test_gradient_scaled_adamw_accumulates_the_scaled_adam_steps(decay_in_update):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    lr, wd, scales = 0.05, 0.1, [1.0, 2.5, 1.3, 1.0]
    opt = GradientScaledAdamW(model.parameters(), lr=lr, weight_decay=wd, accumulate_weight_decay=decay_in_update)
    grads = {k: [] for k in x0}
    for s in scales:
        opt.zero_grad()
        model(torch.randn(5, 3, dtype=torch.float64)).pow(2).sum().backward()
        for k, p in model.named_parameters():
            grads[k].append(p.grad.detach().clone())
        opt.step(scale=s)
    assert opt.round_steps == len(scales)
    for k, p in model.named_parameters():
        x, update = manual_adamw_run(grads[k], scales, lr, wd, x0[k], decay_in_update=decay_in_update)
        torch.testing.assert_close(p.detach(), x)  # the local model moves as plain AdamW
        torch.testing.assert_close(opt.accumulated(p), update)  # the update is the sum of scaled Adam steps
    opt.begin_round(reset_state=False)
    assert opt.accumulated(model.weight) is None and opt.round_steps == 0 and opt.state[model.weight]["step"] == 4
    opt.begin_round(reset_state=True)
    assert len(opt.state) == 0


def lesion_split(n: int = 4, size: int = 32) -> SliceSet:
    """Images with one small lesion each (4 pixels of 1024: small), so every batch has p > 1."""
    g = np.random.default_rng(1)
    images = g.random((n, 1, size, size), dtype=np.float32)
    labels = np.zeros((n, 1, size, size), np.float32)
    labels[:, 0, 10:12, 10:12] = 1.0
    return SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(n)])


def fedgs_trainer(split: SliceSet, **config) -> LocalTrainer:
    torch.manual_seed(0)
    method = FedGS()
    model = method.build_model({"channels": [2, 4, 4, 8], "bottleneck_channels": 8})
    return LocalTrainer(model, method, split, split, TrainConfig(augment=False, **config))


def test_fedgs_sends_the_global_parameters_minus_the_accumulated_update():
    trainer = fedgs_trainer(lesion_split(), batch_size=2, local_epochs=2, finetune_epochs=1)
    assert isinstance(trainer.optimizer, GradientScaledAdamW)
    server = {k: v + 0.01 for k, v in trainer.shared_params().items()}
    trainer.load_shared(server)
    stats = trainer.train_round()
    assert stats["steps"] == 4 and stats["aggregation_weight"] == 4 and stats["n_samples"] == 4
    sent = trainer.shared_params()
    params = dict(trainer.model.named_parameters())
    assert list(sent) == trainer.shared_keys
    moved = 0
    for key, value in sent.items():
        update = trainer.optimizer.accumulated(params[key])
        assert update is not None
        torch.testing.assert_close(value, server[key] - update)
        moved += int(not torch.allclose(value, params[key].detach()))
    assert moved > 0  # p > 1: the sent (virtual) parameters are not the local model's
    assert trainer.finetune()["best_epoch"] in (0, 1)  # fine-tuning: plain AdamW, no step scale


def test_fedgs_update_is_p_times_the_adam_move_and_plain_without_small_lesions():
    # one step on the whole split, no weight decay: U = p * (x_global - x_local), with p from the split's labels
    split = lesion_split()
    trainer = fedgs_trainer(split, batch_size=len(split), weight_decay=0.0)
    server = trainer.shared_params()
    trainer.load_shared(server)
    trainer.train_round()
    p = small_lesion_factor(torch.from_numpy(split.labels))
    assert p == pytest.approx(1 + 2 / 4 * 4 * math.tanh(math.log(256, 1000) ** 2))
    local = trainer.model.state_dict()
    for key, value in trainer.shared_params().items():
        # float32 moves of about lr = 1e-3: p = 1.57 is far outside the tolerance
        torch.testing.assert_close(server[key] - value, p * (server[key] - local[key]), rtol=1e-4, atol=1e-6)
    # no small lesion (about 30% of every image is lesion): p = 1, the sent parameters are the local model's
    trainer = fedgs_trainer(tiny_split(), batch_size=2, weight_decay=0.0)
    trainer.load_shared(trainer.shared_params())
    trainer.train_round()
    local = trainer.model.state_dict()
    for key, value in trainer.shared_params().items():
        torch.testing.assert_close(value, local[key], rtol=1e-5, atol=1e-6)


def test_fedgs_restarts_adamw_every_round_unless_told_otherwise():
    for reset, expected in ((True, 2), (False, 4)):
        torch.manual_seed(0)
        method = FedGS(reset_optimizer_state=reset)
        model = method.build_model({"channels": [2, 4, 4, 8], "bottleneck_channels": 8})
        trainer = LocalTrainer(model, method, lesion_split(), lesion_split(), TrainConfig(batch_size=2, augment=False))
        for _ in range(2):
            trainer.load_shared(trainer.shared_params())
            trainer.train_round()
        assert float(trainer.optimizer.state[trainer.model.head.weight]["step"]) == expected


def test_aggregation_weight_is_samples_or_steps():
    assert tiny_trainer(FedAvg()).train_round()["aggregation_weight"] == 6
    assert tiny_trainer(FedNova()).train_round()["aggregation_weight"] == 6
    assert tiny_trainer(FedGS()).train_round()["aggregation_weight"] == 3  # 6 samples, batch 2

    class Odd(FedAvg):
        name = "odd"
        weight_by = "bytes"

    with pytest.raises(ValueError, match="weight_by='bytes'"):
        tiny_trainer(Odd())


def test_dp_sgd_is_refused_for_fedgs_and_allowed_for_fednova():
    from fedoap.config import RunConfig
    from fedoap.deploy.recipe import FedOAPRecipe

    dp = DPSGDConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="'fedgs' scales each step's share of the sent update"):
        tiny_trainer(FedGS(), dp=dp)
    assert tiny_trainer(FedNova(), dp=dp).dp is not None
    with pytest.raises(ValueError, match="'fedgs' scales each step"):
        FedOAPRecipe(min_clients=2, config=RunConfig.from_options(method="fedgs", width=4, dp_sgd_noise=1.0))
    # client-level DP of the update composes with both; HE with FedGS (a weighted mean), not with FedNova
    FedOAPRecipe(min_clients=2, config=RunConfig.from_options(method="fedgs", width=4, he=True, dp_update_clip=1.0,
                                                              dp_update_noise=1.0))
    with pytest.raises(ValueError, match="'fednova'.*needs plaintext"):
        FedOAPRecipe(min_clients=2, config=RunConfig.from_options(method="fednova", width=4, he=True))
