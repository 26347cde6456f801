"""A site's mandatory client-level DP, enforced through its NVFlare privacy policy (``local/privacy.json``).

NVFlare runs a site's privacy-scope filters before a job's own filters, on every job the site runs, whatever scope
the job picks (a job can only pick a scope the site defines). A filter on the *result* cannot add the noise itself
here: with homomorphic encryption the update is encrypted inside the job's client script, and noise must be added to
plaintext, never to ciphertext. So :class:`SiteDPPolicy` is listed twice in every scope and works in two steps:

1. as a **task-data filter** it writes the site's settings (clip norm ``C``, noise multiplier ``sigma``, ``delta``)
   into the meta of every task the site receives (:data:`SITE_DP_POLICY_KEY`); the client script
   (``fedoap.site.client``) applies clip-and-noise to the shared update with the stricter of the job's and the site's
   settings (``fedoap.site.privacy.stricter``), before encryption, and stamps the result
   (``fedoap.site.privacy.DP_STAMP_KEY``) with what it used;
2. as a **task-result filter** it fails closed: a result that carries parameters without a stamp at least as strict
   as the policy (clip norm <= ``C``, noise multiplier >= ``sigma``, delta <= ``delta``), or that carries site
   statistics in clear, raises ``UnsafeJobError``: NVFlare then sends nothing of it and aborts the job on this site.
   Results without parameters (metrics only, a method that shares nothing, the final personalization report) pass.
   An error reply (return code not OK) passes only if it carries no data: otherwise a job could send its parameters
   out unstamped in an "error".

The site's privacy budget: a scope may set ``total_epsilon`` (client-level DP of the update) and
``total_epsilon_dp_sgd`` (the DP-SGD steps a stamp reports), epsilon at the scope's ``delta`` for the site's data over
its whole life, across rounds *and* jobs. The result filter charges every released update to the site's privacy
ledger (:mod:`fedoap.privacy.ledger`, in the site's ``local/`` folder) and refuses, with nothing released and
nothing recorded, a release that would take the site past the budget; budgets are checked against the releases of
every scope (a job cannot escape a spent budget by picking another scope). The task-data filter announces the budget
and what is left (:data:`SITE_DP_BUDGET_KEY`), so the client script can report it.

What it cannot do: verify that the noise was really drawn. The stamp is written by the job's client script, so the
site trusts that code: with jobs that run code pre-installed on the site (``pip install fedoap``: the site's own
package, allowed by its class allow-list) this is the site's own code; a bring-your-own-code job is trusted as far as
the site trusts the holders of the ``byoc`` right in its ``authorization.json``. The same holds for the ledger: job
code runs as the site's user and could rewrite the file.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter, FilterChainType, FilterContextKey
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from fedoap.protocol import (DP_STAMP_KEY, SECAGG_ADVERTISE_TASK, SECAGG_KEY, SECAGG_SHARE_TASK, SECAGG_UNMASK_TASK,
                             SITE_DP_BUDGET_KEY, SITE_DP_POLICY_KEY, SITE_STATISTICS_KEY)
from fedoap.privacy.budget import BUDGET_UNITS, DPBudget
from fedoap.privacy.dp import UpdateDPConfig
from fedoap.privacy.ledger import (
    DP_SGD_UNITS,
    UNIT_SITE,
    BudgetExceededError,
    Charge,
    LedgerCorruptError,
    PrivacyLedger,
    Release,
    ledger_path,
)

#: the kind of secure aggregation message (``fedoap.privacy.secagg.check_message``) each protocol step replies with
_SECAGG_KINDS = {SECAGG_ADVERTISE_TASK: "advertise", SECAGG_SHARE_TASK: "shares", SECAGG_UNMASK_TASK: "reveal"}

__all__ = ["SiteDPPolicy", "policy_from_meta", "budget_from_meta", "check_stamp", "check_budget_stamp",
           "stamp_releases"]

_TOLERANCE = 1e-9
_STAMP_KEYS = frozenset({"clip_norm", "noise_multiplier", "delta", "releases"})
_DP_SGD_KEY = "dp_sgd"
_DP_SGD_STAMP_KEYS = frozenset({"noise_multiplier", "sample_rate", "steps", "unit"})
_SHAREABLE_KEYS = frozenset({ReservedHeaderKey.HEADERS, "DXO"})  # what a DXO result holds (nvflare.apis.dxo)


def policy_from_meta(meta: Optional[dict]) -> Optional[UpdateDPConfig | DPBudget]:
    """The site's mandatory DP from a received task's meta, or None if the site sets none: a floor on client-level
    DP (:class:`UpdateDPConfig`) or a per-job budget (:class:`DPBudget`, from which the job derives its mechanism).

    Raises:
        ValueError: the entry is malformed (a site policy that cannot be read must not be ignored).
    """
    entry = (meta or {}).get(SITE_DP_POLICY_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"task meta {SITE_DP_POLICY_KEY!r} must be a dict, got {type(entry).__name__}")
    try:
        if "epsilon" in entry:
            return DPBudget(epsilon=entry["epsilon"], delta=entry["delta"], unit=entry["unit"],
                            clip_norm=entry["clip_norm"], max_mean_noise=entry["max_mean_noise"])
        return UpdateDPConfig(clip_norm=entry["clip_norm"], noise_multiplier=entry["noise_multiplier"],
                              delta=entry["delta"])
    except KeyError as err:
        raise ValueError(f"task meta {SITE_DP_POLICY_KEY!r} lacks {err}") from err


def budget_from_meta(meta: Optional[dict]) -> Optional[dict[str, Any]]:
    """The site's privacy budgets from a received task's meta, or None if the scope sets none: ``{"scope", "delta",
    "<unit>": {"total_epsilon", "spent", "left"[, "releases_left"]}}`` for the units that have a budget (``"site"``:
    client-level DP of the update, with the releases left at the scope's noise multiplier; ``"slice"``/``"case"``:
    DP-SGD).

    Raises:
        ValueError: the entry is malformed.
    """
    entry = (meta or {}).get(SITE_DP_BUDGET_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("scope"), str) or not _is_real(entry.get("delta")):
        raise ValueError(f"task meta {SITE_DP_BUDGET_KEY!r} must be a dict with a scope and a delta, got {entry!r}")
    for unit, state in entry.items():
        if unit in ("scope", "delta"):
            continue
        if unit not in (UNIT_SITE, *DP_SGD_UNITS) or not isinstance(state, dict) or not all(
                _is_real(state.get(k)) for k in ("total_epsilon", "spent", "left")):
            raise ValueError(f"task meta {SITE_DP_BUDGET_KEY!r} has a malformed entry {unit!r}: {state!r}")
    return entry


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A number that is not NaN (inf is a valid epsilon: a release without noise)."""
    return _is_number(value) and not math.isnan(float(value))


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _dp_sgd_problem(entry: Any) -> Optional[str]:
    """Why the stamp's DP-SGD entry is malformed, or None."""
    if not isinstance(entry, dict) or set(entry) != _DP_SGD_STAMP_KEYS:
        return f"{_DP_SGD_KEY!r} must have exactly the keys {sorted(_DP_SGD_STAMP_KEYS)}"
    sigma, rate, steps, unit = (entry[k] for k in ("noise_multiplier", "sample_rate", "steps", "unit"))
    if not _is_number(sigma) or not math.isfinite(float(sigma)) or float(sigma) < 0:
        return f"DP-SGD noise multiplier {sigma!r} is not a finite number >= 0"
    if not _is_number(rate) or not 0.0 < float(rate) <= 1.0:
        return f"DP-SGD sample rate {rate!r} is not in (0, 1]"
    if not _is_count(steps) or int(steps) < 0:
        return f"DP-SGD steps {steps!r} is not an integer >= 0"
    if unit not in DP_SGD_UNITS:
        return f"DP-SGD unit {unit!r} is not one of {DP_SGD_UNITS}"
    return None


_CLIENT_STAMP_KEYS = _STAMP_KEYS - {"releases"}


def _stamp_problem(stamp: dict, client_required: bool) -> Optional[str]:
    """Why a stamp is malformed, or None: exactly ``releases`` (1), the client-level keys (all of them, or, when not
    ``client_required``, none), and optionally a well-formed ``dp_sgd`` entry; numbers finite."""
    keys = set(stamp)
    missing = (_STAMP_KEYS if client_required or keys & _CLIENT_STAMP_KEYS else {"releases"}) - keys
    extra = keys - _STAMP_KEYS - {_DP_SGD_KEY}
    if missing or extra:
        return (f"malformed DP stamp {stamp!r}: " + (f"lacks {sorted(missing)}" if missing else "")
                + ("; " if missing and extra else "") + (f"unknown keys {sorted(extra, key=str)}" if extra else ""))
    if keys & _CLIENT_STAMP_KEYS:
        values = [stamp[k] for k in ("clip_norm", "noise_multiplier", "delta")]
        if not all(_is_number(v) for v in values):
            return f"malformed DP stamp {stamp!r}: clip_norm, noise_multiplier and delta must be numbers"
        if not all(math.isfinite(float(v)) for v in values):
            return f"non-finite DP stamp {stamp!r}"
    if not _is_count(stamp["releases"]) or int(stamp["releases"]) != 1:
        return f"malformed DP stamp {stamp!r}: a result is one release, 'releases' must be 1"
    if _DP_SGD_KEY in stamp:
        problem = _dp_sgd_problem(stamp[_DP_SGD_KEY])
        if problem:
            return f"malformed DP stamp {stamp!r}: {problem}"
    return None


def check_stamp(stamp: Any, policy: UpdateDPConfig) -> Optional[str]:
    """Why ``stamp`` (the DP a result went through) is malformed or weaker than ``policy``, or None if it is a
    well-formed stamp at least as strict.

    A stamp is exactly ``{"clip_norm": C, "noise_multiplier": sigma, "delta": d, "releases": 1}``, optionally with
    ``"dp_sgd": {"noise_multiplier", "sample_rate", "steps", "unit": "slice" | "case"}`` (the DP-SGD steps since the
    job's previous release); anything else is refused.
    """
    if not isinstance(stamp, dict):
        return f"the result carries parameters but no client-level DP stamp ({DP_STAMP_KEY!r})"
    problem = _stamp_problem(stamp, client_required=True)
    if problem:
        return problem
    clip, sigma, delta = (float(stamp[k]) for k in ("clip_norm", "noise_multiplier", "delta"))
    if clip > policy.clip_norm * (1 + _TOLERANCE):
        return f"clip norm {clip} is larger than the site's {policy.clip_norm}"
    if sigma < policy.noise_multiplier * (1 - _TOLERANCE):
        return f"noise multiplier {sigma} is smaller than the site's {policy.noise_multiplier}"
    if delta > policy.delta * (1 + _TOLERANCE):
        return f"delta {delta} is larger than the site's {policy.delta}"
    return None


def check_budget_stamp(stamp: Any, budget: DPBudget) -> Optional[str]:
    """Why ``stamp`` is malformed or went through no DP that protects the ``budget``'s unit, or None.

    Under a budget a stamp is one release, ``{"releases": 1}`` with client-level DP (``clip_norm``,
    ``noise_multiplier``, ``delta``: it protects the whole site, hence any unit) and/or DP-SGD steps (``"dp_sgd"``,
    per case or per slice; a case protects its slices). How much epsilon it spends is checked by the ledger charge
    (:meth:`SiteDPPolicy._charge`, the budget per job), not here.
    """
    if not isinstance(stamp, dict):
        return f"the result carries parameters but no DP stamp ({DP_STAMP_KEY!r})"
    problem = _stamp_problem(stamp, client_required=False)
    if problem:
        return problem
    if "clip_norm" in stamp:
        if float(stamp["clip_norm"]) <= 0 or float(stamp["noise_multiplier"]) < 0:
            return f"malformed DP stamp {stamp!r}: clip_norm must be > 0 and noise_multiplier >= 0"
        if float(stamp["delta"]) > budget.delta * (1 + _TOLERANCE):
            return f"delta {stamp['delta']} is larger than the site's {budget.delta}"
    if _covering_unit(stamp, budget) is None:
        return (f"the result went through no DP that protects a {budget.unit} (the site's budget): client-level DP "
                f"of the update{'' if budget.unit == 'site' else ' or DP-SGD per ' + budget.unit} is needed")
    return None


def _covering_unit(stamp: dict, budget: DPBudget) -> Optional[str]:
    """The ledger unit whose epsilon bounds the budget's unit for this stamp: the DP-SGD unit when it protects the
    budget's (a case protects its slices), else the site unit when the stamp has client-level noise; None: neither."""
    dp_sgd = stamp.get(_DP_SGD_KEY)
    if budget.unit != UNIT_SITE and isinstance(dp_sgd, dict) and int(dp_sgd.get("steps", 0)) > 0 \
            and dp_sgd.get("unit") in ("case", budget.unit):
        return dp_sgd["unit"]
    if float(stamp.get("noise_multiplier", 0.0)) > 0:
        return UNIT_SITE
    return None


def stamp_releases(stamp: dict) -> dict[str, Release]:
    """The releases a stamp accepted by :func:`check_stamp` or :func:`check_budget_stamp` makes, by protected unit:
    one client-level release of the update (``"site"``: sigma, q = 1, one step) if it has client-level DP and, if it
    reports DP-SGD steps, those (``"slice"`` or ``"case"``)."""
    releases = {}
    if "noise_multiplier" in stamp:
        releases[UNIT_SITE] = Release.client_level(float(stamp["noise_multiplier"]))
    dp_sgd = stamp.get(_DP_SGD_KEY)
    if dp_sgd is not None and int(dp_sgd["steps"]) > 0:
        releases[dp_sgd["unit"]] = Release(float(dp_sgd["noise_multiplier"]), float(dp_sgd["sample_rate"]),
                                           int(dp_sgd["steps"]))
    return releases


def _check_budget(name: str, value: object) -> None:
    if value is not None and (not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0):
        raise ValueError(f"{name} must be None (no budget) or a finite epsilon > 0, got {value!r}.")


class SiteDPPolicy(Filter):
    """Mandatory DP of a site, and its privacy budget; list it in both ``task_data_filters`` and
    ``task_result_filters`` of every scope of the site's ``privacy.json`` (it acts by the chain it is attached to).

    Two forms. A **budget** (``epsilon``): the most epsilon one job may spend on a ``unit`` (the whole site, a case
    or a slice); each job derives its mechanism and noise from it (``fedoap.privacy.budget.plan_mechanism``:
    client-level DP when the job averages enough sites, else DP-SGD at the unit) and is refused, at deployment and
    when it starts, when no mechanism meets the budget with a useful noise level; the result filter charges every
    release to the ledger and refuses one that would take the job past ``epsilon``. A **floor** (``noise_multiplier``):
    client-level DP at least this strict on every release, whatever the job (the first version's form).

    Args:
        clip_norm: the largest L2 norm ``C`` a released update may be clipped to (floor), or the clip norm of the
            client-level DP a budget derives when the job sets none.
        noise_multiplier: the floor: the smallest client-level noise multiplier ``sigma`` (noise std ``sigma * C``).
        epsilon: the budget: the most epsilon one job may spend on ``unit``, at ``delta``.
        unit: what a budget protects: ``"site"``, ``"case"`` or ``"slice"``.
        max_mean_noise: a budget's usefulness limit: the largest noise multiplier on the averaged quantity
            (``sigma / sites`` for client-level DP, ``sigma / batch`` for DP-SGD).
        delta: the largest delta at which the site's epsilon is reported; budgets are epsilon at this delta.
        allow_statistics: let results carry the statistics some methods share in clear (FedRDN-style); off by
            default, because the DP of the update does not cover them.
        total_epsilon: the most epsilon client-level DP of the update may spend on this site's data, over all rounds
            and jobs (releases of every scope count); None: releases are recorded, not limited.
        total_epsilon_dp_sgd: the same for the DP-SGD steps the stamps report, per protected unit (slice or case).

    Raises:
        ValueError: a value is out of range, or both or neither of ``noise_multiplier`` and ``epsilon``.
    """

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: Optional[float] = None, delta: float = 1e-5,
                 allow_statistics: bool = False, total_epsilon: Optional[float] = None,
                 total_epsilon_dp_sgd: Optional[float] = None, epsilon: Optional[float] = None,
                 unit: str = "slice", max_mean_noise: float = 0.1) -> None:
        super().__init__()
        if (noise_multiplier is None) == (epsilon is None):
            raise ValueError("SiteDPPolicy: give noise_multiplier (a floor on client-level DP) or epsilon (a budget "
                             f"per job), exactly one; got noise_multiplier={noise_multiplier!r}, epsilon={epsilon!r}")
        if unit not in BUDGET_UNITS:
            raise ValueError(f"SiteDPPolicy: unit must be one of {list(BUDGET_UNITS)}, got {unit!r}")
        self.budget: Optional[DPBudget] = None
        self.policy: Optional[UpdateDPConfig] = None
        if epsilon is not None:
            self.budget = DPBudget(epsilon=epsilon, delta=delta, unit=unit, clip_norm=clip_norm,
                                   max_mean_noise=max_mean_noise)
        else:
            self.policy = UpdateDPConfig(clip_norm=clip_norm, noise_multiplier=noise_multiplier, delta=delta)
        _check_budget("total_epsilon", total_epsilon)
        _check_budget("total_epsilon_dp_sgd", total_epsilon_dp_sgd)
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.epsilon = epsilon
        self.unit = unit
        self.max_mean_noise = max_mean_noise
        self.delta = delta
        self.allow_statistics = bool(allow_statistics)
        self.total_epsilon = total_epsilon
        self.total_epsilon_dp_sgd = total_epsilon_dp_sgd

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

    # -- the budget --------------------------------------------------------------------------------------------------
    @property
    def has_budget(self) -> bool:
        """Whether the scope limits any epsilon (then the site's ledger must be reachable)."""
        return self.total_epsilon is not None or self.total_epsilon_dp_sgd is not None or self.budget is not None

    def _ledger(self, fl_ctx: FLContext) -> Optional[PrivacyLedger]:
        """The site's ledger (None without a workspace and without a budget: nothing to enforce, nowhere to write).

        Raises:
            UnsafeJobError: a budget is set but the site's workspace is unknown.
        """
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        root = workspace.get_root_dir() if hasattr(workspace, "get_root_dir") else None
        if root:
            return PrivacyLedger(ledger_path(root))
        if self.has_budget:
            raise UnsafeJobError("site DP policy: the scope sets a privacy budget but the site's workspace is unknown, "
                                 "so its privacy ledger cannot be read; refusing the job")
        return None

    def _budget_state(self, ledger: PrivacyLedger, scope: str) -> dict[str, Any]:
        """What the task-data filter announces: each budget, what this site has spent of it and what is left."""
        state: dict[str, Any] = {"scope": scope, "delta": float(self.delta)}
        units = ([UNIT_SITE] if self.total_epsilon is not None else []) + (
            list(DP_SGD_UNITS) if self.total_epsilon_dp_sgd is not None else [])
        for unit in units:
            total = float(self.total_epsilon if unit == UNIT_SITE else self.total_epsilon_dp_sgd)
            spent = ledger.spent(None, unit, float(self.delta))
            state[unit] = {"total_epsilon": total, "spent": spent, "left": max(0.0, total - spent)}
            if unit == UNIT_SITE and self.noise_multiplier is not None:
                state[unit]["releases_left"] = ledger.releases_left(
                    UNIT_SITE, float(self.delta), Release.client_level(float(self.noise_multiplier)), total)
        return state

    def announcement(self, scope: str) -> dict[str, Any]:
        """What the task-data filter tells the job's client script (:func:`policy_from_meta` reads it back)."""
        if self.budget is not None:
            b = self.budget
            return {"epsilon": float(b.epsilon), "delta": float(b.delta), "unit": b.unit,
                    "clip_norm": float(b.clip_norm), "max_mean_noise": float(b.max_mean_noise), "scope": scope}
        return {"clip_norm": float(self.clip_norm), "noise_multiplier": float(self.noise_multiplier),
                "delta": float(self.delta), "scope": scope}

    # -- the two chains ----------------------------------------------------------------------------------------------
    def _announce(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Task data: tell the job's client script the site's settings and budget."""
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            self.log_warning(fl_ctx, "task data is not a DXO: the site's DP settings cannot be announced; "
                                     "results will still be checked")
            return shareable
        scope = fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, "") or ""
        dxo.set_meta_prop(SITE_DP_POLICY_KEY, self.announcement(scope))
        if self.has_budget:
            try:
                dxo.set_meta_prop(SITE_DP_BUDGET_KEY, self._budget_state(self._ledger(fl_ctx), scope))
            except (LedgerCorruptError, OSError) as err:
                raise UnsafeJobError(f"site DP policy: the site's privacy ledger cannot be read: {err}") from err
        return dxo.update_shareable(shareable)

    def _enforce(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Task result: pass it only if what it shares went through DP at least as strict as the policy, and fits in
        the site's budget (then it is charged to the ledger)."""
        extra = set(shareable) - _SHAREABLE_KEYS
        if extra:
            raise UnsafeJobError(f"site DP policy: the result carries content outside its DXO ({sorted(extra)}); "
                                 "refusing to release it")
        return_code = shareable.get_return_code(ReturnCode.OK)
        if return_code != ReturnCode.OK:
            return self._check_error_reply(shareable, return_code)
        try:
            dxo = from_shareable(shareable)
        except ValueError as err:
            raise UnsafeJobError(f"site DP policy: the result is not a DXO, refusing to release it ({err})") from err
        if dxo.get_meta_prop(SITE_STATISTICS_KEY) is not None and not self.allow_statistics:
            raise UnsafeJobError("site DP policy: the result carries site statistics in clear, which client-level DP "
                                 "does not cover; refusing to release it")
        if dxo.get_meta_prop(SECAGG_KEY) is not None:
            self._check_secagg(dxo, fl_ctx)
        if dxo.data_kind == DataKind.METRICS or not dxo.data:
            return shareable  # nothing shared: metrics only, or an empty parameter set
        stamp = dxo.get_meta_prop(DP_STAMP_KEY)
        reason = check_stamp(stamp, self.policy) if self.budget is None else check_budget_stamp(stamp, self.budget)
        if reason:
            raise UnsafeJobError(f"site DP policy: {reason}; refusing to release the result")
        spent = self._charge(stamp, fl_ctx)
        self.log_info(fl_ctx, f"site DP policy satisfied: {stamp}"
                      + (f"; epsilon spent on this site at delta {self.delta}: {spent}" if spent else ""))
        return shareable

    @staticmethod
    def _check_secagg(dxo: Any, fl_ctx: FLContext) -> None:
        """A secure aggregation message may leave only as the reply to its own protocol step, without parameters, and
        only as key material of the protocol's form (``fedoap.privacy.secagg.check_message``): nothing computed from
        the site's data travels that way around the DP filter."""
        from fedoap.privacy.secagg import check_message

        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "") or ""
        kind = _SECAGG_KINDS.get(task)
        if kind is None or dxo.data:
            raise UnsafeJobError(f"site DP policy: a secure aggregation message in the result of task {task!r}"
                                 f"{' with parameters' if dxo.data else ''}; refusing to release it")
        problem = check_message(kind, dxo.get_meta_prop(SECAGG_KEY))
        if problem:
            raise UnsafeJobError(f"site DP policy: the secure aggregation message of task {task!r} is not key "
                                 f"material of the protocol's form ({problem}); refusing to release it")

    @staticmethod
    def _check_error_reply(shareable: Shareable, return_code: str) -> Shareable:
        """An error reply may go out only empty: no DXO at all, or a DXO without data."""
        if "DXO" not in shareable:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except ValueError as err:
            raise UnsafeJobError(f"site DP policy: a reply with return code {return_code} carries content that is "
                                 f"not a DXO; refusing to release it ({err})") from err
        if dxo.data:
            raise UnsafeJobError(f"site DP policy: a reply with return code {return_code} carries data; an error "
                                 "reply may carry none, refusing to release it")
        return shareable

    def _charge(self, stamp: dict, fl_ctx: FLContext) -> dict[str, float]:
        """Record the result's releases in the site's ledger if they fit in the budgets; unit -> epsilon after it.

        Raises:
            UnsafeJobError: a budget would be exceeded (nothing is recorded), or the ledger cannot be trusted.
        """
        ledger = self._ledger(fl_ctx)
        if ledger is None:
            return {}
        scope = fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, "") or ""
        per_job = _covering_unit(stamp, self.budget) if self.budget is not None else None
        charges = [Charge(unit, release, self.total_epsilon if unit == UNIT_SITE else self.total_epsilon_dp_sgd,
                          job_budget=self.budget.epsilon if unit == per_job else None)
                   for unit, release in stamp_releases(stamp).items()]
        try:
            return ledger.charge(scope, float(self.delta), str(fl_ctx.get_job_id() or "unknown"), charges)
        except (BudgetExceededError, LedgerCorruptError, OSError) as err:
            raise UnsafeJobError(f"site DP policy: {err}; refusing to release the result") from err
