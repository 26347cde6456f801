"""A site's privacy ledger: every DP release of the site's data, kept on disk across rounds and jobs, so that a
privacy budget holds for the site's data as a whole and not only within one job.

An accountant that lives inside a job forgets everything when the job ends: ten jobs of three rounds each spend ten
times what one job reports. The ledger (``<site workspace>/local/fedoap_privacy_ledger.json``) records each release
(Gaussian mechanism: noise multiplier ``sigma``, sample rate ``q``, number of steps) with the privacy scope it ran
under, the protected unit, the job id and the time. Epsilon is the Rényi-DP composition of the recorded history,
converted at the asked delta by Opacus's ``RDPAccountant`` (its ``history`` of ``(sigma, q, steps)``): RDP composes
exactly across mechanisms, so rounds of one job and releases of different jobs add up the same way.

Protected units (adjacency as in :mod:`fedoap.privacy.dp`, add/remove-one):

* ``"site"``: client-level DP of the shared update; one release ``(sigma, q=1, steps=1)`` per result with parameters;
  the unit is the site's whole data set;
* ``"slice"`` / ``"case"``: DP-SGD steps ``(sigma, q, k)``; the unit is one training slice, or one patient case when
  the client samples cases.

:meth:`PrivacyLedger.charge` checks a budget against the composition of the unit's releases in **every** scope of
the site: scopes are labels of jobs, not of data, so a job that switches to another scope still spends the same
patients' privacy. The scope is recorded on each release for the site's own reporting (:meth:`PrivacyLedger.spent`
with a scope name).

Durability and concurrency: the file is owner-only (0600), replaced atomically (a unique temporary file in the same
folder, fsync, ``os.replace``), and every read-check-write runs under ``fcntl.flock`` on ``<ledger>.lock``, so jobs
running at the same time on one site are serialized. A ledger that cannot be read (corrupt, truncated, a foreign
format, readable by others) fails closed with an error naming the file: it is never reset to zero.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import numbers
import os
import stat
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from fedoap.files import PRIVATE_FILE_MODE, write_atomic
from fedoap.checks import is_finite_number as _is_real

__all__ = [
    "LEDGER_FILE",
    "UNIT_SITE",
    "DP_SGD_UNITS",
    "UNITS",
    "Release",
    "Charge",
    "PrivacyLedger",
    "BudgetExceededError",
    "LedgerCorruptError",
    "ledger_path",
    "epsilon_of",
]

#: the ledger's file name inside the site's ``local/`` folder
LEDGER_FILE = "fedoap_privacy_ledger.json"
#: protected unit of client-level DP of the update: the site's whole data set
UNIT_SITE = "site"
#: protected units of DP-SGD: one training slice, or one patient case
DP_SGD_UNITS = ("slice", "case")
UNITS = (UNIT_SITE, *DP_SGD_UNITS)

_FORMAT = "fedoap-privacy-ledger"
_VERSION = 1
_ENTRY_KEYS = {"scope", "unit", "noise_multiplier", "sample_rate", "steps", "job_id", "time"}


class LedgerCorruptError(ValueError):
    """The ledger file exists but cannot be trusted; nothing may be released until a person restores it."""


class BudgetExceededError(ValueError):
    """A release would take a unit's epsilon past its budget (nothing was recorded for it)."""

    def __init__(self, scope: str, unit: str, budget: float, delta: float, spent: float, would_be: float,
                 job: Optional[str] = None) -> None:
        self.scope, self.unit, self.budget, self.delta = scope, unit, budget, delta
        self.spent, self.would_be, self.job = spent, would_be, job
        whose = f"job {job!r} has" if job is not None else "this site has"
        super().__init__(
            f"privacy budget of scope {scope!r} for unit {unit!r} {'per job ' if job is not None else ''}exceeded: "
            f"the budget is epsilon {budget:g} at delta {delta:g}, {whose} spent {spent:.4f}, and this release would "
            f"make it {would_be:.4f}"
        )



@dataclass(frozen=True)
class Release:
    """One Gaussian release: ``steps`` applications of the sampled Gaussian mechanism with noise multiplier
    ``noise_multiplier`` at sample rate ``sample_rate`` (1: no subsampling).

    Raises:
        ValueError: a value is out of range (names the field).
    """

    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if not _is_real(self.noise_multiplier) or float(self.noise_multiplier) < 0:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}.")
        if not _is_real(self.sample_rate) or not 0.0 < float(self.sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}.")
        if not isinstance(self.steps, numbers.Integral) or isinstance(self.steps, bool) or int(self.steps) < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}.")

    @classmethod
    def client_level(cls, noise_multiplier: float) -> "Release":
        """One round's client-level release of the update: every round the site takes part (q = 1), one step."""
        return cls(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)


@dataclass(frozen=True)
class Charge:
    """A release of one unit and that unit's budgets, epsilon at the scope's delta: ``budget`` over every job of the
    site, ``job_budget`` over the releases of this one job (a site's per-job budget,
    ``fedoap.site.policy.SiteDPPolicy``'s ``epsilon``); None: no limit of that kind."""

    unit: str
    release: Release
    budget: Optional[float] = None
    job_budget: Optional[float] = None

    def __post_init__(self) -> None:
        _check_unit(self.unit)
        if not isinstance(self.release, Release):
            raise ValueError(f"release must be a Release, got {type(self.release).__name__}.")
        for name in ("budget", "job_budget"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or float(value) <= 0):
                raise ValueError(f"{name} must be None or a finite epsilon > 0, got {value!r}.")


def _check_unit(unit: object) -> None:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")


def _check_scope_and_job(scope: object, job_id: object) -> None:
    if not isinstance(scope, str):
        raise ValueError(f"scope must be a string, got {scope!r}.")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job_id must be a non-empty string, got {job_id!r}.")


def _check_delta(delta: object) -> None:
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}.")


def ledger_path(workspace_root: str | os.PathLike) -> Path:
    """Where a site keeps its ledger: ``<workspace root>/local/fedoap_privacy_ledger.json`` (the site's own folder,
    beside its ``privacy.json``, which NVFlare never sends anywhere)."""
    return Path(workspace_root) / "local" / LEDGER_FILE


def epsilon_of(releases: Sequence[Release], delta: float) -> float:
    """Epsilon at ``delta`` of the RDP composition of ``releases`` (Opacus ``RDPAccountant`` over their history;
    0 for none, inf if any has no noise).

    Raises:
        ValueError: ``delta`` is not in (0, 1).
    """
    _check_delta(delta)
    if not releases:
        return 0.0
    if any(float(r.noise_multiplier) == 0.0 for r in releases):
        return math.inf
    steps: dict[tuple[float, float], int] = {}
    for r in releases:  # RDP adds up, in any order: one history entry per mechanism keeps a long ledger cheap
        key = (float(r.noise_multiplier), float(r.sample_rate))
        steps[key] = steps.get(key, 0) + int(r.steps)
    from opacus.accountants import RDPAccountant  # loaded where an epsilon is computed, not by every importer

    accountant = RDPAccountant()
    accountant.history = [(sigma, q, k) for (sigma, q), k in steps.items()]
    with warnings.catch_warnings():  # large epsilons make the best order the largest one; the bound still holds
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta=float(delta)))


class PrivacyLedger:
    """The DP releases of one site, persisted in ``path`` (see the module docstring).

    Args:
        path: the ledger file (:func:`ledger_path` of the site's workspace root); created at the first record.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # -- reading -----------------------------------------------------------------------------------------------------
    def entries(self, scope: Optional[str] = None, unit: Optional[str] = None) -> list[dict[str, Any]]:
        """The recorded releases, oldest first (of one scope and/or unit if given; None: all).

        Raises:
            LedgerCorruptError: the file cannot be trusted.
        """
        with self._locked(exclusive=False):
            return self._select(self._read(), scope, unit)

    def spent(self, scope: Optional[str], unit: str, delta: float) -> float:
        """Epsilon at ``delta`` of every release of ``unit`` recorded in ``scope`` (None: in every scope of the site,
        which is what budgets are checked against).

        Raises:
            ValueError: a bad unit or delta; LedgerCorruptError: the file cannot be trusted.
        """
        _check_unit(unit)
        return epsilon_of(_releases(self.entries(scope, unit)), delta)

    def would_spend(self, scope: Optional[str], unit: str, delta: float, release: Release) -> float:
        """Epsilon of :meth:`spent` after ``release`` were recorded too (nothing is recorded)."""
        _check_unit(unit)
        return epsilon_of([*_releases(self.entries(scope, unit)), release], delta)

    def releases_left(self, unit: str, delta: float, release: Release, budget: float) -> int:
        """How many more copies of ``release`` fit in ``budget`` on top of every scope's releases of ``unit`` (e.g.
        rounds a job may still run at the scope's noise multiplier); 0 if none (or ``release`` has no noise).

        Raises:
            ValueError: a bad argument; LedgerCorruptError: the file cannot be trusted.
        """
        _check_unit(unit)
        if not _is_real(budget) or float(budget) <= 0:
            raise ValueError(f"budget must be a finite epsilon > 0, got {budget!r}.")
        history = _releases(self.entries(None, unit))

        def fits(n: int) -> bool:  # n copies of one Gaussian release are that release with n times the steps
            repeated = Release(release.noise_multiplier, release.sample_rate, int(release.steps) * n)
            return epsilon_of([*history, repeated], delta) <= float(budget)

        if float(release.noise_multiplier) == 0.0 or not fits(1):
            return 0
        low, high = 1, 2  # fits(low), then double until high does not fit, then bisect
        while fits(high):
            low, high = high, high * 2
            if high > 2 ** 40:
                return low
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    # -- writing -----------------------------------------------------------------------------------------------------
    def record(self, scope: str, unit: str, release: Release, job_id: str) -> None:
        """Record ``release`` without a budget check (use :meth:`charge` to enforce a budget).

        Raises:
            ValueError: a bad argument; LedgerCorruptError: the file cannot be trusted.
        """
        _check_scope_and_job(scope, job_id)
        charge = Charge(unit, release, None)
        with self._locked(exclusive=True):
            self._write(self._appended(self._read(), scope, job_id, [charge]))

    def charge(self, scope: str, delta: float, job_id: str, charges: Sequence[Charge]) -> dict[str, float]:
        """Check every charge against its budget and, only if all fit, record them all, in one step under the lock.

        A budget is checked against the unit's releases in every scope of the site plus the new release (see the
        module docstring), at ``delta``.

        Returns:
            unit -> epsilon at ``delta`` spent on this site after the charges.

        Raises:
            BudgetExceededError: a charge would exceed its budget; nothing is recorded.
            LedgerCorruptError: the file cannot be trusted; nothing is recorded.
            ValueError: a bad argument.
        """
        _check_scope_and_job(scope, job_id)
        _check_delta(delta)
        charges = list(charges)
        if not charges or not all(isinstance(c, Charge) for c in charges):
            raise ValueError(f"charges must be a non-empty list of Charge, got {charges!r}.")
        if len({c.unit for c in charges}) != len(charges):
            raise ValueError(f"charges name a unit twice: {[c.unit for c in charges]}.")
        with self._locked(exclusive=True):
            entries = self._read()
            after: dict[str, float] = {}
            for c in charges:
                history = _releases(self._select(entries, None, c.unit))
                after[c.unit] = epsilon_of([*history, c.release], delta)
                if c.budget is not None and not after[c.unit] <= float(c.budget):
                    raise BudgetExceededError(scope, c.unit, float(c.budget), float(delta),
                                              epsilon_of(history, delta), after[c.unit])
                if c.job_budget is not None:
                    job = _releases([e for e in self._select(entries, None, c.unit) if e["job_id"] == job_id])
                    job_after = epsilon_of([*job, c.release], delta)
                    if not job_after <= float(c.job_budget):
                        raise BudgetExceededError(scope, c.unit, float(c.job_budget), float(delta),
                                                  epsilon_of(job, delta), job_after, job=job_id)
            self._write(self._appended(entries, scope, job_id, charges))
            return after

    @staticmethod
    def _appended(entries: list[dict[str, Any]], scope: str, job_id: str,
                  charges: Sequence[Charge]) -> list[dict[str, Any]]:
        now = datetime.now(timezone.utc).isoformat()
        return [*entries, *({"scope": scope, "unit": c.unit, "noise_multiplier": float(c.release.noise_multiplier),
                             "sample_rate": float(c.release.sample_rate), "steps": int(c.release.steps),
                             "job_id": job_id, "time": now} for c in charges)]

    # -- file handling -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _corrupt(self, problem: str) -> LedgerCorruptError:
        return LedgerCorruptError(
            f"privacy ledger {self.path}: {problem}; refusing to release anything until the file is restored "
            "(a ledger is never reset to zero)")

    def _read(self) -> list[dict[str, Any]]:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return []  # a site's first release
        if not stat.S_ISREG(info.st_mode):
            raise self._corrupt("is not a regular file")
        if info.st_mode & 0o077:
            raise self._corrupt(f"has mode {stat.S_IMODE(info.st_mode):04o}, not owner-only 0600 (others may have "
                                "changed it)")
        try:
            raw = json.loads(self.path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupt(f"is not valid JSON ({err})") from err
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT or raw.get("version") != _VERSION:
            raise self._corrupt(f"is not a {_FORMAT} version {_VERSION} file")
        entries = raw.get("releases")
        if not isinstance(entries, list):
            raise self._corrupt("has no list of releases")
        for i, entry in enumerate(entries):
            problem = _entry_problem(entry)
            if problem:
                raise self._corrupt(f"release {i} {problem}")
        return entries

    def _write(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps({"format": _FORMAT, "version": _VERSION, "releases": entries}, indent=1, allow_nan=False)
        write_atomic(self.path, (text + "\n").encode("utf-8"), PRIVATE_FILE_MODE)

    @staticmethod
    def _select(entries: list[dict[str, Any]], scope: Optional[str], unit: Optional[str]) -> list[dict[str, Any]]:
        return [dict(e) for e in entries
                if (scope is None or e["scope"] == scope) and (unit is None or e["unit"] == unit)]


def _entry_problem(entry: object) -> Optional[str]:
    """Why a ledger entry is malformed, or None."""
    if not isinstance(entry, Mapping) or set(entry) != _ENTRY_KEYS:
        return f"must have exactly the keys {sorted(_ENTRY_KEYS)}"
    if entry["unit"] not in UNITS:
        return f"has an unknown unit {entry['unit']!r}"
    if not all(isinstance(entry[k], str) for k in ("scope", "job_id", "time")):
        return "has a non-string scope, job_id or time"
    try:
        Release(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
    except ValueError as err:
        return f"is not a valid release ({err})"
    return None


def _releases(entries: Sequence[Mapping[str, Any]]) -> list[Release]:
    return [Release(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
