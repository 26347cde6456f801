"""What a site does to its shared parameters at the site boundary: on the way out, client-level DP (clip the update
and add Gaussian noise) and then homomorphic encryption or secure aggregation's masks; on the way in, decryption of
the server's encrypted sum.

The order is fixed here, in one place: noise is always added to plaintext before encryption or masking (never to
ciphertext or a masked vector), and only the shared parameters the trainer hands over are ever encoded.

A site may impose client-level DP on every job through its NVFlare privacy policy
(``fedoap.site.policy.SiteDPPolicy``): the policy arrives in the task's meta, :func:`stricter` combines it with the
job's own setting (smaller clip norm, larger noise multiplier, smaller delta), and every released update carries a
stamp (:data:`DP_STAMP_KEY`, :meth:`SitePrivacy.stamp`) with the clip norm and noise multiplier actually used, which the
policy's result filter checks before anything leaves the site.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from fedoap.privacy.dp import UpdateDPAccountant, UpdateDPConfig, clip_and_noise

__all__ = ["SitePrivacy", "stricter", "public_metrics", "TRAINING_DATA_METRICS", "PUBLIC_DECIMALS"]



#: metrics computed on the training data, which no DP accountant covers: never sent when DP is on
TRAINING_DATA_METRICS = frozenset({"train_loss"})
#: decimals kept of every other metric when DP is on (held-out Dice and HD95, timings): enough to select a round,
#: too coarse to single out an image of the validation or test split
PUBLIC_DECIMALS = 2


def public_metrics(metrics: Mapping[str, Any], private: bool) -> dict[str, Any]:
    """The metrics a site sends in clear: all of them without DP; under DP (client-level or DP-SGD) without the
    training-data ones (:data:`TRAINING_DATA_METRICS`) and with numbers rounded to :data:`PUBLIC_DECIMALS`."""
    if not private:
        return dict(metrics)
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in TRAINING_DATA_METRICS:
            continue
        out[key] = round(float(value), PUBLIC_DECIMALS) if isinstance(value, (int, float, np.floating)) \
            and not isinstance(value, bool) and np.isfinite(value) else value
    return out


def stricter(*configs: Optional[UpdateDPConfig]) -> Optional[UpdateDPConfig]:
    """The strictest combination of client-level DP settings (None entries are ignored; None if all are None): the
    smallest clip norm, the largest noise multiplier, the smallest delta and the fewest noise shares (a site's policy,
    local DP, keeps all of the noise on each release), so the result is at least as private as each of them."""
    given = [c for c in configs if c is not None]
    if not given:
        return None
    return UpdateDPConfig(clip_norm=min(c.clip_norm for c in given),
                          noise_multiplier=max(c.noise_multiplier for c in given),
                          delta=min(c.delta for c in given), shares=min(c.shares for c in given))


def _as_tensor(value: Any) -> torch.Tensor:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


class SitePrivacy:
    """The site's outgoing and incoming transforms of the shared parameters.

    The update's noise is drawn from a cryptographic source keyed by the operating system for every release
    (``fedoap.privacy.secure_random``), never from the job's seed: whoever sees the released update cannot regenerate
    the noise. Neither the update's norm before clipping nor the clipping factor is reported: together with the
    released update they would undo the clipping.

    Args:
        he_context: the site's TenSEAL client context (secret key), or None for no encryption.
        update_dp: clip-and-noise settings for the shared update, or None for no client-level DP.
        expected: the site's own shared parameters (its trainer's ``shared_params()``), whose keys and shapes every
            broadcast must match (:meth:`expect` sets them later); None: the broadcast's keys and shapes are not
            compared, its types and values are still checked.
    """

    def __init__(self, he_context: Any = None, update_dp: Optional[UpdateDPConfig] = None,
                 expected: Optional[Mapping[str, Any]] = None) -> None:
        self.he_context = he_context
        self.update_dp = update_dp
        # against the server (it sees sums of at least update_dp.shares updates); against a coalition of the other
        # sites, who can take their own noise out of a sum, only this site's share is left
        self.accountant = UpdateDPAccountant(update_dp.noise_multiplier) if update_dp else None
        self.coalition_accountant = (UpdateDPAccountant(update_dp.site_noise_multiplier)
                                     if update_dp and update_dp.shares > 1 else None)
        self.expected: Optional[dict[str, tuple[int, ...]]] = None
        if expected is not None:
            self.expect(expected)

    def expect(self, shared: Mapping[str, Any]) -> None:
        """Compare every later broadcast with the keys and shapes of ``shared`` (the site's trainer's
        ``shared_params()``)."""
        from fedoap.site.broadcast_check import expected_shapes

        self.expected = expected_shapes(shared)

    @property
    def private(self) -> bool:
        """Whether the released update is differentially private (client-level DP of the update)."""
        return self.update_dp is not None

    def stamp(self, dp_sgd: Optional[Mapping[str, Any]] = None) -> Optional[dict[str, Any]]:
        """What a released update went through (None without DP): put in the result's meta under
        :data:`DP_STAMP_KEY`, where the site's policy filter checks it and charges the site's privacy ledger.

        Args:
            dp_sgd: the DP-SGD steps taken since the previous release (``noise_multiplier``, ``sample_rate``,
                ``steps``, ``unit``), if DP-SGD is on.
        """
        if self.update_dp is None:  # DP-SGD alone (e.g. the mechanism of a site's budget), or no DP
            return {"releases": 1, "dp_sgd": dict(dp_sgd)} if dp_sgd else None
        dp = self.update_dp
        # the noise this site added itself (its share under distributed DP): what its own release went through
        stamp: dict[str, Any] = {"clip_norm": float(dp.clip_norm), "noise_multiplier": dp.site_noise_multiplier,
                                 "delta": float(dp.delta), "releases": 1}
        if dp_sgd:
            stamp["dp_sgd"] = dict(dp_sgd)
        return stamp

    def incoming(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The global shared parameters in clear: decrypts the server's encrypted sum, passes plaintext through
        (round 0 broadcasts the public initialization in clear), and refuses what the site must not train on
        (``fedoap.site.broadcast_check``).

        Raises:
            ValueError: encrypted parameters arrived but this site has no HE context, they do not decrypt, or the
                parameters in clear hold other keys than the site's shared ones, another shape, a non-numeric dtype
                or NaN/Inf (named).
        """
        from fedoap.privacy.he import decrypt_average, from_params, is_encrypted
        from fedoap.site.broadcast_check import check_broadcast

        if not isinstance(params, Mapping):
            raise ValueError(f"the broadcast must be a dict of tensors, got a {type(params).__name__}")
        if not is_encrypted(params):
            clear = dict(params)
        elif self.he_context is None:
            raise ValueError("the server sent encrypted parameters but homomorphic encryption is off on this site")
        else:
            clear = decrypt_average(from_params(params), self.he_context)
        check_broadcast(clear, self.expected)
        return clear

    def outgoing(
        self, shared: Mapping[str, torch.Tensor], global_shared: Mapping[str, Any], weight: float,
        masker: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The payload that leaves the site, and metrics about what was done to it.

        Args:
            shared: the site's shared parameters after local training.
            global_shared: the global shared parameters this round started from (plaintext).
            weight: the site's aggregation weight (number of training samples).
            masker: under secure aggregation, the round's masking (``SiteSecAgg.masked_input`` with the round's
                shares, survivors and common scale bound): it takes ``weight *`` the (noised) update, the shared
                parameters minus the round's global ones, as one float64 vector (``fedoap.privacy.secagg_payload``)
                and returns the masked vector that is sent.

        A method that shares nothing (local-only training) releases nothing: the payload stays empty, no noise is
        drawn and no privacy is spent.
        """
        payload = {k: _as_tensor(v) for k, v in shared.items()}
        metrics: dict[str, float] = {}
        if not payload:
            return payload, metrics
        if self.update_dp is not None:
            dp = self.update_dp
            if dp.shares > 1 and self.he_context is None and masker is None:
                raise ValueError(f"distributed DP: this site adds 1/{dp.shares} of the noise variance, which protects "
                                 "only inside a sum of updates; secure aggregation or HE is off, so the update is not "
                                 "released")
            diff = {k: payload[k].double() - _as_tensor(global_shared[k]).double() for k in payload}
            noised, _ = clip_and_noise(diff, dp.clip_norm, dp.site_noise_multiplier)
            payload = {k: (_as_tensor(global_shared[k]).double() + noised[k].double()).float() for k in payload}
            self.accountant.step()
            metrics.update({"dp_update_epsilon": self.accountant.epsilon(dp.delta),
                            "dp_update_clip": float(dp.clip_norm), "dp_update_noise": float(dp.noise_multiplier)})
            if self.coalition_accountant is not None:
                self.coalition_accountant.step()
                metrics.update({"dp_update_epsilon_coalition": self.coalition_accountant.epsilon(dp.delta),
                                "dp_update_shares": float(dp.shares)})
        if self.he_context is not None:
            from fedoap.privacy.he import encrypt_update, to_params

            encrypted = to_params(encrypt_update(payload, weight, self.he_context))
            payload = {k: torch.from_numpy(v) for k, v in encrypted.items()}
        elif masker is not None:
            from fedoap.privacy import secagg_payload

            update = secagg_payload.flatten(payload) - secagg_payload.flatten(
                {k: _as_tensor(global_shared[k]) for k in payload})
            payload = secagg_payload.to_params(masker(update * float(weight)))
        return payload, metrics
