"""Tests of fedoap.losses: BCEDiceLoss and PerturbedBoundaryLoss (FedOAP, arXiv:2511.18847)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fedoap.losses import BCEDiceLoss, PerturbedBoundaryLoss

Z = [2.0, -1.0, 0.5, -3.0]
Y = [1.0, 0.0, 0.0, 1.0]


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def hand_bce(z, y) -> float:
    return sum(-(t * math.log(sig(v)) + (1 - t) * math.log(1 - sig(v))) for v, t in zip(z, y)) / len(z)


def hand_dice_loss(z, y, nr=1e-5, dr=1e-5) -> float:
    p = [sig(v) for v in z]
    inter = sum(a * b for a, b in zip(p, y))
    return 1.0 - (2 * inter + nr) / (sum(p) + sum(y) + dr)


def tiny(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 2, 2)


# ----------------------------------------------------------------------------- BCEDiceLoss
def test_bce_dice_perfect_prediction_is_near_zero():
    y = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    logits = 20.0 * (2 * y - 1)
    assert BCEDiceLoss()(logits, y).item() < 1e-4


def test_bce_dice_known_values():
    z, y = tiny(Z), tiny(Y)
    assert BCEDiceLoss(bce_weight=1.0, dice_weight=0.0)(z, y).item() == pytest.approx(hand_bce(Z, Y), rel=1e-10)
    assert BCEDiceLoss(bce_weight=0.0, dice_weight=1.0)(z, y).item() == pytest.approx(
        hand_dice_loss(Z, Y), rel=1e-10
    )
    expected = 0.5 * hand_bce(Z, Y) + hand_dice_loss(Z, Y)
    assert BCEDiceLoss()(z, y).item() == pytest.approx(expected, rel=1e-10)
    # float32 input also works (target converted to the logits' dtype)
    assert BCEDiceLoss()(z.float(), y.bool()).item() == pytest.approx(expected, rel=1e-5)


def test_bce_dice_batch_vs_per_image():
    z2, y2 = [1.0, -2.0, 0.3, 0.7], [0.0, 0.0, 1.0, 1.0]
    z = torch.cat([tiny(Z), tiny(z2)])
    y = torch.cat([tiny(Y), tiny(y2)])
    per_image = BCEDiceLoss(bce_weight=0.0, batch=False)(z, y).item()
    assert per_image == pytest.approx((hand_dice_loss(Z, Y) + hand_dice_loss(z2, y2)) / 2, rel=1e-10)
    pooled = BCEDiceLoss(bce_weight=0.0)(z, y).item()
    assert pooled == pytest.approx(hand_dice_loss(Z + z2, Y + y2), rel=1e-10)


def test_bce_dice_shape_checks_and_arguments():
    loss = BCEDiceLoss()
    with pytest.raises(ValueError, match="shape"):
        loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError):
        loss(torch.zeros(4, 4), torch.zeros(4, 4))
    for kwargs in (
        {"bce_weight": -1.0},
        {"dice_weight": float("nan")},
        {"bce_weight": 0.0, "dice_weight": 0.0},
        {"smooth_nr": -1e-5},
        {"smooth_dr": "x"},
        {"batch": "yes"},
    ):
        with pytest.raises(ValueError):
            BCEDiceLoss(**kwargs)
    stored = BCEDiceLoss(bce_weight=0.25, dice_weight=2, smooth_nr=0.0, smooth_dr=1e-3, batch=False)
    assert (stored.bce_weight, stored.dice_weight, stored.smooth_nr, stored.smooth_dr, stored.batch) == (
        0.25,
        2,
        0.0,
        1e-3,
        False,
    )


# ----------------------------------------------------------------------------- PerturbedBoundaryLoss
def test_pbl_defaults_are_the_papers():
    pbl = PerturbedBoundaryLoss()
    assert (pbl.threshold, pbl.noise_std, pbl.plain_weight, pbl.perturbed_weight) == (0.75, 0.1, 0.9, 0.1)
    assert pbl.base_loss is None and pbl.generator is None
    assert isinstance(pbl.seg_loss, BCEDiceLoss)


def test_boundary_mask_selects_confidently_wrong_pixels():
    probs = torch.tensor([0.9, 0.1, 0.2, 0.95, 0.5, 0.24, 0.76, 0.8, 0.3, 0.74])
    target = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    expected = torch.tensor([True, True, False, False, False, False, True, False, False, False])
    logits = torch.logit(probs).reshape(1, 1, 2, 5).requires_grad_(True)
    mask = PerturbedBoundaryLoss().boundary_mask(logits, target.reshape(1, 1, 2, 5))
    assert mask.dtype == torch.bool and not mask.requires_grad
    assert torch.equal(mask.flatten(), expected)
    # threshold 0.5: |p - y| = 0.9 0.9 0.2 0.05 0.5 0.24 0.76 0.2 0.7 0.74
    mask_half = PerturbedBoundaryLoss(threshold=0.5).boundary_mask(logits, target.reshape(1, 1, 2, 5))
    assert mask_half.flatten().tolist() == [True, True, False, False, False, False, True, False, True, True]


def random_case(seed: int = 0, shape=(2, 1, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(shape, generator=g)
    target = (torch.rand(shape, generator=g) > 0.5).float()
    return logits, target


def test_noise_only_on_masked_pixels():
    logits, target = random_case()
    pbl = PerturbedBoundaryLoss(noise_std=0.1, generator=torch.Generator().manual_seed(7))
    mask = pbl.boundary_mask(logits, target)
    assert 0 < mask.sum() < mask.numel()
    perturbed = pbl.perturb(logits, target)
    assert torch.equal(perturbed != logits, mask)
    noise = (perturbed - logits)[mask]
    assert noise.std().item() == pytest.approx(0.1, rel=0.2)
    assert abs(noise.mean().item()) < 0.03
    # reproducible with the same seed
    again = PerturbedBoundaryLoss(noise_std=0.1, generator=torch.Generator().manual_seed(7)).perturb(logits, target)
    assert torch.equal(again, perturbed)


def test_loss_formula_with_custom_base_loss():
    logits, target = random_case(1)
    logits.requires_grad_(True)
    base = nn.BCEWithLogitsLoss()
    pbl = PerturbedBoundaryLoss(base_loss=base, generator=torch.Generator().manual_seed(3))
    assert pbl.base_loss is base and pbl.seg_loss is base
    twin = PerturbedBoundaryLoss(base_loss=base, generator=torch.Generator().manual_seed(3))
    expected = 0.9 * base(logits, target) + 0.1 * base(twin.perturb(logits, target), target)
    assert torch.equal(pbl(logits, target), expected)


def test_empty_mask_gives_total_weight_times_plain_loss():
    _, target = random_case(2)
    logits = 5.0 * (2 * target - 1)  # right everywhere: |p - y| ~ 0.0067
    for plain, perturbed in ((0.9, 0.1), (0.7, 0.6)):
        pbl = PerturbedBoundaryLoss(
            plain_weight=plain, perturbed_weight=perturbed, generator=torch.Generator().manual_seed(0)
        )
        assert not pbl.boundary_mask(logits, target).any()
        assert torch.equal(pbl.perturb(logits, target), logits)
        seg = BCEDiceLoss()(logits, target)
        value = pbl(logits, target)
        assert torch.equal(value, plain * seg + perturbed * seg)
        assert value.item() == pytest.approx((plain + perturbed) * seg.item(), rel=1e-6)


def test_gradients_flow_through_both_terms():
    logits, target = random_case(3)
    logits.requires_grad_(True)
    pbl = PerturbedBoundaryLoss(noise_std=0.5, generator=torch.Generator().manual_seed(5))
    pbl(logits, target).backward()
    grad = logits.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0

    # d/dz [0.9 L(z) + 0.1 L(z + M eps)] with M, eps constant
    z = logits.detach().clone().requires_grad_(True)
    twin = PerturbedBoundaryLoss(noise_std=0.5, generator=torch.Generator().manual_seed(5))
    shift = (twin.perturb(z, target) - z).detach()
    seg = BCEDiceLoss()
    (0.9 * seg(z, target) + 0.1 * seg(z + shift, target)).backward()
    assert torch.allclose(grad, z.grad, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.0},
        {"threshold": 1.0},
        {"threshold": 1.5},
        {"threshold": -0.1},
        {"noise_std": -0.1},
        {"noise_std": float("inf")},
        {"plain_weight": -0.1},
        {"perturbed_weight": -1.0},
        {"plain_weight": 0.0, "perturbed_weight": 0.0},
        {"base_loss": lambda a, b: (a - b).mean()},
        {"generator": "seed"},
    ],
)
def test_pbl_argument_validation(kwargs):
    with pytest.raises(ValueError):
        PerturbedBoundaryLoss(**kwargs)


def test_pbl_shape_mismatch():
    pbl = PerturbedBoundaryLoss()
    with pytest.raises(ValueError, match="shape"):
        pbl(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 2))


# -- Dice reduction (--dice-reduction batch|image) --------------------------------------------------------------------
def test_image_dice_reduction_is_the_mean_of_per_image_soft_dice_with_an_empty_image():
    """Per-image reduction: one soft Dice per image, averaged. An empty mask counts by its smoothing terms:
    Dice = smooth_nr / (sum(p) + smooth_dr), ~0 for any predicted foreground (loss ~1)."""
    from fedoap.losses.segmentation import set_dice_reduction

    z0, y0 = Z, Y  # image 0: two foreground pixels
    z1, y1 = [0.3, -2.0, 1.0, -0.5], [0.0, 0.0, 0.0, 0.0]  # image 1: empty mask
    logits = torch.tensor([z0, z1], dtype=torch.float64).reshape(2, 1, 2, 2)
    target = torch.tensor([y0, y1], dtype=torch.float64).reshape(2, 1, 2, 2)
    nr = dr = 1e-5
    empty_dice = nr / (sum(sig(v) for v in z1) + dr)
    assert 1.0 - hand_dice_loss(z1, y1, nr, dr) == pytest.approx(empty_dice)
    per_image = (hand_dice_loss(z0, y0, nr, dr) + hand_dice_loss(z1, y1, nr, dr)) / 2
    bce = hand_bce(z0 + z1, y0 + y1)

    loss = BCEDiceLoss(dice_reduction="image")
    assert loss.dice_reduction == "image" and loss.batch is False
    assert loss(logits, target).item() == pytest.approx(0.5 * bce + per_image, rel=1e-9)
    # the default pools the batch: one Dice of both images together
    pooled = hand_dice_loss(z0 + z1, y0 + y1, nr, dr)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(0.5 * bce + pooled, rel=1e-9)
    assert per_image != pytest.approx(pooled)
    # switched after construction (as a method's loss receives the run's option), inside a PBL too
    pbl = PerturbedBoundaryLoss(base_loss=BCEDiceLoss())
    assert set_dice_reduction(pbl, "image") == 1 and pbl.seg_loss.dice_reduction == "image"
    switched = BCEDiceLoss()
    switched.dice_reduction = "image"
    assert switched(logits, target).item() == pytest.approx(0.5 * bce + per_image, rel=1e-9)
    # an empty image with an empty prediction scores Dice 1 (loss 0 on the Dice term)
    none = torch.full((1, 1, 2, 2), -60.0, dtype=torch.float64)
    assert BCEDiceLoss(bce_weight=0.0, dice_reduction="image")(none, torch.zeros_like(none)).item() == pytest.approx(
        0.0, abs=1e-6)


def test_dice_reduction_rejects_unknown_values():
    with pytest.raises(ValueError, match="dice_reduction"):
        BCEDiceLoss(dice_reduction="voxel")
    with pytest.raises(ValueError, match="dice_reduction"):
        BCEDiceLoss().dice_reduction = "mean"
