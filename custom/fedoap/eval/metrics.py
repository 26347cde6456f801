"""Per-image segmentation metrics (Dice, HD95) with an explicit rule for empty masks.

Published federated segmentation numbers are hard to compare because Dice is often averaged per batch, where a batch
of empty slices with an empty prediction silently counts as about 1. Here every number is computed per image with
MONAI's metrics, and the rules for empty masks are fixed and stated in every table (``EMPTY_MASK_RULE``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance

__all__ = ["EMPTY_MASK_RULE", "LESION_FP_RULE", "ImageScores", "binarize", "per_image_scores", "summarize"]

EMPTY_MASK_RULE = (
    "Dice per image; an image with an empty ground truth scores Dice 1 if the prediction is empty too, else 0. "
    "HD95 (pixels) per image over images with a non-empty ground truth; an empty prediction there scores the image "
    "diagonal."
)

#: the scores that stay comparable where most images have no tumour (the unseen organ): under EMPTY_MASK_RULE one stray
#: pixel scores an empty image 0, so a model that marks most of them gets a Dice of ~0 however well it outlines lesions
LESION_FP_RULE = (
    "Lesion Dice: mean per-image Dice over the images whose ground truth has tumour (empty ones excluded; n_lesion "
    "of them; null when none). Empty-image false-positive (FP) rate: fraction of the images with an empty ground "
    "truth on which the model predicts any tumour pixel (n_empty of them; null when none); FP area: the fraction of "
    "an image's pixels predicted as tumour, mean over those images. Pooled Dice: one Dice of all pixels of all "
    "images together (2 x overlap / (predicted + true tumour pixels); 1 when both are 0)."
)


@dataclass
class ImageScores:
    """Scores of every image of a split (one entry per image, same order as the input)."""

    dice: np.ndarray
    hd95: np.ndarray  # NaN where the ground truth is empty (excluded from the mean)
    empty_gt: np.ndarray
    # pixel counts per image (None: not counted), for the rates of LESION_FP_RULE
    pred_px: Optional[np.ndarray] = None  # pixels predicted as tumour
    gt_px: Optional[np.ndarray] = None  # tumour pixels of the ground truth
    overlap_px: Optional[np.ndarray] = None  # pixels that are both
    image_px: int = 0  # pixels of one image (H x W)

    def mean_dice(self) -> float:
        return float(self.dice.mean()) if self.dice.size else float("nan")

    def mean_hd95(self) -> float:
        valid = self.hd95[~np.isnan(self.hd95)]
        return float(valid.mean()) if valid.size else float("nan")


def binarize(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Turn single-channel tumor logits into a {0,1} float mask."""
    return (torch.sigmoid(logits) > threshold).float()


def per_image_scores(pred: torch.Tensor, target: torch.Tensor) -> ImageScores:
    """Dice and HD95 of every image.

    Args:
        pred: binary prediction, shape (N, 1, H, W).
        target: binary ground truth, same shape.

    Raises:
        ValueError: when the shapes differ or are not (N, 1, H, W).
    """
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(f"pred and target must both be (N, 1, H, W); got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.float().cpu(), target.float().cpu()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, target)
    dice = dice.reshape(-1).numpy().astype(np.float64)

    gt_px = target.flatten(1).sum(1).numpy().astype(np.int64)
    pred_px = pred.flatten(1).sum(1).numpy().astype(np.int64)
    overlap_px = (pred * target).flatten(1).sum(1).numpy().astype(np.int64)
    empty_gt, empty_pred = gt_px == 0, pred_px == 0
    diagonal = math.hypot(pred.shape[-2], pred.shape[-1])
    hd95 = np.full(len(pred), np.nan)
    both = ~empty_gt & ~empty_pred
    if both.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idx = torch.from_numpy(np.nonzero(both)[0])
            hd = compute_hausdorff_distance(pred[idx], target[idx], include_background=True, percentile=95)
        hd95[both] = hd.reshape(-1).numpy()
    hd95[~empty_gt & empty_pred] = diagonal
    return ImageScores(dice=dice, hd95=hd95, empty_gt=empty_gt, pred_px=pred_px, gt_px=gt_px, overlap_px=overlap_px,
                       image_px=int(pred.shape[-2] * pred.shape[-1]))


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def summarize(scores: ImageScores) -> dict[str, float]:
    """Means reported in results tables, with the counts that say how many images each mean covers: the Dice of
    :data:`EMPTY_MASK_RULE` and the scores of :data:`LESION_FP_RULE` (NaN, written null in JSON, where a mean covers
    no image; the FP rate and area and the pooled Dice NaN too when the pixel counts are missing)."""
    empty = scores.empty_gt.astype(bool)
    counted = scores.pred_px is not None and scores.gt_px is not None and scores.overlap_px is not None
    if counted:
        on_empty = scores.pred_px[empty].astype(np.float64)
        fp_rate = _mean((on_empty > 0).astype(np.float64))
        fp_area = _mean(on_empty / scores.image_px) if scores.image_px else float("nan")
        total = float(scores.pred_px.sum() + scores.gt_px.sum())
        pooled = 2.0 * float(scores.overlap_px.sum()) / total if total > 0 else 1.0
        pooled = pooled if scores.dice.size else float("nan")
    else:
        fp_rate = fp_area = pooled = float("nan")
    return {
        "dice": scores.mean_dice(),
        "hd95": scores.mean_hd95(),
        "n_images": int(scores.dice.size),
        "n_empty_gt": int(empty.sum()),
        "lesion_dice": _mean(scores.dice[~empty]),
        "n_lesion": int((~empty).sum()),
        "empty_fp_rate": fp_rate,
        "empty_fp_area": fp_area,
        "pooled_dice": pooled,
    }
