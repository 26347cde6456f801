"""A site's mandatory client-level DP (its privacy policy): the filter announces the policy in every task, the client
script applies the stricter of the job's and the site's settings, and nothing leaves the site without a stamp at least
as strict as the policy. Real NVFlare Shareables, DXOs, FLModel conversions and NVFlare's own privacy.json parser."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import FilterChainType, FilterContextKey
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import make_reply
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.private.fed.app.fl_conf import create_privacy_manager

from fedoap.protocol import SITE_STATISTICS_KEY
from fedoap.site.policy import SiteDPPolicy, budget_from_meta, check_stamp, policy_from_meta, stamp_releases
from fedoap.protocol import SITE_DP_BUDGET_KEY, SITE_DP_POLICY_KEY
from fedoap.site.privacy import SitePrivacy, stricter
from fedoap.protocol import DP_STAMP_KEY
from fedoap.privacy.dp import UpdateDPConfig
from fedoap.privacy.ledger import Release

PRIVACY_JSON = Path(__file__).resolve().parents[1] / "poc_workspace" / "local" / "privacy.json"
POLICY = dict(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)


def _filter(chain: str, **kwargs) -> SiteDPPolicy:
    f = SiteDPPolicy(**{**POLICY, **kwargs})
    f.set_prop(FilterContextKey.CHAIN_TYPE, chain)
    return f


def _ctx(scope: str = "strict") -> FLContext:
    ctx = FLContext()
    ctx.set_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, scope, private=True, sticky=False)
    return ctx


def _result(params, meta=None, metrics=None):
    """A client's result as the Client API turns it into a Shareable."""
    return FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL, metrics=metrics,
                                             meta=dict(meta or {})))


def _update(shift: float = 0.05) -> tuple[dict, dict]:
    torch.manual_seed(0)
    glob = {"enc.w": torch.randn(16, 8), "enc.b": torch.randn(8)}
    return {k: v + shift for k, v in glob.items()}, glob


def test_task_data_filter_announces_the_policy_to_the_client_script():
    task = FLModelUtils.to_shareable(FLModel(params={"enc.w": torch.zeros(2)}, params_type=ParamsType.FULL,
                                             current_round=0, total_rounds=2))
    out = _filter(FilterChainType.TASK_DATA_CHAIN).process(task, _ctx("research"))
    received = FLModelUtils.from_shareable(out)  # what flare.receive() hands the script
    assert received.meta[SITE_DP_POLICY_KEY]["scope"] == "research"
    assert policy_from_meta(received.meta) == UpdateDPConfig(**POLICY)
    assert received.current_round == 0 and torch.equal(received.params["enc.w"], torch.zeros(2))
    assert policy_from_meta({}) is None


def test_the_client_applies_the_stricter_setting_and_its_stamp_passes_the_result_filter():
    local, glob = _update()
    job = UpdateDPConfig(clip_norm=2.0, noise_multiplier=0.5, delta=1e-4)  # weaker than the site on every count
    site = UpdateDPConfig(**POLICY)
    applied = stricter(job, site)
    assert applied == UpdateDPConfig(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    assert stricter(None, site) == site and stricter(None, None) is None
    assert stricter(UpdateDPConfig(0.5, 3.0, 1e-6), site) == UpdateDPConfig(0.5, 3.0, 1e-6)  # a stricter job wins

    gate = _filter(FilterChainType.TASK_RESULT_CHAIN)
    privacy = SitePrivacy(update_dp=applied)
    payload, metrics = privacy.outgoing(local, glob, weight=10)
    assert metrics["dp_update_clip"] == 1.0 and metrics["dp_update_noise"] == 1.0
    passed = gate.process(_result(payload, {DP_STAMP_KEY: privacy.stamp()}), _ctx())
    assert set(from_shareable(passed).data) == set(local)

    weak = SitePrivacy(update_dp=job)  # the job's own setting only: refused, nothing is released
    payload, _ = weak.outgoing(local, glob, weight=10)
    with pytest.raises(UnsafeJobError, match="clip norm 2.0 is larger"):
        gate.process(_result(payload, {DP_STAMP_KEY: weak.stamp()}), _ctx())


STAMP = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, "releases": 1}
DP_SGD = {"noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 10, "unit": "slice"}


@pytest.mark.parametrize("stamp, reason", [
    (None, "no client-level DP stamp"),
    ({**STAMP, "noise_multiplier": 0.99}, "noise multiplier 0.99 is smaller"),
    ({**STAMP, "delta": 1e-3}, "delta 0.001 is larger"),
    ({"clip_norm": 1.0}, "malformed"),
    ({**STAMP, "clip_norm": float("nan")}, "non-finite"),
    ({**STAMP, "clip_norm": "1.0"}, "must be numbers"),
    ({**STAMP, "noise_multiplier": True}, "must be numbers"),
    ({k: v for k, v in STAMP.items() if k != "releases"}, r"lacks \['releases'\]"),
    ({**STAMP, "releases": 2}, "'releases' must be 1"),
    ({**STAMP, "releases": True}, "'releases' must be 1"),
    ({**STAMP, "epsilon": 0.0}, r"unknown keys \['epsilon'\]"),
    ({**STAMP, "dp_sgd": {**DP_SGD, "unit": "pixel"}}, "DP-SGD unit 'pixel'"),
    ({**STAMP, "dp_sgd": {**DP_SGD, "sample_rate": 0.0}}, "DP-SGD sample rate 0.0"),
    ({**STAMP, "dp_sgd": {**DP_SGD, "steps": 2.0}}, "DP-SGD steps 2.0"),
    ({**STAMP, "dp_sgd": {**DP_SGD, "steps": -1}}, "DP-SGD steps -1"),
    ({**STAMP, "dp_sgd": {**DP_SGD, "noise_multiplier": float("inf")}}, "DP-SGD noise multiplier inf"),
    ({**STAMP, "dp_sgd": {k: v for k, v in DP_SGD.items() if k != "unit"}}, "must have exactly the keys"),
    ({**STAMP, "dp_sgd": [1.1, 0.1, 10]}, "must have exactly the keys"),
])
def test_result_filter_fails_closed_on_parameters_without_a_strict_enough_stamp(stamp, reason):
    local, _ = _update()
    meta = {} if stamp is None else {DP_STAMP_KEY: stamp}
    with pytest.raises(UnsafeJobError, match=reason):
        _filter(FilterChainType.TASK_RESULT_CHAIN).process(_result(local, meta), _ctx())
    strict = {"clip_norm": 0.5, "noise_multiplier": 2.0, "delta": 1e-6, "releases": 1}
    assert check_stamp(strict, UpdateDPConfig(**POLICY)) is None
    assert check_stamp({**strict, "dp_sgd": DP_SGD}, UpdateDPConfig(**POLICY)) is None
    assert stamp_releases({**strict, "dp_sgd": DP_SGD}) == {"site": Release(2.0, 1.0, 1),
                                                            "slice": Release(1.1, 0.1, 10)}
    assert stamp_releases({**strict, "dp_sgd": {**DP_SGD, "steps": 0}}) == {"site": Release(2.0, 1.0, 1)}


def test_results_that_share_nothing_pass_and_statistics_in_clear_do_not():
    gate = _filter(FilterChainType.TASK_RESULT_CHAIN)
    metrics_only = FLModelUtils.to_shareable(FLModel(metrics={"val_dice": 0.5}))
    assert from_shareable(gate.process(metrics_only, _ctx())).data_kind == DataKind.METRICS
    personalize = _result({}, metrics={"test_dice": 0.7})  # the final report: metrics, no parameters
    assert from_shareable(gate.process(personalize, _ctx())).data == {}
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)  # an empty error reply passes, an error with data does not
    assert gate.process(error, _ctx()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    empty_error = _result({})
    empty_error.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    assert gate.process(empty_error, _ctx()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION

    statistics = {SITE_STATISTICS_KEY: {"mean": [0.1]}}
    with pytest.raises(UnsafeJobError, match="statistics in clear"):
        gate.process(_result({}, statistics), _ctx())
    lenient = _filter(FilterChainType.TASK_RESULT_CHAIN, allow_statistics=True)
    assert lenient.process(_result({}, statistics), _ctx()) is not None


def test_filter_works_from_the_direction_when_no_chain_is_set_and_validates_its_arguments():
    f = SiteDPPolicy(**POLICY)
    ctx = _ctx()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.OUT, private=True, sticky=False)
    local, _ = _update()
    with pytest.raises(UnsafeJobError):
        f.process(_result(local), ctx)
    with pytest.raises(ValueError, match="noise_multiplier"):
        SiteDPPolicy(clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        SiteDPPolicy(clip_norm=0.0, noise_multiplier=1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "20", True):
        with pytest.raises(ValueError, match="total_epsilon must be"):
            SiteDPPolicy(**POLICY, total_epsilon=bad)
        with pytest.raises(ValueError, match="total_epsilon_dp_sgd must be"):
            SiteDPPolicy(**POLICY, total_epsilon_dp_sgd=bad)
    budgeted = SiteDPPolicy(**POLICY, total_epsilon=20.0, total_epsilon_dp_sgd=10)
    assert (budgeted.total_epsilon, budgeted.total_epsilon_dp_sgd) == (20.0, 10)  # verbatim: NVFlare exports them


def test_task_data_filter_announces_the_budget_and_what_is_left(tmp_path):
    f = _filter(FilterChainType.TASK_DATA_CHAIN, total_epsilon=20.0, total_epsilon_dp_sgd=10.0)
    def task():
        return FLModelUtils.to_shareable(FLModel(params={"enc.w": torch.zeros(2)}, params_type=ParamsType.FULL))

    with pytest.raises(UnsafeJobError, match="workspace is unknown"):  # a budget without a ledger: fail closed
        f.process(task(), _ctx())
    ctx = _ctx()
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(tmp_path), "brain"), private=True, sticky=False)
    budget = budget_from_meta(FLModelUtils.from_shareable(f.process(task(), ctx)).meta)
    assert budget["scope"] == "strict" and budget["delta"] == 1e-5
    assert budget["site"] == {"total_epsilon": 20.0, "spent": 0.0, "left": 20.0, "releases_left": 10}
    assert budget["slice"] == budget["case"] == {"total_epsilon": 10.0, "spent": 0.0, "left": 10.0}
    assert budget_from_meta({}) is None
    with pytest.raises(ValueError, match=SITE_DP_BUDGET_KEY):
        budget_from_meta({SITE_DP_BUDGET_KEY: {"scope": "strict", "delta": 1e-5, "site": {"spent": 1.0}}})
    unbudgeted = _filter(FilterChainType.TASK_DATA_CHAIN)  # no budget: the policy only, no ledger needed
    assert SITE_DP_BUDGET_KEY not in FLModelUtils.from_shareable(unbudgeted.process(task(), _ctx())).meta


def test_shipped_privacy_policy_holds_the_filter_in_both_chains_of_every_scope(tmp_path):
    """Parsed by NVFlare itself, as a client site does at start-up."""
    (tmp_path / "local").mkdir()
    (tmp_path / "startup").mkdir()
    shutil.copyfile(PRIVACY_JSON, tmp_path / "local" / "privacy.json")
    manager = create_privacy_manager(Workspace(str(tmp_path), "brain"), names_only=False)
    raw = json.loads(PRIVACY_JSON.read_text())
    assert manager.default_scope is not None and manager.default_scope.name == raw["default_scope"]
    assert len(manager.name_to_scopes) == len(raw["scopes"]) >= 2
    budgets = {}
    for name, scope in manager.name_to_scopes.items():
        (data_filter,) = scope.task_data_filters[FilterKey.IN]
        (result_filter,) = scope.task_result_filters[FilterKey.OUT]
        assert isinstance(data_filter, SiteDPPolicy) and isinstance(result_filter, SiteDPPolicy), name
        assert data_filter.get_prop(FilterContextKey.CHAIN_TYPE) == FilterChainType.TASK_DATA_CHAIN
        assert result_filter.get_prop(FilterContextKey.CHAIN_TYPE) == FilterChainType.TASK_RESULT_CHAIN
        assert data_filter.budget == result_filter.budget and result_filter.budget is not None  # announced == enforced
        assert (data_filter.total_epsilon, data_filter.total_epsilon_dp_sgd) == (
            result_filter.total_epsilon, result_filter.total_epsilon_dp_sgd)
        assert result_filter.total_epsilon > 0 and result_filter.total_epsilon_dp_sgd > 0, name  # every scope limits
        budgets[name] = result_filter
    assert len({f.epsilon for f in budgets.values()}) == len(raw["scopes"])  # the scopes differ in their budget
    # the POC end-to-end test runs three jobs on the same sites in the default scope, each spending at most the
    # per-job epsilon on a slice: they must fit in the lifetime budget (3 x epsilon, before composition saves)
    default = budgets[raw["default_scope"]]
    assert 3 * default.epsilon <= default.total_epsilon_dp_sgd and default.budget.unit == "slice"
    # a scope that spends more per job must not have the smaller lifetime budget (it caps the total over all scopes)
    by_epsilon = sorted(budgets.values(), key=lambda f: f.epsilon)
    assert [f.total_epsilon_dp_sgd for f in by_epsilon] == sorted(f.total_epsilon_dp_sgd for f in by_epsilon)
