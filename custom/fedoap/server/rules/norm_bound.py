"""Server-side norm bounding: every site's update ``x_k - x`` (its shared parameters minus the round's broadcast) is
scaled down to L2 norm at most ``bound`` before the wrapped rule combines it (Sun, Kairouz, Suresh, McMahan, "Can
You Really Backdoor Federated Learning?", 2019).

It limits how far one site can pull the global model in one round, whatever its claimed weight: under the weighted
mean a site moves the result by at most ``p_k * bound``, under the median or the trimmed mean not beyond the honest
range. The norm is over all shared keys together. It reads the broadcast in clear, so it refuses HE; the clipped
sites and their norms before clipping go into the round's summary (the server sees the plaintext update anyway).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from fedoap.checks import is_finite_number
from fedoap.server.rules.base import ServerRule

__all__ = ["NormBounded"]


class NormBounded(ServerRule):
    """``inner`` fed with every update bounded to L2 norm ``bound`` around the round's broadcast.

    Args:
        inner: the plaintext rule that combines the bounded updates (built on the same reference).
        reference: the global shared parameters the job starts from; each round's :meth:`reset` takes the round's
            broadcast, in clear (and passes it on to ``inner``).
        bound: the largest L2 norm of an update, a finite number > 0.

    Raises:
        ValueError: a ``bound`` that is not a finite number > 0, an ``inner`` that is not a plaintext rule that
            shares, or global parameters with NaN or Inf.

    Example::

        reference = {"w": np.zeros(2)}
        rule = NormBounded(WeightedMean(reference), reference, bound=1.0)
        rule.add("a", {"w": np.array([3.0, 4.0])}, weight=1)   # norm 5: scaled to (0.6, 0.8)
        rule.result()  # {"w": array([0.6, 0.8])}
    """

    name = "norm_bounded"
    linear = False
    reference = "broadcast"

    def __init__(self, inner: ServerRule, reference: Mapping[str, object], bound: float) -> None:
        if not is_finite_number(bound) or bound <= 0:
            raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
        if not isinstance(inner, ServerRule) or inner.encrypted or not inner.shares:
            raise ValueError(f"inner must be a plaintext rule that shares parameters, got {inner!r}")
        self.inner = inner
        self.bound = float(bound)
        self.uses_steps = inner.uses_steps  # type: ignore[misc]  # the wrapped rule decides
        self.name = f"{inner.name}+norm_bound"  # type: ignore[misc]  # what the history records as the job's rule
        self.clipped: dict[str, float] = {}
        super().__init__(reference)

    def reset(self, reference: Mapping[str, Any]) -> None:
        super().reset(reference)
        self._global = self._global_of(reference)
        self.clipped = {}
        self.inner.reset(reference)

    def add(self, site: str, params: Mapping[str, object], weight: float, steps: Optional[float] = None) -> list[str]:
        """Bound one site's update and pass it on; returns the dropped non-shared keys.

        Raises:
            UpdateRejected: a bad weight, a missing key, a wrong shape, NaN or Inf, or what ``inner`` refuses.
        """
        arrays, dropped = self._checked(site, params, weight)
        deltas = {k: v - self._global[k] for k, v in arrays.items()}
        norm = math.sqrt(math.fsum(float(np.square(d).sum()) for d in deltas.values()))
        if norm > self.bound:
            scale = self.bound / norm
            arrays = {k: self._global[k] + scale * d for k, d in deltas.items()}
        self.inner.add(site, arrays, weight, steps=steps)
        if norm > self.bound:
            self.clipped[site] = norm
        self.contributors.append(site)
        return dropped

    def result(self) -> dict[str, Any]:
        """The wrapped rule's result over the bounded updates.

        Raises:
            ValueError: when no update was accepted.
        """
        return self.inner.result()

    def summary(self) -> dict[str, Any]:
        """The wrapped rule's summary, and the norm of every update that was scaled down (by site)."""
        out = dict(self.inner.summary())
        if self.clipped:
            out["update_norm_clipped"] = dict(self.clipped)
        return out

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state(state)
