"""FedOAPRecipe exports a job whose configs rebuild exactly our components (arguments stored unchanged), with the run
configuration as one file of the job."""

import json

from fedoap.config import RUN_CONFIG_FILE, RunConfig
from fedoap.deploy.recipe import FedOAPRecipe
from fedoap.networks import FedOAPNet

import pytest

MODEL_ARGS = {"channels": [4, 8, 16, 32], "bottleneck_channels": 64}  # width 4


def _config(**options) -> RunConfig:
    return RunConfig.from_options(width=4, **options)


@pytest.mark.parametrize("partition", ["authors", "kv_only"])
def test_export_keeps_controller_model_and_run_config(tmp_path, partition):
    config = _config(rounds=3, image_size=32, finetune_epochs=2, seed=1, method_args={"partition": partition,
                                                                                        "use_pbl": True},
                     data_root="/data/sites", unseen_dir="/data/lung")
    recipe = FedOAPRecipe(name="fedoap-export", min_clients=2, config=config)
    assert recipe.config is config  # stored unchanged
    recipe.export(str(tmp_path))
    app = tmp_path / "fedoap-export" / "app" / "config"
    server = json.loads((app / "config_fed_server.json").read_text())
    client = json.loads((app / "config_fed_client.json").read_text())

    (controller,) = server["workflows"]
    assert controller["path"] == "fedoap.server.controller.SharedParamsFedAvg"
    expected_shared = FedOAPNet(**MODEL_ARGS, partition=partition).shared_keys
    assert controller["args"]["shared_keys"] == expected_shared == recipe.shared_keys
    assert controller["args"]["num_rounds"] == 3 and controller["args"]["min_clients"] == 2
    assert controller["args"]["method"] == "fedoap"
    assert controller["args"]["method_args"] == {"partition": partition, "use_pbl": True}

    (persistor,) = [c for c in server["components"] if c["id"] == "persistor"]
    model = persistor["args"]["model"]
    assert model["path"] == "fedoap.networks.fedoap_net.FedOAPNet"
    assert model["args"]["channels"] == MODEL_ARGS["channels"]
    assert model["args"].get("partition", "authors") == partition

    (executor,) = client["executors"]
    assert executor["executor"] == {"path": "fedoap.site.executor.FedOAPExecutor", "args": {}}  # no script arguments
    parsed = RunConfig.load(app / RUN_CONFIG_FILE)  # what every site reads, once
    assert parsed == config
    assert parsed.data.data_root == "/data/sites" and parsed.data.unseen_dir == "/data/lung"
    assert parsed.training.model_args() == MODEL_ARGS
    assert parsed.method.args == {"partition": partition, "use_pbl": True}
    assert (parsed.training.image_size, parsed.training.finetune_epochs, parsed.training.seed) == (32, 2, 1)


def test_paths_with_whitespace_travel_unchanged(tmp_path):
    """The configuration is a file, not an argument string split on whitespace (which used to refuse such paths)."""
    config = _config(data_root="/my data", unseen_dir="/my data/lung")
    FedOAPRecipe(name="spaces", min_clients=1, config=config).export(str(tmp_path))
    assert RunConfig.load(tmp_path / "spaces" / "app" / "config" / RUN_CONFIG_FILE).data.data_root == "/my data"


def test_he_is_refused_at_job_creation_for_a_rule_that_needs_plaintext(monkeypatch):
    from fedoap.methods import METHODS, FedAvg
    from fedoap.server.rules import FedNovaRule

    class CoordinateMedian(FedNovaRule):  # a rule that is not a weighted sum
        name = "coordinate_median"

    class MedianAvg(FedAvg):
        name = "median-test"
        server_rule = CoordinateMedian

    monkeypatch.setitem(METHODS, MedianAvg.name, MedianAvg)
    with pytest.raises(ValueError, match="coordinate_median.*needs plaintext"):
        FedOAPRecipe(min_clients=2, config=_config(method="median-test", he=True))
    # a rule that is not a rule object is refused as well (a rule nobody implements used to be averaged silently)

    class Unknown(FedAvg):
        name = "unknown-rule-test"
        server_rule = "coordinate_median"

    monkeypatch.setitem(METHODS, Unknown.name, Unknown)
    with pytest.raises(ValueError, match="server_rule must be a ServerRule class.*'coordinate_median'"):
        FedOAPRecipe(min_clients=2, config=_config(method="unknown-rule-test"))


def test_unknown_dp_option_is_refused():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dp_sgd_sigma'\]"):
        FedOAPRecipe(min_clients=2, config=_config(dp_sgd_sigma=1.0))


def test_local_only_exports_an_empty_shared_set_under_the_rule_none(tmp_path):
    from fedoap.methods import get_method

    recipe = FedOAPRecipe(name="local-export", min_clients=2, config=_config(method="local", data_root="/d"))
    recipe.export(str(tmp_path))
    server = json.loads((tmp_path / "local-export" / "app" / "config" / "config_fed_server.json").read_text())
    (controller,) = server["workflows"]
    assert controller["args"]["shared_keys"] == [] and controller["args"]["method"] == "local"
    assert get_method("local").server_rule.name == "none"  # the controller takes the rule from the method


def test_a_method_that_shares_nothing_refuses_he_and_update_dp():
    with pytest.raises(ValueError, match=r"'local' shares nothing \(server rule 'none'\)"):
        FedOAPRecipe(min_clients=2, config=_config(method="local", he=True))
    with pytest.raises(ValueError, match="shares nothing"):
        FedOAPRecipe(min_clients=2, config=_config(method="local", dp_update_clip=1.0, dp_update_noise=1.0))
    FedOAPRecipe(min_clients=2, config=_config(method="local", dp_sgd_noise=1.0))  # DP-SGD protects the personal model


def test_dp_sgd_is_refused_at_job_creation_for_a_method_with_a_regularizer():
    with pytest.raises(ValueError, match="'fedprox' adds a regularizer"):
        FedOAPRecipe(min_clients=2, config=_config(method="fedprox", dp_sgd_epsilon=3.0, dp_sgd_clip=1.0))
    FedOAPRecipe(min_clients=2, config=_config(method="fedprox", dp_update_clip=1.0, dp_update_noise=1.0))  # fine
    FedOAPRecipe(min_clients=2, config=_config(method="fedprox", method_args={"mu": 0.0},
                                               dp_sgd_noise=1.0))  # mu = 0: no term


def test_task_request_interval_reaches_the_server_config(tmp_path):
    recipe = FedOAPRecipe(name="fast-poll", min_clients=2, config=_config(), task_request_interval=0.2)
    recipe.export(str(tmp_path))
    server = json.loads((tmp_path / "fast-poll" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["server"]["task_request_interval"] == 0.2


def test_the_network_is_built_once_with_the_sites_seed():
    import torch

    recipe = FedOAPRecipe(min_clients=2, config=_config(seed=3))
    site_model = _config(seed=3).build_model()  # what each site builds from the same configuration
    for key, value in site_model.state_dict().items():
        assert torch.equal(recipe.network.state_dict()[key], value)


def test_with_an_initial_checkpoint_the_server_loads_tensors_without_the_network(tmp_path):
    """The simulator starts the sites only once the server runs: its persistor reads the checkpoint without building
    the network, so building the server's components (in a fresh process, from the exported config) and starting
    its run imports no MONAI, and the persistor loads the checkpoint's tensors unchanged."""
    import subprocess
    import sys

    import torch

    config = _config(seed=3)
    ckpt = tmp_path / "initial_model.pt"
    torch.save(config.build_model().state_dict(), ckpt)
    FedOAPRecipe(name="ckpt", min_clients=2, config=config, initial_ckpt=str(ckpt)).export(str(tmp_path / "jobs"))
    server = tmp_path / "jobs" / "ckpt" / "app" / "config" / "config_fed_server.json"
    (persistor,) = [c for c in json.loads(server.read_text())["components"] if c["id"] == "persistor"]
    assert persistor["args"].get("model") is None and persistor["args"]["source_ckpt_file_full_name"] == str(ckpt)
    probe = f"""
import json, sys
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.utils.class_utils import instantiate_class
config = json.load(open({str(server)!r}))
built = [instantiate_class(c["path"], c["args"]) for c in config["components"] + config["workflows"]]
persistor = [b for b, c in zip(built, config["components"]) if c["id"] == "persistor"][0]
ctx = FLContext()
ctx.set_prop(FLContextKey.APP_ROOT, {str(tmp_path / "app_server")!r}, private=True, sticky=False)
persistor.handle_event(EventType.START_RUN, ctx)  # as the server's run starts: NVFlare builds a network it was given
learnable = persistor.load_model(ctx)
assert "monai" not in sys.modules, sorted(m for m in sys.modules if m.startswith("monai"))[:3]
print(json.dumps(sorted(learnable["weights"])))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == sorted(torch.load(ckpt))
