"""FedAWA's rule: aggregation weights learned from the client vectors by a few steps of gradient descent.

Implements the server side of Shi, Zhao, Zhang, Zhou, Guo, Chang, "FedAWA: Adaptive Optimization of Aggregation
Weights in Federated Learning Using Client Vectors", CVPR 2025 (arXiv 2503.15842), as the authors' code computes it.
Site ``k`` sends its shared parameters ``x_k``; with ``x`` the global parameters broadcast this round, its *client
vector* is ``tau_k = x_k - x``. The weights are ``lambda = softmax(t)`` of one logit ``t_k`` per site, which the rule
keeps from round to round. Each round it takes ``server_epochs`` steps of its optimizer on

    L(t) = sum_k lambda_k ||tau_k - sum_j lambda_j tau_j||_2  +  sum_k lambda_k d(x, x_k)

and returns ``gamma * sum_k lambda_k x_k / sum_k lambda_k``. The first term moves weight to the sites whose update
agrees with the weighted mean update, the second to the sites whose model stayed close to the global one (``d``: the
cosine distance ``1 - cos(x, x_k)``, or ``"euc"``: the mean squared coordinate difference ``||tau_k||^2 / N``).

The norms and inner products come from the sites' Gram matrix ``G_kj = <tau_k, tau_j>`` (accumulated in float64 as
updates arrive): ``||tau_k - sum_j lambda_j tau_j||^2 = G_kk - 2 (G lambda)_k + lambda^T G lambda``, so the descent
steps cost O(K^2), not O(K N). The authors' code computes the same norms on the stacked float32 vectors.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

import numpy as np
import torch

from fedoap.server.rules.base import ServerRule
from fedoap.checks import is_finite_number as _is_real

__all__ = ["FedAWARule", "REG_DISTANCES", "SERVER_OPTIMIZERS", "LOGIT_INITS", "AGGREGATE_WITH"]

#: the distance ``d(x, x_k)`` of the regularization term
REG_DISTANCES = ("cos", "euc")
#: the optimizer of the weight logits; the authors' fixed settings: Adam with betas (0.5, 0.999); SGD with momentum
#: 0.9 and weight decay 5e-4
SERVER_OPTIMIZERS = ("adam", "sgd")
#: how a site's logit starts: its normalized sample weight ``p_k`` (the authors' code: softmax of the weights
#: themselves, close to uniform) or ``log(p_k)`` (softmax equal to FedAvg's weights)
LOGIT_INITS = ("weights", "log_weights")
#: which weights aggregate: those of the last descent step's forward pass, before its update (the authors' code), or
#: the softmax of the logits after the last update
AGGREGATE_WITH = ("last_forward", "updated")

_CHUNK = 1 << 20  # values per chunk of a float64 inner product (bounded temporaries for large models)
_COS_EPS = 1e-8  # torch.nn.CosineSimilarity's default, as in the authors' code



def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``<a, b>`` accumulated in float64, chunk by chunk (the stored vectors are float32)."""
    return float(sum(np.dot(a[i : i + _CHUNK].astype(np.float64), b[i : i + _CHUNK].astype(np.float64))
                     for i in range(0, a.size, _CHUNK)))


class FedAWARule(ServerRule):
    """FedAWA's aggregation over the shared parameters (see the module docstring for the rule).

    The learned logits by site live in the rule object from round to round (:meth:`state` reads them,
    :meth:`load_state` restores them). After :meth:`result`, :attr:`weights` holds the aggregation weight of each
    site and :attr:`logits` the logits carried on (both also in :meth:`summary`, which the controller records in its
    history). The sample weights passed to ``add`` only initialize the logit of a site seen for the first time.

    Args:
        reference: the global shared parameters the job starts from; each round's :meth:`reset` takes the round's
            broadcast (``x``), in clear.
        server_epochs: descent steps on the weights per round (authors' default 1).
        server_lr: step size of the weight optimizer (authors: 1e-3 with Adam; their SGD used 1e-2).
        server_optimizer: ``"adam"`` (betas 0.5, 0.999) or ``"sgd"`` (momentum 0.9, weight decay 5e-4); built afresh
            every round, as in the authors' code.
        reg_distance: ``"cos"`` (authors' default) or ``"euc"``.
        gamma: factor of the aggregate (authors' default 1: none).
        logit_init: how the logit of a new site starts, see :data:`LOGIT_INITS`.
        aggregate_with: which weights aggregate, see :data:`AGGREGATE_WITH`.

    Raises:
        ValueError: an invalid hyperparameter (see :meth:`check_args`), or global parameters with NaN or Inf.

    Example::

        rule = FedAWARule({"w": np.zeros(2)})
        rule.add("a", {"w": np.array([1.0, 0.0])}, weight=1)
        rule.add("b", {"w": np.array([0.0, 1.0])}, weight=1)
        rule.result()            # lambda = (1/2, 1/2) by symmetry: {"w": array([0.5, 0.5])}
        rule.state()             # {"logits": {"a": 0.5, "b": 0.5}}
    """

    name = "fedawa"
    reference = "broadcast"

    def __init__(self, reference: Mapping[str, object], **settings: Any) -> None:
        for name, value in self.check_args(**settings).items():  # the hyperparameters are declared there, once
            setattr(self, name, value)
        self.logits: dict[str, float] = {}
        super().__init__(reference)

    @classmethod
    def check_args(  # type: ignore[override]
        cls,
        server_epochs: int = 1,
        server_lr: float = 1e-3,
        server_optimizer: str = "adam",
        reg_distance: str = "cos",
        gamma: float = 1.0,
        logit_init: str = "weights",
        aggregate_with: str = "last_forward",
    ) -> dict[str, Any]:
        """FedAWA's hyperparameters with their defaults (the authors'), checked: the one place they are declared (the
        rule takes them as keywords; the method passes its own through).

        Raises:
            ValueError: ``server_epochs`` not an integer >= 1, ``server_lr`` or ``gamma`` not a finite number > 0, or
                a name outside :data:`SERVER_OPTIMIZERS`, :data:`REG_DISTANCES`, :data:`LOGIT_INITS`,
                :data:`AGGREGATE_WITH`.
        """
        settings = {k: v for k, v in locals().items() if k != "cls"}
        if not isinstance(server_epochs, numbers.Integral) or isinstance(server_epochs, bool) or server_epochs < 1:
            raise ValueError(f"server_epochs must be an integer >= 1, got {server_epochs!r}")
        if not _is_real(server_lr) or server_lr <= 0:
            raise ValueError(f"server_lr must be a finite number > 0, got {server_lr!r}")
        if not _is_real(gamma) or gamma <= 0:
            raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
        for name, value, choices in (("server_optimizer", server_optimizer, SERVER_OPTIMIZERS),
                                     ("reg_distance", reg_distance, REG_DISTANCES),
                                     ("logit_init", logit_init, LOGIT_INITS),
                                     ("aggregate_with", aggregate_with, AGGREGATE_WITH)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return settings

    def reset(self, reference: Mapping[str, object]) -> None:
        """Start a round from the broadcast ``x``; the logits learned so far carry on."""
        super().reset(reference)
        self._previous_logits = dict(self.logits)
        self._keys = list(self.shapes)
        global_params = self._global_of(reference)
        self._global = np.concatenate([global_params[k].ravel() for k in self._keys])
        self._global_sq = _dot(self._global, self._global)
        self._updates: list[np.ndarray] = []  # tau_k as float32, in the order of self.contributors
        self._site_weights: list[float] = []
        self._gram: list[list[float]] = []  # G_kj = <tau_k, tau_j>, float64
        self._distance: list[float] = []  # d(x, x_k)
        self.weights: dict[str, float] = {}

    @staticmethod
    def _logits_of(state: Optional[Mapping[str, Any]]) -> dict[str, float]:
        logits = state.get("logits") if isinstance(state, Mapping) else None
        if not isinstance(logits, Mapping) or not all(isinstance(k, str) and _is_real(v) for k, v in logits.items()):
            raise ValueError(f"state must be {{'logits': {{site: finite number}}}}, got {state!r}")
        return {k: float(v) for k, v in logits.items()}

    def add(self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's parameters (``steps`` is not used); returns the dropped non-shared keys.

        Raises:
            UpdateRejected: a bad weight, a missing key, a wrong shape, NaN or Inf.
        """
        arrays, dropped = self._checked(site, params, weight)
        update = np.concatenate([arrays[k].ravel() for k in self._keys]) - self._global
        row = [_dot(update, other) for other in self._updates]
        for g_row, value in zip(self._gram, row):
            g_row.append(value)
        self._gram.append(row + [_dot(update, update)])
        self._distance.append(self._distance_to_global(update, self._gram[-1][-1]))
        self._updates.append(update.astype(np.float32))
        self._site_weights.append(float(weight))
        self.contributors.append(site)
        return dropped

    def _distance_to_global(self, update: np.ndarray, update_sq: float) -> float:
        """``d(x, x_k)`` from ``tau_k = x_k - x``: ``1 - cos(x, x + tau_k)`` or ``||tau_k||^2 / N``."""
        if self.reg_distance == "euc":
            return update_sq / self._global.size
        cross = _dot(self._global, update)
        site_sq = max(self._global_sq + 2.0 * cross + update_sq, 0.0)
        return 1.0 - (self._global_sq + cross) / max(math.sqrt(self._global_sq * site_sq), _COS_EPS)

    def _initial_logit(self, site: str, share: float) -> float:
        if site in self._previous_logits:
            return self._previous_logits[site]
        return share if self.logit_init == "weights" else math.log(share)

    def _optimizer(self, logits: torch.Tensor) -> torch.optim.Optimizer:
        if self.server_optimizer == "adam":
            return torch.optim.Adam([logits], lr=self.server_lr, betas=(0.5, 0.999))
        return torch.optim.SGD([logits], lr=self.server_lr, momentum=0.9, weight_decay=5e-4)

    def learn_weights(self) -> np.ndarray:
        """Run the round's descent steps on the logits; return the aggregation weights (in the order of
        :attr:`contributors`) and set :attr:`weights` and :attr:`logits`.

        Raises:
            ValueError: when no update was accepted.
        """
        if not self.contributors:
            raise ValueError("no client update was accepted in this round")
        total = sum(self._site_weights)
        init = [self._initial_logit(s, w / total) for s, w in zip(self.contributors, self._site_weights)]
        logits = torch.tensor(init, dtype=torch.float64, requires_grad=True)
        gram = torch.tensor(self._gram, dtype=torch.float64)
        distance = torch.tensor(self._distance, dtype=torch.float64)
        optimizer = self._optimizer(logits)
        for _ in range(self.server_epochs):
            lam = torch.softmax(logits, dim=0)
            # ||tau_k - sum_j lam_j tau_j||^2 = G_kk - 2 (G lam)_k + lam^T G lam (clamped: rounding, and a zero norm
            # gets a zero gradient, as torch.norm's)
            g_lam = gram @ lam
            spread = torch.sqrt((torch.diagonal(gram) - 2.0 * g_lam + lam @ g_lam).clamp_min(1e-30))
            loss = (lam * spread).sum() + (lam * distance).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            used = lam.detach()
        if self.aggregate_with == "updated":
            used = torch.softmax(logits.detach(), dim=0)
        self.weights = dict(zip(self.contributors, used.tolist()))
        self.logits = {**self._previous_logits, **dict(zip(self.contributors, logits.detach().tolist()))}
        return used.numpy()

    def result(self) -> dict[str, np.ndarray]:
        """``gamma * sum_k lambda_k x_k / sum_k lambda_k`` as float32 arrays, with the learned ``lambda``.

        Raises:
            ValueError: when no update was accepted.
        """
        lam = self.learn_weights()
        lam = lam / lam.sum()
        mean_update = np.zeros_like(self._global)
        for share, update in zip(lam, self._updates):
            mean_update += share * update.astype(np.float64)
        flat = self.gamma * (self._global + mean_update)
        out, start = {}, 0
        for key in self._keys:
            size = int(np.prod(self.shapes[key], dtype=np.int64))
            out[key] = flat[start : start + size].reshape(self.shapes[key]).astype(np.float32)
            start += size
        return out

    def summary(self) -> dict[str, Any]:
        """The round's learned weights and logits by site (recorded in the controller's history)."""
        return {"weights": dict(self.weights), "logits": dict(self.logits)}

    def state(self) -> dict[str, Any]:
        """What the next round starts from: ``{"logits": {site: logit}}`` (updated by this round's descent if
        :meth:`result` ran)."""
        return {"logits": dict(self.logits)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (call it before the round's first :meth:`add`).

        Raises:
            ValueError: not ``{"logits": {site: finite number}}``.
        """
        self.logits = self._logits_of(state)
        self._previous_logits = dict(self.logits)
