"""What the server accepts from the sites each round: every field of every result checked, every claim bounded, before
any rule computes with it, so that no site can take the global model over or stop the job for the others.

A site's result (an NVFlare ``FLModel``) carries its shared parameters, its metrics and, in the meta, its aggregation
weight, its sample and step counts and (FedRDN, FedDP) statistics of its data. All of it is the site's claim.
:class:`RoundIntake` reads one round's results in three passes:

1. each result alone: the parameters are a dict of tensors or arrays of a real numeric dtype (the shared ones with
   the shared shapes and finite values, or under HE the transport arrays of ``fedoap.privacy.he``, under secure
   aggregation the one masked vector of ``fedoap.privacy.secagg_payload``); the metrics are
   numbers, None, or short strings for the few keys that are text (:data:`STRING_METRICS`), under short printable
   names that are not the server's own fields (:data:`SERVER_FIELDS`); the weight, sample and step counts are
   numbers in range (weight and samples at most ``max_site_weight``, steps whole and at most ``max_site_steps``).
   Anything else rejects the site for the round;
2. the claims against each other: a weight above ``weight_median_multiple`` (k) times the median of the *other*
   valid sites' claims is clipped to that bound (recorded as ``weight_clipped``), or, under HE or secure aggregation,
   where the weight is inside the ciphertext or the masked vector, rejected; a rule that computes with the step count (FedNova) rejects steps outside
   ``[m / k, k m]``, ``m`` the median of the sites' step counts (of the other site's, with two sites: see
   :meth:`RoundIntake._bound_claims`). With one valid site there is nothing to compare with;
3. the rule: every surviving update goes to the rule's ``add``; whatever it raises (its own rejection or an
   unexpected error) rejects that site alone. Then the aggregate is formed and, in clear, checked to hold exactly the
   shared keys and shapes with finite values: otherwise it is refused and the round keeps the previous global
   model (recorded as ``aggregate_refused``). Under HE the server cannot see the values: the sites' decryption check
   (the check slot of ``fedoap.privacy.he``) and their check of the broadcast (``fedoap.site.broadcast_check``)
   catch a sum that is not finite.

Statistics are kept (and forwarded to every site with the next task, :meth:`RoundIntake.task_meta`) only when the
job's method uses them (``FederatedMethod.shares_statistics``), only as ``{name: [finite numbers]}`` of at most
``max_statistics_values`` numbers, and only from a site that was not rejected; otherwise they are ignored with a
warning (``statistics_ignored`` in the site's entry), and a site's previous statistics stay.

A majority of sites that lie together defeats any median; the bounds stop one site, or a minority.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from fedoap.privacy.he import HE_KEY_PREFIX
from fedoap.protocol import AGGREGATION_WEIGHT_KEY, NUM_SAMPLES_KEY, NUM_STEPS_KEY, SITE_STATISTICS_KEY
from fedoap.server.rules import ServerRule, UpdateRejected

__all__ = ["RoundIntake", "RoundOutcome", "IntakeLimits", "payload_bytes", "SERVER_FIELDS", "STRING_METRICS", "MAX_NAME_CHARS",
           "MAX_STRING_CHARS", "MAX_METRICS"]

logger = logging.getLogger(__name__)

#: what the server writes into a site's entry of the round's history; a metric of one of these names is refused
SERVER_FIELDS = frozenset({NUM_SAMPLES_KEY, AGGREGATION_WEIGHT_KEY, "steps", "bytes_uploaded", "rejected",
                           "dropped_keys", "weight_clipped", "claimed_weight", "statistics_ignored", "site", "round"})
#: the metrics that are text (the organ at personalization, DP-SGD's unit); every other metric is a number or None
STRING_METRICS = frozenset({"organ", "dp_sgd_unit"})
#: the longest metric, statistics or parameter name, and the longest text metric
MAX_NAME_CHARS = 256
MAX_STRING_CHARS = 64
#: the most metrics one result may carry
MAX_METRICS = 1024
#: the most names in a site's statistics
MAX_STATISTICS_NAMES = 10_000

_TORCH_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class IntakeLimits:
    """The bounds of :class:`RoundIntake` (``fedoap.config.RobustnessOptions`` holds them as options, with the same
    names and checked defaults; this is the plain form for a caller without a run configuration).

    Raises:
        ValueError: a bound that is not a finite number in its range (named).
    """

    max_site_weight: float
    weight_median_multiple: float
    max_site_steps: int
    max_statistics_values: int

    def __post_init__(self) -> None:
        if _real(self.max_site_weight) is None or self.max_site_weight <= 0:
            raise ValueError(f"max_site_weight must be a finite number > 0, got {self.max_site_weight!r}")
        if _real(self.weight_median_multiple) is None or self.weight_median_multiple < 1:
            raise ValueError(f"weight_median_multiple must be a finite number >= 1, got "
                             f"{self.weight_median_multiple!r}")
        for name in ("max_site_steps", "max_statistics_values"):
            value = getattr(self, name)
            if _whole(value) is None or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")

    @classmethod
    def of(cls, options: Any) -> "IntakeLimits":
        """The limits an object with these attributes holds (``RunConfig.robustness``)."""
        return cls(**{name: getattr(options, name) for name in cls.__dataclass_fields__})


@dataclass
class RoundOutcome:
    """What one round produced.

    Attributes:
        record: the round's history record ``{"round", "accepted", "sites": {site: entry}}`` (plus ``aggregation``,
            the rule's summary, and ``aggregate_refused`` when the aggregate was not usable).
        aggregate: the new global shared parameters, or None: keep the previous ones (nothing accepted, a rule that
            shares nothing, or an aggregate refused).
    """

    record: dict[str, Any]
    aggregate: Optional[dict[str, Any]] = None


class _Malformed(ValueError):
    """A field of a result that is not what the protocol allows; the message is the logged reason."""


@dataclass
class _Claim:
    """One site's checked result, before the claims are compared."""

    site: str
    params: dict[str, Any]
    weight: Optional[float]
    steps: Optional[int]
    statistics: Optional[dict[str, list[float]]] = None
    entry: dict[str, Any] = field(default_factory=dict)


# -- numbers -------------------------------------------------------------------------------------------------------
def _real(value: Any) -> Optional[float]:
    """``value`` as a finite float if it is a real number (not a bool, not an array), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        return None
    try:
        out = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return out if math.isfinite(out) else None


def _whole(value: Any) -> Optional[int]:
    """``value`` as an int if it is a finite real number with no fractional part, else None."""
    real = _real(value)
    return int(real) if real is not None and real.is_integer() else None


def _name_problem(name: Any) -> Optional[str]:
    if not isinstance(name, str):
        return f"a name must be a string, got {type(name).__name__}"
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        return f"name {name[:40]!r} is empty, longer than {MAX_NAME_CHARS} characters or not printable"
    return None


def _show(value: Any) -> str:
    """A short rendering of a claimed value for a log line (never the whole of something large)."""
    if isinstance(value, int) and abs(value) > 10**30:  # repr of a huge int is slow, or refused beyond 4300 digits
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if isinstance(value, (numbers.Number, str, type(None))) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _format(value: Any, decimals: int = 3) -> str:
    """A metric for a progress line: the number, or ``nan`` for anything else (never an error)."""
    real = _real(value)
    return f"{real:.{decimals}f}" if real is not None else "nan"


# -- what a site uploaded ------------------------------------------------------------------------------------------
def _array_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.element_size() * value.numel()) if value.layout == torch.strided else 0
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return 0


def _count_numbers(value: Any, budget: int, depth: int = 0) -> int:
    """How many numbers a (nested) JSON-like value holds, counting stops a little past ``budget``."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return int(value.numel() if isinstance(value, torch.Tensor) else value.size)
    if depth > 4:
        return 0
    items: Sequence[Any]
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return int(_real(value) is not None or isinstance(value, float))
    total = 0
    for item in items:
        total += _count_numbers(item, budget - total, depth + 1)
        if total > budget:
            break
    return total


def payload_bytes(params: Any) -> int:
    """Bytes of the parameter arrays of one update (0 for what is not a dict of arrays)."""
    return sum(_array_bytes(v) for v in params.values()) if isinstance(params, Mapping) else 0


def _uploaded_bytes(params: Any, statistics: Any, budget: int) -> int:
    """Bytes of the parameter arrays of one update, plus its statistics as float32 values (what the site sent)."""
    return payload_bytes(params) + 4 * _count_numbers(statistics, budget)


# -- the checks of one result --------------------------------------------------------------------------------------
def _array_problem(value: Any) -> Optional[str]:
    """Why ``value`` is not a dense tensor or array of a real numeric dtype, or None."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            return f"a {value.layout} tensor (dense only)"
        if not (value.is_floating_point() or value.dtype in _TORCH_INTS):
            return f"dtype {value.dtype} (real numbers only)"
        return None
    if isinstance(value, np.ndarray):
        return None if value.dtype.kind in "fiu" else f"dtype {value.dtype} (real numbers only)"
    return f"a {type(value).__name__}, not a tensor or array"


def _all_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    return value.dtype.kind != "f" or bool(np.isfinite(value).all())


def checked_params(params: Any, shapes: Mapping[str, tuple[int, ...]], encrypted: bool,
                   masked: bool = False, partial: bool = False) -> dict[str, Any]:
    """The parameters of one result, checked: a dict of str to dense tensors or arrays of a real dtype; in clear,
    every shared key (``shapes``) present with its shape and finite values (other keys are left for the rule to
    drop; with ``partial``, a rule that takes some of the shared keys from each site, only the keys sent are
    checked); under HE (``encrypted``) or secure aggregation (``masked``) the rule reads the transport arrays.

    Raises:
        _Malformed: the first problem, naming the key.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise _Malformed(f"parameters must be a dict, got a {type(params).__name__}")
    for key, value in params.items():
        problem = _name_problem(key)
        if problem:
            raise _Malformed(f"parameter {problem}")
        problem = _array_problem(value)
        if problem:
            raise _Malformed(f"parameter {key!r} is {problem}")
        if not (encrypted or masked) and key in shapes:
            if tuple(value.shape) != tuple(shapes[key]):
                raise _Malformed(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(shapes[key])}")
            if not _all_finite(value):
                raise _Malformed(f"{key!r} contains NaN or Inf")
    if masked:
        pass  # the masked sum reads its one vector (fedoap.privacy.secagg_payload) and rejects anything else
    elif not encrypted:
        missing = [] if partial else sorted(k for k in shapes if k not in params)
        if missing:
            raise _Malformed(f"update lacks {len(missing)} shared parameter(s), e.g. {missing[0]!r}")
    elif shapes and params and not any(k.startswith(HE_KEY_PREFIX) for k in params):
        raise _Malformed("plaintext update while homomorphic encryption is on")
    return dict(params)


def checked_metrics(metrics: Any) -> dict[str, Any]:
    """The metrics of one result as plain values: numbers (NaN and Inf kept: an HD95 over images without a tumour is
    NaN; they are null in the history file), None, or short printable text for :data:`STRING_METRICS`.

    Raises:
        _Malformed: not a dict, too many metrics, a bad or reserved name, or a value of another type.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise _Malformed(f"metrics must be a dict, got a {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise _Malformed(f"{len(metrics)} metrics, more than {MAX_METRICS}")
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        problem = _name_problem(key)
        if problem:
            raise _Malformed(f"metric {problem}")
        if key in SERVER_FIELDS:
            raise _Malformed(f"metric {key!r} is a field the server records itself")
        if value is None:
            out[key] = None
        elif isinstance(value, str):
            if key.split("/", 1)[0] not in STRING_METRICS:  # "organ", or "organ/<site>" of the pooled reference
                raise _Malformed(f"metric {key!r} is text; only {sorted(STRING_METRICS)} may be")
            if len(value) > MAX_STRING_CHARS or not value.isprintable():
                raise _Malformed(f"metric {key!r} is longer than {MAX_STRING_CHARS} characters or not printable")
            out[key] = value
        elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
            raise _Malformed(f"metric {key!r} is a {type(value).__name__}, not a number")
        elif isinstance(value, (numbers.Integral, np.integer)):
            if _real(value) is None or abs(int(value)) >= 2**63:
                raise _Malformed(f"metric {key!r} is an integer out of range")
            out[key] = int(value)
        else:
            out[key] = float(value)
    return out


def checked_statistics(statistics: Any, limit: int) -> dict[str, list[float]]:
    """A site's statistics as ``{name: [float, ...]}``: names as metric names, values lists (or 1-D arrays) of
    finite real numbers, at most ``limit`` numbers in all.

    Raises:
        _Malformed: anything else (the reason says what).
    """
    if not isinstance(statistics, Mapping):
        raise _Malformed(f"statistics must be a dict, got a {type(statistics).__name__}")
    if len(statistics) > MAX_STATISTICS_NAMES:
        raise _Malformed(f"{len(statistics)} statistics, more than {MAX_STATISTICS_NAMES}")
    sizes = {}
    for key, values in statistics.items():
        problem = _name_problem(key)
        if problem:
            raise _Malformed(f"statistics {problem}")
        if isinstance(values, (list, tuple)):
            sizes[key] = len(values)
        elif isinstance(values, (torch.Tensor, np.ndarray)) and values.ndim == 1 and _array_problem(values) is None:
            sizes[key] = int(values.shape[0])
        else:
            raise _Malformed(f"statistics {key!r} must be a list of numbers, got a {type(values).__name__}")
    if sum(sizes.values()) > limit:
        raise _Malformed(f"statistics hold {sum(sizes.values())} numbers, more than {limit}")
    out = {}
    for key, values in statistics.items():
        if isinstance(values, (torch.Tensor, np.ndarray)):
            array = (values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor)
                     else values.astype(np.float64))
            if not np.isfinite(array).all():
                raise _Malformed(f"statistics {key!r} contain NaN or Inf")
            out[key] = array.tolist()
            continue
        floats = [_real(v) for v in values]
        if any(v is None for v in floats):
            raise _Malformed(f"statistics {key!r} must hold finite numbers only")
        out[key] = floats
    return out


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


# -- the intake ------------------------------------------------------------------------------------------------------
class RoundIntake:
    """The server's intake of the sites' results, one object for the whole job (see the module docstring).

    Args:
        limits: the bounds: ``fedoap.config.RobustnessOptions`` (``RunConfig.robustness``), an :class:`IntakeLimits`,
            or any object with the attributes ``max_site_weight``, ``weight_median_multiple``, ``max_site_steps``
            and ``max_statistics_values``.
        shares_statistics: the job's method uses the statistics sites send (``get_method(name, **args)
            .shares_statistics``: FedRDN, FedDP); otherwise every site's statistics are ignored.
        num_rounds: the job's rounds (for the progress line only).
        progress: called with one line per round (the round's sites, accepted count, losses and Dice); default: the
            module's logger at INFO.
        warn: called with every rejection, clipping and ignored statistics; default: the module's logger at WARNING.

    Attributes:
        site_statistics: the latest accepted statistics by site, what :meth:`task_meta` forwards.

    Raises:
        ValueError: invalid limits (named), or a ``num_rounds`` below 1.
    """

    def __init__(self, limits: Any, *, shares_statistics: bool = False, num_rounds: int = 1,
                 progress: Optional[Callable[[str], None]] = None,
                 warn: Optional[Callable[[str], None]] = None) -> None:
        self.limits = limits if isinstance(limits, IntakeLimits) else IntakeLimits.of(limits)
        if _whole(num_rounds) is None or num_rounds < 1:
            raise ValueError(f"num_rounds must be a whole number >= 1, got {num_rounds!r}")
        self.shares_statistics = bool(shares_statistics)
        self.num_rounds = int(num_rounds)
        self._progress = progress or logger.info
        self._warn = warn or logger.warning
        self.site_statistics: dict[str, dict[str, list[float]]] = {}

    def task_meta(self) -> dict[str, Any]:
        """What every task carries besides the parameters: the latest accepted statistics of every site that sent
        some (empty for a method that uses none)."""
        return {SITE_STATISTICS_KEY: dict(self.site_statistics)} if self.site_statistics else {}

    # -- one round -------------------------------------------------------------------------------------------------
    def collect(self, rnd: int, rule: ServerRule, broadcast: Mapping[str, Any], results: Sequence[Any]) -> RoundOutcome:
        """Run one round through ``rule``: ``reset`` with ``broadcast``, check and bound every result, ``add`` what
        passes, form and check the aggregate. Never raises for what a site sent.

        Args:
            rnd: the round (0-based; the history and the log lines say ``rnd + 1``).
            rule: the job's rule object (``fedoap.server.rules.rule_for_job``).
            broadcast: the global shared parameters this round started from (ciphertext under HE after round 0).
            results: the sites' answers (NVFlare ``FLModel``: ``params``, ``metrics``, ``meta`` with
                ``client_name`` set by NVFlare).

        Returns:
            The round's record and its aggregate (None: keep the previous global model).
        """
        results = list(results or [])
        sites: dict[str, dict[str, Any]] = {}
        record: dict[str, Any] = {"round": rnd, "accepted": 0, "sites": sites}
        try:
            rule.reset(broadcast)
        except Exception as err:  # noqa: BLE001 - the server's own state: record it, keep the previous model
            reason = f"the round's broadcast cannot start the rule: {type(err).__name__}: {err}"
            self._warn(f"round {rnd + 1}: {reason}; the global model is unchanged")
            record["aggregate_refused"] = reason
            return RoundOutcome(record)
        claims: list[_Claim] = []
        for index, result in enumerate(results):
            claim = self._check_one(rnd, index, result, rule, sites)
            if claim is not None:
                claims.append(claim)
        if rule.shares:
            claims = self._bound_claims(rnd, rule, claims)
        for claim in claims:
            self._add(rnd, rule, claim)
        for claim in claims:  # statistics of a site that was not rejected
            if claim.statistics is not None and "rejected" not in claim.entry:
                self.site_statistics[claim.site] = claim.statistics
        record["accepted"] = rule.count
        aggregate = self._aggregate(rnd, rule, record) if rule.shares else None
        self._progress_line(rnd, rule, sites, len(results))
        return RoundOutcome(record, aggregate)

    def collect_personalized(self, results: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """The sites' final metrics after personalization, checked as a round's metrics are (a malformed answer is
        recorded as ``{"rejected": reason}``), with one progress line per site."""
        out: dict[str, dict[str, Any]] = {}
        for index, result in enumerate(results):
            site = self._site_of(index, result, out)
            try:
                metrics = checked_metrics(getattr(result, "metrics", None))
            except Exception as err:  # noqa: BLE001 - _Malformed, or whatever a hostile object raises
                reason = str(err) if isinstance(err, _Malformed) else f"unreadable: {type(err).__name__}: {err}"
                self._warn(f"personalization: {site}: refused its metrics: {reason}")
                out[site] = {"rejected": f"{site}: {reason}"}
                continue
            out[site] = metrics
            self._progress(f"{site}: personalized test Dice {_format(metrics.get('test_dice'))}, "
                           f"HD95 {_format(metrics.get('test_hd95'), 1)}")
        return out

    # -- the passes ------------------------------------------------------------------------------------------------
    @staticmethod
    def _site_of(index: int, result: Any, taken: Mapping[str, Any]) -> str:
        """The site's name as NVFlare set it (``meta["client_name"]``), or ``?<index>``; a second answer under a
        name already taken gets a name of its own."""
        try:
            meta = getattr(result, "meta", None)
            name = meta.get("client_name") if isinstance(meta, dict) else None
        except Exception:  # noqa: BLE001 - a hostile object: no name
            name = None
        site = name if isinstance(name, str) and _name_problem(name) is None else f"?{index}"
        return site if site not in taken else f"{site} (answer {index + 1})"

    def _check_one(self, rnd: int, index: int, result: Any, rule: ServerRule,
                   sites: dict[str, dict[str, Any]]) -> Optional[_Claim]:
        """Pass 1: one result alone. Records the site's entry in ``sites`` (the server's fields first, then the
        site's metrics, none of which may bear a server field's name); returns its claim, or None if rejected."""
        site = self._site_of(index, result, sites)
        entry: dict[str, Any] = {"bytes_uploaded": 0, NUM_SAMPLES_KEY: 0, "steps": None, AGGREGATION_WEIGHT_KEY: None}
        sites[site] = entry
        statistics = None
        try:
            meta = getattr(result, "meta", None)
            params = getattr(result, "params", None)
            statistics = meta.get(SITE_STATISTICS_KEY) if isinstance(meta, Mapping) else None
            entry["bytes_uploaded"] = _uploaded_bytes(params, statistics, self.limits.max_statistics_values)
            if not isinstance(meta, Mapping):
                raise _Malformed(f"meta must be a dict, got a {type(meta).__name__}")
            weight, samples, steps = self._checked_counts(meta, rule)
            entry.update({NUM_SAMPLES_KEY: samples, "steps": steps, AGGREGATION_WEIGHT_KEY: weight})
            entry.update(checked_metrics(getattr(result, "metrics", None)))  # refuses the server's field names
            checked = checked_params(params, rule.shapes, rule.encrypted,
                                     masked=rule.hides_updates and not rule.encrypted,
                                     partial=rule.partial_updates)
        except _Malformed as err:
            self._reject(rnd, site, entry, f"{site}: {err}")
            return None
        except Exception as err:  # noqa: BLE001 - whatever a hostile object raises while being read
            self._reject(rnd, site, entry, f"{site}: unreadable result: {type(err).__name__}: {err}")
            return None
        claim = _Claim(site=site, params=checked, weight=weight, steps=steps, entry=entry)
        if statistics is not None:
            claim.statistics = self._checked_statistics(rnd, site, statistics, entry)
        return claim

    def _checked_counts(self, meta: Mapping[str, Any], rule: ServerRule) -> tuple[Optional[float], int, Optional[int]]:
        """The claimed weight (``aggregation_weight``, else ``n_samples``), sample count and step count, in range.

        Raises:
            _Malformed: a count that is not a number in its range, or one the rule needs that is missing.
        """
        max_weight, max_steps = self.limits.max_site_weight, self.limits.max_site_steps
        samples: Optional[int] = 0
        if NUM_SAMPLES_KEY in meta:
            samples = _whole(meta[NUM_SAMPLES_KEY])
            if samples is None or not 0 <= samples <= max_weight:
                raise _Malformed(f"sample count must be a whole number in [0, {max_weight:g}], got "
                                 f"{_show(meta[NUM_SAMPLES_KEY])}")
        claimed = meta.get(AGGREGATION_WEIGHT_KEY, meta.get(NUM_SAMPLES_KEY))
        weight = None
        if claimed is not None or rule.shares:
            weight = _real(claimed)
            if weight is None or weight <= 0:
                raise _Malformed(f"aggregation weight must be a positive number, got {_show(claimed)}")
            if weight > max_weight:
                raise _Malformed(f"aggregation weight {weight:g} is above the largest a site may claim "
                                 f"({max_weight:g})")
        steps = None
        if meta.get(NUM_STEPS_KEY) is not None or rule.uses_steps:
            steps = _whole(meta.get(NUM_STEPS_KEY))
            low = 1 if rule.uses_steps else 0
            if steps is None or not low <= steps <= max_steps:
                raise _Malformed(f"number of local steps must be a whole number in [{low}, {max_steps}], got "
                                 f"{_show(meta.get(NUM_STEPS_KEY))}")
        return weight, int(samples or 0), steps

    def _checked_statistics(self, rnd: int, site: str, statistics: Any,
                            entry: dict[str, Any]) -> Optional[dict[str, list[float]]]:
        """A site's statistics if the method uses them and they are well formed; else None, with a warning."""
        if not self.shares_statistics:
            reason = "this job's method uses no site statistics"
        else:
            try:
                return checked_statistics(statistics, self.limits.max_statistics_values)
            except _Malformed as err:
                reason = str(err)
            except Exception as err:  # noqa: BLE001 - whatever a hostile object raises while being read
                reason = f"unreadable: {type(err).__name__}: {err}"
        entry["statistics_ignored"] = reason
        self._warn(f"round {rnd + 1}: {site}: statistics ignored: {reason}")
        return None

    def _bound_claims(self, rnd: int, rule: ServerRule, claims: list[_Claim]) -> list[_Claim]:
        """Pass 2: the claims against each other; returns the claims that go on to the rule.

        A weight has an upper bound only, k times the median of the *other* sites' claims (a small weight only lowers
        the site's own influence, and a liar's large claim only loosens the others' bounds). Steps (a rule that uses
        them) are bounded both ways, ``[m / k, k m]``: with three or more sites ``m`` is the median of all the claims,
        which one liar (any minority) cannot move outside the honest range, so it can never push an honest site out;
        with two sites ``m`` is the other's claim, and two that differ by more than k are both refused (nothing tells
        which one lies: the round keeps the previous model).
        """
        k = float(self.limits.weight_median_multiple)
        weights = {c.site: float(c.weight) for c in claims if c.weight is not None}
        kept = []
        for claim in claims:
            others = [w for s, w in weights.items() if s != claim.site]
            if others and claim.weight is not None:
                bound = k * _median(others)
                if claim.weight > bound:
                    why = (f"claimed weight {claim.weight:g} is above {k:g} x the median of the other sites' claims "
                           f"({bound:g})")
                    if rule.hides_updates:  # the weight is inside the ciphertext or masked vector: no clipping
                        self._reject(rnd, claim.site, claim.entry, f"{claim.site}: {why}")
                        continue
                    claim.entry["weight_clipped"] = why
                    claim.entry["claimed_weight"] = claim.weight
                    claim.entry[AGGREGATION_WEIGHT_KEY] = claim.weight = bound
                    self._warn(f"round {rnd + 1}: {claim.site}: {why}: clipped to it")
            kept.append(claim)
        if not rule.uses_steps:
            return kept
        steps = {c.site: float(c.steps) for c in kept if c.steps is not None}
        if len(steps) < 2:
            return kept
        survivors = []
        for claim in kept:
            if len(steps) >= 3:
                median, of = _median(list(steps.values())), "the sites' step counts"
            else:
                median, of = next(n for s, n in steps.items() if s != claim.site), "the other site's step count"
            if not median / k <= claim.steps <= k * median:
                self._reject(rnd, claim.site, claim.entry, f"{claim.site}: claimed {claim.steps} steps, outside "
                                                           f"[1/{k:g}, {k:g}] x the median of {of} ({median:g})")
                continue
            survivors.append(claim)
        return survivors

    def _add(self, rnd: int, rule: ServerRule, claim: _Claim) -> None:
        """Pass 3: one update into the rule; whatever the rule raises rejects this site alone."""
        try:
            dropped = rule.add(claim.site, claim.params, claim.weight if claim.weight is not None else 0.0,
                               steps=claim.steps)
        except UpdateRejected as err:
            self._reject(rnd, claim.site, claim.entry, str(err))
            return
        except Exception as err:  # noqa: BLE001 - one site's update must never stop the round for the others
            logger.exception("round %d: the server rule failed on %s's update", rnd + 1, claim.site)
            self._reject(rnd, claim.site, claim.entry,
                         f"{claim.site}: the server rule failed on this update: {type(err).__name__}: {err}")
            return
        if dropped:
            self._warn(f"round {rnd + 1}: {claim.site} sent {len(dropped)} non-shared key(s), dropped: {dropped}")
            claim.entry["dropped_keys"] = list(dropped)

    def _aggregate(self, rnd: int, rule: ServerRule, record: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The round's aggregate, checked (in clear: the shared keys and shapes, finite values); None to keep the
        previous global model, with the reason in ``record["aggregate_refused"]``."""
        if not rule.count:
            self._warn(f"round {rnd + 1}: no update accepted; the global model is unchanged")
            return None
        try:
            aggregate = dict(rule.result())
            if not rule.encrypted:
                problem = _aggregate_problem(aggregate, rule.shapes)
                if problem:
                    raise ValueError(problem)
        except Exception as err:  # noqa: BLE001 - keep the previous model rather than stop or broadcast garbage
            reason = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
            self._warn(f"round {rnd + 1}: aggregate refused, the global model is unchanged: {reason}")
            record["aggregate_refused"] = reason
            return None
        try:
            summary = rule.summary()  # what a learned rule decided (FedAWA's weights, FedLWS's factors)
        except Exception as err:  # noqa: BLE001 - a summary is for the record only
            summary = {"error": f"{type(err).__name__}: {err}"}
        if summary:
            record["aggregation"] = summary
        return aggregate

    def _reject(self, rnd: int, site: str, entry: dict[str, Any], reason: str) -> None:
        entry["rejected"] = reason
        self._warn(f"round {rnd + 1}: rejected update: {reason}")

    def _progress_line(self, rnd: int, rule: ServerRule, sites: Mapping[str, Mapping[str, Any]], n: int) -> None:
        parts = [f"{site} loss {_format(s.get('train_loss'))} val Dice {_format(s.get('val_dice'))}"
                 for site, s in sorted(sites.items())]
        status = f"{rule.count}/{n} accepted" if rule.shares else f"{n} local"
        self._progress(f"round {rnd + 1}/{self.num_rounds} ({status}): " + "; ".join(parts))


def _aggregate_problem(aggregate: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """Why a plaintext aggregate must not be broadcast (other keys, other shapes, NaN or Inf), or None."""
    if set(aggregate) != set(shapes):
        return "the aggregate does not hold exactly the shared keys"
    for key, shape in shapes.items():
        value = aggregate[key]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.shape != tuple(shape):
            return f"the aggregate's {key!r} has shape {array.shape}, expected {tuple(shape)}"
        if array.dtype.kind not in "fiu" or not np.isfinite(array).all():
            return f"the aggregate's {key!r} contains NaN or Inf"
    return None
