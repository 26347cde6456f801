"""FedOAPRecipe exports a job whose configs rebuild exactly our components (arguments stored unchanged)."""

import json

from fedoap.site import client as client_script
from fedoap.deploy.recipe import FedOAPRecipe, client_args_string
from fedoap.networks import FedOAPNet

import pytest

MODEL_ARGS = {"channels": [4, 8, 16, 32], "bottleneck_channels": 64}


@pytest.mark.parametrize("partition", ["authors", "kv_only"])
def test_export_keeps_controller_model_and_client_arguments(tmp_path, partition):
    recipe = FedOAPRecipe(
        name="fedoap-export", min_clients=2, num_rounds=3, data_root="/data/sites", unseen_dir="/data/lung",
        method_args={"partition": partition, "use_pbl": True}, model_args=MODEL_ARGS,
        train_config={"image_size": 32, "finetune_epochs": 2, "seed": 1},
    )
    recipe.export(str(tmp_path))
    app = tmp_path / "fedoap-export" / "app" / "config"
    server = json.loads((app / "config_fed_server.json").read_text())
    client = json.loads((app / "config_fed_client.json").read_text())

    (controller,) = server["workflows"]
    assert controller["path"] == "fedoap.server.controller.SharedParamsFedAvg"
    expected_shared = FedOAPNet(**MODEL_ARGS, partition=partition).shared_keys
    assert controller["args"]["shared_keys"] == expected_shared
    assert controller["args"]["num_rounds"] == 3 and controller["args"]["min_clients"] == 2

    (persistor,) = [c for c in server["components"] if c["id"] == "persistor"]
    model = persistor["args"]["model"]
    assert model["path"] == "fedoap.networks.fedoap_net.FedOAPNet"
    assert model["args"]["channels"] == MODEL_ARGS["channels"]
    assert model["args"].get("partition", "authors") == partition

    (executor,) = client["executors"]
    script_args = executor["executor"]["args"]["task_script_args"].split()
    parsed = client_script.build_parser().parse_args(script_args)
    assert parsed.data_root == "/data/sites" and parsed.unseen_dir == "/data/lung"
    assert json.loads(parsed.model_args) == MODEL_ARGS
    assert json.loads(parsed.method_args) == {"partition": partition, "use_pbl": True}
    assert (parsed.image_size, parsed.finetune_epochs, parsed.seed) == (32, 2, 1)


def test_client_arguments_refuse_whitespace():
    with pytest.raises(ValueError, match="data_root"):
        client_args_string({"data_root": "/my data"})


def test_he_is_refused_at_job_creation_for_a_rule_that_needs_plaintext(monkeypatch):
    from fedoap.methods import METHODS, FedAvg

    class MedianAvg(FedAvg):
        name = "median-test"
        server_rule = "coordinate_median"

    monkeypatch.setitem(METHODS, MedianAvg.name, MedianAvg)
    with pytest.raises(ValueError, match="coordinate_median.*needs plaintext"):
        FedOAPRecipe(min_clients=2, data_root="/d", method="median-test", model_args=MODEL_ARGS, he=True)
    # without HE the job is still refused, by the controller: it implements only the rules it lists (a rule it does
    # not know used to be averaged silently)
    with pytest.raises(ValueError, match="server_rule must be one of.*'coordinate_median'"):
        FedOAPRecipe(min_clients=2, data_root="/d", method="median-test", model_args=MODEL_ARGS)


def test_unknown_dp_option_is_refused():
    with pytest.raises(ValueError, match="unknown dp option"):
        FedOAPRecipe(min_clients=2, data_root="/d", model_args=MODEL_ARGS, dp={"dp_sgd_sigma": 1.0})


def test_local_only_exports_an_empty_shared_set_under_the_rule_none(tmp_path):
    recipe = FedOAPRecipe(name="local-export", min_clients=2, data_root="/d", method="local", model_args=MODEL_ARGS)
    recipe.export(str(tmp_path))
    server = json.loads((tmp_path / "local-export" / "app" / "config" / "config_fed_server.json").read_text())
    (controller,) = server["workflows"]
    assert controller["args"]["shared_keys"] == [] and controller["args"]["server_rule"] == "none"


def test_a_method_that_shares_nothing_refuses_he_and_update_dp():
    with pytest.raises(ValueError, match="'none', which needs plaintext"):
        FedOAPRecipe(min_clients=2, data_root="/d", method="local", model_args=MODEL_ARGS, he=True)
    with pytest.raises(ValueError, match="shares nothing"):
        FedOAPRecipe(min_clients=2, data_root="/d", method="local", model_args=MODEL_ARGS,
                     dp={"dp_update_clip": 1.0, "dp_update_noise": 1.0})
    FedOAPRecipe(min_clients=2, data_root="/d", method="local", model_args=MODEL_ARGS,
                 dp={"dp_sgd_noise": 1.0})  # DP-SGD protects the personal model: fine


def test_dp_sgd_is_refused_at_job_creation_for_a_method_with_a_regularizer():
    with pytest.raises(ValueError, match="'fedprox' adds a regularizer"):
        FedOAPRecipe(min_clients=2, data_root="/d", method="fedprox", model_args=MODEL_ARGS,
                     dp={"dp_sgd_epsilon": 3.0, "dp_sgd_clip": 1.0})
    FedOAPRecipe(min_clients=2, data_root="/d", method="fedprox", model_args=MODEL_ARGS,
                 dp={"dp_update_clip": 1.0, "dp_update_noise": 1.0})  # client-level DP of the update: fine
    FedOAPRecipe(min_clients=2, data_root="/d", method="fedprox", method_args={"mu": 0.0}, model_args=MODEL_ARGS,
                 dp={"dp_sgd_noise": 1.0})  # mu = 0: no term


def test_task_request_interval_reaches_the_server_config(tmp_path):
    recipe = FedOAPRecipe(name="fast-poll", min_clients=2, data_root="/d", model_args=MODEL_ARGS,
                          task_request_interval=0.2)
    recipe.export(str(tmp_path))
    server = json.loads((tmp_path / "fast-poll" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["server"]["task_request_interval"] == 0.2
