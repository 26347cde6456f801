"""``fedoap bench dp``: the rows it plans (client-level sigma from the accountant's inverse), its summary and table on
results shaped like real ``results.json`` files, its one-line option errors, and one real tiny run through the CLI
(plain and client-level DP, 1 round, 2 sites, 32 x 32, width 4) that is then reused and refused with other settings."""

import json
import math
from dataclasses import asdict

import pytest

from fedoap.bench_dp import (DpRow, _read_spent, bench_dp_command, dp_table, plan_rows, resolve_dp_settings,
                             summarize_rows)
from fedoap.benchmark import _record
from fedoap.cli import main
from fedoap.config import FederationOptions, PrivacyOptions, RunConfig, TrainingOptions
from fedoap.privacy.dp import noise_for_epsilon, update_dp_epsilon

DELTA = 1e-5
TINY = ["--rounds", "1", "--local-epochs", "1", "--finetune-epochs", "1", "--image-size", "32", "--width", "4",
        "--clients", "brain,breast", "--cases", "brain=3,breast=6", "--unseen", "none", "--synthetic-size", "32",
        "--processes", "1", "--threads", "1"]


# -- the plan ----------------------------------------------------------------------------------------------------------
def test_rows_are_plain_then_each_setting_at_each_epsilon_and_build_valid_runs():
    rows = plan_rows(["distributed", "client", "dp_sgd", "plain"], [8, 1], rounds=3, n_sites=3, delta=DELTA)
    assert [r.name for r in rows] == ["plain", "dp_sgd-eps1", "dp_sgd-eps8", "client-eps1", "client-eps8",
                                      "distributed-eps1", "distributed-eps8"]
    by_name = {r.name: r for r in rows}
    assert by_name["plain"].options == {} and by_name["plain"].target_epsilon is None
    # DP-SGD: only the target; every other DP-SGD option stays at the run configuration's default
    assert by_name["dp_sgd-eps8"].options == {"dp_sgd_epsilon": 8.0, "dp_delta": DELTA}
    client, dist = by_name["client-eps8"], by_name["distributed-eps8"]
    assert client.options == {"dp_update_clip": 1.0, "dp_update_noise": client.noise_multiplier, "dp_delta": DELTA}
    assert dist.noise_multiplier == client.noise_multiplier  # the same sigma, shared among the sites
    assert dist.options == {**client.options, "secagg": True, "dp_update_distributed": True, "min_responses": 3}
    via_he = plan_rows(["distributed"], [8], rounds=3, n_sites=3, delta=DELTA, client_clip=0.5,
                       distributed_via="he")[0]
    assert via_he.options["he"] is True and "secagg" not in via_he.options and via_he.options["dp_update_clip"] == 0.5
    for row in rows + [via_he]:  # every row is a run configuration FedOAP accepts
        run = RunConfig.from_options(rounds=3, **row.options)
        assert run.method.name == "fedoap"
    assert RunConfig.from_options(**by_name["dp_sgd-eps8"].options).privacy.dp_sgd_clip == PrivacyOptions().dp_sgd_clip
    # no overrides: exactly `fedoap simulate`'s training and federation
    settings = resolve_dp_settings()
    assert {k: settings[k] for k in asdict(TrainingOptions()) if k != "seed"} == {
        k: v for k, v in asdict(TrainingOptions()).items() if k != "seed"}
    assert {k: settings[k] for k in asdict(FederationOptions())} == asdict(FederationOptions())
    assert resolve_dp_settings({"rounds": 1, "local_epochs": 1})["rounds"] == 1


@pytest.mark.parametrize("rounds", [1, 12])
def test_client_sigma_is_the_accountants_inverse(rounds):
    for row in plan_rows(["client"], [1, 4, 8], rounds=rounds, n_sites=3, delta=DELTA):
        spent = update_dp_epsilon(row.noise_multiplier, rounds, DELTA)
        assert spent <= row.target_epsilon  # never more than the target ...
        assert spent == pytest.approx(row.target_epsilon, abs=0.05)  # ... and not much less (Opacus's search)
        assert row.noise_multiplier == noise_for_epsilon(row.target_epsilon, rounds, DELTA)


# -- summary and table on results shaped like real results.json files --------------------------------------------------
def _results(dice: dict, privacy: dict, wall: float = 30.0) -> dict:
    sites = list(dice)
    return {
        "method": "fedoap", "rounds": 2,
        "clients": {s: {"organ": s, "dice": d, "hd95": 10.0, "n_test": 4.0, "n_test_empty": 1.0,
                        "best_finetune_epoch": 1.0, "best_val_dice": d} for s, d in dice.items()},
        "not_personalized": {}, "dropouts": {}, "resumed": [], "unseen": {},
        "bytes_uploaded_per_round": {s: 1000 for s in sites}, "wall_time_s": wall,
        "privacy": {"he": False, "secagg": bool(privacy.get("secagg")), "dp": {}, **privacy},
        "val_dice_per_round": {s: [0.1, 0.2] for s in sites}, "test_dice_per_round": {s: [0.1, 0.2] for s in sites},
    }


def _dp_update(eps: float, coalition=None) -> dict:
    out = {"dp_update_epsilon_per_round": {"a": [eps / 2, eps], "b": [eps / 2, eps]},
           "dp_update_epsilon_federation": eps, "delta": DELTA}
    if coalition is not None:
        out.update(dp_update_epsilon_coalition_per_round={"a": [coalition], "b": [coalition]},
                   dp_update_epsilon_coalition_federation=coalition, secagg=True)
    return out


def _records(tmp_path, runs):
    records = []
    for row, seed, results in runs:
        folder = tmp_path / row / f"seed{seed}"
        if results is None:
            records.append(_read_spent(_record(row, seed, str(folder), False, None, None, RuntimeError("boom"))))
            continue
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results))
        records.append(_read_spent(_record(row, seed, str(folder), False, results, 40.0)))
    return records


def test_summary_and_table_from_results_files(tmp_path):
    rows = [DpRow("plain", "plain", None, {}), DpRow("dp_sgd-eps4", "dp_sgd", 4.0, {}),
            DpRow("client-eps4", "client", 4.0, {}, 3.0), DpRow("distributed-eps4", "distributed", 4.0, {}, 3.0),
            DpRow("distributed-eps8", "distributed", 8.0, {}, 2.0)]
    sgd = {"dp_sgd_epsilon_per_round": {"a": [3.99], "b": [3.5]}, "dp_sgd_epsilon_federation": 3.99,
           "dp_sgd_epsilon_per_case_federation": None, "delta": DELTA}
    records = _records(tmp_path, [
        ("plain", 0, _results({"a": 0.8, "b": 0.6}, {})),
        ("plain", 1, _results({"a": 0.9, "b": 0.7}, {})),
        ("dp_sgd-eps4", 0, _results({"a": 0.5, "b": 0.3}, sgd)),
        ("dp_sgd-eps4", 1, _results({"a": 0.7, "b": 0.3}, {**sgd, "dp_sgd_epsilon_federation": 3.98})),
        ("client-eps4", 0, _results({"a": 0.6, "b": 0.6}, _dp_update(3.996))),
        ("client-eps4", 1, None),  # a failed seed: not in any mean, named in the table
        ("distributed-eps4", 0, _results({"a": 0.7, "b": 0.5}, _dp_update(3.996, coalition=6.1))),
        ("distributed-eps8", 0, None),
    ])
    res = summarize_rows(rows, records)
    plain, sgd_row, client = res["plain"], res["dp_sgd-eps4"], res["client-eps4"]
    assert plain["mean_dice"]["mean"] == pytest.approx(0.75) and plain["mean_dice"]["n"] == 2
    assert plain["epsilon_spent"] == {"dp_sgd_epsilon": None, "dp_sgd_epsilon_per_case": None,
                                      "dp_update_epsilon": None, "dp_update_epsilon_coalition": None}
    assert sgd_row["mean_dice"]["mean"] == pytest.approx(0.45)
    assert sgd_row["mean_dice"]["std"] == pytest.approx(math.sqrt(0.005))  # seeds 0.4 and 0.5, ddof 1
    assert sgd_row["epsilon_spent"]["dp_sgd_epsilon"] == 3.99  # the largest over seeds
    assert sgd_row["worst_sites"] == ["b", "b"] and sgd_row["worst_client_dice"]["mean"] == pytest.approx(0.3)
    # drop vs plain, paired by seed, in points: seed 0 70 - 40, seed 1 80 - 50
    assert sgd_row["dice_drop_points"]["mean"] == pytest.approx(30.0) and sgd_row["dice_drop_points"]["n"] == 2
    assert client["status"] == "partial" and client["seeds_failed"] == [1]
    assert client["dice_drop_points"]["mean"] == pytest.approx(10.0) and client["dice_drop_points"]["n"] == 1
    assert client["epsilon_spent"]["dp_update_epsilon"] == 3.996 and client["noise_multiplier"] == 3.0
    assert res["distributed-eps4"]["epsilon_spent"]["dp_update_epsilon_coalition"] == 6.1
    assert res["distributed-eps8"]["status"] == "failed"

    table = dp_table({"rows": [r.name for r in rows], "results": res})
    cells = {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("| ").split(" | ")]
             for line in table[2:] if line}
    assert "empty masks" in table[0]
    assert cells["plain"][1:4] == ["∞", "∞", "∞"] and cells["plain"][6] == "0 (reference)"
    assert cells["plain"][4] == "0.750 ± 0.071"
    assert cells["dp_sgd-eps4"][1:7] == ["4", "3.99", "3.99", "0.450 ± 0.071", "0.300 ± 0.000 (b)", "30.0 ± 0.0"]
    assert cells["client-eps4 (failed seeds 1)"][2:7] == ["4.00", "4.00", "0.600", "0.600 (a)", "10.0"]
    assert cells["distributed-eps4"][2:4] == ["4.00", "6.10"]  # vs the server, vs the other sites
    assert cells["distributed-eps8"][2] == "failed"


def test_command_repeats_the_options():
    command = bench_dp_command(["plain", "client"], [1.0, 8.0], [0, 1], "/x/out", {"rounds": 1, "unseen": "none"},
                               client_clip=0.5, distributed_via="he", delta=1e-6)
    assert command == ("fedoap bench dp --settings plain,client --epsilons 1,8 --seeds 0,1 --client-clip 0.5 "
                       "--distributed-via he --out /x/out --dp-delta 1e-06 --rounds 1 --unseen none")


# -- options -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, named", [
    (["--settings", "plain,nope"], "--settings"),
    (["--settings", "plain,plain"], "--settings"),
    (["--epsilons", "0"], "--epsilons"),
    (["--epsilons=-1,4"], "--epsilons"),
    (["--epsilons", "inf"], "--epsilons"),
    (["--epsilons", "four"], "--epsilons"),
    (["--client-clip", "0"], "--client-clip"),
    (["--distributed-via", "tls"], "--distributed-via"),
    (["--dp-delta", "1"], "--dp-delta"),
    (["--rounds", "0"], "--rounds"),
    (["--rounds", "2", "--total-epochs", "4"], "not both"),
    (["--settings", "distributed", "--clients", "brain"], "--clients"),
])
def test_bad_options_are_one_line_errors_naming_the_option(tmp_path, capsys, args, named):
    out = tmp_path / "out"
    assert main(["bench", "dp", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedoap: error: ") and named in err
    assert not out.exists()  # refused before any data or run


# -- one real run ------------------------------------------------------------------------------------------------------
def test_cli_end_to_end_client_level(tmp_path, capsys):
    """One real run (the plain row and the drop are covered on results files above: the suite's time is short)."""
    out = tmp_path / "bench"
    argv = ["bench", "dp", "--settings", "client", "--epsilons", "8", "--seeds", "0", "--out", str(out), *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "bench_dp.json").read_text())
    assert doc["rows"] == ["client-eps8"] and doc["seeds"] == [0] and doc["epsilons"] == [8.0]
    assert doc["n_runs"] == 1 and doc["n_failed"] == 0, [r.get("error") for r in doc["runs"]]
    assert doc["settings"]["rounds"] == 1 and doc["settings"]["clients"] == ["brain", "breast"]
    sigma = noise_for_epsilon(8.0, 1, DELTA)
    client = doc["results"]["client-eps8"]
    assert client["noise_multiplier"] == sigma and client["target_epsilon"] == 8.0
    # what the sites' accountants reported is the accountant's epsilon of sigma over the run's one round
    assert client["epsilon_spent"]["dp_update_epsilon"] == pytest.approx(update_dp_epsilon(sigma, 1, DELTA))
    assert client["epsilon_spent"]["dp_update_epsilon"] <= 8.0
    assert client["epsilon_spent"]["dp_update_epsilon_coalition"] is None
    assert 0.0 <= client["mean_dice"]["mean"] <= 1.0 and client["wall_time_s"]["mean"] > 0
    run = json.loads((out / "runs" / "client-eps8" / "seed0" / "results.json").read_text())
    assert run["config"]["dp_update_noise"] == sigma and run["config"]["dp_update_clip"] == 1.0
    assert run["config"]["method"] == "fedoap" and run["privacy"]["dp"]["dp_update_clip"] == 1.0
    markdown = (out / "bench_dp.md").read_text()
    assert doc["command"] in markdown and doc["empty_mask_rule"] in markdown and "| client-eps8 | 8 |" in markdown
    assert doc["command"].startswith("fedoap bench dp --settings client --epsilons 8 --seeds 0")
    assert f"reproduce: {doc['command']}" in printed

    # the same command again reuses the run; other settings are refused before anything runs
    assert main(argv) == 0
    assert json.loads((out / "bench_dp.json").read_text())["n_resumed"] == 1
    assert main([*argv, "--client-clip", "2"]) == 2
    assert "dp_update_clip" in capsys.readouterr().err
