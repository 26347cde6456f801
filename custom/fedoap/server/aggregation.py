"""Server arithmetic for personalized FL over the shared parameters only: a weighted average (FedAvg), and FedNova's
normalized average; the registry of every rule (:data:`SERVER_RULES`; FedAWA's and FedLWS's aggregators live in
``fedoap.server.fedawa_aggregation`` and ``fedoap.server.fedlws_aggregation``).

Kept apart from the workflow (as NVFlare keeps ``WeightedAggregationHelper`` apart from ``FedAvg``) so that the rules
are unit-tested without a running federation: keys outside the shared set are dropped and reported, and an update
with a missing shared key, a wrong shape, a non-finite value, a non-positive weight (or, for FedNova, a non-positive
step count) is rejected with a reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["UpdateRejected", "SharedParamsAggregator", "FedNovaAggregator", "payload_bytes", "ServerRule",
           "SERVER_RULES", "PLAINTEXT_RULES", "make_aggregator"]


class UpdateRejected(ValueError):
    """A client update that must not enter the average; the message is the reason that gets logged."""


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and bool(
        np.isfinite(value) and value > 0)


def payload_bytes(params: Mapping[str, object]) -> int:
    """Bytes of the parameter arrays of one update (what a client uploaded)."""
    return int(sum(np.asarray(v).nbytes for v in params.values()))


class SharedParamsAggregator:
    """Weighted average of the shared parameters of one round.

    Args:
        reference: the current global shared parameters; fixes the key set and every shape.

    Example::

        agg = SharedParamsAggregator({"w": np.zeros(2)})
        agg.add("site-a", {"w": np.ones(2)}, weight=3)
        agg.add("site-b", {"w": np.zeros(2), "head.w": np.ones(1)}, weight=1)  # returns ["head.w"] (dropped)
        agg.result()  # {"w": array([0.75, 0.75])}
    """

    def __init__(self, reference: Mapping[str, object]) -> None:
        if not reference:
            raise ValueError("the shared parameter set is empty: nothing to aggregate")
        self.shapes = {k: tuple(np.shape(v)) for k, v in reference.items()}
        self._sums: dict[str, np.ndarray] = {}
        self._total_weight = 0.0
        self.contributors: list[str] = []

    def add(self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one client's update (``steps``, the site's local step count, is not used by the weighted mean).
        Returns the keys that were dropped because they are not shared.

        Raises:
            UpdateRejected: the update is left out of the average (the reason names the site and the key).
        """
        arrays, dropped = self._checked(site, params, weight)
        self._accumulate(arrays, weight)
        self.contributors.append(site)
        return dropped

    def _checked(
        self, site: str, params: Mapping[str, object], weight: float
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """The update's shared arrays as float64, and the non-shared keys it sent; raises ``UpdateRejected``."""
        if not _positive_number(weight):
            raise UpdateRejected(f"{site}: aggregation weight must be a positive number, got {weight!r}")
        dropped = sorted(k for k in params if k not in self.shapes)
        missing = sorted(k for k in self.shapes if k not in params)
        if missing:
            raise UpdateRejected(f"{site}: update lacks {len(missing)} shared parameter(s), e.g. {missing[0]!r}")
        arrays = {}
        for key, shape in self.shapes.items():
            value = np.asarray(params[key], dtype=np.float64)
            if value.shape != shape:
                raise UpdateRejected(f"{site}: {key!r} has shape {value.shape}, expected {shape}")
            if not np.isfinite(value).all():
                raise UpdateRejected(f"{site}: {key!r} contains NaN or Inf")
            arrays[key] = value
        return arrays, dropped

    def _accumulate(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        for key, value in arrays.items():
            if key in self._sums:
                self._sums[key] += weight * value
            else:
                self._sums[key] = weight * value
        self._total_weight += float(weight)

    @property
    def count(self) -> int:
        return len(self.contributors)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean as float32 arrays.

        Raises:
            ValueError: when no update was accepted.
        """
        if not self.contributors:
            raise ValueError("no client update was accepted in this round")
        return {k: (v / self._total_weight).astype(np.float32) for k, v in self._sums.items()}


class FedNovaAggregator(SharedParamsAggregator):
    """FedNova's normalized averaging of one round (Wang et al., NeurIPS 2020), over the shared parameters.

    Each site ``k`` sends its parameters ``x_k`` after ``tau_k`` local steps, with its sample count ``n_k`` as weight.
    With ``x`` the global parameters the round started from,

        result = x - tau_eff * sum_k p_k (x - x_k) / tau_k,   p_k = n_k / sum_j n_j,   tau_eff = sum_k p_k tau_k,

    i.e. the normalizer ``a_k = tau_k`` of plain local SGD (the choice for AdamW is discussed in
    ``fedoap.methods.fednova``). With equal step counts it is the weighted mean of :class:`SharedParamsAggregator`.
    The same ``add``/``count``/``result`` contract, with the step count as a further argument of ``add``.

    Args:
        reference: the global shared parameters broadcast this round, in clear (``x``; fixes keys and shapes).

    Example::

        agg = FedNovaAggregator({"w": np.zeros(1)})
        agg.add("a", {"w": np.full(1, -4.0)}, weight=1, steps=2)   # d_a = (0 - (-4)) / 2 = 2
        agg.add("b", {"w": np.full(1, -1.0)}, weight=1, steps=1)   # d_b = 1
        agg.result()  # tau_eff = 1.5, sum p_k d_k = 1.5: {"w": array([-2.25])} (FedAvg: -2.5)
    """

    def __init__(self, reference: Mapping[str, object]) -> None:
        super().__init__(reference)
        self._global = {k: np.asarray(v, dtype=np.float64) for k, v in reference.items()}
        if not all(np.isfinite(v).all() for v in self._global.values()):
            raise ValueError("the global parameters contain NaN or Inf")
        self._weighted_steps = 0.0

    def add(  # type: ignore[override]
        self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None
    ) -> list[str]:
        """Add one site's parameters after ``steps`` local steps; returns the dropped non-shared keys.

        Raises:
            UpdateRejected: as :meth:`SharedParamsAggregator.add`, or a step count that is not a positive number.
        """
        if not _positive_number(steps):
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


@dataclass(frozen=True)
class ServerRule:
    """How the server combines the shared parameters of one round.

    Attributes:
        aggregator: dotted path of the aggregator class, built once per round as ``cls(reference, **rule_args)``;
            it offers ``add(site, params, weight, steps=None) -> dropped keys``, ``count`` and ``result()``.
        reference: what the class gets as ``reference``: ``"initial"`` (the plaintext initialization: it only fixes
            keys and shapes) or ``"broadcast"`` (the round's global shared parameters, which the rule computes with).
        plaintext: the rule needs the global model in clear on the server, so it cannot run under HE.
        stateful: the rule carries state from round to round (FedAWA's learned weight logits): its aggregator
            offers ``state()``, and the next round's aggregator is built with ``state=`` the previous one's (None in
            the first round).
    """

    aggregator: str
    reference: str = "initial"
    plaintext: bool = False
    stateful: bool = False


#: every server rule but ``"none"`` (a method that shares nothing: no aggregator at all)
SERVER_RULES: dict[str, ServerRule] = {
    "weighted_mean": ServerRule(f"{__name__}.SharedParamsAggregator"),
    "fednova": ServerRule(f"{__name__}.FedNovaAggregator", reference="broadcast", plaintext=True),
    "fedawa": ServerRule("fedoap.server.fedawa_aggregation.FedAWAAggregator", reference="broadcast", plaintext=True,
                         stateful=True),
    "fedlws": ServerRule("fedoap.server.fedlws_aggregation.FedLWSAggregator", reference="broadcast", plaintext=True),
}
#: rules that need the global model in clear on the server (refused under homomorphic encryption)
PLAINTEXT_RULES = frozenset(name for name, rule in SERVER_RULES.items() if rule.plaintext)


def make_aggregator(
    rule: str,
    broadcast: Mapping[str, Any],
    initial: Mapping[str, Any],
    rule_args: Optional[Mapping[str, Any]] = None,
    previous: Any = None,
) -> Any:
    """The aggregator of one round under ``rule`` (a key of :data:`SERVER_RULES`); ``previous`` is the previous
    round's aggregator (or None), whose ``state()`` a stateful rule carries on.

    Raises:
        ValueError: an unknown rule.
    """
    if rule not in SERVER_RULES:
        raise ValueError(f"unknown server rule {rule!r}; choose one of {sorted(SERVER_RULES)} or 'none'")
    spec = SERVER_RULES[rule]
    module_name, _, class_name = spec.aggregator.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs = dict(rule_args or {})
    if spec.stateful:
        kwargs["state"] = previous.state() if previous is not None else None
    return cls(broadcast if spec.reference == "broadcast" else initial, **kwargs)
