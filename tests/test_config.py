"""The run configuration is declared once: the command line comes from it, it travels as one JSON document, and every
bad option is refused once, in one line that names the option."""

import json
from dataclasses import fields

import pytest

from fedoap.cli import build_parser
from fedoap.config import (METHOD_FLAGS, DataOptions, FederationOptions, MethodOptions, PrivacyOptions,
                           RobustnessOptions, RunConfig, TrainingOptions, cli_args, from_namespace, option_flag,
                           run_config_from_namespace)

GROUPS = (TrainingOptions, MethodOptions, PrivacyOptions, DataOptions, RobustnessOptions, FederationOptions)


def test_every_option_has_one_flag_a_help_text_and_a_default_that_passes_its_checks():
    flags = [option_flag(f) for g in GROUPS for f in fields(g) if option_flag(f)]
    assert len(flags) == len(set(flags)) and not set(flags) & set(METHOD_FLAGS)
    for group in GROUPS:
        group()  # the defaults are valid
        for f in fields(group):
            assert f.metadata["help"], f"{group.__name__}.{f.name} has no help text"
    assert all(option_flag(f) is None for f in fields(DataOptions))  # set by the simulator, never on a command line


def test_the_simulate_command_line_is_generated_from_the_options():
    """A new option is one field: simulate's parser has a flag for every option a user sets."""
    parser = build_parser("simulate")
    known = {a for action in parser._subparsers._group_actions[0].choices["simulate"]._actions
             for a in action.option_strings}
    for group in (TrainingOptions, MethodOptions, PrivacyOptions, RobustnessOptions, FederationOptions):
        for f in fields(group):
            assert option_flag(f) is None or option_flag(f) in known, option_flag(f)
    assert set(METHOD_FLAGS) <= known


def test_command_line_round_trip():
    options = {"rounds": 3, "local_epochs": 1, "image_size": 32, "width": 4, "lr": 0.01, "seed": 7,
               "method": "fednova", "method_args": {}, "dp_update_clip": 1.5, "dp_update_noise": 0.5,
               "dp_sgd_unit": "case", "dp_sgd_epsilon": 4.0}
    args = build_parser("simulate").parse_args(["simulate", *cli_args(**options), "--clients", "brain,breast",
                                                "--unseen", "none", "--cases", "brain=6,breast=9"])
    assert run_config_from_namespace(args) == RunConfig.from_options(**options)
    assert from_namespace(FederationOptions, args) == FederationOptions(clients=("brain", "breast"), unseen=None,
                                                                        cases={"brain": 6, "breast": 9})
    shortcut = build_parser("simulate").parse_args(["simulate", "--method", "fedoap", "--no-pbl", "--partition",
                                                    "kv_only"])
    assert run_config_from_namespace(shortcut).method.args == {"use_pbl": False, "partition": "kv_only"}


def test_one_json_document_round_trip(tmp_path):
    config = RunConfig.from_options(rounds=2, finetune_epochs=0, method="fedoap", method_args={"adapter": False},
                                    he=True, dp_sgd_noise=1.0, data_root="/data with spaces",
                                    unseen_dir="/data/lung")
    path = config.save(tmp_path / "fedoap_run.json")
    document = json.loads(path.read_text())
    assert list(document) == ["training", "method", "privacy", "data", "robustness"]
    assert document["method"] == {"name": "fedoap", "args": {"adapter": False}}
    assert RunConfig.load(path) == config and RunConfig.from_json(config.to_json()) == config
    assert RunConfig.load(path).method.instance is not config.method.instance  # each side builds its own method


@pytest.mark.parametrize("document, message", [
    ({"training": {"rounds": "3"}}, "--rounds must be an integer, got '3'"),
    ({"training": {"lr": True}}, "--lr must be a number"),
    ({"training": {"data_root": "/"}}, r"unknown option\(s\) \['data_root'\] in training"),
    ({"secrets": {}}, r"unknown group\(s\) \['secrets'\]"),
    ({"privacy": {"dp_sgd_sigma": 1.0}}, r"unknown option\(s\) \['dp_sgd_sigma'\] in privacy"),
    ({"data": {"pool_sites": "a,b"}}, "pool_sites must be a list of names"),
    ({"data": {"pool_sites": ["a"]}}, "pool_sites .* needs data_root"),
    ({"method": {"name": "fedoap", "args": {"nope": 1}}}, r"--method-args: method 'fedoap' takes no argument \['nope'\]"),
    (["training"], "a run configuration is a JSON object"),
])
def test_a_bad_document_is_refused_naming_the_option(document, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(document)


@pytest.mark.parametrize("document, message", [
    ({"training": {"rounds": "3"}}, "--rounds must be an integer"),
    ({"training": {"image_size": 7}}, "--image-size must be a multiple of 16"),
    ({"privacy": {"dp_sgd_sigma": 1.0}}, r"unknown option\(s\) \['dp_sgd_sigma'\] in privacy"),
    ({"method": {"name": 3}}, "--method must be a string"),
    ({"method": {"args": []}}, "--method-args must be an object"),
    ({"data": {"pool_sites": ["a"]}}, "pool_sites .* needs data_root"),
])
def test_a_site_vets_a_document_without_building_the_method(document, message):
    from fedoap.config import check_document

    with pytest.raises(ValueError, match=message):
        check_document(json.dumps(document))
    assert check_document(json.dumps({"data": {"data_root": "/d"}})).data_root == "/d"


def test_load_names_the_file(tmp_path):
    path = tmp_path / "fedoap_run.json"
    with pytest.raises(ValueError, match=f"{path}: cannot read"):
        RunConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: the run configuration is not JSON"):
        RunConfig.load(path)


@pytest.mark.parametrize("options, message", [  # issue 11's late errors, now one line each, before anything starts
    ({"image_size": 7}, r"^--image-size must be a multiple of 16 \(the UNet halves it 4 times\), got 7$"),
    ({"image_size": 16}, "^--image-size must be >= 32"),
    ({"batch_size": 0}, "^--batch-size must be >= 1, got 0$"),
    ({"lr": -1}, "^--lr must be a finite number > 0, got -1.0$"),
    ({"local_epochs": 0}, "^--local-epochs must be >= 1, got 0$"),
    ({"finetune_epochs": -1}, "^--finetune-epochs must be >= 0, got -1$"),
    ({"rounds": 0}, "^--rounds must be >= 1"),
    ({"width": 0}, "^--width must be >= 1"),
    ({"device": "gpu"}, "^--device must be cpu, cuda, cuda:N or mps"),
    ({"seed": -1}, "^--seed must be >= 0"),
])
def test_bad_training_options(options, message):
    with pytest.raises(ValueError, match=message):
        TrainingOptions(**options)


@pytest.mark.parametrize("options, message", [
    ({"dp_sgd_noise": 1.0, "dp_sgd_epsilon": 3.0}, "give --dp-sgd-noise or --dp-sgd-epsilon, not both"),
    ({"dp_update_noise": 1.0}, "--dp-update-noise needs --dp-update-clip > 0"),
    ({"dp_delta": 1.0}, r"--dp-delta must be in \(0, 1\)"),
    ({"dp_sgd_unit": "patient"}, r"--dp-sgd-unit must be one of \['slice', 'case'\]"),
    ({"dp_update_clip": float("nan")}, "--dp-update-clip must be a finite number >= 0"),
    ({"he": True, "secagg": True}, "give --he or --secagg, not both"),
    ({"secagg": True, "secagg_neighbours": 3}, "--secagg-neighbours must be even"),
    ({"secagg": True, "secagg_frac_bits": 60}, r"--secagg-frac-bits must be in \[8, 28\]"),
    ({"secagg": True, "secagg_ring_bits": 16}, r"--secagg-ring-bits must be one of \[32, 64\]"),
    ({"secagg_neighbours": 4}, "--secagg-neighbours, --secagg-ring-bits and --secagg-frac-bits need --secagg"),
])
def test_bad_privacy_options(options, message):
    with pytest.raises(ValueError, match=message):
        PrivacyOptions(**options)


@pytest.mark.parametrize("options, message", [
    ({"method": "nope"}, "--method: unknown method 'nope'; choose one of"),
    ({"method": "fedprox", "method_args": {"mu": -1}}, "--method-args: method 'fedprox': mu must be"),
    ({"method": "fednova", "he": True}, "--he: method 'fednova' combines updates by 'fednova', which needs plaintext"),
    ({"method": "local", "he": True}, r"--he: method 'local' shares nothing \(server rule 'none'\)"),
    ({"method": "local", "dp_update_clip": 1.0}, "--dp-update-clip: method 'local' shares nothing"),
    ({"method": "fedrdn", "he": True}, "--he: method 'fedrdn' sends site statistics in clear"),
    ({"method": "fedprox", "dp_sgd_epsilon": 3.0}, "--dp-sgd-epsilon: method 'fedprox' adds a regularizer"),
    ({"method": "fedawa", "secagg": True}, "--secagg: method 'fedawa' combines updates by 'fedawa', which needs "
                                           "plaintext on the server; secure aggregation supports only linear rules"),
    ({"method": "local", "secagg": True}, r"--secagg: method 'local' shares nothing"),
    ({"method": "feddp", "secagg": True}, "--secagg: method 'feddp' sends site statistics in clear"),
    ({"method": "fedavg", "secagg": True, "robust_rule": "median"}, "--robust-rule needs every update in clear on "
                                                                   "the server; --secagg hides it"),
    ({"rounds": 3, "nope": 1}, r"unknown option\(s\) \['nope'\]"),
])
def test_combinations_the_method_cannot_serve_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_options(**options)


def test_a_shortcut_of_another_method_is_refused():
    args = build_parser("simulate").parse_args(["simulate", "--method", "fedavg", "--no-adapter"])
    with pytest.raises(ValueError, match="--no-adapter is FedOAP's option; --method is 'fedavg'"):
        run_config_from_namespace(args)


def test_options_become_the_objects_sites_train_with():
    config = RunConfig.from_options(rounds=4, local_epochs=2, batch_size=8, lr=0.01, seed=3, dp_sgd_epsilon=5.0,
                                    dp_sgd_clip=0.5, dp_sgd_unit="case", dp_update_clip=2.0, dp_update_noise=0.1)
    train = config.training.train_config()
    assert (train.batch_size, train.lr, train.local_epochs, train.seed) == (8, 0.01, 2, 3)
    dp = config.privacy.dp_sgd(total_epochs=8)
    assert (dp.target_epsilon, dp.noise_multiplier, dp.max_grad_norm, dp.unit, dp.total_epochs) == (5.0, None, 0.5,
                                                                                                     "case", 8)
    update = config.privacy.update_dp()
    assert (update.clip_norm, update.noise_multiplier, update.delta) == (2.0, 0.1, 1e-5)
    assert config.privacy.enabled() == {"dp_update_clip": 2.0, "dp_update_noise": 0.1, "dp_sgd_epsilon": 5.0,
                                        "dp_sgd_clip": 0.5, "dp_sgd_unit": "case", "dp_sgd_noise_source": "chacha20",
                                        "dp_delta": 1e-5}
    assert RunConfig().privacy.enabled() == {} and RunConfig().privacy.dp_sgd(10) is None


def test_the_initial_network_is_the_same_on_every_side():
    import torch

    a, b = RunConfig.from_options(width=4, seed=5), RunConfig.from_options(width=4, seed=5)
    for (ka, va), (kb, vb) in zip(a.build_model().state_dict().items(), b.build_model().state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# -- robustness --------------------------------------------------------------------------------------------------------
def test_robustness_options_round_trip_as_json_and_an_older_document_loads_with_defaults(tmp_path):
    config = RunConfig.from_options(method="fedavg", robust_rule="trimmed_mean", trim_fraction=0.25,
                                    update_norm_bound=5.0, max_site_weight=5e4, weight_median_multiple=20.0,
                                    max_site_steps=500, max_statistics_values=1000, round_timeout=60.0,
                                    min_responses=2, resume_from="/runs/earlier")
    path = config.save(tmp_path / "fedoap_run.json")
    assert RunConfig.load(path) == config and RunConfig.load(path).robustness.resume_from == "/runs/earlier"
    document = json.loads(path.read_text())
    del document["robustness"]  # written before the section existed
    assert RunConfig.from_dict(document).robustness == RobustnessOptions()
    assert config.robustness.rule_options() == {"robust_rule": "trimmed_mean", "robust_args": {"trim_fraction": 0.25},
                                                "update_norm_bound": 5.0}
    assert RobustnessOptions(robust_rule="median").rule_options()["robust_args"] == {}
    # the run's record names how it ran, not where it resumed from
    assert config.options()["robust_rule"] == "trimmed_mean" and "resume_from" not in config.options()


def test_robustness_options_come_from_the_command_line():
    import argparse

    from fedoap.config import add_options

    parser = argparse.ArgumentParser()
    add_options(parser, RobustnessOptions)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert {"--robust-rule", "--trim-fraction", "--update-norm-bound", "--max-site-weight",
            "--weight-median-multiple", "--max-site-steps", "--max-statistics-values", "--round-timeout",
            "--min-responses"} <= flags and "--resume-from" not in flags  # resume_from is set by a program
    args = parser.parse_args(["--robust-rule", "median", "--update-norm-bound", "2.5", "--min-responses", "2"])
    config = run_config_from_namespace(args, require_device=False)
    assert config.robustness == RobustnessOptions(robust_rule="median", update_norm_bound=2.5, min_responses=2)
    assert cli_args(robust_rule="median", update_norm_bound=2.5) == ["--robust-rule", "median",
                                                                       "--update-norm-bound", "2.5"]


@pytest.mark.parametrize("options, message", [
    ({"robust_rule": "krum"}, r"^--robust-rule must be one of \['', 'median', 'trimmed_mean'\], got 'krum'$"),
    ({"trim_fraction": 0.5}, r"^--trim-fraction must be in \[0, 0.5\), got 0.5$"),
    ({"weight_median_multiple": 0.5}, "^--weight-median-multiple must be >= 1"),
    ({"weight_median_multiple": float("inf")}, "^--weight-median-multiple must be a finite number > 0"),
    ({"max_site_weight": 0}, "^--max-site-weight must be a finite number > 0"),
    ({"max_site_steps": 0}, "^--max-site-steps must be >= 1"),
    ({"max_statistics_values": 0}, "^--max-statistics-values must be >= 1"),
    ({"update_norm_bound": -1}, "^--update-norm-bound must be a finite number >= 0"),
    ({"round_timeout": float("nan")}, "^--round-timeout must be a finite number >= 0"),
    ({"min_responses": -1}, "^--min-responses must be >= 0"),
    ({"resume_from": "runs/relative"}, "^resume_from must be an earlier job's id or an absolute folder, got "),
    ({"resume_from": "job id with spaces"}, "^resume_from must be an earlier job's id"),
    ({"max_site_steps": 2.5}, "^--max-site-steps must be an integer"),
])
def test_bad_robustness_options(options, message):
    with pytest.raises(ValueError, match=message):
        RobustnessOptions(**options)
    assert RobustnessOptions(resume_from="a1b2-c3d4").resume_from == "a1b2-c3d4"  # an earlier job's id


@pytest.mark.parametrize("options, message", [
    ({"method": "fedavg", "he": True, "robust_rule": "median"}, "^--robust-rule needs every update in clear on the "
                                                                "server; --he hides it$"),
    ({"method": "fedavg", "he": True, "update_norm_bound": 1.0}, "^--update-norm-bound needs every update in clear"),
    ({"method": "fednova", "robust_rule": "trimmed_mean"}, "^--robust-rule replaces the plain weighted mean only; "
                                                           "method 'fednova' combines updates by 'fednova'$"),
    ({"method": "fedawa", "update_norm_bound": 1.0}, "^--update-norm-bound replaces the plain weighted mean only"),
    ({"method": "fedlws", "robust_rule": "median"}, "method 'fedlws' combines updates by 'fedlws'"),
    ({"method": "local", "robust_rule": "median"}, "method 'local' combines updates by 'none'"),
])
def test_robust_rules_are_refused_where_they_cannot_serve(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_options(**options)


def test_methods_with_the_weighted_mean_take_the_robust_rules():
    for method in ("fedavg", "fedoap", "fedprox", "fedrdn", "fedgs"):
        config = RunConfig.from_options(method=method, robust_rule="median", update_norm_bound=1.0)
        assert config.robustness.robust_rule == "median"


def test_a_site_vets_the_robustness_section_too():
    from fedoap.config import check_document

    with pytest.raises(ValueError, match="--trim-fraction must be in"):
        check_document(json.dumps({"robustness": {"trim_fraction": 0.9}}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nope'\] in robustness"):
        check_document(json.dumps({"robustness": {"nope": 1}}))
