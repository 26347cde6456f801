"""FedNova's rule: normalized averaging (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020), over the shared parameters.

Each site ``k`` sends its parameters ``x_k`` after ``tau_k`` local steps, with its sample count ``n_k`` as weight.
With ``x`` the global parameters the round started from,

    result = x - tau_eff * sum_k p_k (x - x_k) / tau_k,   p_k = n_k / sum_j n_j,   tau_eff = sum_k p_k tau_k,

i.e. the normalizer ``a_k = tau_k`` of plain local SGD (the choice for AdamW is discussed in
``fedoap.methods.fednova``). With equal step counts it is the weighted mean. It needs ``x`` in clear and forms
``tau_eff`` from the clear step counts, so it does not run on ciphertexts.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from fedoap.server.rules.base import UpdateRejected, is_positive_number
from fedoap.server.rules.weighted_mean import WeightedMean

__all__ = ["FedNovaRule"]


class FedNovaRule(WeightedMean):
    """FedNova's normalized averaging of one round (see the module docstring); ``add`` needs the step count.

    Args:
        reference: the global shared parameters the job starts from; each round's :meth:`reset` takes the round's
            broadcast (``x``), in clear.

    Example::

        rule = FedNovaRule({"w": np.zeros(1)})
        rule.add("a", {"w": np.full(1, -4.0)}, weight=1, steps=2)   # d_a = (0 - (-4)) / 2 = 2
        rule.add("b", {"w": np.full(1, -1.0)}, weight=1, steps=1)   # d_b = 1
        rule.result()  # tau_eff = 1.5, sum p_k d_k = 1.5: {"w": array([-2.25])} (FedAvg: -2.5)
    """

    name = "fednova"
    linear = False
    reference = "broadcast"
    uses_steps = True

    def reset(self, reference: Mapping[str, object]) -> None:
        super().reset(reference)
        self._global = self._global_of(reference)
        self._weighted_steps = 0.0

    def add(self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's parameters after ``steps`` local steps; returns the dropped non-shared keys.

        Raises:
            UpdateRejected: as :meth:`WeightedMean.add`, or a step count that is not a positive number.
        """
        if not is_positive_number(steps):
            raise UpdateRejected(f"{site}: FedNova needs the number of local steps, a positive number; got {steps!r}")
        arrays, dropped = self._checked(site, params, weight)
        # the normalized update d_k = (x - x_k) / tau_k, summed with weight n_k
        self._accumulate({k: (self._global[k] - v) / float(steps) for k, v in arrays.items()}, weight)
        self._weighted_steps += float(weight) * float(steps)
        self.contributors.append(site)
        return dropped

    def result(self) -> dict[str, np.ndarray]:
        """``x - tau_eff * sum_k p_k d_k`` as float32 arrays.

        Raises:
            ValueError: when no update was accepted.
        """
        if not self.contributors:
            raise ValueError("no client update was accepted in this round")
        tau_eff = self._weighted_steps / self._total_weight
        return {k: (self._global[k] - tau_eff * v / self._total_weight).astype(np.float32)
                for k, v in self._sums.items()}
