"""Tests of fedoap.privacy.dp: client-level clip-and-noise of the shared update (McMahan et al. 2018) and sample-level
DP-SGD with Opacus (Abadi et al. 2016). Real torch and Opacus, no mocks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from opacus.accountants import RDPAccountant

from fedoap.data import SliceSet
from fedoap.losses import BCEDiceLoss, PerturbedBoundaryLoss
from fedoap.methods.fedoap import FedOAP
from fedoap.networks import FedOAPNet
from fedoap.privacy.dp import (
    DPSGD,
    DPSGDConfig,
    UpdateDPAccountant,
    UpdateDPConfig,
    clip_and_noise,
    noise_for_epsilon,
    per_sample_loss,
    update_dp_epsilon,
)
from fedoap.training import LocalTrainer, TrainConfig

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    # Opacus's hooks on the first layer, whose input needs no gradient: expected, harmless
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def global_norm(update) -> float:
    return math.sqrt(sum(float(torch.as_tensor(v).double().square().sum()) for v in update.values()))


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """The reference: a fresh Opacus RDPAccountant stepped ``steps`` times."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def tiny_fedoap(seed: int = 0, dtype=torch.float64) -> FedOAPNet:
    torch.manual_seed(seed)
    return FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8).to(dtype)


def tiny_conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.ReLU(), nn.Conv2d(2, 1, 1))


def segmentation_batch(n: int, size: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g, dtype=dtype)
    labels = (torch.rand(n, 1, size, size, generator=g) > 0.8).to(dtype)
    return images, labels


def run_epochs(dp: DPSGD, model, optimizer, loss_fn, images, labels, epochs: int) -> int:
    """The trainer's loop with DP batches; returns the number of (non-empty) batches trained on."""
    trained = 0
    for _ in range(epochs):
        for idx in dp.batches(optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images[idx]), labels[idx]).backward()
            optimizer.step()
            trained += 1
    return trained


# ==================================================================================================== clip_and_noise
def test_clip_without_noise_bounds_the_global_norm_exactly():
    g = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(30, 4, generator=g), "b": torch.randn(7, generator=g)}
    norm = global_norm(update)
    for clip in (norm / 5, norm * 2):
        out, stats = clip_and_noise(update, clip_norm=clip, noise_multiplier=0.0)
        assert global_norm(out) == pytest.approx(min(norm, clip), rel=1e-6)
        for key in update:  # scaled as a whole by min(1, C / norm): the direction is kept
            torch.testing.assert_close(out[key], update[key] * min(1.0, clip / norm))
        assert stats == {"noise_std": 0.0}  # neither the norm nor the clip factor is handed out
    out, _ = clip_and_noise(update, clip_norm=norm * 2, noise_multiplier=0.0)
    for key in update:  # below the bound: untouched
        torch.testing.assert_close(out[key], update[key])


def test_noise_std_matches_sigma_times_clip():
    update = {"w": np.zeros((400, 250), dtype=np.float32), "b": np.zeros(100_000, dtype=np.float32)}
    out, stats = clip_and_noise(update, clip_norm=2.0, noise_multiplier=0.75)
    noise = torch.cat([v.flatten() for v in out.values()]).double()
    assert noise.numel() == 200_000
    assert stats["noise_std"] == pytest.approx(1.5)
    assert float(noise.std()) == pytest.approx(1.5, rel=0.02)
    assert abs(float(noise.mean())) < 0.02
    assert all(v.dtype == torch.float32 and isinstance(v, torch.Tensor) for v in out.values())
    assert {k: tuple(v.shape) for k, v in out.items()} == {"w": (400, 250), "b": (100_000,)}


def test_noise_is_added_after_clipping():
    g = torch.Generator().manual_seed(2)
    clip = 0.5
    direction = torch.randn(1000, generator=g)
    update = {"x": direction / direction.norm() * 100 * clip}
    out, stats = clip_and_noise(update, clip_norm=clip, noise_multiplier=1e-3)
    assert stats["noise_std"] == pytest.approx(1e-3 * clip)
    # noise norm ~ sqrt(1000) * 1e-3 * C = 0.03 C: far from the 100 C of noising before clipping
    assert global_norm(out) == pytest.approx(clip, rel=0.05)


def test_clip_and_noise_cannot_be_seeded_and_never_repeats():
    update = {"a": torch.ones(50), "b": torch.zeros(3, 3)}
    with pytest.raises(TypeError):
        clip_and_noise(update, 1.0, 1.0, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    first, _ = clip_and_noise(update, 1.0, 1.0)
    torch.manual_seed(7)  # torch's global generator plays no part either
    again, _ = clip_and_noise(update, 1.0, 1.0)
    for key in update:
        assert not torch.equal(first[key], again[key])


@pytest.mark.parametrize(
    "update, kwargs, match",
    [
        ({}, {}, "empty"),
        ({"n": torch.ones(3, dtype=torch.int64)}, {}, "floating-point"),
        ({"x": torch.tensor([1.0, float("nan")])}, {}, "non-finite"),
        ({"x": torch.ones(2)}, {"clip_norm": 0.0}, "clip_norm"),
        ({"x": torch.ones(2)}, {"noise_multiplier": -1.0}, "noise_multiplier"),
    ],
)
def test_clip_and_noise_rejects_bad_input(update, kwargs, match):
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        clip_and_noise(update, **args)


def test_update_dp_config_validates():
    assert UpdateDPConfig(clip_norm=1.0, noise_multiplier=0.5).delta == 1e-5
    with pytest.raises(ValueError, match="clip_norm"):
        UpdateDPConfig(clip_norm=-1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="delta"):
        UpdateDPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1.0)


# ========================================================================================= client-level accountant
@pytest.mark.parametrize("sigma, rounds, q", [(1.0, 50, 1.0), (4.0, 20, 1.0), (2.0, 30, 0.5)])
def test_update_accountant_matches_opacus_rdp(sigma, rounds, q):
    accountant = UpdateDPAccountant(sigma, sample_rate=q)
    assert accountant.epsilon(1e-5) == 0.0
    for _ in range(rounds):
        accountant.step()
    assert accountant.rounds == rounds
    expected = rdp_epsilon(sigma, q, rounds, 1e-5)
    assert accountant.epsilon(1e-5) == pytest.approx(expected, rel=1e-12)
    assert update_dp_epsilon(sigma, rounds, 1e-5, sample_rate=q) == pytest.approx(expected, rel=1e-12)


def test_client_level_epsilon_is_large_without_heavy_noise():
    assert update_dp_epsilon(1.0, 50, 1e-5) > 30  # q = 1: no amplification by subsampling
    assert update_dp_epsilon(10.0, 50, 1e-5) < 5
    assert update_dp_epsilon(0.0, 1, 1e-5) == math.inf
    assert update_dp_epsilon(1.0, 0, 1e-5) == 0.0


def test_noise_for_epsilon_reaches_the_target():
    sigma = noise_for_epsilon(8.0, rounds=20, delta=1e-5)
    eps = update_dp_epsilon(sigma, 20, 1e-5)
    assert 8.0 - 0.02 <= eps <= 8.0
    assert update_dp_epsilon(sigma * 0.9, 20, 1e-5) > 8.0


def test_update_accountant_state_round_trips():
    a = UpdateDPAccountant(2.0)
    for _ in range(5):
        a.step()
    b = UpdateDPAccountant(2.0)
    b.load_state_dict(a.state_dict())
    assert b.rounds == 5 and b.epsilon(1e-5) == a.epsilon(1e-5)


# ================================================================================================ loss for DP-SGD
def test_per_sample_loss_switches_dice_to_per_image():
    loss = per_sample_loss(BCEDiceLoss(bce_weight=0.3, dice_weight=0.7))
    assert isinstance(loss, BCEDiceLoss) and loss.batch is False
    assert (loss.bce_weight, loss.dice_weight) == (0.3, 0.7)
    already = BCEDiceLoss(batch=False)
    assert per_sample_loss(already) is already
    pbl = per_sample_loss(PerturbedBoundaryLoss(base_loss=BCEDiceLoss(), threshold=0.6))
    assert isinstance(pbl, PerturbedBoundaryLoss) and pbl.seg_loss.batch is False and pbl.threshold == 0.6
    with pytest.raises(ValueError, match="per-sample"):
        per_sample_loss(nn.CrossEntropyLoss(reduction="sum"))


def single_example_grads(model: nn.Module, loss_fn, images, labels) -> list[list[torch.Tensor]]:
    grads = []
    for i in range(len(images)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(images[i : i + 1]), labels[i : i + 1]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return grads


def opacus_grad_samples(model: nn.Module, loss_fn, images, labels) -> list[torch.Tensor]:
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=len(images), batch_size=len(images))
    model, _ = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    loss_fn(model(images), labels).backward()
    return [p.grad_sample.detach().clone() for p in model.parameters()]


def test_per_sample_gradients_are_exact_for_the_per_image_loss():
    images, labels = segmentation_batch(3, 32, seed=3, dtype=torch.float64)
    labels[1] = 0.0  # one empty mask, as in tumour data
    reference = tiny_fedoap()
    loss_fn = per_sample_loss(BCEDiceLoss())
    expected = single_example_grads(copy.deepcopy(reference), loss_fn, images, labels)
    samples = opacus_grad_samples(reference, loss_fn, images, labels)
    for j, gs in enumerate(samples):
        assert gs.shape[0] == 3
        for i in range(3):
            torch.testing.assert_close(gs[i], expected[i][j], rtol=1e-7, atol=1e-10)


def test_batch_pooled_dice_is_not_per_sample_separable():
    images, labels = segmentation_batch(3, 32, seed=3, dtype=torch.float64)
    reference = tiny_fedoap()
    pooled = BCEDiceLoss(batch=True)
    expected = single_example_grads(copy.deepcopy(reference), pooled, images, labels)
    samples = opacus_grad_samples(reference, pooled, images, labels)
    worst = max(
        float((gs[i] - expected[i][j]).abs().max() / (expected[i][j].abs().max() + 1e-12))
        for j, gs in enumerate(samples)
        for i in range(3)
    )
    assert worst > 1e-2  # the "per-sample gradients" of a pooled Dice are not those of any per-sample loss


# ============================================================================================== DP-SGD with Opacus
def test_dpsgd_config_validates():
    with pytest.raises(ValueError, match="exactly one"):
        DPSGDConfig()
    with pytest.raises(ValueError, match="exactly one"):
        DPSGDConfig(noise_multiplier=1.0, target_epsilon=3.0, total_epochs=2)
    with pytest.raises(ValueError, match="total_epochs"):
        DPSGDConfig(target_epsilon=3.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="accountant"):
        DPSGDConfig(noise_multiplier=1.0, accountant="moments")
    with pytest.raises(ValueError, match="unit"):
        DPSGDConfig(noise_multiplier=1.0, unit="patient")
    with pytest.raises(ValueError, match="noise_source"):
        DPSGDConfig(noise_multiplier=1.0, noise_source="mt19937")
    with pytest.raises(ValueError, match="n_train"):
        DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=0, batch_size=4)
    with pytest.raises(ValueError, match="case_ids"):
        DPSGD(DPSGDConfig(noise_multiplier=1.0, unit="case"), n_train=4, batch_size=2)
    with pytest.raises(ValueError, match="case_ids"):
        DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=4, batch_size=2, case_ids=["a", "b"])


def test_sample_rate_and_steps_follow_opacus_convention():
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=100, batch_size=16)
    assert dp.sample_rate == 1 / 7 and dp.steps_per_epoch == 7 and dp.expected_batch_size == 14
    small = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=5, batch_size=16)
    assert small.sample_rate == 1.0 and small.expected_batch_size == 5


def test_call_order_is_enforced():
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=8, batch_size=4)
    with pytest.raises(RuntimeError, match="make_private"):
        dp.batches()
    model = tiny_conv()
    dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="already"):
        dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not a DPOptimizer"):
        dp.batches(torch.optim.SGD(model.parameters(), lr=0.1))


def test_epsilon_equals_a_fresh_opacus_rdp_accountant():
    images, labels = segmentation_batch(40, 8, seed=4)
    model = tiny_conv()
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.1, max_grad_norm=0.5), n_train=40, batch_size=10)
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert dp.epsilon() == 0.0
    run_epochs(dp, model, optimizer, nn.BCEWithLogitsLoss(), images, labels, epochs=2)
    assert dp.sample_rate == 0.25 and dp.steps == 8
    for delta in (1e-5, 1e-3):
        assert dp.epsilon(delta) == pytest.approx(rdp_epsilon(1.1, 0.25, 8, delta), rel=1e-12)


def test_target_epsilon_is_reached_after_total_epochs():
    images, labels = segmentation_batch(40, 8, seed=5)
    config = DPSGDConfig(target_epsilon=4.0, delta=1e-5, total_epochs=3)
    dp = DPSGD(config, n_train=40, batch_size=10)
    model = tiny_conv()
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    run_epochs(dp, model, optimizer, nn.BCEWithLogitsLoss(), images, labels, epochs=3)
    assert dp.steps == 3 * dp.steps_per_epoch
    assert dp.epsilon() == pytest.approx(4.0, rel=0.05)
    assert dp.epsilon() <= 4.0


def test_empty_poisson_batches_become_accounted_noise_only_steps():
    images, labels = segmentation_batch(8, 8, seed=6)
    model = tiny_conv()
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=8, batch_size=1)  # q = 1/8: P(empty) = 0.34 per draw
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # the sampling is unpredictable by design: 48 draws all non-empty has probability 0.66^48 < 1e-8
    trained = run_epochs(dp, model, optimizer, nn.BCEWithLogitsLoss(), images, labels, epochs=6)
    assert dp.steps == 48 > trained  # every draw is accounted, the empty ones too
    assert dp.epsilon() == pytest.approx(rdp_epsilon(1.0, 1 / 8, 48, 1e-5), rel=1e-12)
    before = [p.detach().clone() for p in model.parameters()]
    DPSGD._noise_only_step(optimizer)
    assert dp.steps == 49
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step is pure noise


def one_dp_step(noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, noise_source: str = "chacha20"):
    images, labels = segmentation_batch(4, 32, seed=7, dtype=torch.float64)
    model = tiny_fedoap()
    plain = copy.deepcopy(model)
    config = DPSGDConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_source=noise_source)
    dp = DPSGD(config, n_train=4, batch_size=4)
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5))
    loss_fn = per_sample_loss(BCEDiceLoss())
    assert run_epochs(dp, model, optimizer, loss_fn, images, labels, epochs=1) == 1  # q = 1: the full batch
    return model, plain, (images, labels, loss_fn)


@pytest.mark.parametrize("noise_source", ["chacha20", "os_seeded"])
def test_noise_is_added_and_differs_between_identical_runs(noise_source):
    a, _, _ = one_dp_step(noise_source=noise_source)
    b, _, _ = one_dp_step(noise_source=noise_source)  # same data, model, seeds: only the noise can differ
    quiet, _, _ = one_dp_step(noise_multiplier=0.0, noise_source=noise_source)
    assert all(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # what the noise moved: lr * sigma * C / expected batch per coordinate, 0.5 * 1 / 4
    moved = torch.cat([(x - q).detach().flatten() for x, q in zip(a.parameters(), quiet.parameters())])
    assert float(moved.std()) == pytest.approx(0.125, rel=0.1)


def _private_conv(prefetch: bool):
    images, labels = segmentation_batch(4, 8, seed=8)
    model = tiny_conv()
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0, noise_prefetch=prefetch), n_train=4, batch_size=4)  # q = 1
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return dp, model, optimizer, images, labels


@pytest.mark.parametrize("prefetch", [True, False])
def test_noise_drawn_ahead_is_fresh_used_once_and_only_when_it_fits(prefetch, monkeypatch):
    """The next step's noise is drawn on a thread while the step computes: every step still gets one draw of its
    own (one per parameter and step, plus the one ahead), two steps never share noise, and a draw made for another
    scale is thrown away, not used."""
    import fedoap.privacy.dp_optimizer as dp_optimizer

    draws = []
    real = dp_optimizer.secure_normal
    monkeypatch.setattr(dp_optimizer, "secure_normal",
                        lambda shape, std, dtype=torch.float32: draws.append(std) or real(shape, std, dtype=dtype))
    dp, model, optimizer, images, labels = _private_conv(prefetch)
    n = len(optimizer.params)
    assert run_epochs(dp, model, optimizer, nn.BCEWithLogitsLoss(), images, labels, epochs=3) == 3
    if prefetch:
        optimizer._ahead.result()
    assert len(draws) == (3 + prefetch) * n  # each step's own draw; with prefetch, the next step's too
    first, second = optimizer._noise(1.0), optimizer._noise(1.0)
    assert all(not torch.equal(a, b) for a, b in zip(first, second))
    assert all(z.abs().sum() == 0 for z in optimizer._noise(0.0))  # a draw ahead at scale 1 is not used at 0
    assert all(z.abs().sum() == 0 for z in optimizer._noise(0.0))
    assert all(z.abs().sum() > 0 for z in optimizer._noise(1.0))  # nor one at 0 for a step at 1
    dp.close()  # the draw in flight ends with the job
    assert optimizer._ahead is None and optimizer._drawer is None


def test_without_noise_and_clipping_a_dp_step_is_a_plain_sgd_step():
    private, plain, (images, labels, loss_fn) = one_dp_step(noise_multiplier=0.0, max_grad_norm=1e6)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)
    optimizer.zero_grad()
    loss_fn(plain(images), labels).backward()
    optimizer.step()
    for (name, p), q in zip(plain.named_parameters(), private.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=name)


def tiny_trainer() -> LocalTrainer:
    g = np.random.default_rng(0)
    images = g.random((6, 1, 32, 32), dtype=np.float32)
    labels = (g.random((6, 1, 32, 32)) > 0.8).astype(np.float32)
    split = SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(6)])
    torch.manual_seed(0)
    model = FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8)
    return LocalTrainer(model, FedOAP(), split, split, TrainConfig(batch_size=3, augment=False))


def test_shared_parameters_keep_their_names_after_make_private():
    trainer = tiny_trainer()
    keys = list(trainer.model.state_dict())
    shared_before = trainer.shared_params()
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=len(trainer.train_set), batch_size=3)
    model, trainer.optimizer = dp.make_private(trainer.model, trainer.optimizer)
    assert model is trainer.model
    assert list(trainer.model.state_dict()) == keys and not any(k.startswith("_module.") for k in keys)
    assert list(trainer.shared_params()) == list(shared_before)

    server = {k: v + 1.0 for k, v in shared_before.items()}
    trainer.load_shared(server)
    for k, v in trainer.shared_params().items():
        assert torch.equal(v, server[k])

    # the trainer's loop with DP batches and the per-image loss trains the same parameters
    loss_fn = per_sample_loss(trainer.loss_fn)
    for idx in dp.batches(trainer.optimizer):
        images, labels = trainer._train_images[idx], trainer._train_labels[idx]
        trainer.optimizer.zero_grad(set_to_none=True)
        loss_fn(trainer.model(images), labels).backward()
        trainer.optimizer.step()
    assert dp.steps == dp.steps_per_epoch == 2
    after = trainer.shared_params()
    assert list(after) == list(server) and any(not torch.equal(after[k], server[k]) for k in after)
    assert trainer.evaluate(trainer.val_set).mean_dice() >= 0.0  # evaluation needs no pause


def test_paused_allows_plain_training_and_private_optimizer_is_accounted():
    images, labels = segmentation_batch(8, 8, seed=8)
    model = tiny_conv()
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), n_train=8, batch_size=4)
    model, optimizer = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    run_epochs(dp, model, optimizer, nn.BCEWithLogitsLoss(), images, labels, epochs=1)
    steps = dp.steps
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with dp.paused():
        for _ in range(2):  # two backward passes: would trip Opacus's grad-accumulation check with hooks on
            plain.zero_grad()
            nn.BCEWithLogitsLoss()(model(images), labels).backward()
            plain.step()
    assert dp.steps == steps and all(p.grad_sample is None for p in model.parameters())
    finetune = dp.private_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    run_epochs(dp, model, finetune, nn.BCEWithLogitsLoss(), images, labels, epochs=1)
    assert dp.steps == steps + dp.steps_per_epoch
    dp.close()
    assert not hasattr(next(model.parameters()), "grad_sample")


def test_dp_sgd_has_its_own_batch_and_learning_rate_and_fine_tuning_keeps_the_plain_ones():
    """DP-SGD's defaults differ from plain training's (a larger expected batch, a larger rate for its fewer, noisier
    steps); the final fine-tuning, which is never released, keeps the plain rate."""
    g = np.random.default_rng(0)
    images = g.random((12, 1, 32, 32), dtype=np.float32)
    split = SliceSet(images=images, labels=(images > 0.8).astype(np.float32), case_ids=[f"c{i}" for i in range(12)])
    config = TrainConfig(batch_size=3, lr=1e-3, dp_lr=3e-3, augment=False)

    def trainer(dp):
        torch.manual_seed(0)
        return LocalTrainer(FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8), FedOAP(), split, split, config,
                            dp=dp)

    private = trainer(DPSGDConfig(noise_multiplier=1.0, batch_size=6))
    assert (private.dp.batch_size, private.dp.sample_rate, private.dp.expected_batch_size) == (6, 0.5, 6)
    assert {group["lr"] for group in private.optimizer.param_groups} == {3e-3}
    assert {group["lr"] for group in private._finetune_optimizer().param_groups} == {1e-3}
    plain = trainer(None)
    assert {group["lr"] for group in plain.optimizer.param_groups} == {1e-3}  # dp_lr applies under DP-SGD only
    with pytest.raises(ValueError, match="batch_size"):
        DPSGDConfig(noise_multiplier=1.0, batch_size=0)
    with pytest.raises(ValueError, match="dp_lr"):
        TrainConfig(dp_lr=-1.0)


def test_the_trainers_dp_sgd_step_equals_one_of_opacus_as_shipped(monkeypatch):
    """Under DP-SGD the trainer's backward pass asks autograd for the images' gradient only (the weights' batch
    gradients would be thrown away by DP-SGD's optimizer); with the same batch, clipping active and no noise, its step
    lands where Opacus as shipped lands: its own per-sample rules, ``loss.backward()`` and its ``DPOptimizer``."""
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizer

    from fedoap.privacy.grad_samplers import stock_opacus

    g = np.random.default_rng(0)
    images = g.random((6, 1, 32, 32))  # float64 throughout: the two steps differ by rounding only
    labels = (g.random((6, 1, 32, 32)) > 0.8).astype(np.float64)
    split = SliceSet(images=images, labels=labels, case_ids=[f"c{i}" for i in range(6)])
    config = TrainConfig(batch_size=3, lr=1e-2, augment=False)
    batch = torch.tensor([0, 2, 5])
    torch.manual_seed(0)
    model = FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8).double()
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    method = FedOAP(head_prior_init=False)
    trainer = LocalTrainer(model, method, split, split, config, dp=DPSGDConfig(noise_multiplier=0.0,
                                                                                max_grad_norm=0.05))
    monkeypatch.setattr(trainer, "_index_batches", lambda optimizer: iter([batch]))
    trainer._epoch(trainer.loss_fn, trainer.optimizer, federated=True)

    with stock_opacus():
        optimizer = method.make_round_optimizer(reference.parameters(), config.lr, config.weight_decay)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(6)), batch_size=3)
        reference, _, _ = PrivacyEngine().make_private(module=reference, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=0.0, max_grad_norm=0.05,
                                                       poisson_sampling=False)
        optimizer = DPOptimizer(optimizer, noise_multiplier=0.0, max_grad_norm=0.05,
                                expected_batch_size=trainer.dp.expected_batch_size, loss_reduction="mean")
        optimizer.zero_grad(set_to_none=True)
        x, y = torch.from_numpy(images[batch.numpy()]), torch.from_numpy(labels[batch.numpy()])
        per_sample_loss(method.train_loss())(reference(x), y).backward()
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in reference.parameters()]).norm(dim=0)
        assert (norms > 0.05).all()  # every sample is clipped: the step depends on each per-sample gradient
        optimizer.step()
    for (name, p), q in zip(reference._module.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
    assert any(not torch.equal(q, p) for q, p in zip(model.parameters(), initial.parameters()))  # it stepped


def test_fine_tuning_after_dp_sgd_rounds_moves_the_weights():
    """The fine-tuning that follows DP-SGD rounds runs a plain optimizer with the hooks paused: unlike a DP-SGD step,
    its steps need the weights' own gradients (``loss.backward()``), and every weight it trains moves."""
    g = np.random.default_rng(0)
    images = g.random((6, 1, 32, 32), dtype=np.float32)
    split = SliceSet(images=images, labels=(images > 0.8).astype(np.float32), case_ids=[f"c{i}" for i in range(6)])
    torch.manual_seed(0)
    trainer = LocalTrainer(FedOAPNet(channels=(2, 4, 4, 8), bottleneck_channels=8), FedOAP(), split, split,
                           TrainConfig(batch_size=3, augment=False), dp=DPSGDConfig(noise_multiplier=1.0))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with trainer.dp.paused():
        _, steps, _ = trainer._epoch(trainer.method.finetune_loss(), trainer._finetune_optimizer())
    assert steps == 2
    after = trainer.model.state_dict()
    still = [name for name, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(after[name],
                                                                                                     before[name])]
    assert not still
