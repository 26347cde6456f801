"""``fedoap bench fedmepd``: the variants' method arguments, the per-region per-site table from hand-made results files
(resume of finished runs, a failed run recorded, the others kept), and the option errors. No simulator runs here (the
real FedMEPD run is tests/test_fedmepd_e2e.py)."""

import json
from pathlib import Path

import pytest

from fedoap import bench_fedmepd as bf
from fedoap.cli import main
from fedoap.config import MethodOptions

MASKS = ("1111", "1100", "0011")
MODALITIES = {"1111": "flair+t1ce+t1+t2", "1100": "flair+t1ce", "0011": "t1+t2"}
#: a small setting: 3 sites of 3 cases at 16^3, 2 rounds (data generation only, no run)
SMALL = {"modality_masks": MASKS, "cases": {f"site-{i}": 3 for i in (1, 2, 3)}, "server_cases": 2,
         "rounds": 2}


def _results(dice: dict[str, tuple[float, float, float]], hd95: float = 5.0, wall: float = 40.0, rounds: int = 2,
             workspace: str = "") -> dict:
    """A results.json of a brain-tumour run: per site (WT, TC, ET) Dice, the same HD95 in every region."""
    clients = {}
    for i, (site, regions) in enumerate(dice.items()):
        clients[site] = {"organ": "brain", "modalities": MODALITIES[MASKS[i]], "dice": sum(regions) / 3,
                         "hd95": hd95, "n_test": 1,
                         "regions": {r: {"dice": d, "hd95": None if r == "et" and d == 0 else hd95}
                                     for r, d in zip(bf.REGIONS, regions)}}
    return {"method": "fedmepd", "rounds": rounds, "clients": clients, "wall_time_s": wall, "workspace": workspace,
            "task": "brats-missing-modality", "region_rule": "Per region (WT, TC, ET) and case: RULE",
            "bytes_uploaded_per_round": {s: 100 for s in dice}, "val_dice_per_round": {s: [0.1] * rounds for s in dice},
            "test_dice_per_round": {s: [0.1] * rounds for s in dice}, "unseen": {}}


def test_variants_map_to_fedmepd_arguments():
    assert list(bf.VARIANTS) == ["fedmepd", "fedavg", "split", "local", "fedmepd-no-anchors",
                                 "fedmepd-no-personal-filters"]
    base = bf.DEFAULT_METHOD_ARGS
    assert bf.method_args("fedmepd") == base
    assert bf.method_args("fedavg") == {**base, "baseline": "fedavg"}
    assert bf.method_args("split", {"patience": 3}) == {"patience": 3, "baseline": "split"}
    assert bf.method_args("local") == {**base, "baseline": "local"}
    assert bf.method_args("fedmepd-no-anchors") == {**base, "anchors": False}
    assert bf.method_args("fedmepd-no-personal-filters") == {**base, "personalize_filters": False}
    built = {v: MethodOptions(name=bf.METHOD, args=bf.method_args(v)).instance for v in bf.VARIANTS}
    assert [(m.baseline, m.uses_anchors, m.uses_filters) for m in built.values()] == [
        ("", True, True), ("fedavg", False, False), ("split", False, False), ("local", False, False),
        ("", False, True), ("", True, False)]
    assert bf.parse_variants(["local", "fedmepd"]) == ["fedmepd", "local"]  # table order
    assert bf.parse_variants(None) == list(bf.VARIANTS)


def test_default_setting_resolves_and_overrides_apply():
    s = bf.resolve_settings()
    assert s["task"] == "brats-missing-modality" and s["rounds"] * s["local_epochs"] == s["total_epochs"]
    assert len(s["modality_masks"]) == len(s["cases"]) and s["method_args"] == bf.DEFAULT_METHOD_ARGS
    s = bf.resolve_settings({"rounds": 3, "method_args": '{"server_epochs": 2}'})
    assert s["rounds"] == 3 and s["method_args"] == {**bf.DEFAULT_METHOD_ARGS, "server_epochs": 2}


def test_summary_of_one_run_per_region_site_and_time_per_round(tmp_path):
    res = _results({"site-1": (0.9, 0.6, 0.3), "site-2": (0.5, 0.2, 0.0), "site-3": (0.7, 0.4, 0.1)}, wall=40.0)
    sm = bf.summarize_run(res)  # no history: wall / rounds
    assert sm["sites"]["site-2"]["mask"] == "1100" and sm["sites"]["site-3"]["mask"] == "0011"
    assert sm["sites"]["site-1"]["tc_dice"] == 0.6 and sm["sites"]["site-2"]["et_hd95"] is None
    assert sm["mean_wt_dice"] == pytest.approx(0.7) and sm["mean_et_dice"] == pytest.approx(0.4 / 3)
    assert sm["mean_et_hd95"] == pytest.approx(5.0)  # the empty region's NaN/None is left out of the mean
    assert sm["worst_site"] == "site-2" and sm["worst_site_dice"] == pytest.approx(0.7 / 3)
    assert sm["seconds_per_round"] == 20.0 and sm["seconds_per_round_source"] == "wall_time_s / rounds"
    history = {"rounds": [{"round": r, "round_seconds": t} for r, t in enumerate((20.0, 3.0, 5.0))]}
    with_history = bf.summarize_run(res, history)  # the first round (start-up) apart
    assert with_history["seconds_per_round"] == 4.0 and with_history["first_round_seconds"] == 20.0
    server = tmp_path / "ws" / "server" / "simulate_job"  # the history read from the run's workspace
    server.mkdir(parents=True)
    (server / "fedoap_history.json").write_text(json.dumps(history))
    assert bf._history({**res, "workspace": str(tmp_path / "ws")}) == history
    assert bf._history({**res, "workspace": str(tmp_path / "gone")}) is None


def _plan(out: Path, variants, seeds, overrides):
    """What run_bench_fedmepd plans (the data of each seed generated, no run): (variant, seed, PlannedRun)."""
    s = bf.resolve_settings(overrides)
    plan = []
    for seed in seeds:
        federation = bf._seed_federation(s, out, seed)
        for v in variants:
            run_dir = out / "runs" / v / f"seed{seed}"
            plan.append((v, seed, bf._plan_run(s, v, seed, run_dir, federation)))
    return plan


def test_table_from_finished_runs_resumed_and_a_failed_run_recorded(tmp_path, capsys):
    from fedoap.simulation import config_record

    out, variants, seeds = tmp_path / "bench", ["fedmepd", "fedavg", "local"], [0, 1]
    wt = {("fedmepd", 0): 0.8, ("fedmepd", 1): 0.6, ("fedavg", 0): 0.5, ("fedavg", 1): 0.7, ("local", 0): 0.4}
    for v, seed, cfg in _plan(out, variants, seeds, SMALL):
        run_dir = Path(cfg.out)
        run_dir.mkdir(parents=True)
        if (v, seed) not in wt:  # a run that left a broken results file: recorded as failed, the others go on
            (run_dir / "results.json").write_text(json.dumps({"config": config_record(cfg.run, cfg.federation)}))
            continue
        d = wt[(v, seed)]
        res = _results({"site-1": (d, 0.5, 0.2), "site-2": (d - 0.2, 0.3, 0.0), "site-3": (d - 0.1, 0.4, 0.1)},
                       wall=10.0 * (seed + 1))
        res["config"] = config_record(cfg.run, cfg.federation)
        (run_dir / "results.json").write_text(json.dumps(res))
    assert {cfg.run.method.args.get("baseline", "") for _, _, cfg in _plan(out, variants, [0], SMALL)} == {
        "", "fedavg", "local"}

    result = bf.run_bench_fedmepd(variants, seeds, out, SMALL, verbose=False)
    assert result["n_runs"] == 6 and result["n_resumed"] == 6 and result["n_failed"] == 1
    r = result["results"]
    assert r["fedmepd"]["mean_wt_dice"]["mean"] == pytest.approx(0.6)  # sites 0.8,0.6,0.7 and 0.6,0.4,0.5
    assert r["fedmepd"]["mean_wt_dice"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert r["fedmepd"]["sites"]["site-2"]["wt_dice"]["mean"] == pytest.approx(0.5)
    assert r["fedmepd"]["sites"]["site-2"]["mask"] == "1100"
    assert r["fedmepd"]["seconds_per_round"]["mean"] == pytest.approx(7.5)  # 10/2 and 20/2
    assert r["fedmepd"]["worst_sites"] == ["site-2", "site-2"]
    assert r["local"]["status"] == "partial" and r["local"]["seeds_failed"] == [1]
    assert r["local"]["mean_wt_dice"]["std"] is None  # one seed
    assert result["variant_args"]["fedavg"]["baseline"] == "fedavg"
    assert result["region_rule"].startswith("Per region (WT, TC, ET)")

    md = (out / "bench_fedmepd.md").read_text()
    assert json.loads((out / "bench_fedmepd.json").read_text())["n_failed"] == 1
    assert "fedoap bench fedmepd --variants fedmepd,fedavg,local --seeds 0,1" in md
    assert "Regions and empty regions: Per region (WT, TC, ET)" in md
    for title in ("## Summary (mean over sites)", "## WT Dice per site", "## TC Dice per site", "## ET Dice per site",
                  "## Mean Dice (WT, TC, ET) per site", "## ET HD95 per site (mm)", "## Failed runs"):
        assert title in md
    assert "| variant | site-1 (1111) | site-2 (1100) | site-3 (0011) | mean |" in md
    summary = md.split("## Summary (mean over sites)")[1].split("##")[0]
    assert "| fedmepd | 0.600 ± 0.141 |" in summary and "local (failed seeds 1)" in summary
    assert "s / round" in summary and "| 7.5 ± 3.5 |" in summary
    assert "(site-2)" in summary  # the worst site named

    # the same folder with other settings: refused before anything runs, naming the setting
    with pytest.raises(ValueError, match="finetune_epochs"):
        bf.run_bench_fedmepd(variants, seeds, out, {**SMALL, "finetune_epochs": 5}, verbose=False)


def test_command_repeats_the_options():
    cmd = bf.bench_fedmepd_command(["fedmepd", "local"], [0, 1], "/o", {"rounds": 4, "volume_size": 24,
                                                                         "method_args": {"server_epochs": 2}})
    assert cmd == ("fedoap bench fedmepd --variants fedmepd,local --seeds 0,1 --out /o --rounds 4 --volume-size 24 "
                   "--method-args '{\"server_epochs\": 2}'")


@pytest.mark.parametrize("args, named", [
    (["--variants", "fedmepd,nope"], "--variants"),
    (["--variants", "local,local"], "--variants"),
    (["--method-args", "{bad"], "--method-args"),
    (["--method-args", '{"anchors": false}'], "--variants"),
    (["--method-args", '{"patience": 0}'], "patience"),
    (["--method-args", '{"nope": 1}'], "nope"),
    (["--task", "organ-slices"], "--task"),
    (["--volume-size", "12"], "--volume-size"),
    (["--rounds", "0"], "--rounds"),
    (["--rounds", "2", "--total-epochs", "4"], "not both"),
    (["--workers", "0"], "--workers"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, named):
    out = tmp_path / "out"
    assert main(["bench", "fedmepd", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and named in err
    assert not out.exists()  # refused before any data or run
