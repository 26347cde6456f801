"""The coordinate-wise trimmed mean of the sites' shared parameters (Yin et al., ICML 2018): per coordinate, drop the
``b`` largest and the ``b`` smallest values of the round's updates and average the rest.

``b = ceil(trim_fraction * K)`` for ``K`` accepted updates, at most ``(K - 1) // 2`` (so one value always remains):
with any ``trim_fraction > 0`` and three or more sites at least one value is cut at each end, so a single outlier
never enters the mean (with the default 0.1 and three sites it is the median; with 30 sites, 3 per end). Up to ``b``
sites per end are tolerated. Unweighted, like the median (a claimed sample count buys no influence), and plaintext
only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from fedoap.checks import is_finite_number
from fedoap.server.rules.median import CoordinateMedian

__all__ = ["TrimmedMean", "trimmed_count"]


def trimmed_count(n: int, trim_fraction: float) -> int:
    """How many values are cut at each end of ``n``: ``ceil(trim_fraction * n)``, at most ``(n - 1) // 2``."""
    return max(0, min(math.ceil(trim_fraction * n), (n - 1) // 2))


class TrimmedMean(CoordinateMedian):
    """Coordinate-wise trimmed mean of one round's updates.

    After :meth:`result`, :meth:`summary` says how many values were cut at each end.

    Args:
        reference: the global shared parameters; fixes the key set and every shape.
        trim_fraction: the fraction of the updates cut at each end, in ``[0, 0.5)`` (0: the plain unweighted mean).

    Raises:
        ValueError: an invalid ``trim_fraction`` (see :meth:`check_args`).

    Example::

        rule = TrimmedMean({"w": np.zeros(1)}, trim_fraction=0.2)
        for site, value in zip("abcde", (1.0, 2.0, 3.0, 4.0, 1e9)):
            rule.add(site, {"w": np.full(1, value)}, weight=1)
        rule.result()  # b = ceil(0.2 * 5) = 1: mean of (2, 3, 4) = {"w": array([3.])}
    """

    name = "trimmed_mean"

    def __init__(self, reference: Mapping[str, object], **settings: Any) -> None:
        for name, value in self.check_args(**settings).items():  # declared once, there
            setattr(self, name, value)
        self.trimmed = 0
        super().__init__(reference)

    @classmethod
    def check_args(cls, trim_fraction: float = 0.1) -> dict[str, Any]:  # type: ignore[override]
        """The rule's argument with its default, checked.

        Raises:
            ValueError: ``trim_fraction`` not a finite number in ``[0, 0.5)``.
        """
        if not is_finite_number(trim_fraction) or not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")
        return {"trim_fraction": float(trim_fraction)}

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        b = trimmed_count(stacked.shape[0], self.trim_fraction)
        self.trimmed = b
        ordered = np.sort(stacked, axis=0)
        return ordered[b : stacked.shape[0] - b].mean(axis=0)

    def summary(self) -> dict[str, int]:
        """How many updates were cut at each end, per coordinate (recorded in the controller's history)."""
        return {"trimmed_per_end": self.trimmed}
