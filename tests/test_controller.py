"""The shared-parameters controller in a real NVFlare simulator run, with scripted sites that misbehave."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.job_config.script_runner import ScriptRunner

from fedoap.server.controller import SharedParamsFedAvg

from fedoap.protocol import HISTORY_FILE

SCRIPT = Path(__file__).parent / "scripts" / "scripted_client.py"
SITES = ["good-1", "good-3", "nan", "shape", "liar", "garbage"]
#: one machine: sites ask for their next task every 0.2 s instead of NVFlare's 2 s
FAST_POLLING = {"server": {"task_request_interval": 0.2}}


def fed_job(**kwargs) -> BaseFedJob:
    """A job whose components' packages are named, not copied into it: fedoap and torch are installed where the job
    runs (``set_app_packages``, as the recipe declares fedoap). Otherwise NVFlare's export treats the initial model's
    ``torch.nn.Linear`` as custom code and parses every module torch imports: about 50 s per job on 2 cores."""
    job = BaseFedJob(**kwargs)
    job.set_app_packages(["fedoap", "torch"])
    return job


def test_controller_averages_shared_keys_drops_and_rejects(tmp_path):
    job = fed_job(name="ctl", initial_model=torch.nn.Linear(4, 2), min_clients=len(SITES))
    job.to_server(SharedParamsFedAvg(num_rounds=2, min_clients=len(SITES), shared_keys=["weight"], method="fedavg"))
    job.to_clients(ScriptRunner(script=str(SCRIPT)))
    job.to_server(FAST_POLLING)
    job.simulator_run(str(tmp_path / "ws"), clients=SITES, threads=len(SITES))

    server = tmp_path / "ws" / "server" / "simulate_job"
    history = json.loads((server / HISTORY_FILE).read_text())
    assert len(history["rounds"]) == 2
    for record in history["rounds"]:
        sites = record["sites"]
        assert record["accepted"] == 2
        assert sites["good-3"]["dropped_keys"] == ["bias"]
        assert "NaN or Inf" in sites["nan"]["rejected"]
        assert "has shape (4, 2), expected (2, 4)" in sites["shape"]["rejected"]
        assert "rejected" in sites["liar"]  # its 1e308 samples: no claim makes a site the global model
        assert "rejected" in sites["garbage"] and sites["garbage"].get("n_samples") != 7  # no field overwritten
        assert sites["good-1"]["bytes_uploaded"] == 2 * 4 * 4 + 4  # the float32 weight, and its one statistic
        assert "statistics_ignored" in sites["good-1"]  # FedAvg uses no site statistics
    assert history["status"] == "completed"
    assert set(history["personalized"]) == set(SITES)
    # statistics reach the other sites only for a method that uses them (FedRDN, FedDP): never for FedAvg
    assert all(m["statistics_seen"] == 0 for m in history["personalized"].values())

    saved = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    # (1 * 1 + 3 * 3) / (1 + 3): only the two valid updates, weighted by their sample counts (not the liar's 1000)
    np.testing.assert_allclose(np.asarray(saved["weight"]), np.full((2, 4), 2.5), rtol=1e-6)
    # the non-shared key 'bias' that good-3 sent (99.0) never reached the global model
    assert np.abs(np.asarray(saved["bias"])).max() < 1.0


def test_controller_with_nothing_shared_only_paces_the_rounds(tmp_path):
    sites = ["good-1", "good-3"]
    job = fed_job(name="ctl-none", initial_model=torch.nn.Linear(4, 2), min_clients=len(sites))
    job.to_server(SharedParamsFedAvg(num_rounds=2, min_clients=len(sites), shared_keys=[], method="local"))
    job.to_clients(ScriptRunner(script=str(SCRIPT)))
    job.to_server(FAST_POLLING)
    job.simulator_run(str(tmp_path / "ws"), clients=sites, threads=len(sites))

    server = tmp_path / "ws" / "server" / "simulate_job"
    history = json.loads((server / HISTORY_FILE).read_text())
    assert history["server_rule"] == "none" and history["n_shared_keys"] == 0
    assert len(history["rounds"]) == 2
    for record in history["rounds"]:
        assert record["accepted"] == 0
        assert record["sites"]["good-1"]["bytes_uploaded"] == 4  # no parameter: only its one statistic
        assert record["sites"]["good-1"]["train_loss"] == pytest.approx(0.2)
        assert record["sites"]["good-3"]["dropped_keys"] == ["bias"]  # sent anyway: dropped, never stored
    assert set(history["personalized"]) == set(sites)
    assert not (server / "app_server" / "FL_global_model.pt").exists()  # nothing aggregated, nothing saved


def test_controller_fednova_normalizes_by_the_reported_steps(tmp_path):
    initial = torch.nn.Linear(4, 2)
    torch.nn.init.zeros_(initial.weight)
    ckpt = tmp_path / "zeros.pt"  # the persistor would re-initialize the model: start from a checkpoint instead
    torch.save(initial.state_dict(), ckpt)
    persistor = PTFileModelPersistor(model=torch.nn.Linear(4, 2), source_ckpt_file_full_name=str(ckpt))
    job = fed_job(name="ctl-nova", initial_model=initial, min_clients=len(SITES), model_persistor=persistor)
    job.to_server(SharedParamsFedAvg(num_rounds=2, min_clients=len(SITES), shared_keys=["weight"], method="fednova"))
    job.to_clients(ScriptRunner(script=str(SCRIPT)))
    job.to_server(FAST_POLLING)
    job.simulator_run(str(tmp_path / "ws"), clients=SITES, threads=len(SITES))

    server = tmp_path / "ws" / "server" / "simulate_job"
    history = json.loads((server / HISTORY_FILE).read_text())
    assert history["server_rule"] == "fednova"
    for record in history["rounds"]:
        assert record["accepted"] == 2
        assert record["sites"]["good-3"]["steps"] == 3 and record["sites"]["good-3"]["n_samples"] == 3
        assert "NaN or Inf" in record["sites"]["nan"]["rejected"]
        assert "rejected" in record["sites"]["liar"]  # its 1e-12 steps would have scaled its update by 1e12
    # good-1: n = 1, tau = 1, x_1 = 1; good-3: n = 3, tau = 3, x_3 = 3; p = (1/4, 3/4), tau_eff = 1/4 + 9/4 = 2.5.
    # round 1 from x = 0: d = (-1, -1), x = 0 + 2.5 * 1 = 2.5 (as FedAvg: equal d).
    # round 2 from x = 2.5: d = (1.5, -1/6), sum p d = 0.375 - 0.125 = 0.25, x = 2.5 - 2.5 * 0.25 = 1.875
    # (FedAvg would stay at 2.5)
    saved = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    np.testing.assert_allclose(np.asarray(saved["weight"]), np.full((2, 4), 1.875), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shared_keys": ["w"], "method": "fednova", "he": True}, "'fednova' needs the global model in clear"),
        ({"shared_keys": [], "method": "fedavg"}, "shared_keys is empty"),
        ({"shared_keys": ["w"], "method": "local"}, "shares nothing, but 1 shared key"),
        ({"shared_keys": [], "method": "local", "he": True}, "nothing to encrypt"),
        ({"shared_keys": ["w"], "method": "median"}, "unknown method 'median'"),
        ({"shared_keys": ["w"], "method": "median-test"}, "server_rule must be a ServerRule class"),
        ({"shared_keys": ["w"], "method": "fedawa", "method_args": {"server_epochs": 0}}, "server_epochs"),
    ],
)
def test_the_shared_set_must_fit_the_server_rule(kwargs, message, monkeypatch):
    from fedoap.methods import METHODS, FedAvg

    class MedianAvg(FedAvg):  # a method that names a rule the way methods used to: as a string
        name = "median-test"
        server_rule = "coordinate_median"

    monkeypatch.setitem(METHODS, MedianAvg.name, MedianAvg)
    with pytest.raises(ValueError, match=message):
        SharedParamsFedAvg(num_rounds=1, min_clients=1, **kwargs)
    assert SharedParamsFedAvg(num_rounds=1, min_clients=1, shared_keys=[], method="local").shared_keys == []


def test_constructor_arguments_are_stored_verbatim_for_the_job_export():
    import inspect

    args = {"num_rounds": 3, "min_clients": 2, "shared_keys": ["w"], "method": "fedawa",
            "method_args": {"server_lr": 0.01}, "personalize": False, "he": False, "secagg": None, "persistor_id": "p",
            "task_timeout": 5, "personalize_timeout": 7, "robustness": {"min_responses": 1, "max_site_weight": 1e5}}
    controller = SharedParamsFedAvg(**args)
    assert set(inspect.signature(SharedParamsFedAvg.__init__).parameters) - {"self"} == set(args)
    assert all(getattr(controller, name) == value for name, value in args.items())


class _Result:
    """What ``send_model_and_wait`` returns, as far as the controller's intake reads it."""

    def __init__(self, site, value, meta):
        self.params = {"w": np.full(2, value, np.float32)}
        self.meta = {"client_name": site, **meta}
        self.metrics = {"train_loss": 0.1}


def test_the_reported_aggregation_weight_beats_the_sample_count_and_fednova_gets_the_steps():
    from fedoap.server.rules import FedNovaRule, WeightedMean

    controller = SharedParamsFedAvg(num_rounds=1, min_clients=2, shared_keys=["w"], method="fedavg")
    results = [_Result("a", 1.0, {"n_samples": 100, "aggregation_weight": 2, "NUM_STEPS_CURRENT_ROUND": 4}),
               _Result("b", 4.0, {"n_samples": 10, "NUM_STEPS_CURRENT_ROUND": 2})]  # no weight: n_samples
    zeros = {"w": np.zeros(2)}
    outcome = controller._intake.collect(0, WeightedMean(zeros), zeros, results)
    np.testing.assert_allclose(outcome.aggregate["w"], (2 * 1.0 + 10 * 4.0) / 12)
    record = outcome.record
    assert record["sites"]["a"]["n_samples"] == 100 and record["sites"]["a"]["aggregation_weight"] == 2
    assert record["sites"]["a"]["steps"] == 4

    nova = SharedParamsFedAvg(num_rounds=1, min_clients=2, shared_keys=["w"], method="fednova")
    outcome = nova._intake.collect(0, FedNovaRule(zeros), zeros,
                                   [_Result("a", -4.0, {"n_samples": 1, "NUM_STEPS_CURRENT_ROUND": 2}),
                                    _Result("b", -1.0, {"n_samples": 1, "NUM_STEPS_CURRENT_ROUND": 1})])
    np.testing.assert_allclose(outcome.aggregate["w"], -2.25)  # tau_eff 1.5 * mean(d = 2, 1); FedAvg: -2.5
    outcome = nova._intake.collect(0, FedNovaRule(zeros), zeros, [_Result("a", 1.0, {"n_samples": 1})])  # no steps
    assert "number of local steps" in outcome.record["sites"]["a"]["rejected"]
    assert outcome.aggregate is None
