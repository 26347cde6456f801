"""What a site does to its shared parameters at the site boundary: on the way out, client-level DP (clip the update
and add Gaussian noise) and then homomorphic encryption; on the way in, decryption of the server's encrypted sum.

The order is fixed here, in one place: noise is always added to plaintext before encryption (never to ciphertext),
and only the shared parameters the trainer hands over are ever encoded.

A site may impose client-level DP on every job through its NVFlare privacy policy
(``fedoap.fl.site_policy.SiteDPPolicy``): the policy arrives in the task's meta, :func:`stricter` combines it with the
job's own setting (smaller clip norm, larger noise multiplier, smaller delta), and every released update carries a
stamp (:data:`DP_STAMP_KEY`, :meth:`SitePrivacy.stamp`) with the clip norm and noise multiplier actually used, which the
policy's result filter checks before anything leaves the site.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

from fedoap.privacy.dp import UpdateDPAccountant, UpdateDPConfig, clip_and_noise

__all__ = ["SitePrivacy", "DP_STAMP_KEY", "stricter"]

#: result meta key: the client-level DP actually applied to the released update ({"clip_norm", "noise_multiplier",
#: "delta"}), checked by the site's privacy policy filter
DP_STAMP_KEY = "fedoap_update_dp"


def stricter(*configs: Optional[UpdateDPConfig]) -> Optional[UpdateDPConfig]:
    """The strictest combination of client-level DP settings (None entries are ignored; None if all are None): the
    smallest clip norm, the largest noise multiplier and the smallest delta, so the result is at least as private as
    each of them."""
    given = [c for c in configs if c is not None]
    if not given:
        return None
    return UpdateDPConfig(clip_norm=min(c.clip_norm for c in given),
                          noise_multiplier=max(c.noise_multiplier for c in given),
                          delta=min(c.delta for c in given))


def _as_tensor(value: Any) -> torch.Tensor:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


class SitePrivacy:
    """The site's outgoing and incoming transforms of the shared parameters.

    Args:
        he_context: the site's TenSEAL client context (secret key), or None for no encryption.
        update_dp: clip-and-noise settings for the shared update, or None for no client-level DP.
        seed: seed of the noise generator (distinct per site).
    """

    def __init__(
        self, he_context: Any = None, update_dp: Optional[UpdateDPConfig] = None, seed: int = 0
    ) -> None:
        self.he_context = he_context
        self.update_dp = update_dp
        self.generator = torch.Generator().manual_seed(seed)
        self.accountant = UpdateDPAccountant(update_dp.noise_multiplier) if update_dp else None

    def stamp(self) -> Optional[dict[str, float]]:
        """What a released update went through (None without client-level DP): put in the result's meta under
        :data:`DP_STAMP_KEY`."""
        if self.update_dp is None:
            return None
        dp = self.update_dp
        return {"clip_norm": float(dp.clip_norm), "noise_multiplier": float(dp.noise_multiplier),
                "delta": float(dp.delta)}

    def incoming(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The global shared parameters in clear: decrypts the server's encrypted sum, passes plaintext through
        (round 0 broadcasts the public initialization in clear).

        Raises:
            ValueError: encrypted parameters arrived but this site has no HE context.
        """
        from fedoap.privacy.he import decrypt_average, from_params, is_encrypted

        if not is_encrypted(params):
            return dict(params)
        if self.he_context is None:
            raise ValueError("the server sent encrypted parameters but homomorphic encryption is off on this site")
        return decrypt_average(from_params(params), self.he_context)

    def outgoing(
        self, shared: Mapping[str, torch.Tensor], global_shared: Mapping[str, Any], weight: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The payload that leaves the site, and metrics about what was done to it.

        Args:
            shared: the site's shared parameters after local training.
            global_shared: the global shared parameters this round started from (plaintext).
            weight: the site's aggregation weight (number of training samples).

        A method that shares nothing (local-only training) releases nothing: the payload stays empty, no noise is
        drawn and no privacy is spent.
        """
        payload = {k: _as_tensor(v) for k, v in shared.items()}
        metrics: dict[str, float] = {}
        if not payload:
            return payload, metrics
        if self.update_dp is not None:
            diff = {k: payload[k].double() - _as_tensor(global_shared[k]).double() for k in payload}
            noised, stats = clip_and_noise(diff, self.update_dp.clip_norm, self.update_dp.noise_multiplier,
                                           generator=self.generator)
            payload = {k: (_as_tensor(global_shared[k]).double() + noised[k].double()).float() for k in payload}
            self.accountant.step()
            metrics.update({"dp_update_norm": stats["norm"], "dp_update_scale": stats["scale"],
                            "dp_update_epsilon": self.accountant.epsilon(self.update_dp.delta),
                            "dp_update_clip": float(self.update_dp.clip_norm),
                            "dp_update_noise": float(self.update_dp.noise_multiplier)})
        if self.he_context is not None:
            from fedoap.privacy.he import encrypt_update, to_params

            encrypted = to_params(encrypt_update(payload, weight, self.he_context))
            payload = {k: torch.from_numpy(v) for k, v in encrypted.items()}
        return payload, metrics
