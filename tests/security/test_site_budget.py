"""A site's privacy policy as a budget (epsilon per job): the job derives its mechanism and noise from it, a job that
cannot meet it usefully is refused (at deployment and when it starts), and no job spends more than the budget.

The adversary is a job submitter: it asks for client-level DP with 2 sites (noise as large as the signal), for no DP
at all, for DP-SGD of a weaker unit, or for more rounds than the budget pays for. Everything is real: Opacus's
accountant as the reference, the site's ``SiteDPPolicy`` driven with NVFlare ``Shareable``/``FLContext``/``Workspace``
objects and the ledger on disk, NVFlare's own parser of ``privacy.json``, and real site sessions that train.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import FilterChainType, FilterContextKey
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.private.fed.app.fl_conf import create_privacy_manager

from fedoap.config import RUN_CONFIG_FILE, RunConfig
from fedoap.data import generate_site
from fedoap.privacy.at_rest import create_key, site_key_path
from fedoap.privacy.budget import (BudgetRefusal, DPBudget, JobShape, gaussian_epsilon, gaussian_noise_for,
                                   plan_mechanism)
from fedoap.privacy.dp import update_dp_epsilon
from fedoap.privacy.ledger import PrivacyLedger, Release, epsilon_of, ledger_path
from fedoap.protocol import DP_STAMP_KEY, SITE_DP_POLICY_KEY, TRAIN_TASK
from fedoap.site.app_validator import FedOAPAppValidator, site_budgets
from fedoap.site.policy import SiteDPPolicy, policy_from_meta
from fedoap.site.session import SiteSession

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5


def _site(tmp_path: Path) -> Workspace:
    (tmp_path / "startup").mkdir(parents=True, exist_ok=True)
    (tmp_path / "local").mkdir(exist_ok=True)
    return Workspace(str(tmp_path), "brain")


def _ctx(workspace: Workspace, job_id: str) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, "strict", private=True, sticky=False)
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, workspace, private=True, sticky=False)
    ctx.set_prop(FLContextKey.CURRENT_RUN, job_id, private=False, sticky=False)
    return ctx


def _gate(chain: str = FilterChainType.TASK_RESULT_CHAIN, **kwargs) -> SiteDPPolicy:
    f = SiteDPPolicy(**{"epsilon": 4.0, "delta": DELTA, "unit": "slice", **kwargs})
    f.set_prop(FilterContextKey.CHAIN_TYPE, chain)
    return f


def _result(stamp):
    meta = {} if stamp is None else {DP_STAMP_KEY: stamp}
    return FLModelUtils.to_shareable(FLModel(params={"enc.w": [[0.25, 0.5]]}, params_type=ParamsType.FULL,
                                             metrics={"val_dice": 0.5}, meta=meta))


def _dp_sgd_stamp(sigma=2.0, rate=0.1, steps=10, unit="slice"):
    return {"releases": 1, "dp_sgd": {"noise_multiplier": sigma, "sample_rate": rate, "steps": steps, "unit": unit}}


# -- the mechanism a budget derives ------------------------------------------------------------------------------------
def test_the_derived_noise_spends_the_budget_by_opacus_accountant():
    budget = DPBudget(epsilon=8.0, delta=DELTA, unit="slice")
    client = plan_mechanism(budget, JobShape(rounds=12, local_epochs=2, batch_size=64, sites=40))
    assert client.kind == "client" and client.mean_noise == pytest.approx(client.noise_multiplier / 40)
    spent = update_dp_epsilon(client.noise_multiplier, 12, DELTA)
    assert 7.9 <= spent <= 8.0  # Opacus's calibration: within its 0.01 tolerance below the target
    sgd = plan_mechanism(budget, JobShape(rounds=12, local_epochs=2, batch_size=64, sites=3, units=204))
    assert (sgd.kind, sgd.unit, sgd.sample_rate, sgd.steps) == ("dp_sgd", "slice", 0.25, 96)
    assert sgd.mean_noise == pytest.approx(sgd.noise_multiplier / 51)  # int(204 * 0.25) expected per batch
    assert 7.9 <= epsilon_of([Release(sgd.noise_multiplier, sgd.sample_rate, sgd.steps)], DELTA) <= 8.0


@pytest.mark.parametrize("sigma, releases", [(0.5, 3), (1.0, 3), (2.21, 12), (5.0, 100)])
def test_the_torch_free_calibration_equals_opacus_accountant(sigma, releases):
    """What a site's parent process computes at deployment (numpy only) is Opacus's RDP accountant's epsilon."""
    assert gaussian_epsilon(sigma, releases, DELTA) == pytest.approx(update_dp_epsilon(sigma, releases, DELTA),
                                                                     rel=1e-12)
    noise = gaussian_noise_for(8.0, releases, DELTA)
    assert 7.99 <= update_dp_epsilon(noise, releases, DELTA) <= 8.0


def test_client_level_dp_with_two_sites_is_refused_with_the_reason():
    shape = JobShape(rounds=12, local_epochs=2, batch_size=64, sites=2)
    with pytest.raises(BudgetRefusal, match=r"client-level DP at epsilon 8 over 12 rounds needs sigma 2\.2.*"
                                            r"on the mean of 2 site\(s\), above the site's limit 0\.1"):
        plan_mechanism(DPBudget(epsilon=8.0, unit="site"), shape)
    # a case or slice budget falls back to DP-SGD, unless the method cannot run it
    assert plan_mechanism(DPBudget(epsilon=8.0, unit="case"), shape).kind == "dp_sgd"
    with pytest.raises(BudgetRefusal, match="DP-SGD per case is impossible: method 'ditto' adds a regularizer"):
        plan_mechanism(DPBudget(epsilon=8.0, unit="case"),
                       JobShape(12, 2, 64, 2, dp_sgd_conflict="method 'ditto' adds a regularizer"))
    # DP-SGD per patient with 17 patients: each step averages 17 gradients, too few for epsilon 8
    with pytest.raises(BudgetRefusal, match=r"DP-SGD per case, sigma .* on the mean gradient\) is above the limit"):
        plan_mechanism(DPBudget(epsilon=8.0, unit="case"), JobShape(12, 2, 64, 2, units=17))
    for bad, match in (({"epsilon": 0.0}, "epsilon"), ({"epsilon": 8.0, "unit": "hospital"}, "unit"),
                       ({"epsilon": 8.0, "delta": 1.0}, "delta"), ({"epsilon": 8.0, "max_mean_noise": -1}, "max_")):
        with pytest.raises(ValueError, match=match):
            DPBudget(**bad)


# -- the result filter under a budget --------------------------------------------------------------------------------
def test_no_job_spends_more_than_the_budget_per_job(tmp_path):
    site, gate = _site(tmp_path), _gate(epsilon=2.0)
    ledger = PrivacyLedger(ledger_path(site.get_root_dir()))
    release = Release(2.0, 0.1, 10)
    fits = 0
    while epsilon_of([Release(2.0, 0.1, 10 * (fits + 1))], DELTA) <= 2.0:
        fits += 1
    assert fits >= 2
    for _ in range(fits):  # the rounds the budget pays for pass, untouched
        out = gate.process(_result(_dp_sgd_stamp()), _ctx(site, "job-a"))
        assert from_shareable(out).data["enc.w"] == [[0.25, 0.5]]
    with pytest.raises(UnsafeJobError,
                       match=r"budget of scope 'strict' for unit 'slice' per job exceeded: the budget is epsilon 2 "):
        gate.process(_result(_dp_sgd_stamp()), _ctx(site, "job-a"))  # one round more than the budget pays for
    assert len(ledger.entries()) == fits  # the refused release is not recorded
    assert ledger.spent(None, "slice", DELTA) == pytest.approx(epsilon_of([release] * fits, DELTA))
    gate.process(_result(_dp_sgd_stamp()), _ctx(site, "job-b"))  # the next job has its own budget
    assert [e["job_id"] for e in ledger.entries()][-1] == "job-b"


@pytest.mark.parametrize("stamp, reason", [
    (None, "no DP stamp"),
    ({"releases": 1}, "no DP that protects a case"),  # asks for no DP at all
    (_dp_sgd_stamp(unit="slice"), "no DP that protects a case"),  # a slice does not protect a patient's slices
    ({"clip_norm": 1.0, "noise_multiplier": 0.0, "delta": DELTA, "releases": 1}, "no DP that protects a case"),
    ({"clip_norm": 1.0, "releases": 1}, "malformed DP stamp"),
    ({**_dp_sgd_stamp(unit="case"), "releases": 2}, "'releases' must be 1"),
    ({"clip_norm": 1.0, "noise_multiplier": 9.0, "delta": 1e-3, "releases": 1}, "delta 0.001 is larger"),
])
def test_a_result_without_dp_protecting_the_budget_unit_is_refused(tmp_path, stamp, reason):
    site = _site(tmp_path)
    with pytest.raises(UnsafeJobError, match=reason):
        _gate(unit="case").process(_result(stamp), _ctx(site, "job-a"))
    assert not PrivacyLedger(ledger_path(site.get_root_dir())).entries()


def test_a_case_level_or_client_level_release_meets_a_case_budget(tmp_path):
    site, gate = _site(tmp_path), _gate(unit="case")
    gate.process(_result(_dp_sgd_stamp(unit="case")), _ctx(site, "job-a"))
    gate.process(_result({"clip_norm": 1.0, "noise_multiplier": 3.0, "delta": DELTA, "releases": 1}),
                 _ctx(site, "job-b"))
    assert [e["unit"] for e in PrivacyLedger(ledger_path(site.get_root_dir())).entries()] == ["case", "site"]


def test_the_budget_travels_to_the_client_script_and_back():
    announced = _gate(FilterChainType.TASK_DATA_CHAIN, unit="case", max_mean_noise=0.05).announcement("strict")
    budget = policy_from_meta({SITE_DP_POLICY_KEY: announced})
    assert budget == DPBudget(epsilon=4.0, delta=DELTA, unit="case", clip_norm=1.0, max_mean_noise=0.05)
    for bad in ({"noise_multiplier": 1.0, "epsilon": 8.0}, {}, {"epsilon": 8.0, "unit": "hospital"}):
        with pytest.raises(ValueError):
            SiteDPPolicy(**bad)


# -- refused at deployment ---------------------------------------------------------------------------------------------
def _workspace(tmp_path: Path, scopes: dict, **options) -> Path:
    """A site's workspace as NVFlare deploys a job into it: ``local/privacy.json`` with these scopes (SiteDPPolicy in
    both chains) and the shipped FedOAP job's app at ``<job id>/app_brain`` with ``options`` in its run config."""
    policy = {"scopes": [{"name": name, **{chain: [{"path": "fedoap.site.policy.SiteDPPolicy", "args": args}]
                                           for chain in ("task_data_filters", "task_result_filters")}}
                         for name, args in scopes.items()], "default_scope": next(iter(scopes))}
    site = _site(tmp_path)
    (tmp_path / "local" / "privacy.json").write_text(json.dumps(policy))
    create_privacy_manager(site, names_only=False)  # NVFlare itself accepts the policy
    app = tmp_path / "job-1" / "app_brain"
    shutil.copytree(ROOT / "jobs" / "fedoap" / "app", app)
    RunConfig.from_options(rounds=12, **options).save(app / "config" / RUN_CONFIG_FILE)
    return app


def test_deployment_refuses_a_job_no_scope_can_run_usefully(tmp_path):
    site_only = {"strict": {"epsilon": 8.0, "unit": "site"}, "research": {"epsilon": 16.0, "unit": "site"}}
    reason, _ = FedOAPAppValidator().validate(str(_workspace(tmp_path / "a", site_only, min_responses=2)))
    assert reason.startswith("fedoap site policy: no privacy scope of this site can run the job within its budget")
    assert "scope 'strict': client-level DP at epsilon 8 over 12 rounds" in reason and "scope 'research'" in reason
    accepted = [  # 60 sites average the noise; the job may pick a floor scope; a slice budget falls back to DP-SGD
        _workspace(tmp_path / "b", site_only, min_responses=60),
        _workspace(tmp_path / "c", {**site_only, "floor": {"noise_multiplier": 1.0}}, min_responses=2),
        _workspace(tmp_path / "d", {"strict": {"epsilon": 8.0, "unit": "slice"}}, min_responses=2)]
    for app in accepted:
        assert FedOAPAppValidator().validate(str(app)) == ("", {})
    assert site_budgets(str(ROOT / "poc_workspace" / "local" / "privacy.json")) == {
        "strict": [DPBudget(8.0, 1e-5, "slice")] * 2, "research": [DPBudget(16.0, 1e-5, "slice")] * 2}
    bad = _workspace(tmp_path / "e", {"strict": {"epsilon": 8.0}})
    (tmp_path / "e" / "local" / "privacy.json").write_text(json.dumps({"scopes": [{"name": "strict",
        "task_result_filters": [{"path": "fedoap.site.policy.SiteDPPolicy", "args": {"epsilon": 8.0,
                                                                                   "unit": "hospital"}}]}]}))
    assert "scope 'strict': unit must be one of" in FedOAPAppValidator().validate(str(bad))[0]  # fails closed


# -- a real site session meets the budget ------------------------------------------------------------------------------
def test_a_session_switches_dp_sgd_on_at_the_budget_and_its_stamp_passes(tmp_path):
    generate_site(tmp_path / "data" / "brain", "brain", n_cases=4, seed=0, size=32)
    site = _site(tmp_path / "ws")
    create_key(site_key_path(tmp_path / "ws"))
    config = RunConfig.from_options(rounds=2, local_epochs=1, finetune_epochs=0, image_size=32, width=4,
                                    batch_size=4, dp_sgd_batch_size=8, method="fedavg",
                                    data_root=str(tmp_path / "data"))
    session = SiteSession(config, "brain", tmp_path / "ws", "job-a")
    assert session.trainer.dp is None  # the job asks for no DP
    announce = _gate(FilterChainType.TASK_DATA_CHAIN, epsilon=8.0, max_mean_noise=0.5)
    task = FLModelUtils.from_shareable(announce.process(FLModelUtils.to_shareable(FLModel(
        params=session.trainer.shared_params(), params_type=ParamsType.FULL)), _ctx(site, "job-a")))
    reply = session.handle(TRAIN_TASK, task.params, task.meta, 0)
    dp = session.trainer.dp
    assert dp is not None and dp.unit == "slice" and dp.batch_size == 8
    planned = epsilon_of([Release(dp.noise_multiplier, dp.sample_rate, 2 * dp.steps_per_epoch)], DELTA)
    assert 7.9 <= planned <= 8.0  # the whole job spends the budget, not more
    assert reply.meta[DP_STAMP_KEY]["dp_sgd"]["unit"] == "slice" and "noise_multiplier" not in reply.meta[
        DP_STAMP_KEY]
    gate = _gate(epsilon=8.0, max_mean_noise=0.5)
    gate.process(FLModelUtils.to_shareable(FLModel(params=reply.params, params_type=ParamsType.FULL,
                                                   meta=reply.meta)), _ctx(site, "job-a"))
    assert PrivacyLedger(ledger_path(site.get_root_dir())).entries()[0]["unit"] == "slice"
    # a site budget the job cannot meet usefully stops the job at its first task, with the reason
    strict = SiteSession(config, "brain", tmp_path / "ws", "job-b")
    meta = {SITE_DP_POLICY_KEY: _gate(epsilon=8.0, unit="site").announcement("strict")}
    with pytest.raises(BudgetRefusal, match="client-level DP at epsilon 8 over 2 rounds"):
        strict.handle(TRAIN_TASK, task.params, meta, 0)
