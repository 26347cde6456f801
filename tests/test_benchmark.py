"""``fedoap benchmark``: real NVFlare simulator runs (2 methods x 2 seeds, 2 sites, 2 rounds, 32 x 32, width 4), a
method that fails, resume, and the FL-MedSegBench round selection on hand-made histories."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedoap.benchmark import protocol_round, resolve_settings, run_benchmark, summarize_run
from fedoap.cli import main
from fedoap.data import generate_site
from fedoap.eval.metrics import EMPTY_MASK_RULE, LESION_FP_RULE
from fedoap.methods import METHODS, FedAvg

METHODS_OK = ("fedoap", "local")
SEEDS = (0, 1)
OVERRIDES = {"rounds": 2, "local_epochs": 1, "image_size": 32, "width": 4, "finetune_epochs": 1}
CLI_OVERRIDES = ["--rounds", "2", "--local-epochs", "1", "--image-size", "32", "--width", "4", "--finetune-epochs", "1"]


class Broken(FedAvg):
    """A registered method whose construction fails, as a buggy new method would."""

    name = "broken"

    def __init__(self) -> None:
        raise RuntimeError("broken on purpose")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, "broken", Broken)
        assert main(["benchmark", "--methods", ",".join(METHODS_OK + ("broken",)), "--seeds", "0,1",
                     "--preset", "fast", "--out", str(out), "--workers", "1", *CLI_OVERRIDES]) == 0  # sequential:
        # the monkeypatched method exists in this process only
    return out, json.loads((out / "benchmark.json").read_text())


def _run_results(out: Path, method: str, seed: int) -> dict:
    return json.loads((out / "runs" / method / f"seed{seed}" / "results.json").read_text())


# -- protocol selection and the per-run summary on hand-made histories ---------------------------------------------
def test_protocol_round_is_best_validation_round_in_second_half():
    assert protocol_round([0.9, 0.1, 0.5, 0.4]) == 2  # round 0's 0.9 is before T/2: never selected
    assert protocol_round([0.2, 0.8, 0.3, 0.3, 0.1]) == 2  # T = 5: rounds 2..4; the first of a tie wins
    assert protocol_round([0.1, 0.2, 0.3, 0.7]) == 3
    assert protocol_round([0.4]) == 0
    assert protocol_round([0.5, float("nan"), 0.2]) == 2  # a NaN never wins
    assert protocol_round([0.5, None, None]) is None
    assert protocol_round([]) is None


def test_summary_takes_test_dice_at_the_protocol_round():
    results = {
        "clients": {"a": {"dice": 0.7, "hd95": 3.0, "volume_dice": 0.8}, "b": {"dice": 0.4, "hd95": None}},
        "unseen": {"a": {"dice": 0.1}, "b": {"dice": 0.3}},
        "bytes_uploaded_per_round": {"a": 100, "b": 300},
        "wall_time_s": 12.0,
        "val_dice_per_round": {"a": [0.9, 0.2, 0.6, 0.5], "b": [0.1, 0.1, 0.2, 0.3]},
        "test_dice_per_round": {"a": [0.95, 0.3, 0.55, 0.61], "b": [0.0, 0.1, 0.25, 0.35]},
    }
    s = summarize_run(results)
    assert s["clients"]["a"]["protocol_round"] == 2 and s["clients"]["a"]["protocol_dice"] == 0.55
    assert s["clients"]["b"]["protocol_round"] == 3 and s["clients"]["b"]["protocol_dice"] == 0.35
    assert s["protocol_mean_dice"] == pytest.approx(0.45)
    assert s["worst_client"] == "b" and s["worst_client_dice"] == 0.4
    assert s["mean_dice"] == pytest.approx(0.55)
    assert s["mean_hd95"] == 3.0  # a site without any HD95 is left out, not counted as 0
    assert s["unseen_dice"] == pytest.approx(0.2)
    assert s["clients"]["b"]["volume_dice"] is None  # a 2D site has no volumes: left out of the mean, not 0
    assert s["mean_volume_dice"] == 0.8
    assert s["bytes_uploaded_per_round_per_client"] == 200
    assert s["val_dice_per_round"] == pytest.approx([0.5, 0.15, 0.4, 0.4])


def test_settings_trade_rounds_for_local_epochs_and_reject_bad_overrides():
    full = resolve_settings("full")
    assert (full["image_size"], full["device"], full["rounds"], full["local_epochs"]) == (256, "cuda", 50, 1)
    assert resolve_settings("full", {"local_epochs": 5})["rounds"] == 10  # same 50 epochs, fewer rounds
    assert resolve_settings("fast", {"rounds": 3, "local_epochs": 2})["total_epochs"] == 6
    # a preset is a partial override of the run configuration: what it leaves out is the configuration's default
    assert (resolve_settings("fast")["lr"], resolve_settings("fast")["device"]) == (1e-3, "cpu")
    medium = resolve_settings("medium")  # the CPU preset where personalization matters: three organ sites
    assert (medium["clients"], medium["image_size"], medium["width"], medium["rounds"]) == \
        (("brain", "liver", "breast"), 64, 16, 15)
    for preset, overrides, message in [
        ("huge", {}, "preset"),
        ("fast", {"epochs": 3}, "epochs"),
        ("fast", {"rounds": 2, "total_epochs": 4}, "not both"),
        ("full", {"local_epochs": 3}, "multiple"),
        ("fast", {"width": 0}, "width"),
        ("fast", {"image_size": 40}, "--image-size must be a multiple of 16"),  # the options' own checks
        ("fast", {"clients": ("brain", "brain")}, "--clients must be distinct"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_settings(preset, overrides)
    with pytest.raises(ValueError, match="nope"):
        run_benchmark(["fedoap", "nope"], out="unused")
    with pytest.raises(ValueError, match="seeds"):
        run_benchmark(["fedoap"], seeds=[0, 0], out="unused")


# -- the real benchmark ---------------------------------------------------------------------------------------------
def test_methods_share_data_and_splits(bench):
    out, _ = bench
    for seed in SEEDS:
        runs = [_run_results(out, m, seed) for m in METHODS_OK]
        assert {r["config"]["data"] for r in runs} == {str((out / "data" / f"seed{seed}").resolve())}
        assert len({json.dumps({s: c["n_test"] for s, c in r["clients"].items()}) for r in runs}) == 1
        assert all(r["config"]["seed"] == seed and r["rounds"] == 2 for r in runs)


def test_means_stds_and_worst_client_match_the_runs(bench):
    out, res = bench
    assert res["methods"] == ["fedoap", "local", "broken"] and res["seeds"] == [0, 1]
    assert res["empty_mask_rule"] == EMPTY_MASK_RULE and res["headline"] == "personalized"
    assert res["n_runs"] == 6 and res["n_failed"] == 2 and res["n_resumed"] == 0
    for method in METHODS_OK:
        agg = res["results"][method]
        assert agg["status"] == "ok" and agg["seeds_ok"] == [0, 1]
        runs = [_run_results(out, method, seed) for seed in SEEDS]
        for site in ("brain", "breast"):
            dice = [r["clients"][site]["dice"] for r in runs]
            assert agg["clients"][site]["dice"]["mean"] == pytest.approx(np.mean(dice))
            assert agg["clients"][site]["dice"]["std"] == pytest.approx(np.std(dice, ddof=1))
            protocol = [r["test_dice_per_round"][site][protocol_round(r["val_dice_per_round"][site])] for r in runs]
            assert agg["clients"][site]["protocol_dice"]["mean"] == pytest.approx(np.mean(protocol))
            assert all(len(r["test_dice_per_round"][site]) == 2 for r in runs)
        volume = [r["clients"]["brain"]["volume_dice"] for r in runs]  # NIfTI: per test volume (3D)
        assert agg["clients"]["brain"]["volume_dice"]["mean"] == pytest.approx(np.mean(volume))
        assert agg["clients"]["breast"]["volume_dice"]["n"] == 0  # PNG slices: no volumes
        assert agg["mean_volume_dice"]["mean"] == pytest.approx(np.mean(volume))
        worst = [min(c["dice"] for c in r["clients"].values()) for r in runs]
        assert agg["worst_client_dice"]["mean"] == pytest.approx(np.mean(worst))
        assert agg["worst_client_dice"]["mean"] <= agg["mean_dice"]["mean"] + 1e-12
        mean = [np.mean([c["dice"] for c in r["clients"].values()]) for r in runs]
        assert agg["mean_dice"]["mean"] == pytest.approx(np.mean(mean))
        unseen = [np.mean([u["dice"] for u in r["unseen"].values()]) for r in runs]
        assert agg["unseen_dice"]["mean"] == pytest.approx(np.mean(unseen))
        lesion = [np.mean([u["lesion_dice"] for u in r["unseen"].values()]) for r in runs]  # LESION_FP_RULE
        assert agg["unseen_lesion_dice"]["mean"] == pytest.approx(np.mean(lesion))
        assert agg["unseen_lesion_dice"]["std"] == pytest.approx(np.std(lesion, ddof=1))
        fp = [np.mean([u["empty_fp_rate"] for u in r["unseen"].values()]) for r in runs]
        assert agg["unseen_empty_fp_rate"]["mean"] == pytest.approx(np.mean(fp))
        assert agg["wall_time_s"]["mean"] == pytest.approx(np.mean([r["wall_time_s"] for r in runs]))
        assert len(agg["val_dice_per_round"]) == 2
    uploads = res["results"]["fedoap"]["bytes_uploaded_per_round_per_client"]
    assert uploads["mean"] > 0 and uploads["std"] == 0  # same model every seed
    assert res["results"]["local"]["bytes_uploaded_per_round_per_client"]["mean"] == 0  # nothing leaves a site
    assert sorted(res["ranking"]) == ["fedoap", "local"]
    first, second = (res["results"][m]["mean_dice"]["mean"] for m in res["ranking"])
    assert first >= second


def test_failed_method_is_recorded_not_fatal(bench):
    _, res = bench
    assert res["results"]["broken"] == {"status": "failed", "seeds_ok": [], "seeds_failed": [0, 1]}
    failed = [r for r in res["runs"] if r["status"] == "failed"]
    assert {r["method"] for r in failed} == {"broken"}
    assert all("RuntimeError: broken on purpose" in r["error"] and "Traceback" in r["traceback"] for r in failed)


def test_markdown_and_figures(bench):
    out, res = bench
    md = (out / "benchmark.md").read_text()
    assert EMPTY_MASK_RULE in md and LESION_FP_RULE in md
    assert "unseen lesion Dice" in md and "## Unseen organ (lung): lesion Dice and empty-slice false positives" in md
    assert "fedoap benchmark --methods fedoap,local,broken --seeds 0,1 --preset fast" in md
    assert "Ranking by the personalized score" in md
    assert "## Personalized per-volume (3D) Dice per site" in md
    summary = md.split("## Summary")[1].split("##")[0]
    for method in METHODS_OK:
        assert sum(line.startswith(f"| {method} |") for line in summary.splitlines()) == 1
    assert "## Failed runs" in md and "broken on purpose" in md
    for name in res["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_site_folder_fails_the_run_with_its_name(tmp_path):
    data = tmp_path / "data"
    generate_site(data / "brain", "brain", n_cases=3, size=32)
    res = run_benchmark(["local"], [0], "fast", tmp_path / "out",
                        {"data": str(data), "clients": ("brain", "liver"), "unseen": "none"}, verbose=False)
    (run,) = res["runs"]
    assert run["status"] == "failed" and str(data / "liver") in run["error"]
    assert res["ranking"] == [] and res["results"]["local"]["status"] == "failed"
    assert "## Failed runs" in (tmp_path / "out" / "benchmark.md").read_text()


def test_resume_reuses_finished_runs_and_refuses_other_settings(bench):
    out, before = bench
    stamps = {(m, s): (out / "runs" / m / f"seed{s}" / "results.json").stat().st_mtime_ns
              for m in METHODS_OK for s in SEEDS}
    res = run_benchmark(list(METHODS_OK), SEEDS, "fast", out, OVERRIDES, verbose=False)
    assert res["n_resumed"] == 4 and all(r["resumed"] for r in res["runs"])
    assert stamps == {k: (out / "runs" / k[0] / f"seed{k[1]}" / "results.json").stat().st_mtime_ns for k in stamps}
    for method in METHODS_OK:
        assert res["results"][method]["mean_dice"] == before["results"][method]["mean_dice"]
    assert res["wall_time_s"] < 30  # nothing was simulated again
    assert "reused from an earlier invocation" in (out / "benchmark.md").read_text()
    with pytest.raises(ValueError, match="rounds"):
        run_benchmark(["local"], [0], "fast", out, {**OVERRIDES, "rounds": 3}, verbose=False)
    with pytest.raises(ValueError, match="synthetic data generated with other settings"):
        run_benchmark(["local"], [0], "fast", out, {**OVERRIDES, "synthetic_size": 32}, verbose=False)
    assert json.loads((out / "benchmark.json").read_text())["n_resumed"] == 4  # the refused calls wrote nothing


def test_parallel_workers_run_the_centralized_reference_per_site(tmp_path):
    """Two runs at once (each its own simulator process); the centralized reference trains one pooled model and
    still reports every site's personalized, protocol and per-round scores on that site's own splits."""
    res = run_benchmark(["centralized", "local"], [0], "fast", tmp_path, OVERRIDES, verbose=False, workers=2)
    assert res["workers"] == 2 and res["n_failed"] == 0, [r.get("error") for r in res["runs"]]
    central = _run_results(tmp_path, "centralized", 0)
    local = _run_results(tmp_path, "local", 0)
    assert set(central["clients"]) == {"brain", "breast"}
    for site in ("brain", "breast"):
        assert 0.0 <= central["clients"][site]["dice"] <= 1.0
        assert central["clients"][site]["n_test"] == local["clients"][site]["n_test"]  # the same test slices
        assert len(central["val_dice_per_round"][site]) == 2 and len(central["test_dice_per_round"][site]) == 2
        assert central["bytes_uploaded_per_round"][site] == 0
    assert res["results"]["centralized"]["protocol_mean_dice"]["mean"] is not None
    assert "2 at a time" in (tmp_path / "benchmark.md").read_text()


def test_ablations_are_fedoap_with_one_part_removed(tmp_path):
    from fedoap.benchmark import ABLATIONS, _config, _parse_methods

    settings = resolve_settings("fast")
    cfg = _config(settings, "fedoap-no-dca", 0, tmp_path / "run", tmp_path / "data")
    assert cfg.run.method.name == "fedoap" and cfg.run.method.args == {"cross_attention": False}
    assert _config(settings, "fedavg", 0, tmp_path, tmp_path).run.method.args == {}
    for name, (method, args) in ABLATIONS.items():
        assert method == "fedoap" and args
        net = METHODS[method](**args).build_model({"channels": [2, 4, 4, 8], "bottleneck_channels": 8})
        keys = set(net.state_dict())
        assert ("dca.to_q.weight" in keys) == args.get("cross_attention", True)
        assert any(k.startswith("adapter.") for k in keys) == args.get("adapter", True)
    assert _parse_methods(["fedoap", "fedoap-no-pbl"]) == ["fedoap", "fedoap-no-pbl"]
    with pytest.raises(ValueError, match="FedOAP's ablations"):
        _parse_methods(["fedoap-no-such"])


def test_resume_never_takes_a_run_made_under_other_defaults(tmp_path):
    """A run records its method's settings with the defaults resolved: a FedOAP run made while the head prior was off
    by default, or by a version that did not record them, is not reused as today's default FedOAP."""
    from fedoap.benchmark import _config, _config_mismatch
    from fedoap.simulation import config_record

    settings = resolve_settings("fast", OVERRIDES)
    now = _config(settings, "fedoap", 0, tmp_path / "run", tmp_path / "data")
    stored = config_record(now.run, now.federation)
    assert stored["method_settings"]["head_prior_init"] is True
    assert _config_mismatch(stored, now, user_data=False) == []
    authors = {**stored, "method_settings": {**stored["method_settings"], "head_prior_init": False}}
    assert _config_mismatch(authors, now, user_data=False) == ["method_settings"]
    older = {k: v for k, v in stored.items() if k != "method_settings"}
    assert _config_mismatch(older, now, user_data=False) == [
        "method_settings (not recorded: made by an earlier version of fedoap)"]
    # the authors' FedOAP under its benchmark name records exactly what it ran with
    no_prior = _config(settings, "fedoap-no-head-prior", 0, tmp_path / "run", tmp_path / "data")
    assert _config_mismatch(authors, no_prior, user_data=False) == ["method_args"]
