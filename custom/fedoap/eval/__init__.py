"""Segmentation metrics with explicit empty-mask rules: per image (slice) and per volume (case, in mm)."""

from .metrics import EMPTY_MASK_RULE, ImageScores, binarize, per_image_scores, summarize
from .volume import (VOLUME_DICE_RULE, VOLUME_EMPTY_MASK_RULE, VolumeScores, dice_per_case, volume_dice, volume_hd95,
                     volume_scores)

__all__ = [
    "EMPTY_MASK_RULE",
    "VOLUME_DICE_RULE",
    "VOLUME_EMPTY_MASK_RULE",
    "ImageScores",
    "VolumeScores",
    "binarize",
    "dice_per_case",
    "per_image_scores",
    "summarize",
    "volume_dice",
    "volume_hd95",
    "volume_scores",
]
