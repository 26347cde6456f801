"""Segmentation loss used by FedOAP: weighted binary cross-entropy plus soft Dice.

Implements the segmentation objective of

    Tashdeed, Rahman, Islam, Hossain, "Personalized Federated Segmentation with Shared Feature
    Aggregation and Boundary-Focused Calibration" (FedOAP), arXiv:2511.18847,

which trains with ``0.5 * BCE + (1 - soft Dice)``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from monai.losses import DiceLoss

__all__ = ["DICE_REDUCTIONS", "BCEDiceLoss", "set_dice_reduction"]

#: how the soft Dice term is reduced over a batch: ``"batch"`` pools the intersection and the sums over the whole
#: batch (one Dice per channel); ``"image"`` computes one soft Dice per image and channel and averages them (the
#: authors' code)
DICE_REDUCTIONS = ("batch", "image")


def _check_non_negative(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


class BCEDiceLoss(nn.Module):
    """
    ``bce_weight * BCEWithLogits(z, y) + dice_weight * (1 - softDice(sigmoid(z), y))`` for sigmoid
    (binary, one logit per label) segmentation outputs, as used by FedOAP (Tashdeed et al.,
    arXiv:2511.18847; paper weights: 0.5 and 1).

    The BCE term is averaged over all elements. The Dice term is MONAI's
    :class:`monai.losses.DiceLoss` with ``sigmoid=True``. By default (``batch=True``) the
    intersection and the sums are pooled over the whole batch before dividing, i.e. one soft Dice
    per channel for the batch. This is chosen because tumour datasets contain many slices with an
    empty mask: per-image soft Dice on an empty mask is ``smooth_nr / (sum(p) + smooth_dr)``, which
    is ~0 (loss ~1) for any non-negligible predicted foreground and so gives a large, noisy signal
    on every empty slice; pooling over the batch keeps the Dice term well defined and stable.
    Set ``batch=False`` (``dice_reduction="image"``) for the per-image mean, as in the authors' code: one soft Dice
    ``(2 * sum(p * y) + smooth_nr) / (sum(p) + sum(y) + smooth_dr)`` per image and channel, averaged. An image with
    an empty mask counts like any other: its Dice is ``smooth_nr / (sum(p) + smooth_dr)`` (1 when nothing is
    predicted, ~0 otherwise). :attr:`dice_reduction` can be changed after construction (a method's loss receives
    the run's ``--dice-reduction`` this way, :func:`set_dice_reduction`).

    Args:
        bce_weight: weight of the binary cross-entropy term. Defaults to 0.5 (paper).
        dice_weight: weight of the ``1 - soft Dice`` term. Defaults to 1.0 (paper).
        smooth_nr: constant added to the Dice numerator. Defaults to 1e-5.
        smooth_dr: constant added to the Dice denominator. Defaults to 1e-5.
        batch: pool the Dice statistics over the batch (see above). Defaults to True.
        dice_reduction: ``"batch"`` or ``"image"``, an alternative to ``batch`` (which it overrides when given).

    Raises:
        ValueError: if a weight or smoothing constant is negative or not finite, or if both weights are 0.

    Example::

        >>> loss = BCEDiceLoss()
        >>> logits = torch.randn(4, 1, 64, 64, requires_grad=True)
        >>> target = (torch.rand(4, 1, 64, 64) > 0.9).float()
        >>> loss(logits, target).backward()
    """

    def __init__(
        self,
        bce_weight: float = 0.5,
        dice_weight: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = True,
        dice_reduction: str | None = None,
    ) -> None:
        super().__init__()
        _check_non_negative("bce_weight", bce_weight)
        _check_non_negative("dice_weight", dice_weight)
        _check_non_negative("smooth_nr", smooth_nr)
        _check_non_negative("smooth_dr", smooth_dr)
        if float(bce_weight) == 0 and float(dice_weight) == 0:
            raise ValueError("bce_weight and dice_weight cannot both be 0.")
        if not isinstance(batch, bool):
            raise ValueError(f"batch must be a bool, got {batch!r}.")
        if dice_reduction is not None:
            batch = _batch_of(dice_reduction)
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.batch = batch
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=float(smooth_nr), smooth_dr=float(smooth_dr), batch=batch)

    @property
    def dice_reduction(self) -> str:
        """``"batch"`` (pooled Dice) or ``"image"`` (mean of per-image Dice); settable."""
        return "batch" if self.batch else "image"

    @dice_reduction.setter
    def dice_reduction(self, value: str) -> None:
        self.batch = _batch_of(value)
        self.dice.batch = self.batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: raw scores ``(B, C, *spatial)`` (``C = 1`` for binary segmentation).
            target: ground truth in ``[0, 1]`` (normally ``{0, 1}``), same shape as ``logits``.

        Returns:
            the scalar loss.

        Raises:
            ValueError: if ``logits`` has fewer than 3 dimensions or ``target`` has a different shape.
        """
        if logits.ndim < 3:
            raise ValueError(f"logits must have shape (B, C, *spatial), got {tuple(logits.shape)}.")
        if target.shape != logits.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}."
            )
        target = target.to(dtype=logits.dtype)
        return self.bce_weight * self.bce(logits, target) + self.dice_weight * self.dice(logits, target)


def _batch_of(reduction: object) -> bool:
    if reduction not in DICE_REDUCTIONS:
        raise ValueError(f"dice_reduction must be one of {DICE_REDUCTIONS}, got {reduction!r}.")
    return reduction == "batch"


def set_dice_reduction(loss: nn.Module, reduction: str) -> int:
    """Set the Dice reduction (``"batch"`` or ``"image"``) of every :class:`BCEDiceLoss` inside ``loss`` (itself
    included, e.g. the segmentation loss inside a :class:`~fedoap.losses.PerturbedBoundaryLoss`); return how many
    were set.

    Raises:
        ValueError: an unknown reduction.
    """
    _batch_of(reduction)
    count = 0
    for module in loss.modules():
        if isinstance(module, BCEDiceLoss):
            module.dice_reduction = reduction
            count += 1
    return count
