"""Per-region scores of 3D brain-tumour segmentations: Dice and HD95 of every case and every nested region (WT, TC,
ET), each case's volume scored as a whole (:func:`fedoap.eval.volume.volume_scores`: MONAI's HD95 in the spacing's
units, the empty-mask rules of :data:`fedoap.eval.volume.VOLUME_EMPTY_MASK_RULE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from fedoap.eval.volume import VOLUME_EMPTY_MASK_RULE, volume_scores

__all__ = ["REGION_NAMES", "REGION_RULE", "RegionScores", "region_scores"]

#: the output channels of a brain-tumour network, in order
REGION_NAMES: tuple[str, ...] = ("wt", "tc", "et")
REGION_RULE = "Per region (WT, TC, ET) and case: " + VOLUME_EMPTY_MASK_RULE


@dataclass
class RegionScores:
    """Dice and HD95 per case (rows) and region (columns); HD95 NaN where the ground truth is empty."""

    dice: np.ndarray
    hd95: np.ndarray
    regions: tuple[str, ...] = REGION_NAMES

    def mean_dice(self) -> float:
        """Mean Dice over every case and region (the model-selection score of the fine-tuning)."""
        return float(self.dice.mean()) if self.dice.size else float("nan")

    def mean_hd95(self) -> float:
        valid = self.hd95[~np.isnan(self.hd95)]
        return float(valid.mean()) if valid.size else float("nan")

    def summary(self) -> dict[str, float]:
        """``dice``, ``hd95`` (means over regions and cases), ``dice_<region>``, ``hd95_<region>`` and ``n_cases``."""
        out: dict[str, float] = {"dice": self.mean_dice(), "hd95": self.mean_hd95(), "n_cases": int(len(self.dice))}
        for r, name in enumerate(self.regions):
            hd = self.hd95[:, r][~np.isnan(self.hd95[:, r])]
            out[f"dice_{name}"] = float(self.dice[:, r].mean()) if len(self.dice) else float("nan")
            out[f"hd95_{name}"] = float(hd.mean()) if hd.size else float("nan")
        return out


def region_scores(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                  spacings: Optional[Sequence[Sequence[float]]] = None,
                  regions: Sequence[str] = REGION_NAMES) -> RegionScores:
    """Scores of binary predictions ``(N, R, H, W, D)`` against region masks of the same shape.

    Raises:
        ValueError: shapes that differ or are not 5D with one channel per region, or one spacing per case missing.
    """
    pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    target = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != len(regions):
        raise ValueError(f"pred and target must both be (N, {len(regions)}, H, W, D); got {pred.shape} and "
                         f"{target.shape}")
    if spacings is not None and len(spacings) != len(pred):
        raise ValueError(f"{len(spacings)} spacings for {len(pred)} cases")
    dice = np.zeros(pred.shape[:2])
    hd95 = np.full(pred.shape[:2], np.nan)
    for i in range(pred.shape[0]):
        for r in range(pred.shape[1]):
            s = volume_scores(pred[i, r], target[i, r], spacings[i] if spacings is not None else None)
            dice[i, r], hd95[i, r] = s.dice, s.hd95
    return RegionScores(dice=dice, hd95=hd95, regions=tuple(regions))
