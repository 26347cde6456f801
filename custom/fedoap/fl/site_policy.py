"""A site's mandatory client-level DP, enforced through its NVFlare privacy policy (``local/privacy.json``).

NVFlare runs a site's privacy-scope filters before a job's own filters, on every job the site runs, whatever scope
the job picks (a job can only pick a scope the site defines). A filter on the *result* cannot add the noise itself
here: with homomorphic encryption the update is encrypted inside the job's client script, and noise must be added to
plaintext, never to ciphertext. So :class:`SiteDPPolicy` is listed twice in every scope and works in two steps:

1. as a **task-data filter** it writes the site's settings (clip norm ``C``, noise multiplier ``sigma``, ``delta``)
   into the meta of every task the site receives (:data:`SITE_DP_POLICY_KEY`); the client script
   (``fedoap.fl.client``) applies clip-and-noise to the shared update with the stricter of the job's and the site's
   settings (``fedoap.fl.site_privacy.stricter``), before encryption, and stamps the result
   (``fedoap.fl.site_privacy.DP_STAMP_KEY``) with what it used;
2. as a **task-result filter** it fails closed: a result that carries parameters without a stamp at least as strict
   as the policy (clip norm <= ``C``, noise multiplier >= ``sigma``, delta <= ``delta``), or that carries site
   statistics in clear, raises ``UnsafeJobError``: NVFlare then sends nothing of it and aborts the job on this site.
   Results without parameters (metrics only, a method that shares nothing, the final personalization report) pass.

What it cannot do: verify that the noise was really drawn. The stamp is written by the job's client script, so the
site trusts that code: with jobs that run code pre-installed on the site (``pip install fedoap``: the site's own
package, allowed by its class allow-list) this is the site's own code; a bring-your-own-code job is trusted as far as
the site trusts the holders of the ``byoc`` right in its ``authorization.json``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter, FilterChainType, FilterContextKey
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import Shareable

from fedoap.fl.controller import SITE_STATISTICS_KEY
from fedoap.fl.site_privacy import DP_STAMP_KEY
from fedoap.privacy.dp import UpdateDPConfig

__all__ = ["SiteDPPolicy", "SITE_DP_POLICY_KEY", "policy_from_meta", "check_stamp"]

#: task meta key under which the policy's settings reach the client script
SITE_DP_POLICY_KEY = "fedoap_site_dp_policy"
_TOLERANCE = 1e-9


def policy_from_meta(meta: Optional[dict]) -> Optional[UpdateDPConfig]:
    """The site's mandatory client-level DP from a received task's meta, or None if the site sets none.

    Raises:
        ValueError: the entry is malformed (a site policy that cannot be read must not be ignored).
    """
    entry = (meta or {}).get(SITE_DP_POLICY_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"task meta {SITE_DP_POLICY_KEY!r} must be a dict, got {type(entry).__name__}")
    try:
        return UpdateDPConfig(clip_norm=entry["clip_norm"], noise_multiplier=entry["noise_multiplier"],
                              delta=entry["delta"])
    except KeyError as err:
        raise ValueError(f"task meta {SITE_DP_POLICY_KEY!r} lacks {err}") from err


def check_stamp(stamp: Any, policy: UpdateDPConfig) -> Optional[str]:
    """Why ``stamp`` (the DP a result went through) is weaker than ``policy``, or None if it is at least as strict."""
    if not isinstance(stamp, dict):
        return f"the result carries parameters but no client-level DP stamp ({DP_STAMP_KEY!r})"
    try:
        clip, sigma, delta = (float(stamp[k]) for k in ("clip_norm", "noise_multiplier", "delta"))
    except (KeyError, TypeError, ValueError):
        return f"malformed DP stamp {stamp!r}"
    if not all(math.isfinite(v) for v in (clip, sigma, delta)):
        return f"non-finite DP stamp {stamp!r}"
    if clip > policy.clip_norm * (1 + _TOLERANCE):
        return f"clip norm {clip} is larger than the site's {policy.clip_norm}"
    if sigma < policy.noise_multiplier * (1 - _TOLERANCE):
        return f"noise multiplier {sigma} is smaller than the site's {policy.noise_multiplier}"
    if delta > policy.delta * (1 + _TOLERANCE):
        return f"delta {delta} is larger than the site's {policy.delta}"
    return None


class SiteDPPolicy(Filter):
    """Mandatory client-level DP of a site; list it in both ``task_data_filters`` and ``task_result_filters`` of
    every scope of the site's ``privacy.json`` (it acts by the chain it is attached to).

    Args:
        clip_norm: the largest L2 norm ``C`` a released update may be clipped to.
        noise_multiplier: the smallest noise multiplier ``sigma`` (noise std ``sigma * C`` per coordinate).
        delta: the largest delta at which the site's epsilon is reported.
        allow_statistics: let results carry the statistics some methods share in clear (FedRDN-style); off by
            default, because the DP of the update does not cover them.

    Raises:
        ValueError: a value is out of range.
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 allow_statistics: bool = False) -> None:
        super().__init__()
        self.policy = UpdateDPConfig(clip_norm=clip_norm, noise_multiplier=noise_multiplier, delta=delta)
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.allow_statistics = bool(allow_statistics)

    def _chain(self, fl_ctx: FLContext) -> str:
        chain = self.get_prop(FilterContextKey.CHAIN_TYPE)
        if chain in (FilterChainType.TASK_DATA_CHAIN, FilterChainType.TASK_RESULT_CHAIN):
            return chain
        direction = fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION)  # a client: data comes in, results go out
        if direction == FilterKey.IN:
            return FilterChainType.TASK_DATA_CHAIN
        if direction == FilterKey.OUT:
            return FilterChainType.TASK_RESULT_CHAIN
        raise UnsafeJobError(f"{type(self).__name__}: cannot tell whether it filters task data or task results")

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if self._chain(fl_ctx) == FilterChainType.TASK_DATA_CHAIN:
            return self._announce(shareable, fl_ctx)
        return self._enforce(shareable, fl_ctx)

    def _announce(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Task data: tell the job's client script the site's settings."""
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            self.log_warning(fl_ctx, "task data is not a DXO: the site's DP settings cannot be announced; "
                                     "results will still be checked")
            return shareable
        dxo.set_meta_prop(SITE_DP_POLICY_KEY, {
            "clip_norm": float(self.clip_norm), "noise_multiplier": float(self.noise_multiplier),
            "delta": float(self.delta), "scope": fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, ""),
        })
        return dxo.update_shareable(shareable)

    def _enforce(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Task result: pass it only if what it shares went through DP at least as strict as the policy."""
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no content
        try:
            dxo = from_shareable(shareable)
        except ValueError as err:
            raise UnsafeJobError(f"site DP policy: the result is not a DXO, refusing to release it ({err})") from err
        if dxo.get_meta_prop(SITE_STATISTICS_KEY) is not None and not self.allow_statistics:
            raise UnsafeJobError("site DP policy: the result carries site statistics in clear, which client-level DP "
                                 "does not cover; refusing to release it")
        if dxo.data_kind == DataKind.METRICS or not dxo.data:
            return shareable  # nothing shared: metrics only, or an empty parameter set
        reason = check_stamp(dxo.get_meta_prop(DP_STAMP_KEY), self.policy)
        if reason:
            raise UnsafeJobError(f"site DP policy: {reason}; refusing to release the result")
        self.log_info(fl_ctx, f"site DP policy satisfied: {dxo.get_meta_prop(DP_STAMP_KEY)}")
        return shareable
