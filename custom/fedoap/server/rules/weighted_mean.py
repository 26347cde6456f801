"""FedAvg's rule: the weighted mean of the shared parameters (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017), restricted to the shared set as in FedOAP (arXiv 2511.18847).

The weight is what a site reports: its sample count, or its step count for a method that weighs by steps (FedGS,
whose sites send ``x - U_k`` so that this mean is its update rule). A weighted sum, so it also runs on ciphertexts.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from fedoap.server.rules.base import ServerRule

__all__ = ["WeightedMean"]


class WeightedMean(ServerRule):
    """Weighted average of the shared parameters of one round.

    Args:
        reference: the global shared parameters; fixes the key set and every shape.

    Example::

        rule = WeightedMean({"w": np.zeros(2)})
        rule.add("site-a", {"w": np.ones(2)}, weight=3)
        rule.add("site-b", {"w": np.zeros(2), "head.w": np.ones(1)}, weight=1)  # returns ["head.w"] (dropped)
        rule.result()  # {"w": array([0.75, 0.75])}
    """

    name = "weighted_mean"
    linear = True

    def reset(self, reference: Mapping[str, object]) -> None:
        super().reset(reference)
        self._sums: dict[str, np.ndarray] = {}
        self._total_weight = 0.0

    def add(self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's update (``steps`` is not used by the weighted mean); returns the dropped non-shared keys.

        Raises:
            UpdateRejected: the update is left out of the average (the reason names the site and the key).
        """
        arrays, dropped = self._checked(site, params, weight)
        self._accumulate(arrays, weight)
        self.contributors.append(site)
        return dropped

    def _accumulate(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        for key, value in arrays.items():
            if key in self._sums:
                self._sums[key] += weight * value
            else:
                self._sums[key] = weight * value
        self._total_weight += float(weight)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean as float32 arrays.

        Raises:
            ValueError: when no update was accepted.
        """
        if not self.contributors:
            raise ValueError("no client update was accepted in this round")
        return {k: (v / self._total_weight).astype(np.float32) for k, v in self._sums.items()}
