"""The coordinate-wise median of the sites' shared parameters (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018), a robust replacement of the weighted mean.

Every coordinate of the result is the median of that coordinate over the round's accepted updates, so fewer than half
of the sites cannot move it outside the range of the honest values, whatever they send. The claimed weights are
checked but not used: a site cannot buy influence with a sample count. The price is that unequal sites count
equally, and the statistical efficiency of the mean is lost (measure the Dice cost before choosing it). The rule
keeps every update of the round (``K x N`` float32 values) and needs plaintext, so it is not linear and refuses HE.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from fedoap.server.rules.base import ServerRule

__all__ = ["CoordinateMedian"]


class CoordinateMedian(ServerRule):
    """Coordinate-wise median of one round's updates (unweighted; an even count averages the two middle values).

    Args:
        reference: the global shared parameters; fixes the key set and every shape.

    Example::

        rule = CoordinateMedian({"w": np.zeros(2)})
        for site, value in (("a", 1.0), ("b", 2.0), ("c", 1e9)):
            rule.add(site, {"w": np.full(2, value)}, weight=1)
        rule.result()  # {"w": array([2., 2.])}: the outlier cannot drag it
    """

    name = "median"
    linear = False

    def reset(self, reference: Mapping[str, object]) -> None:
        super().reset(reference)
        self._updates: list[dict[str, np.ndarray]] = []  # by key, float32, in the order of self.contributors

    def add(self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None) -> list[str]:
        """Keep one site's update (``weight`` is checked, not used; ``steps`` neither); returns the dropped keys.

        Raises:
            UpdateRejected: a bad weight, a missing key, a wrong shape, NaN or Inf.
        """
        arrays, dropped = self._checked(site, params, weight)
        self._updates.append({k: v.astype(np.float32) for k, v in arrays.items()})
        self.contributors.append(site)
        return dropped

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        """The statistic over axis 0 (one row per site)."""
        return np.median(stacked, axis=0)

    def result(self) -> dict[str, np.ndarray]:
        """The coordinate-wise statistic as float32 arrays.

        Raises:
            ValueError: when no update was accepted.
        """
        if not self.contributors:
            raise ValueError("no client update was accepted in this round")
        return {k: self._combine(np.stack([u[k] for u in self._updates]).astype(np.float64)).astype(np.float32)
                for k in self.shapes}
