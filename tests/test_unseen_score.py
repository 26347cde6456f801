"""Scores a reader can compare methods on where most slices have no tumour (the unseen organ): lesion Dice, the
empty-slice false-positive rate and area, the pooled Dice (``LESION_FP_RULE``), next to the per-image Dice of
``EMPTY_MASK_RULE`` that stays as it was; from hand-made masks to ``results.json``, the results table and the
benchmark's aggregation and tables. Fast: no simulator."""

import json
import math

import numpy as np
import pytest
import torch

from fedoap.benchmark import _record, aggregate_runs, benchmark_markdown, resolve_settings
from fedoap.eval.metrics import EMPTY_MASK_RULE, LESION_FP_RULE, per_image_scores, summarize
from fedoap.jsonio import to_json_text
from fedoap.report import results_table
from fedoap.simulation import _unseen_scores

SIZE = 8


def _masks(boxes):
    """(N, 1, SIZE, SIZE) masks, one list of (row, col, height, width) boxes per image."""
    out = torch.zeros(len(boxes), 1, SIZE, SIZE)
    for i, image in enumerate(boxes):
        for r, c, h, w in image:
            out[i, 0, r:r + h, c:c + w] = 1
    return out


# 2 slices with tumour (Dice 1 and 2*2/(4+2) = 2/3), 3 empty slices of which one has a 1-pixel false positive
TARGET = _masks([[(1, 1, 2, 2)], [(4, 4, 2, 2)], [], [], []])
PRED = _masks([[(1, 1, 2, 2)], [(4, 4, 1, 2)], [(0, 7, 1, 1)], [], []])


def test_lesion_dice_and_empty_fp_rate_of_hand_made_masks():
    scores = per_image_scores(PRED, TARGET)
    np.testing.assert_allclose(scores.dice, [1.0, 2 / 3, 0.0, 1.0, 1.0])  # EMPTY_MASK_RULE, unchanged
    s = summarize(scores)
    assert s["dice"] == pytest.approx((1 + 2 / 3 + 0 + 1 + 1) / 5)  # the plain Dice is what it always was
    assert s["n_images"] == 5 and s["n_empty_gt"] == 3
    assert s["lesion_dice"] == pytest.approx((1 + 2 / 3) / 2) and s["n_lesion"] == 2
    assert s["empty_fp_rate"] == pytest.approx(1 / 3)
    assert s["empty_fp_area"] == pytest.approx((1 / SIZE**2) / 3)  # one pixel of 64 on one of the three
    assert s["pooled_dice"] == pytest.approx(2 * (4 + 2) / ((4 + 2 + 1) + (4 + 4)))  # all pixels together
    assert s["hd95"] == pytest.approx(scores.mean_hd95())


def test_without_lesions_or_without_empty_slices_the_mean_is_nan_and_null_in_json():
    empty = _masks([[], [], []])
    s = summarize(per_image_scores(_masks([[(0, 0, 1, 1)], [], []]), empty))
    assert math.isnan(s["lesion_dice"]) and s["n_lesion"] == 0
    assert s["empty_fp_rate"] == pytest.approx(1 / 3) and s["dice"] == pytest.approx(2 / 3)
    assert s["pooled_dice"] == 0.0  # one false pixel and no tumour at all
    assert json.loads(to_json_text(s))["lesion_dice"] is None  # how results files report it: null
    both_empty = summarize(per_image_scores(empty, empty))
    assert both_empty["pooled_dice"] == 1.0 and both_empty["empty_fp_rate"] == 0.0  # nothing to find, nothing found
    lesions_only = summarize(per_image_scores(TARGET[:2], TARGET[:2]))
    assert math.isnan(lesions_only["empty_fp_rate"]) and lesions_only["n_empty_gt"] == 0
    assert lesions_only["lesion_dice"] == 1.0


def test_the_rule_says_what_each_score_covers():
    for words in ("Lesion Dice", "false-positive", "n_lesion", "n_empty", "null when none", "Pooled Dice"):
        assert words in LESION_FP_RULE


# -- from the site's metrics to results.json, the results table and the benchmark ------------------------------------
def _site_metrics(lesion_dice, fp_rate, dice=0.02, private=False):
    """What a site sends after personalization (``Session._personalize``): counts are floats under DP (rounded)."""
    count = float if private else int
    return {"unseen_dice": dice, "unseen_hd95": 9.0, "unseen_lesion_dice": lesion_dice,
            "unseen_n_lesion": count(10), "unseen_empty_fp_rate": fp_rate, "unseen_empty_fp_area": fp_rate / 100,
            "unseen_n_empty": count(26), "unseen_pooled_dice": lesion_dice / 2}


def test_results_json_unseen_entry_carries_the_site_metrics():
    u = _unseen_scores("lung", _site_metrics(0.4, 0.5, private=True))
    assert u == {"organ": "lung", "dice": 0.02, "hd95": 9.0, "lesion_dice": 0.4, "n_lesion": 10, "empty_fp_rate": 0.5,
                 "empty_fp_area": 0.005, "n_empty": 26, "pooled_dice": 0.2}
    assert isinstance(u["n_lesion"], int) and isinstance(u["n_empty"], int)
    old = _unseen_scores("lung", {"unseen_dice": 0.1, "unseen_hd95": None})  # a site that sends only the old two
    assert old["dice"] == 0.1 and old["lesion_dice"] is None and old["n_lesion"] is None


def _results(lesion, fp, test_lesion=0.6):
    """A results.json as ``run_simulation`` writes it: two sites, the unseen organ lung, two rounds."""
    clients = {site: {"organ": site, "dice": 0.5, "hd95": 4.0, "n_test": 24, "n_test_empty": 8,
                      "lesion_dice": test_lesion, "empty_fp_rate": 0.25, "best_finetune_epoch": 0,
                      "best_val_dice": 0.5} for site in ("brain", "breast")}
    unseen = {site: _unseen_scores("lung", _site_metrics(lesion + d, fp + d)) for site, d in
              (("brain", -0.05), ("breast", 0.05))}
    return {"method": "x", "rounds": 2, "clients": clients, "unseen": unseen, "not_personalized": {},
            "bytes_uploaded_per_round": {"brain": 100, "breast": 100}, "wall_time_s": 10.0,
            "val_dice_per_round": {s: [0.3, 0.4] for s in clients}, "test_dice_per_round": {s: [0.3, 0.4] for s in clients},
            "empty_mask_rule": EMPTY_MASK_RULE, "lesion_fp_rule": LESION_FP_RULE}


def test_results_table_shows_lesion_dice_and_fp_rate_with_the_rule():
    table = results_table(_results(0.4, 0.5))
    header = table.splitlines()[1]
    assert "unseen Dice" in header and header.count("lesion") == 2 and header.count("FP rate") == 2
    brain = next(line for line in table.splitlines() if line.startswith("brain"))
    assert brain.split()[-3:] == ["0.020", "0.350", "0.45"]  # unseen Dice, lesion Dice, FP rate
    assert "0.600" in brain and "0.25" in brain  # the test split's lesion Dice and FP rate
    mean = next(line for line in table.splitlines() if line.startswith("mean"))
    assert mean.split()[-2:] == ["0.400", "0.50"]
    assert EMPTY_MASK_RULE in table and LESION_FP_RULE in table
    assert "Unseen organ: 10 slices with tumour, 26 empty slices." in table


def test_benchmark_aggregates_and_tables_the_new_scores_over_seeds():
    per_seed = {"a": [(0.4, 0.5), (0.6, 0.7)], "b": [(0.2, 0.9), (0.3, 1.0)]}  # (unseen lesion Dice, FP rate)
    records = [_record(m, seed, f"runs/{m}/seed{seed}", False, _results(*v), 10.0)
               for m, values in per_seed.items() for seed, v in enumerate(values)]
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert records[0]["summary"]["unseen_n_lesion"] == 10 and records[0]["summary"]["unseen_n_empty"] == 26
    by_method = {m: aggregate_runs([r for r in records if r["method"] == m]) for m in per_seed}
    for m, values in per_seed.items():
        agg = by_method[m]
        lesion, fp = np.array(values).T
        assert agg["unseen_lesion_dice"]["mean"] == pytest.approx(lesion.mean())
        assert agg["unseen_lesion_dice"]["std"] == pytest.approx(lesion.std(ddof=1))
        assert agg["unseen_empty_fp_rate"]["mean"] == pytest.approx(fp.mean())
        assert agg["unseen_empty_fp_rate"]["std"] == pytest.approx(fp.std(ddof=1))
        assert agg["unseen_pooled_dice"]["mean"] == pytest.approx(lesion.mean() / 2)
        assert agg["unseen_empty_fp_area"]["mean"] == pytest.approx(fp.mean() / 100)
        assert agg["unseen_dice"]["mean"] == pytest.approx(0.02)  # the old score, unchanged
        assert agg["clients"]["brain"]["unseen_lesion_dice"]["mean"] == pytest.approx(lesion.mean() - 0.05)
        assert agg["mean_lesion_dice"]["mean"] == pytest.approx(0.6) and agg["mean_empty_fp_rate"]["mean"] == 0.25

    result = {"command": "fedoap benchmark", "preset": "fast", "settings": resolve_settings("fast"),
              "methods": list(per_seed), "seeds": [0, 1], "empty_mask_rule": EMPTY_MASK_RULE,
              "lesion_fp_rule": LESION_FP_RULE, "protocol": "p", "std": "sample standard deviation", "ranking": ["a", "b"],
              "results": by_method, "runs": records, "n_runs": 4, "n_failed": 0, "n_resumed": 0, "workers": 1}
    md = benchmark_markdown(result)
    assert EMPTY_MASK_RULE in md and LESION_FP_RULE in md
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "| unseen lesion Dice | unseen empty-slice FP rate |" in summary
    assert "| a | " in summary and "0.500 ± 0.141 | 0.60 ± 0.14 |" in summary  # lesion Dice, FP rate of method a
    section = md.split("## Unseen organ (lung): lesion Dice and empty-slice false positives")[1].split("\n## ")[0]
    assert "seed 0: 10 with tumour, 26 empty; seed 1: 10 with tumour, 26 empty" in section
    assert "| method | Dice (empty-mask rule) | lesion Dice | empty-slice FP rate | FP area on empty slices | " \
           "pooled Dice |" in section
    assert "| b | 0.020 ± 0.000 | 0.250 ± 0.071 | 0.95 ± 0.07 | 0.0095 ± 0.0007 | 0.125 ± 0.035 |" in section
    assert "## Unseen organ (lung) lesion Dice of each site's personalized model" in md
    assert "## Personalized lesion Dice per site (test slices with tumour only)" in md


def test_benchmark_of_old_results_files_reports_na():
    old = _results(0.4, 0.5)
    for u in old["unseen"].values():
        for key in ("lesion_dice", "n_lesion", "empty_fp_rate", "empty_fp_area", "n_empty", "pooled_dice"):
            del u[key]
    record = _record("a", 0, "runs/a/seed0", True, old, 0.0)
    agg = aggregate_runs([record])
    assert agg["unseen_lesion_dice"] == {"mean": None, "std": None, "n": 0}
    assert agg["unseen_dice"]["mean"] == pytest.approx(0.02)
