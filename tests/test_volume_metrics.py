"""Per-volume metrics: Dice counts every voxel of a case once, HD95 is measured in the scan's units (mm from the
voxel spacing), and empty masks follow the stated rule. Expected values are worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch

from fedoap.eval.metrics import per_image_scores
from fedoap.eval.volume import (VOLUME_EMPTY_MASK_RULE, dice_per_case, volume_dice, volume_hd95, volume_scores)

SPACING = (0.5, 0.8, 2.5)  # anisotropic, as a CT: fine in-plane, thick slices


def _box(shape, *ranges) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in ranges)] = 1
    return mask


def test_dice_of_two_overlapping_boxes_is_the_hand_count():
    a = _box((10, 10, 10), (2, 6), (2, 6), (2, 6))  # 4*4*4 = 64 voxels
    b = _box((10, 10, 10), (3, 7), (2, 6), (2, 6))  # 64 voxels, shifted by one along x: overlap 3*4*4 = 48
    assert volume_dice(a, b) == pytest.approx(0.75)  # 2*48 / (64+64) = 96/128
    c = _box((10, 10, 10), (0, 2), (0, 3), (0, 4))  # 2*3*4 = 24 voxels
    d = _box((10, 10, 10), (1, 5), (0, 3), (0, 1))  # 4*3*1 = 12 voxels; overlap x 1..2, y 0..3, z 0..1 = 1*3*1 = 3
    assert volume_dice(c, d) == pytest.approx(6 / 36)  # 2*3 / (24+12)
    assert volume_dice(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(0.75)


def test_hd95_of_a_shift_is_the_shift_in_mm_along_its_axis():
    # two parallel one-voxel-thick plates 3 voxels apart: every surface point is exactly 3 voxels from the other plate
    z_a, z_b = _box((10, 10, 10), (2, 8), (2, 8), (2, 3)), _box((10, 10, 10), (2, 8), (2, 8), (5, 6))
    x_a, x_b = _box((10, 10, 10), (2, 3), (2, 8), (2, 8)), _box((10, 10, 10), (5, 6), (2, 8), (2, 8))
    assert volume_hd95(z_a, z_b) == pytest.approx(3.0)  # voxels without a spacing
    assert volume_hd95(z_a, z_b, SPACING) == pytest.approx(7.5)  # 3 slices of 2.5 mm
    assert volume_hd95(x_a, x_b, SPACING) == pytest.approx(1.5)  # 3 pixels of 0.5 mm
    # a 4-voxel cube moved one voxel along y: its leading face (16 of its 56 surface voxels, 29% > 5%) is 0.8 mm away
    a = _box((10, 10, 10), (2, 6), (2, 6), (2, 6))
    assert volume_hd95(a, _box((10, 10, 10), (2, 6), (3, 7), (2, 6)), SPACING) == pytest.approx(0.8)
    doubled = tuple(2 * s for s in SPACING)
    assert volume_hd95(z_a, z_b, doubled) == pytest.approx(2 * volume_hd95(z_a, z_b, SPACING))


def test_the_empty_mask_rule():
    empty, lesion = np.zeros((6, 8, 6), np.uint8), _box((6, 8, 6), (1, 3), (1, 3), (1, 3))
    both_empty = volume_scores(empty, empty, SPACING)
    assert both_empty.dice == 1.0 and math.isnan(both_empty.hd95) and both_empty.empty_gt and both_empty.empty_pred
    false_alarm = volume_scores(lesion, empty, SPACING)
    assert false_alarm.dice == 0.0 and math.isnan(false_alarm.hd95) and false_alarm.pred_voxels == 8
    missed = volume_scores(empty, lesion, (0.5, 0.5, 2.0))
    # an empty prediction scores the volume's diagonal: (6*0.5, 8*0.5, 6*2.0) = (3, 4, 12) mm, diagonal 13 mm
    assert missed.dice == 0.0 and missed.hd95 == pytest.approx(13.0) and missed.gt_voxels == 8
    assert "empty ground truth scores Dice 1" in VOLUME_EMPTY_MASK_RULE and "diagonal" in VOLUME_EMPTY_MASK_RULE


def test_2d_images_are_scored_in_their_own_units():
    a, b = _box((8, 8), (1, 5), (1, 5)), _box((8, 8), (1, 5), (3, 7))  # 16 and 16 pixels, overlap 4*2 = 8
    scores = volume_scores(a, b, (0.25, 0.25))
    assert scores.dice == pytest.approx(0.5)  # 16/32
    assert scores.hd95 == pytest.approx(2 * 0.25)  # moved 2 pixels of 0.25 mm


def test_dice_per_case_pools_the_slices_of_each_case():
    pred = np.zeros((3, 1, 4, 4), np.float32)
    target = np.zeros_like(pred)
    target[0, 0, :2, :2] = 1  # case a, slice 0: 4 true pixels, predicted 2 of them
    pred[0, 0, :1, :2] = 1
    pred[1, 0, 3, 3] = 1  # case a, slice 1: empty truth, 1 false pixel (slice Dice 0)
    target[2, 0, :, :1] = 1  # case b: 4 true pixels, all predicted, and 4 more
    pred[2, 0, :, :2] = 1
    per_case = dice_per_case(pred, target, ["a", "a", "b"])
    assert list(per_case) == ["a", "b"]
    assert per_case["a"] == pytest.approx(2 * 2 / (3 + 4))  # a: overlap 2, predicted 2+1, true 4
    assert per_case["b"] == pytest.approx(2 * 4 / (8 + 4))
    stacked = volume_dice(pred[:2, 0], target[:2, 0])
    assert per_case["a"] == pytest.approx(stacked)
    # the per-slice mean of case a is another number: (2*2/(2+4) + 0) / 2 = 1/3
    slices = per_image_scores(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    assert slices.mean_dice() == pytest.approx(1 / 3) and per_case["a"] != pytest.approx(1 / 3)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one 2D or 3D shape"):
        volume_dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        volume_hd95(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="one case id per slice"):
        dice_per_case(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)), ["a"])
