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

from fedoap.privacy.he import HE_KEY_PREFIX, EncryptedUpdate, add_encrypted, from_params, pack, to_params
from fedoap.server.rules.base import ServerRule, UpdateRejected

__all__ = ["EncryptedSum"]


class EncryptedSum(ServerRule):
    """Ciphertext sum of one round.

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

    def __init__(self, reference: Mapping[str, Any], server_context: Any) -> None:
        _, layout = pack(reference)
        self._expected = list(zip(layout.keys, layout.shapes))
        self._context = server_context
        super().__init__(reference)

    def reset(self, reference: Mapping[str, Any]) -> None:
        super().reset(reference)
        self._updates: list[EncryptedUpdate] = []

    def add(self, site: str, params: Mapping[str, Any], weight: float, steps: Optional[float] = None) -> list[str]:
        """Add one site's encrypted update (``steps`` is not used); returns the plaintext keys it dropped (they are
        never aggregated).

        Raises:
            UpdateRejected: plaintext instead of ciphertext, a malformed payload, another layout, or a clear weight
                that differs from the one inside the payload.
        """
        dropped = sorted(k for k in params if not k.startswith(HE_KEY_PREFIX))
        encrypted = {k: v for k, v in params.items() if k.startswith(HE_KEY_PREFIX)}
        if not encrypted:
            raise UpdateRejected(f"{site}: plaintext update while homomorphic encryption is on")
        try:
            update = from_params(encrypted)
        except ValueError as err:
            raise UpdateRejected(f"{site}: malformed encrypted update: {err}") from err
        if list(zip(update.layout.keys, update.layout.shapes)) != self._expected:
            raise UpdateRejected(f"{site}: encrypted update does not hold exactly the shared parameters and shapes")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and math.isclose(update.weight, weight)):
            raise UpdateRejected(f"{site}: encrypted weight {update.weight} differs from the sample count {weight!r}")
        self._updates.append(update)
        self.contributors.append(site)
        return dropped

    def result(self) -> dict[str, Any]:
        """The encrypted sum, as transport arrays (uint8 ciphertexts, header, clear total weight).

        Raises:
            ValueError: when no update was accepted.
        """
        if not self._updates:
            raise ValueError("no client update was accepted in this round")
        return to_params(add_encrypted(self._updates, self._context))
