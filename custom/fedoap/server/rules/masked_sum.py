"""The rule under secure aggregation: the weighted mean of the shared parameters, computed from masked updates whose
masks cancel only in the sum (pairwise masking, Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020).

Each site sends its update (shared parameters minus the round's global ones) times ``n_k / S``, quantized and masked
(``fedoap.privacy.secagg``, one vector laid out by ``fedoap.privacy.secagg_payload``), and ``n_k`` in clear; ``S``
is the round's common scale, the total of the weights the sites announced in the key exchange, so that the sum stays
within the fixed-point ring whatever the sample counts. The server checks what it can without the values (one vector
of the right length, from a site that took part in the round's key exchange), adds it, and at :meth:`result` asks the
sites that are still there for the key shares that remove the masks (the callback the workflow gives
:meth:`MaskedSum.begin`): self-mask shares of every site whose update was accepted, mask-key shares of every site of
the key exchange whose update was not (it dropped out or was rejected). The global parameters plus the sum times ``S``
divided by the accepted sites' total weight is the new global model in clear: unlike HE, the server learns the aggregate, never one site's update.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

from fedoap.privacy.secagg import SecAggConfig, SecAggError, ServerSecAgg, dequantize
from fedoap.privacy.secagg_payload import MASKED_KEY, flatten, from_params, n_values, unflatten
from fedoap.server.rules.base import ServerRule, UpdateRejected, is_positive_number

__all__ = ["MaskedSum", "Unmasker"]

#: what the workflow does to remove the masks: ask the sites for their reveals, given (sent, dropped); site -> reveal
Unmasker = Callable[[Sequence[str], Sequence[str]], Mapping[str, Any]]


class MaskedSum(ServerRule):
    """Masked sum of one round; the masks come off in :meth:`result`.

    Args:
        reference: the global shared parameters the job starts from (fixes the keys, shapes and the vector length).
        config: the job's secure aggregation settings (fraction bits, neighbours).

    Raises:
        ValueError: an empty reference.
    """

    name = "masked_sum"
    linear = True
    reference = "broadcast"
    hides_updates = True

    def __init__(self, reference: Mapping[str, Any], config: SecAggConfig) -> None:
        self.config = config
        super().__init__(reference)
        self.n_values = n_values(self.shapes)
        self._round: Optional[ServerSecAgg] = None
        self._unmask: Optional[Unmasker] = None
        self._scale = 1.0

    def begin(self, server_round: ServerSecAgg, unmask: Unmasker, scale: float) -> None:
        """The round's key exchange (done by the workflow before the training task), how to ask for reveals, and the
        round's common scale ``S`` the sites divided their weighted updates by."""
        if not is_positive_number(scale):
            raise ValueError(f"the round's scale must be a positive number, got {scale!r}")
        self._round, self._unmask, self._scale = server_round, unmask, float(scale)

    def reset(self, reference: Mapping[str, Any]) -> None:
        super().reset(reference)
        self._weights: list[float] = []
        self._global = flatten(self._global_of(reference))

    def add(self, site: str, params: Mapping[str, Any], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's masked update (``steps`` is not used); returns the other keys it sent (never used).

        Raises:
            UpdateRejected: no key exchange this round, a plaintext or malformed update, a vector of another length,
                a weight that is not a positive number, or a site outside the round's key exchange.
        """
        if self._round is None:
            raise UpdateRejected(f"{site}: a masked update arrived outside a round's key exchange")
        if not is_positive_number(weight):
            raise UpdateRejected(f"{site}: aggregation weight must be a positive number, got {weight!r}")
        dropped = sorted(k for k in params if k != MASKED_KEY)
        try:
            masked = from_params(params)
        except ValueError as err:
            raise UpdateRejected(f"{site}: {err} (secure aggregation is on)") from None
        if masked.size != self.n_values:
            raise UpdateRejected(f"{site}: the masked update holds {masked.size} values, the shared parameters "
                                 f"{self.n_values}")
        try:
            self._round.add_masked(site, masked)
        except SecAggError as err:
            raise UpdateRejected(f"{site}: {err}") from None
        self._weights.append(float(weight))
        self.contributors.append(site)
        return dropped

    def result(self) -> dict[str, Any]:
        """Remove the masks with the reveals of the sites still there; the weighted mean in clear.

        Raises:
            ValueError: no update accepted; SecAggError (a ValueError): too few shares to remove the masks (the round
                fails closed: the previous global model stays), or shares that do not reconstruct.
        """
        if not self._weights or self._round is None or self._unmask is None:
            raise ValueError("no client update was accepted in this round")
        sent, dropped = self._round.unmask_request()
        reveals = self._unmask(sent, dropped)
        total = self._round.finish(reveals)
        mean_update = dequantize(total, self.config.frac_bits) * (self._scale / math.fsum(self._weights))
        return unflatten(self._global + mean_update, self.shapes)

    def summary(self) -> dict[str, Any]:
        sent, dropped = self._round.unmask_request() if self._round is not None else ([], [])
        return {"secagg": {"masked": sorted(sent), "unmasked_dropped": sorted(dropped)}}
