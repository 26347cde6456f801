"""FedLWS's rule: the weighted mean, shrunk layer by layer by a factor computed from the sites' updates.

Implements the server side of Shi, Li, Zhao, Guo, Chang, "FedLWS: Federated Learning with Adaptive Layer-wise Weight
Shrinking", ICLR 2025 (arXiv 2503.15111), as the authors' code computes it. With ``x`` the global parameters broadcast
this round, ``x_k`` site ``k``'s, ``p_k`` its share of the sample weights and ``K`` the number of sites, for every
layer ``l`` (restricting each vector to the layer's keys):

    u_k      = x_k - x                                   (site k's update)
    m        = sum_k p_k x_k                             (FedAvg's aggregate)
    tau_l    = clip(beta * mean_k ||u_k - mean_j u_j||, min_tau, max_tau)
    gamma_l  = ||x|| / (||x|| + tau_l * ||m - x||)
    result_l = gamma_l * m

so a layer whose sites disagree more (larger spread of the updates) and that moves more is shrunk more; ``gamma_l``
is in ``(0, 1]``. Note the spread uses the plain mean of the updates, the aggregate the sample-weighted one, as in
the authors' code.

Choices the paper leaves open, fixed here:

- What a "layer" is (``layers``). The authors' code walks the state dict in module order and closes a layer at every
  key whose name contains ``"bias"``, which makes a layer of each module's weight and bias (convolution, norm affine).
  The shared keys reach the server sorted by name, where that walk would split modules wrongly, so the default
  ``"module"`` groups the keys by their module (the key minus its last dotted part): the same layers for modules with
  a weight and a bias, and a layer of its own for a module without bias (which the authors' walk would merge into the
  next module). ``"key"`` makes every state-dict key a layer.
- A layer whose global norm is zero (all-zero initialization) is left unshrunk (``gamma_l = 1``): the formula would
  give 0 and pin the layer at zero for ever.
- Defaults ``beta = 0.03``, ``min_tau = 0.01``, ``max_tau = 0.2``: the authors' code (and FL-MedSegBench's).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from fedoap.server.rules.weighted_mean import WeightedMean
from fedoap.checks import is_finite_number as _is_real

__all__ = ["FedLWSRule", "LAYER_GROUPINGS", "layer_groups"]

#: how state-dict keys form the layers that get one factor each
LAYER_GROUPINGS = ("module", "key")



def layer_groups(keys: list[str], layers: str = "module") -> dict[str, list[str]]:
    """The layers of ``keys``: by module (``"enc.conv.weight"`` and ``"enc.conv.bias"`` form ``"enc.conv"``) or one
    per key; keys keep their order within a layer."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.rpartition(".")[0] if layers == "module" else key, []).append(key)
    return groups


class FedLWSRule(WeightedMean):
    """FedLWS's aggregation over the shared parameters (see the module docstring for the rule).

    After :meth:`result`, :attr:`gammas` and :attr:`taus` hold each layer's factor and ``tau`` (also in
    :meth:`summary`, which the controller records in its history).

    Args:
        reference: the global shared parameters the job starts from; each round's :meth:`reset` takes the round's
            broadcast (``x``), in clear.
        beta: scale of the updates' spread in ``tau``.
        min_tau, max_tau: bounds of ``tau``.
        layers: ``"module"`` or ``"key"``, see :data:`LAYER_GROUPINGS`.

    Raises:
        ValueError: an invalid hyperparameter (see :meth:`check_args`), or global parameters with NaN or Inf.

    Example::

        rule = FedLWSRule({"fc.weight": np.array([3.0, 4.0])}, beta=1.0)     # ||x|| = 5
        rule.add("a", {"fc.weight": np.array([3.0, 4.0])}, weight=1)        # u_a = (0, 0)
        rule.add("b", {"fc.weight": np.array([3.0, 4.2])}, weight=1)        # u_b = (0, 0.2)
        rule.result()  # m = (3, 4.1); spread 0.1 -> tau 0.1; gamma = 5 / (5 + 0.1 * 0.1): {"fc.weight": gamma * m}
    """

    name = "fedlws"
    linear = False
    reference = "broadcast"

    def __init__(self, reference: Mapping[str, object], **settings: Any) -> None:
        for name, value in self.check_args(**settings).items():  # the hyperparameters are declared there, once
            setattr(self, name, value)
        super().__init__(reference)

    @classmethod
    def check_args(  # type: ignore[override]
        cls, beta: float = 0.03, min_tau: float = 0.01, max_tau: float = 0.2, layers: str = "module"
    ) -> dict[str, Any]:
        """FedLWS's hyperparameters with their defaults (the authors'), checked: the one place they are declared.

        Raises:
            ValueError: ``beta`` not a finite number >= 0, ``min_tau``/``max_tau`` not finite numbers with
                ``0 <= min_tau <= max_tau``, or ``layers`` outside :data:`LAYER_GROUPINGS`.
        """
        settings = {k: v for k, v in locals().items() if k != "cls"}
        if not _is_real(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not (_is_real(min_tau) and _is_real(max_tau)) or not 0 <= min_tau <= max_tau:
            raise ValueError(f"min_tau and max_tau must be finite with 0 <= min_tau <= max_tau, "
                             f"got {min_tau!r}, {max_tau!r}")
        if layers not in LAYER_GROUPINGS:
            raise ValueError(f"layers must be one of {LAYER_GROUPINGS}, got {layers!r}")
        return settings

    def reset(self, reference: Mapping[str, object]) -> None:
        super().reset(reference)
        self._global = self._global_of(reference)
        self._updates: list[dict[str, np.ndarray]] = []  # u_k by key, float32, in the order of self.contributors
        self.gammas: dict[str, float] = {}
        self.taus: dict[str, float] = {}

    def add(self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's parameters (``steps`` is not used); returns the dropped non-shared keys.

        Raises:
            UpdateRejected: as :meth:`WeightedMean.add`.
        """
        arrays, dropped = self._checked(site, params, weight)
        self._accumulate(arrays, weight)
        self._updates.append({k: (v - self._global[k]).astype(np.float32) for k, v in arrays.items()})
        self.contributors.append(site)
        return dropped

    def _layer_factor(self, keys: list[str], mean: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """``(gamma_l, tau_l)`` of the layer made of ``keys``."""
        def flat(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
            return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])

        updates = np.stack([flat(u) for u in self._updates])
        spread = float(np.linalg.norm(updates - updates.mean(axis=0), axis=1).mean())
        tau = min(max(self.beta * spread, self.min_tau), self.max_tau)
        global_norm = float(np.linalg.norm(flat(self._global)))
        if global_norm == 0.0:
            return 1.0, tau
        move = float(np.linalg.norm(flat(mean) - flat(self._global)))
        return global_norm / (global_norm + tau * move), tau

    def summary(self) -> dict[str, dict[str, float]]:
        """Each layer's ``gamma`` and ``tau`` of the round (recorded in the controller's history)."""
        return {"gammas": dict(self.gammas), "taus": dict(self.taus)}

    def result(self) -> dict[str, np.ndarray]:
        """The sample-weighted mean with every layer multiplied by its ``gamma_l``, as float32 arrays.

        Raises:
            ValueError: when no update was accepted.
        """
        if not self.contributors:
            raise ValueError("no client update was accepted in this round")
        mean = {k: v / self._total_weight for k, v in self._sums.items()}
        out = {}
        for layer, keys in layer_groups(list(self.shapes), self.layers).items():
            gamma, tau = self._layer_factor(keys, mean)
            self.gammas[layer], self.taus[layer] = gamma, tau
            out.update({k: (gamma * mean[k]).astype(np.float32) for k in keys})
        return out
