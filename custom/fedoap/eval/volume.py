"""Per-volume (3D) segmentation metrics: Dice over a whole case and HD95 in millimetres from the voxel spacing.

The per-image scores of :mod:`fedoap.eval.metrics` are what the federation optimizes and reports each round, but a
radiologist judges a case: one tumour cut into 12 slices is one lesion, and a false positive on an otherwise empty
slice of a large tumour's volume weighs little. These scores count every voxel of a case once and measure distances in
the scan's own units (the NIfTI header's spacing), with the rules for empty masks fixed in
:data:`VOLUME_EMPTY_MASK_RULE`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

__all__ = ["VOLUME_DICE_RULE", "VOLUME_EMPTY_MASK_RULE", "VolumeScores", "volume_dice", "volume_hd95", "volume_scores",
           "dice_per_case"]

#: the Dice half of :data:`VOLUME_EMPTY_MASK_RULE` (what a table of per-volume Dice alone states)
VOLUME_DICE_RULE = ("Dice per case over all of its voxels; a case with an empty ground truth scores Dice 1 if the "
                    "prediction is empty too, else 0.")
VOLUME_EMPTY_MASK_RULE = VOLUME_DICE_RULE + (
    " HD95 per case in mm (the header's voxel spacing; pixels for 2D images) over cases with a non-empty ground truth "
    "(NaN, excluded from means, otherwise); an empty prediction there scores the volume's diagonal."
)


@dataclass(frozen=True)
class VolumeScores:
    """The scores of one case (see :data:`VOLUME_EMPTY_MASK_RULE`)."""

    dice: float
    hd95: float  # NaN when the ground truth is empty
    empty_gt: bool
    empty_pred: bool
    gt_voxels: int
    pred_voxels: int


def _binary(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """A boolean mask: floats above 0.5, other types non-zero."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return array > 0.5 if array.dtype.kind == "f" else array.astype(bool)


def _checked(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _binary(pred), _binary(target)
    if pred.shape != target.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred and target must be masks of one 2D or 3D shape; got {pred.shape} and {target.shape}")
    return pred, target


def _dice_of_counts(overlap: int, pred: int, target: int) -> float:
    """2|A∩B| / (|A| + |B|), and the empty rule: two empty masks agree perfectly."""
    total = pred + target
    return 1.0 if total == 0 else 2.0 * overlap / total


def volume_dice(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Dice over every voxel of one case (binary masks of one shape; floats are thresholded at 0.5)."""
    pred, target = _checked(pred, target)
    return _dice_of_counts(int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred)),
                           int(np.count_nonzero(target)))


def _spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (one per axis), got {tuple(spacing)}")
    return values


def volume_hd95(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the masks' surfaces, in the units of ``spacing`` (one
    number per axis, e.g. the NIfTI zooms in mm; None: voxels). Empty masks follow :data:`VOLUME_EMPTY_MASK_RULE`.

    Raises:
        ValueError: the masks differ in shape, or ``spacing`` is not one positive number per axis.
    """
    pred, target = _checked(pred, target)
    spacing = _spacing(spacing, pred.ndim)
    if not target.any():
        return float("nan")
    if not pred.any():
        return math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None],
                                        include_background=True, percentile=95, spacing=list(spacing))
    return float(hd.reshape(-1)[0])


def volume_scores(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                  spacing: Optional[Sequence[float]] = None) -> VolumeScores:
    """Dice and HD95 of one case (see :func:`volume_dice`, :func:`volume_hd95`)."""
    pred, target = _checked(pred, target)
    n_pred, n_target = int(np.count_nonzero(pred)), int(np.count_nonzero(target))
    return VolumeScores(dice=_dice_of_counts(int(np.count_nonzero(pred & target)), n_pred, n_target),
                        hd95=volume_hd95(pred, target, spacing), empty_gt=n_target == 0, empty_pred=n_pred == 0,
                        gt_voxels=n_target, pred_voxels=n_pred)


def dice_per_case(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                  case_ids: Sequence[str]) -> dict[str, float]:
    """Dice of each case over its stacked slices (``(N, 1, H, W)`` masks, ``case_ids[i]`` the case of slice ``i``),
    in the order cases first appear. The site's per-volume test score, at the training size."""
    pred, target = _binary(pred), _binary(target)
    if pred.shape != target.shape or pred.ndim != 4 or len(case_ids) != len(pred):
        raise ValueError(f"pred and target must both be (N, 1, H, W) with one case id per slice; got "
                         f"{pred.shape}, {target.shape} and {len(case_ids)} case ids")
    overlap = (pred & target).reshape(len(pred), -1).sum(1)
    n_pred, n_target = pred.reshape(len(pred), -1).sum(1), target.reshape(len(target), -1).sum(1)
    ids = np.asarray(case_ids, dtype=object)
    out: dict[str, float] = {}
    for case in dict.fromkeys(case_ids):
        rows = ids == case
        out[case] = _dice_of_counts(int(overlap[rows].sum()), int(n_pred[rows].sum()), int(n_target[rows].sum()))
    return out
