"""The rule under homomorphic encryption: the weighted sum of the shared parameters, computed on CKKS ciphertexts with
a context that holds no secret key.

Each site sends ``n_k * params_k`` encrypted (``fedoap.privacy.he``) and ``n_k`` in clear; the server checks what it
can check without decrypting (every update is ciphertext, the layout is the shared set with its shapes, the clear
weight matches the one inside), adds the ciphertexts and broadcasts the encrypted sum. Sites divide by the total
weight after decrypting, so this serves every linear rule (``ServerRule.linear``: the weighted mean). NaN/Inf cannot
be seen here; the sites' check slot catches a sum that overflowed.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from fedoap.privacy.he import HE_KEY_PREFIX, EncryptedUpdate, from_params, load_ciphertexts, pack, to_params
from fedoap.server.rules.base import ServerRule, UpdateRejected

__all__ = ["EncryptedSum"]


class EncryptedSum(ServerRule):
    """Ciphertext sum of one round.

    Every update is added to the round's sum as it arrives, so an update whose ciphertexts do not parse or do not
    add up (random bytes, another context's parameters, another scale) is rejected for its sender in :meth:`add`,
    and :meth:`result` only serializes.

    Args:
        reference: the global shared parameters the job starts from, in clear (fixes the expected keys and shapes;
            never encrypted here). Every later broadcast is ciphertext, which :meth:`reset` ignores.
        server_context: TenSEAL context without a secret key.

    Raises:
        ValueError: an empty reference, or one with NaN, Inf or a non-floating dtype.
    """

    name = "encrypted_sum"
    linear = True
    encrypted = True
    hides_updates = True

    def __init__(self, reference: Mapping[str, Any], server_context: Any) -> None:
        _, layout = pack(reference)
        self._layout = layout
        self._expected = list(zip(layout.keys, layout.shapes))
        self._context = server_context
        super().__init__(reference)

    def reset(self, reference: Mapping[str, Any]) -> None:
        super().reset(reference)
        self._sums: list[Any] = []  # one CKKS vector per chunk: the sum of the accepted updates
        self._weights: list[float] = []

    def add(self, site: str, params: Mapping[str, Any], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's encrypted update (``steps`` is not used); returns the plaintext keys it dropped (they are
        never aggregated).

        Raises:
            UpdateRejected: plaintext instead of ciphertext, a malformed payload, another layout, a clear weight
                that differs from the one inside the payload, or ciphertexts that do not add to the round's sum.
        """
        dropped = sorted(k for k in params if not k.startswith(HE_KEY_PREFIX))
        encrypted = {k: v for k, v in params.items() if k.startswith(HE_KEY_PREFIX)}
        if not encrypted:
            raise UpdateRejected(f"{site}: plaintext update while homomorphic encryption is on")
        try:
            update = from_params(encrypted)
        except ValueError as err:
            raise UpdateRejected(f"{site}: malformed encrypted update: {err}") from None
        if list(zip(update.layout.keys, update.layout.shapes)) != self._expected:
            raise UpdateRejected(f"{site}: encrypted update does not hold exactly the shared parameters and shapes")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and math.isclose(update.weight, weight)):
            raise UpdateRejected(f"{site}: encrypted weight {update.weight} differs from the sample count {weight!r}")
        if update.count != 1:
            raise UpdateRejected(f"{site}: an update claims to sum {update.count} updates, a site sends one")
        try:
            vectors = load_ciphertexts(update, self._context)
            # a new sum (not in place): an update that fails half-way leaves the round's sum as it was
            sums = [a + v for a, v in zip(self._sums, vectors)] if self._sums else vectors
        except Exception as err:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError from C++
            raise UpdateRejected(f"{site}: its ciphertexts do not add to the round's sum: {err}") from None
        self._sums = sums
        self._weights.append(update.weight)
        self.contributors.append(site)
        return dropped

    def result(self) -> dict[str, Any]:
        """The encrypted sum, as transport arrays (uint8 ciphertexts, header, clear total weight).

        Raises:
            ValueError: when no update was accepted.
        """
        if not self._sums:
            raise ValueError("no client update was accepted in this round")
        return to_params(EncryptedUpdate(ciphertexts=[v.serialize() for v in self._sums], layout=self._layout,
                                         weight=math.fsum(self._weights), n_values=self._layout.n_values,
                                         count=len(self._weights)))
