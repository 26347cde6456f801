"""A site's privacy budget holds across rounds and jobs, enforced by the site's own NVFlare filter.

An adversary who can submit jobs tries to spend more of a site's privacy than its scope allows: by running more
rounds, by running more jobs, by switching to another scope, by running two jobs at the same time, by truncating or
corrupting the ledger so that it restarts at zero, and by smuggling parameters out of the site in an "error" reply
that the policy used to pass unchecked. Everything is real: the site's ``SiteDPPolicy`` driven with real NVFlare
``Shareable``/``DXO``/``FLContext``/``Workspace`` objects, the ledger on disk, two real processes, and Opacus's own
``RDPAccountant`` as the reference for epsilon. Each test mounts the attack and asserts it fails.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import FilterChainType, FilterContextKey
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import make_reply
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from opacus.accountants import RDPAccountant

from fedoap.site.policy import SiteDPPolicy, budget_from_meta
from fedoap.protocol import DP_STAMP_KEY
from fedoap.privacy.dp import UpdateDPAccountant, update_dp_epsilon
from fedoap.privacy.ledger import (
    BudgetExceededError,
    Charge,
    LedgerCorruptError,
    PrivacyLedger,
    Release,
    epsilon_of,
    ledger_path,
)

DELTA = 1e-5
POLICY = dict(clip_norm=1.0, noise_multiplier=1.0, delta=DELTA)
STAMP = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": DELTA, "releases": 1}


def _site(tmp_path: Path) -> Workspace:
    """A client site's workspace as NVFlare lays it out (``startup/`` and ``local/``)."""
    (tmp_path / "startup").mkdir(exist_ok=True)
    (tmp_path / "local").mkdir(exist_ok=True)
    return Workspace(str(tmp_path), "brain")


def _gate(chain: str = FilterChainType.TASK_RESULT_CHAIN, **kwargs) -> SiteDPPolicy:
    f = SiteDPPolicy(**{**POLICY, **kwargs})
    f.set_prop(FilterContextKey.CHAIN_TYPE, chain)
    return f


def _ctx(workspace: Workspace, job_id: str, scope: str = "strict") -> FLContext:
    """The context a site's job process gives its filters (client_app_runner sets the same props)."""
    ctx = FLContext()
    ctx.set_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, scope, private=True, sticky=False)
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, workspace, private=True, sticky=False)
    ctx.set_prop(FLContextKey.CURRENT_RUN, job_id, private=False, sticky=False)
    return ctx


def _params() -> dict:
    return {"enc.w": np.full((4, 3), 0.25, dtype=np.float32), "enc.b": np.zeros(3, dtype=np.float32)}


def _result(stamp=STAMP, params=None):
    """A round's result as the client script sends it (Client API FLModel -> Shareable)."""
    meta = {} if stamp is None else {DP_STAMP_KEY: dict(stamp)}
    return FLModelUtils.to_shareable(FLModel(params=_params() if params is None else params,
                                             params_type=ParamsType.FULL, metrics={"val_dice": 0.5}, meta=meta))


def _task():
    return FLModelUtils.to_shareable(FLModel(params=_params(), params_type=ParamsType.FULL, current_round=0,
                                             total_rounds=3))


def _ledger(workspace: Workspace) -> PrivacyLedger:
    return PrivacyLedger(ledger_path(workspace.get_root_dir()))


def _most_releases(sigma: float, budget: float, already: int = 0) -> int:
    n = 0
    while update_dp_epsilon(sigma, already + n + 1, DELTA) <= budget:
        n += 1
    return n


# ====================================================================================================================
def test_the_ledger_adds_up_across_rounds_and_across_jobs(tmp_path):
    site = _site(tmp_path)
    gate, announce = _gate(total_epsilon=20.0), _gate(FilterChainType.TASK_DATA_CHAIN, total_epsilon=20.0)
    ledger = _ledger(site)
    released = 0
    for job in ("job-a", "job-b"):  # two jobs of three rounds: a per-job accountant would report 9.01 twice
        for _ in range(3):
            budget = budget_from_meta(FLModelUtils.from_shareable(announce.process(_task(), _ctx(site, job))).meta)
            assert budget["site"]["spent"] == pytest.approx(update_dp_epsilon(1.0, released, DELTA), rel=1e-12)
            assert budget["site"]["releases_left"] == _most_releases(1.0, 20.0, released)
            out = gate.process(_result(), _ctx(site, job))
            assert set(from_shareable(out).data) == set(_params())  # released untouched
            released += 1
            assert ledger.spent(None, "site", DELTA) == pytest.approx(update_dp_epsilon(1.0, released, DELTA),
                                                                       rel=1e-12)
    assert [e["job_id"] for e in ledger.entries()] == ["job-a"] * 3 + ["job-b"] * 3
    assert ledger.spent("strict", "site", DELTA) == pytest.approx(13.776, abs=1e-3)  # not 9.01: jobs compose
    assert budget_from_meta(FLModelUtils.from_shareable(announce.process(_task(), _ctx(site, "job-c"))).meta)[
        "site"]["left"] == pytest.approx(20.0 - update_dp_epsilon(1.0, 6, DELTA), rel=1e-12)
    # results that release nothing spend nothing (metrics, the final personalization report)
    gate.process(FLModelUtils.to_shareable(FLModel(metrics={"val_dice": 0.5})), _ctx(site, "job-c"))
    gate.process(_result(stamp=None, params={}), _ctx(site, "job-c"))
    assert len(ledger.entries()) == 6


def test_the_release_past_the_budget_is_refused_and_not_recorded(tmp_path):
    site = _site(tmp_path)
    gate = _gate(total_epsilon=10.0)
    for _ in range(3):  # 3 releases at sigma 1: epsilon 9.01 <= 10
        gate.process(_result(), _ctx(site, "job-a"))
    path = ledger_path(site.get_root_dir())
    before = path.read_bytes()
    with pytest.raises(UnsafeJobError, match=r"budget of scope 'strict' .*budget is epsilon 10 at delta 1e-05.*"
                                             r"spent 9\.0100.*would make it 10\.7255"):
        gate.process(_result(), _ctx(site, "job-b"))  # a new job: the budget is the site's, not the job's
    assert path.read_bytes() == before  # nothing recorded for the refused release

    # another scope of the same site does not reset the budget: scopes label jobs, the data is the same
    research = _gate(total_epsilon=10.0)
    with pytest.raises(UnsafeJobError, match="budget of scope 'research' for unit 'site' exceeded"):
        research.process(_result(), _ctx(site, "job-c", scope="research"))
    assert path.read_bytes() == before
    # what is charged is the noise the stamp reports: a release with three times the noise still fits
    research.process(_result({**STAMP, "noise_multiplier": 3.0}), _ctx(site, "job-c", scope="research"))
    assert _ledger(site).spent(None, "site", DELTA) == pytest.approx(
        epsilon_of([Release(1.0, 1.0, 3), Release(3.0)], DELTA), rel=1e-12)


def test_dp_sgd_steps_are_charged_to_their_own_unit_and_an_overdraft_records_nothing(tmp_path):
    site = _site(tmp_path)
    gate = _gate(total_epsilon=50.0, total_epsilon_dp_sgd=30.0)
    steps = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 50, "unit": "slice"}
    gate.process(_result({**STAMP, "dp_sgd": steps}), _ctx(site, "job-a"))
    gate.process(_result({**STAMP, "dp_sgd": {**steps, "unit": "case", "sample_rate": 0.5}}), _ctx(site, "job-a"))
    ledger = _ledger(site)
    assert ledger.spent(None, "slice", DELTA) == pytest.approx(epsilon_of([Release(1.0, 0.1, 50)], DELTA))
    assert ledger.spent(None, "case", DELTA) == pytest.approx(epsilon_of([Release(1.0, 0.5, 50)], DELTA))
    assert len(ledger.entries(unit="site")) == 2
    before = ledger.entries()
    # the update alone would fit, the DP-SGD steps would not: the whole result is refused, neither is recorded
    with pytest.raises(UnsafeJobError, match="for unit 'slice' exceeded: the budget is epsilon 30 "):
        gate.process(_result({**STAMP, "dp_sgd": {**steps, "steps": 5000}}), _ctx(site, "job-b"))
    assert ledger.entries() == before


def test_an_error_reply_carrying_parameters_is_refused(tmp_path):
    site = _site(tmp_path)
    gate = _gate(total_epsilon=20.0)
    for stamp in (None, STAMP):  # unstamped parameters, and stamped ones that would skip the budget
        smuggled = _result(stamp)
        smuggled.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
        with pytest.raises(UnsafeJobError, match="return code EXECUTION_EXCEPTION carries data"):
            gate.process(smuggled, _ctx(site, "job-a"))
    metrics = FLModelUtils.to_shareable(FLModel(metrics={"enc.w": 0.25}))  # data of any kind
    metrics.set_return_code(ReturnCode.TASK_ABORTED)
    with pytest.raises(UnsafeJobError, match="carries data"):
        gate.process(metrics, _ctx(site, "job-a"))
    beside = make_reply(ReturnCode.EXECUTION_EXCEPTION)  # content next to the DXO, not in it
    beside["weights"] = _params()
    with pytest.raises(UnsafeJobError, match=r"content outside its DXO \(\['weights'\]\)"):
        gate.process(beside, _ctx(site, "job-a"))
    stamped = _result()  # the same smuggling beside a well-stamped result
    stamped["raw_update"] = _params()
    with pytest.raises(UnsafeJobError, match="content outside its DXO"):
        gate.process(stamped, _ctx(site, "job-a"))
    assert not ledger_path(site.get_root_dir()).exists()  # nothing was released, nothing charged
    empty = make_reply(ReturnCode.EXECUTION_EXCEPTION)  # an empty error reply still goes out
    assert gate.process(empty, _ctx(site, "job-a")).get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _rewrite(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("corrupt, problem", [
    (_truncate, "is not valid JSON"),
    (lambda p: p.write_bytes(b""), "is not valid JSON"),
    (lambda p: p.write_bytes(b"\xff\xfe garbage"), "is not valid JSON"),
    (lambda p: p.write_text("[]"), "is not a fedoap-privacy-ledger version 1 file"),
    (lambda p: _rewrite(p, lambda r: r.update(version=2)), "is not a fedoap-privacy-ledger version 1 file"),
    (lambda p: _rewrite(p, lambda r: r.update(releases={})), "has no list of releases"),
    (lambda p: _rewrite(p, lambda r: r["releases"][0].update(noise_multiplier=-1.0)), "release 0 is not a valid"),
    (lambda p: _rewrite(p, lambda r: r["releases"][1].update(noise_multiplier=float("nan"))), "release 1 is not"),
    (lambda p: _rewrite(p, lambda r: r["releases"][1].pop("steps")), "release 1 must have exactly the keys"),
    (lambda p: _rewrite(p, lambda r: r["releases"][0].update(unit="pixel")), "release 0 has an unknown unit 'pixel'"),
    (lambda p: os.chmod(p, 0o644), "has mode 0644, not owner-only"),
    (lambda p: (p.unlink(), p.mkdir()), "is not a regular file"),
])
def test_a_corrupt_or_truncated_ledger_fails_closed(tmp_path, corrupt, problem):
    site = _site(tmp_path)
    gate, announce = _gate(total_epsilon=20.0), _gate(FilterChainType.TASK_DATA_CHAIN, total_epsilon=20.0)
    for _ in range(2):
        gate.process(_result(), _ctx(site, "job-a"))
    path = ledger_path(site.get_root_dir())
    corrupt(path)
    after = path.read_bytes() if path.is_file() else None
    for filt, message in ((gate, _result()), (announce, _task())):
        with pytest.raises(UnsafeJobError, match=f"privacy ledger {path}: {problem}.*never reset to zero"):
            filt.process(message, _ctx(site, "job-b"))
    with pytest.raises(LedgerCorruptError, match=str(path)):
        _ledger(site).spent(None, "site", DELTA)
    assert (path.read_bytes() if path.is_file() else None) == after  # left as found for a person to restore


def test_the_ledger_file_is_owner_only_and_replaced_atomically(tmp_path):
    site = _site(tmp_path)
    old_umask = os.umask(0)  # the most permissive umask a site process could have
    try:
        for _ in range(3):
            _gate(total_epsilon=20.0).process(_result(), _ctx(site, "job-a"))
    finally:
        os.umask(old_umask)
    path = ledger_path(site.get_root_dir())
    for f in (path, path.with_name(path.name + ".lock")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]  # no temp file left
    assert len(json.loads(path.read_text())["releases"]) == 3


def _charge_until_refused(root: str, job_id: str, budget: float, start, counts) -> None:
    """One job process of a site: release updates through the real filter until the budget refuses one."""
    gate = _gate(total_epsilon=budget)
    ctx = _ctx(Workspace(root, "brain"), job_id)
    start.wait()
    released = 0
    try:
        while released < 1000:
            gate.process(_result(), ctx)
            released += 1
    except UnsafeJobError as err:
        assert "budget" in str(err), err
    counts[job_id] = released


def test_two_jobs_charging_at_the_same_time_never_exceed_the_budget(tmp_path):
    site = _site(tmp_path)
    budget = 30.0
    fits = _most_releases(1.0, budget)
    context = multiprocessing.get_context("fork")  # the filter, the ledger and Opacus already imported
    with context.Manager() as manager:
        counts = manager.dict()
        start = context.Barrier(2)
        jobs = [context.Process(target=_charge_until_refused, args=(str(tmp_path), job, budget, start, counts))
                for job in ("job-a", "job-b")]
        for p in jobs:
            p.start()
        for p in jobs:
            p.join(timeout=300)
        assert [p.exitcode for p in jobs] == [0, 0]
        counts = dict(counts)
    ledger = _ledger(site)
    assert sum(counts.values()) == len(ledger.entries()) == fits  # no release lost, none beyond the budget
    assert all(counts.values()), counts  # both ran concurrently
    assert ledger.spent(None, "site", DELTA) <= budget
    assert {e["job_id"] for e in ledger.entries()} == {"job-a", "job-b"}


def test_recorded_epsilon_equals_opacus_accountant_for_the_same_history(tmp_path):
    site = _site(tmp_path)
    ledger = _ledger(site)
    history = [("job-a", 1.0, 0.05, 40), ("job-a", 1.0, 0.05, 40), ("job-b", 1.3, 0.1, 25),
               ("job-b", 0.8, 0.02, 100), ("job-c", 1.0, 0.05, 40)]
    reference, update_reference = RDPAccountant(), UpdateDPAccountant(1.0)
    gate = _gate(noise_multiplier=0.5)  # no budget: releases are recorded, not limited
    for job, sigma, q, k in history:
        stamp = {**STAMP, "noise_multiplier": 1.0,
                 "dp_sgd": {"noise_multiplier": sigma, "sample_rate": q, "steps": k, "unit": "case"}}
        gate.process(_result(stamp), _ctx(site, job, scope="research" if job == "job-b" else "strict"))
        for _ in range(k):  # Opacus's own bookkeeping: one step() per optimizer step
            reference.step(noise_multiplier=sigma, sample_rate=q)
        update_reference.step()
        assert ledger.spent(None, "site", DELTA) == pytest.approx(update_reference.epsilon(DELTA), rel=1e-12)
    for delta in (1e-5, 1e-3):  # across rounds, jobs and scopes
        assert ledger.spent(None, "case", delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    # per scope: only that scope's releases; the budget check composes every scope
    strict_only = RDPAccountant()
    for job, sigma, q, k in history:
        if job != "job-b":
            strict_only.history.append((sigma, q, k))
    assert ledger.spent("strict", "case", DELTA) == pytest.approx(strict_only.get_epsilon(DELTA), rel=1e-12)
    assert ledger.spent("strict", "case", DELTA) < ledger.spent(None, "case", DELTA)
    # would_spend is what spent becomes after the release, and charging it enforces exactly that number
    extra = Release(1.0, 0.05, 40)
    after = ledger.would_spend(None, "case", DELTA, extra)
    with pytest.raises(BudgetExceededError) as refused:
        ledger.charge("strict", DELTA, "job-d", [Charge("case", extra, budget=after * (1 - 1e-9))])
    assert refused.value.would_be == pytest.approx(after, rel=1e-12) and isinstance(refused.value, ValueError)
    assert ledger.charge("strict", DELTA, "job-d", [Charge("case", extra, budget=after)]) == {"case": after}
    assert ledger.spent(None, "case", DELTA) == pytest.approx(after, rel=1e-12)
    assert math.isinf(epsilon_of([Release(0.0, 1.0, 1)], DELTA)) and epsilon_of([], DELTA) == 0.0


def test_ledger_arguments_are_checked():
    with pytest.raises(ValueError, match="noise_multiplier"):
        Release(-1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        Release(1.0, 0.0)
    with pytest.raises(ValueError, match="steps"):
        Release(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="unit must be one of"):
        Charge("pixel", Release(1.0))
    with pytest.raises(ValueError, match="budget"):
        Charge("site", Release(1.0), budget=float("inf"))
    with pytest.raises(ValueError, match="delta"):
        epsilon_of([Release(1.0)], 1.0)
