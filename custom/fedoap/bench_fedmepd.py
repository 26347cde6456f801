"""``fedoap bench fedmepd``: FedMEPD against its baselines and ablations on the brain-tumour task with missing
modalities, per region (WT, TC, ET) and per site, over seeds, with the time per round.

Every variant is the ``fedmepd`` method on the same network, data, splits and seeds, only its arguments differ
(:data:`VARIANTS`): FedMEPD itself, the baselines FedAvg (everything shared, plain mean), the FedOAP-style
shared/local split and local training, and the ablations without the server's anchors and without the partially
personalized decoder. Each variant x seed is one ordinary :func:`fedoap.simulation.run_simulation` run in
``OUT/runs/<variant>/seed<k>``, planned, executed (``workers`` at a time), reused on resume after the check of its
configuration, and recorded as failed without stopping the others, by :mod:`fedoap.benchmark`'s machinery. The
synthetic federation of a seed (one modality mask per site, the server's full-modal set) is generated once under
``OUT/data/seed<k>`` and shared by every variant (or read from ``--data``).

Per run (from its ``results.json``): each site's test Dice and HD95 per region and their means after the final local
fine-tuning, the mean over sites, the worst site, and the time per round: the server's ``round_seconds`` averaged
over rounds 2..T (its history; the first also holds the simulator's start-up and is reported apart), or
``wall_time_s / rounds`` when the history is gone. Then mean ± std over seeds.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fedoap.benchmark import (_FEDERATION, _TRAINING, DATA_DIR, OVERRIDABLE as _BENCHMARK_OVERRIDABLE, PlannedRun,
                              _execute, _fmt, _fmt_ms, _mean, _mean_std, _parse_seeds, _resolve, _table, parse_choices,
                              plan_runs, split_by_status)
from fedoap.config import FederationOptions, MethodOptions, RunConfig, TrainingOptions, cli_args
from fedoap.jsonio import to_jsonable, write_json

__all__ = ["VARIANTS", "METHOD", "DEFAULT", "DEFAULT_METHOD_ARGS", "OVERRIDABLE", "REGIONS", "parse_variants",
           "parse_method_args", "method_args", "resolve_settings", "summarize_run", "aggregate_variant",
           "bench_fedmepd_command", "bench_fedmepd_markdown", "run_bench_fedmepd"]

#: the registered method every variant runs
METHOD = "fedmepd"
#: the table's rows, in order: variant name -> the arguments of ``fedmepd`` that make it (on top of the setting's
#: ``method_args``)
VARIANTS: dict[str, dict[str, Any]] = {
    "fedmepd": {},
    "fedavg": {"baseline": "fedavg"},  # every site sends everything, plain weighted mean
    "split": {"baseline": "split"},  # FedOAP-style: encoders and decoder body shared, the head and attention local
    "local": {"baseline": "local"},  # nothing shared
    "fedmepd-no-anchors": {"anchors": False},  # ablation: no server anchors, no attention to them
    "fedmepd-no-personal-filters": {"personalize_filters": False},  # ablation: the whole decoder shared
}
REGIONS = ("wt", "tc", "et")

#: The CPU-sized setting, measured on 2 busy cores: one FedMEPD run ~80 s (simulator ~65 s: round 1 with the start-up
#: ~25 s, then ~4-5 s per round). Five sites whose masks cover four, three, two and one modalities (a subset of the
#: authors' eight: 1111, 1110, 1100, 0011 and the T2-only 0001), 16^3 volumes, 6 cases per site (4/1/1
#: train/val/test), the server's full-modal set of 4 cases, 8 rounds x 4 local epochs (with 1 epoch per round the
#: loss barely moved: val Dice ~0.1 after 8 rounds, ~0.3-0.4 with 4), then 3 epochs of local fine-tuning. One
#: simulator process per site (the default): with fewer, NVFlare restarts a site's client for every task (~60 s per
#: round measured with 2 processes for 5 sites).
DEFAULT: dict[str, Any] = {
    "task": "brats-missing-modality", "volume_size": 16,
    "modality_masks": ("1111", "1110", "1100", "0011", "0001"),
    "cases": {f"site-{i}": 6 for i in range(1, 6)}, "server_cases": 4,
    "total_epochs": 32, "local_epochs": 4, "finetune_epochs": 3, "batch_size": 2, "tracking": "none",
    "workers": 1,
}
#: FedMEPD's arguments for every variant (the baselines ignore those they do not use). The authors' patience of 10
#: rounds can never fire in a run of 8 rounds, and the ablation without personal filters would equal FedMEPD; measured
#: on the default setting (seed 0), patience 2 still made no filter personal, patience 1 (the least) made 0-2 decoder
#: filters personal per site: at this size the partial personalization is barely exercised
DEFAULT_METHOD_ARGS: dict[str, Any] = {"patience": 1}
#: keys a caller may override: those of ``fedoap benchmark`` and ``method_args`` (merged into the default's)
OVERRIDABLE = (*_BENCHMARK_OVERRIDABLE, "method_args")
_RESULTS_JSON, _RESULTS_MD = "bench_fedmepd.json", "bench_fedmepd.md"


# -- options -----------------------------------------------------------------------------------------------------------
def parse_variants(names: Optional[Sequence[str]]) -> list[str]:
    """The chosen variants in table order (None: all).

    Raises:
        ValueError: an unknown or repeated variant, or none.
    """
    return parse_choices("--variants", names, list(VARIANTS))


def parse_method_args(text: Optional[str | Mapping[str, Any]]) -> dict[str, Any]:
    """``--method-args`` (a JSON object, or a mapping) as a dict; None: none.

    Raises:
        ValueError: not a JSON object.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--method-args must be a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--method-args must be a JSON object, got {text!r}")
    return value


def method_args(variant: str, base: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The arguments of ``fedmepd`` for a variant: the setting's ``base`` (default :data:`DEFAULT_METHOD_ARGS`) with
    the variant's own on top (they cannot be overridden: they define the variant)."""
    return {**(DEFAULT_METHOD_ARGS if base is None else base), **VARIANTS[variant]}


def resolve_settings(overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """:data:`DEFAULT` with the overrides applied, checked as ``fedoap benchmark`` checks its presets, ``rounds``
    resolved, and ``method_args`` (the default's with the override's on top) checked by building every variant.

    Raises:
        ValueError: an unknown override key, an invalid option (named), a task other than brats-missing-modality,
            or method arguments some variant rejects.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {list(OVERRIDABLE)}")
    extra = parse_method_args(overrides.pop("method_args", None))
    for key in sorted({k for v in VARIANTS.values() for k in v}):
        if key in extra:
            raise ValueError(f"--method-args: {key!r} defines the variants; choose them with --variants")
    s = _resolve(DEFAULT, overrides)
    if s["task"] != DEFAULT["task"]:
        raise ValueError(f"--task must be {DEFAULT['task']} (FedMEPD's task), got {s['task']!r}")
    s["method_args"] = {**DEFAULT_METHOD_ARGS, **extra}
    for variant in VARIANTS:  # the method checks its arguments, naming the bad one
        try:
            MethodOptions(name=METHOD, args=method_args(variant, s["method_args"]))
        except (TypeError, ValueError) as err:
            raise ValueError(str(err) if "--method-args" in str(err) else f"--method-args: {err}") from None
    return s


def bench_fedmepd_command(variants: Sequence[str], seeds: Sequence[int], out: str | Path,
                          overrides: Optional[Mapping[str, Any]] = None) -> str:
    """The ``fedoap bench fedmepd`` command line that repeats this table (written into ``bench_fedmepd.md``)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    extra = overrides.pop("method_args", None)
    parts = ["fedoap", "bench", "fedmepd", "--variants", ",".join(variants), "--seeds", ",".join(map(str, seeds)),
             "--out", str(out)]
    parts += cli_args(**overrides)
    if extra:
        parts += ["--method-args", json.dumps(parse_method_args(extra))]
    return shlex.join(parts)


# -- planning ----------------------------------------------------------------------------------------------------------
def _seed_federation(settings: Mapping[str, Any], out: Path, seed: int) -> FederationOptions:
    """The federation of a seed's runs, its data folder set: ``--data`` as given, or the synthetic brain-tumour
    federation generated once under ``out/data/seed<k>`` (:func:`fedoap.simulation.brats_federation`), as the
    simulator itself would name its sites, so that the configuration a run records equals the planned one."""
    from fedoap.simulation import brats_federation

    federation = FederationOptions(**{k: settings[k] for k in _FEDERATION})
    federation, root = brats_federation(federation, seed, settings["volume_size"], out / DATA_DIR / f"seed{seed}",
                                        replace=False)
    return replace(federation, data=str(root))


def _plan_run(settings: Mapping[str, Any], variant: str, seed: int, run_dir: Path,
              federation: FederationOptions) -> PlannedRun:
    """One variant x seed, with the server-side arguments the simulator adds (the server's set, its size) already
    in, so that a finished run's recorded configuration compares equal on resume."""
    from fedoap.simulation import _brats_method_args

    training = TrainingOptions(**{k: settings[k] for k in _TRAINING}, seed=seed)
    run = RunConfig(training=training, method=MethodOptions(name=METHOD, args=method_args(variant,
                                                                                           settings["method_args"])))
    run = run.override(method_args=_brats_method_args(run, Path(federation.data)))
    return PlannedRun(out=str(run_dir), run=run, federation=federation)


# -- one run -----------------------------------------------------------------------------------------------------------
def _mask(modalities: Optional[str]) -> Optional[str]:
    """``"flair+t1ce"`` -> ``"1100"`` over (FLAIR, T1ce, T1, T2)."""
    if not modalities:
        return None
    from fedoap.data.brats import MODALITIES

    held = set(modalities.split("+"))
    return "".join("1" if m in held else "0" for m in MODALITIES)


def _history(results: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The server's history of a run (``<workspace>/server/.../fedoap_history.json``), or None when it is gone."""
    from fedoap.protocol import HISTORY_FILE

    server = Path(results.get("workspace", "")) / "server"
    found = sorted(server.rglob(HISTORY_FILE)) if results.get("workspace") and server.is_dir() else []
    return json.loads(found[0].read_text()) if found else None


def summarize_run(results: Mapping[str, Any], history: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The numbers the table compares, from one run's ``results.json`` content and its server's history (None:
    the time per round is ``wall_time_s / rounds``)."""
    sites: dict[str, Any] = {}
    for site, row in results["clients"].items():
        regions = row.get("regions") or {}
        sites[site] = {"modalities": row.get("modalities"), "mask": _mask(row.get("modalities")),
                       "dice": row.get("dice"), "hd95": row.get("hd95"),
                       **{f"{r}_dice": (regions.get(r) or {}).get("dice") for r in REGIONS},
                       **{f"{r}_hd95": (regions.get(r) or {}).get("hd95") for r in REGIONS}}
    dice = {site: s["dice"] for site, s in sites.items()
            if s["dice"] is not None and math.isfinite(float(s["dice"]))}
    worst = min(dice, key=dice.get) if dice else None
    round_seconds = [r["round_seconds"] for r in (history or {}).get("rounds", []) if "round_seconds" in r]
    rounds = results.get("rounds")
    wall = results.get("wall_time_s")
    first_round = round_seconds[0] if round_seconds else None
    if len(round_seconds) > 1:  # the first round also holds the simulator's start-up: the steady state after it
        per_round, source = float(np.mean(round_seconds[1:])), "server history round_seconds, rounds 2..T"
    elif round_seconds:
        per_round, source = float(round_seconds[0]), "server history round_seconds"
    else:
        per_round = wall / rounds if wall is not None and rounds else None
        source = "wall_time_s / rounds"
    summary = {
        "sites": sites,
        "mean_dice": _mean([s["dice"] for s in sites.values()]),
        "mean_hd95": _mean([s["hd95"] for s in sites.values()]),
        **{f"mean_{r}_{m}": _mean([s[f"{r}_{m}"] for s in sites.values()]) for r in REGIONS for m in ("dice", "hd95")},
        "worst_site": worst,
        "worst_site_dice": dice[worst] if worst else None,
        "seconds_per_round": per_round,
        "seconds_per_round_source": source,
        "first_round_seconds": first_round,
        "wall_time_s": wall,
        "rounds": rounds,
    }
    return summary


_SITE_METRICS = ("dice", "hd95", *(f"{r}_{m}" for r in REGIONS for m in ("dice", "hd95")))
_VARIANT_METRICS = ("mean_dice", "mean_hd95", *(f"mean_{r}_{m}" for r in REGIONS for m in ("dice", "hd95")),
                    "worst_site_dice", "seconds_per_round", "first_round_seconds", "wall_time_s")


def aggregate_variant(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One variant's mean and std over its successful seeds (runs: records with ``seed``, ``status`` and, when ok,
    ``fedmepd``: :func:`summarize_run`'s)."""
    ok, out = split_by_status(runs)
    if not ok:
        return out
    site_names = sorted({s for r in ok for s in r["fedmepd"]["sites"]}, key=_site_key)
    out["sites"] = {}
    for site in site_names:
        rows = [r["fedmepd"]["sites"].get(site, {}) for r in ok]
        masks = sorted({row.get("mask") for row in rows if row.get("mask")})
        out["sites"][site] = {"mask": masks[0] if len(masks) == 1 else "/".join(masks) or None,
                              **{m: _mean_std([row.get(m) for row in rows]) for m in _SITE_METRICS}}
    for m in _VARIANT_METRICS:
        out[m] = _mean_std([r["fedmepd"][m] for r in ok])
    out["worst_sites"] = [r["fedmepd"]["worst_site"] for r in ok]
    return out


def _site_key(site: str) -> tuple:
    """site-2 before site-10."""
    head, _, tail = site.rpartition("-")
    return (head, int(tail), "") if tail.isdigit() else (site, -1, site)


# -- the table ---------------------------------------------------------------------------------------------------------
def _region_rule(result: Mapping[str, Any]) -> str:
    if result.get("region_rule"):
        return result["region_rule"]
    from fedoap.eval.regions import REGION_RULE

    return REGION_RULE


def _cell(ms: Optional[Mapping[str, Any]], n_seeds: int, digits: int) -> str:
    """mean ± std, with the number of seeds it covers when some seed had no finite value."""
    text = _fmt_ms(ms, digits)
    if ms and ms.get("mean") is not None and ms.get("n", n_seeds) < n_seeds:
        text += f" (n={ms['n']})"
    return text


def _row_name(variant: str, agg: Mapping[str, Any]) -> str:
    if agg["status"] == "partial":
        return f"{variant} (failed seeds {','.join(map(str, agg['seeds_failed']))})"
    return variant


def _worst_cell(agg: Mapping[str, Any], n_seeds: int) -> str:
    names = sorted(set(agg.get("worst_sites") or []), key=_site_key)
    where = f" ({', '.join(names)})" if names else ""
    return _cell(agg.get("worst_site_dice"), n_seeds, 3) + where


def bench_fedmepd_markdown(result: Mapping[str, Any]) -> str:
    """The tables: a summary (regions' Dice and HD95, the worst site, time per round), then per-site tables of each
    region's Dice and HD95 and of the mean Dice, variants as rows, sites (with their modality masks) as columns."""
    s, res = result["settings"], result["results"]
    ok = [v for v in result["variants"] if res[v]["status"] != "failed"]
    sites = sorted({site for v in ok for site in res[v]["sites"]}, key=_site_key)
    masks = {site: next((res[v]["sites"][site]["mask"] for v in ok if site in res[v]["sites"]), None) for site in sites}
    labels = [f"{site} ({masks[site]})" if masks[site] else site for site in sites]
    n = {v: len(res[v]["seeds_ok"]) for v in ok}
    lines = [
        f"# FedMEPD against baselines and ablations: {', '.join(result['variants'])}",
        "",
        f"Produced by `{result['command']}`.",
        "",
        f"Setting: task {s['task']}; synthetic data "
        + (f"from {s['data']}" if s.get("data") else "generated once per seed and shared by every variant")
        + "; sites' modality masks over (FLAIR, T1ce, T1, T2) "
        + f"{', '.join(s['modality_masks']) or 'the authors eight'}; "
        f"cases per site {', '.join(f'{k}={v}' for k, v in s['cases'].items()) or 'default'}, the server's "
        f"full-modal set {s['server_cases']} cases; "
        f"{s['volume_size']}^3 volumes; {s['rounds']} rounds x {s['local_epochs']} local epoch(s), then "
        f"{s['finetune_epochs']} epoch(s) of local fine-tuning for every variant (best epoch on the validation "
        f"split); batch {s['batch_size']}, lr {s['lr']}, device {s['device']}; fedmepd's arguments "
        f"{json.dumps(s['method_args'])} for every variant; seeds {', '.join(map(str, result['seeds']))}.",
        "",
        "Variants (all the `fedmepd` method on the same network and data): "
        + "; ".join(f"`{v}` = {json.dumps(VARIANTS[v]) if VARIANTS[v] else 'FedMEPD'}" for v in result["variants"])
        + ".",
        "",
        f"Scores: test Dice and HD95 (mm) of each site's model after the final fine-tuning, per case then mean "
        f"over the site's test cases. Regions and empty regions: {_region_rule(result)}",
        "",
        f"Values: mean ± {result['std']}; (n=k): only k seeds had a finite value. Worst site: the lowest mean Dice of "
        "a seed, mean over seeds (the sites that were worst in brackets). Time per round: the server's "
        "`round_seconds` (the sites' training and evaluation, upload, aggregation and the server's step) averaged "
        "over rounds 2..T (`wall_time_s / rounds` where a run's history is gone); round 1 also holds the simulator's "
        "start-up and is shown apart; wall: the simulator's run time, start-up and fine-tuning included.",
        "",
    ]
    if result["n_resumed"]:
        lines += [f"Resume: {result['n_resumed']} of {result['n_runs']} runs were reused from an earlier invocation "
                  "(their `results.json` already existed in `runs/<variant>/seed<k>`; times are theirs).", ""]
    summary = [[_row_name(v, res[v])] + [_cell(res[v][f"mean_{r}_dice"], n[v], 3) for r in REGIONS]
               + [_cell(res[v]["mean_dice"], n[v], 3), _worst_cell(res[v], n[v])]
               + [_cell(res[v][f"mean_{r}_hd95"], n[v], 1) for r in REGIONS]
               + [_cell(res[v]["seconds_per_round"], n[v], 1), _cell(res[v]["first_round_seconds"], n[v], 1),
                  _cell(res[v]["wall_time_s"], n[v], 0)] for v in ok]
    lines += ["## Summary (mean over sites)", ""] + _table(
        ["variant", "WT Dice", "TC Dice", "ET Dice", "mean Dice", "worst site Dice", "WT HD95 mm", "TC HD95 mm",
         "ET HD95 mm", "s / round", "round 1 s", "wall s"], summary)
    per_site = [(f"{r.upper()} Dice per site", f"{r}_dice", f"mean_{r}_dice", 3) for r in REGIONS]
    per_site += [("Mean Dice (WT, TC, ET) per site", "dice", "mean_dice", 3)]
    per_site += [(f"{r.upper()} HD95 per site (mm)", f"{r}_hd95", f"mean_{r}_hd95", 1) for r in REGIONS]
    for title, key, mean_key, digits in per_site:
        rows = [[_row_name(v, res[v])] + [_cell(res[v]["sites"].get(site, {}).get(key), n[v], digits)
                                          for site in sites] + [_cell(res[v][mean_key], n[v], digits)] for v in ok]
        lines += [f"## {title}", ""] + _table(["variant", *labels, "mean"], rows)
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", "", f"Not counted in any mean above; the full traceback is in {_RESULTS_JSON}.",
                  ""]
        lines += _table(["variant", "seed", "error"],
                        [[r["variant"], str(r["seed"]), r["error"].replace("|", "\\|").replace("\n", " ")]
                         for r in failed])
    return "\n".join(lines)


# -- the benchmark -----------------------------------------------------------------------------------------------------
def _with_summary(record: dict[str, Any], variant: str) -> dict[str, Any]:
    """A record of :func:`fedoap.benchmark._execute` with the variant's name and, when the run succeeded, this
    table's summary of it (a results file it cannot read fails that run only)."""
    record = {**record, "variant": variant}
    if record["status"] != "ok":
        return record
    try:
        results = json.loads((Path(record["out"]) / "results.json").read_text())
        record["fedmepd"] = summarize_run(results, _history(results))
        record["region_rule"] = results.get("region_rule")
    except Exception as err:  # noqa: BLE001 - a malformed results file fails this run only
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
    return record


def run_bench_fedmepd(variants: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1, 2),
                      out: str | Path = "runs/bench_fedmepd", overrides: Optional[Mapping[str, Any]] = None,
                      verbose: bool = True, workers: Optional[int] = None) -> dict[str, Any]:
    """Run every variant on every seed, write ``bench_fedmepd.json`` and ``bench_fedmepd.md`` in ``out``; return the
    content of the JSON.

    Args:
        variants: names of :data:`VARIANTS` (None: all), in table order.
        seeds: one federation per seed: data, split, initial weights and training order.
        out: the folder; runs go to ``out/runs/<variant>/seed<k>`` and are reused when their ``results.json`` exists
            and was made with the same settings.
        overrides: settings replacing :data:`DEFAULT`'s (keys of :data:`OVERRIDABLE`; None values are ignored).
        workers: runs at the same time, each its own simulator process (None: the setting's, 1).

    Raises:
        ValueError: a bad argument (named), or ``out`` holds a finished run made with other settings.
    """
    say = print if verbose else (lambda *a, **k: None)
    variants = parse_variants(variants)
    seeds = _parse_seeds(seeds)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = resolve_settings(overrides)
    out = Path(out).resolve()
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")
    command = bench_fedmepd_command(variants, seeds, out, overrides)

    sites: list[str] = []

    def seed_federation(seed: int) -> FederationOptions:
        federation = _seed_federation(settings, out, seed)
        sites[:] = list(federation.clients)
        return federation

    plan = plan_runs(seeds, variants, out, bool(settings.get("data")), seed_federation,
                     lambda variant, seed, run_dir, federation: _plan_run(settings, variant, seed, run_dir, federation))
    if workers is not None:
        settings["workers"] = workers
    for _, _, run_dir, _, previous, _ in plan:
        if previous is None and Path(run_dir).exists():  # what a failed or interrupted run left: never read it
            shutil.rmtree(run_dir)

    records: list[dict[str, Any]] = []
    start = time.time()
    for i, (record, (seed, variant, *_)) in enumerate(zip(_execute(plan, settings["workers"]), plan), 1):
        record = _with_summary(record, variant)
        records.append(record)
        if record["status"] == "ok":
            sm = record["fedmepd"]
            say(f"[bench fedmepd] {i}/{len(plan)} {variant} seed {seed}{' (reused)' if record['resumed'] else ''}: "
                + ", ".join(f"{r.upper()} {_fmt(sm[f'mean_{r}_dice'])}" for r in REGIONS)
                + f", mean Dice {_fmt(sm['mean_dice'])} (worst {_fmt(sm['worst_site_dice'])}), "
                f"{_fmt(sm['seconds_per_round'], 1)} s/round, {record['seconds']:.0f} s")
        else:
            say(f"[bench fedmepd] {i}/{len(plan)} {variant} seed {seed}: FAILED {record['error']}")

    result = {
        "command": command,
        "settings": dict(settings),
        "sites": sites,  # as the simulator names them (the settings' clients/unseen are the organ task's defaults)
        "variants": variants,
        "variant_args": {v: method_args(v, settings["method_args"]) for v in variants},
        "seeds": seeds,
        "region_rule": next((r.get("region_rule") for r in records if r.get("region_rule")), None),
        "std": "sample standard deviation over seeds (ddof 1); shown without one with fewer than 2 values",
        "results": {v: aggregate_variant([r for r in records if r["variant"] == v]) for v in variants},
        "runs": records,
        "n_runs": len(records),
        "n_failed": sum(r["status"] != "ok" for r in records),
        "n_resumed": sum(bool(r["resumed"]) for r in records),
        "wall_time_s": time.time() - start,
    }
    if result["region_rule"] is None:
        result["region_rule"] = _region_rule({})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / _RESULTS_JSON, result)
    (out / _RESULTS_MD).write_text(bench_fedmepd_markdown(result))
    say(f"[bench fedmepd] wrote {out / _RESULTS_JSON}, {out / _RESULTS_MD}")
    return to_jsonable(result)
