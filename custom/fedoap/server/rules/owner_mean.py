"""The weighted mean of every shared key over the sites that sent it (FedMEPD's owner-only encoder averaging).

A site sends only some of the shared keys (FedMEPD: the encoders of the modalities it holds, and the decoder); each
key's mean is ``sum w_k x_k / sum w_k`` over the sites ``k`` that sent that key, and a key nobody sent keeps the
round's broadcast value. Per key the weights that divide are public (which sites sent which keys, and their
weights), so the sum could run on ciphertexts with the division after decryption; this plaintext rule keeps the
previous value of an unsent key, which it reads from the broadcast in clear (``reference = "broadcast"``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from fedoap.server.rules.base import ServerRule, UpdateRejected, is_positive_number

__all__ = ["OwnerMean"]


class OwnerMean(ServerRule):
    """Weighted mean per key over the sites that sent the key.

    Example::

        rule = OwnerMean({"enc.a": np.zeros(1), "enc.b": np.zeros(1), "dec": np.zeros(1)})
        rule.add("s1", {"enc.a": np.ones(1), "dec": np.ones(1)}, weight=1)
        rule.add("s2", {"enc.b": np.full(1, 3.0), "dec": np.zeros(1)}, weight=3)
        rule.result()  # enc.a 1 (s1 only), enc.b 3 (s2 only), dec 0.25
    """

    name = "owner_mean"
    reference = "broadcast"
    partial_updates = True

    def reset(self, reference: Mapping[str, Any]) -> None:
        super().reset(reference)
        self._previous = self._global_of(reference)
        self._sums: dict[str, np.ndarray] = {}
        self._weights: dict[str, float] = {}

    def add(self, site: str, params: Mapping[str, Any], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add the keys one site sent; returns the dropped non-shared keys.

        Raises:
            UpdateRejected: a bad weight, no shared key at all, a wrong shape, NaN or Inf.
        """
        if not is_positive_number(weight):
            raise UpdateRejected(f"{site}: aggregation weight must be a positive number, got {weight!r}")
        dropped = sorted(k for k in params if k not in self.shapes)
        sent = [k for k in params if k in self.shapes]
        if not sent:
            raise UpdateRejected(f"{site}: update holds none of the shared parameters")
        arrays = {}
        for key in sent:
            value = np.asarray(params[key], dtype=np.float64)
            if value.shape != self.shapes[key]:
                raise UpdateRejected(f"{site}: {key!r} has shape {value.shape}, expected {self.shapes[key]}")
            if not np.isfinite(value).all():
                raise UpdateRejected(f"{site}: {key!r} contains NaN or Inf")
            arrays[key] = value
        for key, value in arrays.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(weight) * value
            self._weights[key] = self._weights.get(key, 0.0) + float(weight)
        self.contributors.append(site)
        return dropped

    def result(self) -> dict[str, np.ndarray]:
        """Every shared key: its owners' weighted mean, or the broadcast value when nobody sent it (float32).

        Raises:
            ValueError: when no update was accepted.
        """
        if not self.contributors:
            raise ValueError("no client update was accepted in this round")
        return {k: (self._sums[k] / self._weights[k] if k in self._sums else self._previous[k]).astype(np.float32)
                for k in self.shapes}

    def summary(self) -> dict[str, Any]:
        """How many sites sent each module's keys (``encoders.flair``: 2, ...), for the history."""
        senders: dict[str, float] = {}
        for key, weight in self._weights.items():
            module = ".".join(key.split(".")[:2])
            senders[module] = max(senders.get(module, 0.0), weight)
        return {"weight_per_module": senders}
