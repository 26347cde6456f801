"""``fedoap benchmark``: every chosen method on identical data, splits and seeds, summarized over seeds.

Each method x seed is one ordinary :func:`fedoap.simulation.run_simulation` run (no simulation logic lives here), so
every method gets the same backbone width, data, local epochs and the same fine-tuning budget at the end (a
personalized model per site for every method). The data of a seed is generated once under ``DIR/data/seed<k>`` (or
read from ``--data``) and shared by all methods; the seed also fixes the case split, the initial weights and the
training order.

Two scores per site:

- **personalized** (the headline): the test Dice of the site's model after the final local fine-tuning
  (``results.json``'s ``clients[site]["dice"]``);
- **protocol** (FL-MedSegBench): the test Dice of the round's model (before fine-tuning) at the round
  ``r* = argmax_{r >= floor(T/2)} val Dice`` (see :func:`protocol_round`).

A run that fails is recorded with its error; the benchmark goes on. A run whose ``results.json`` already exists is
reused (resume), after checking that it was made with the same settings.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fedoap.config import FederationOptions, MethodOptions, RunConfig, TrainingOptions, cli_args
from fedoap.jsonio import to_jsonable, write_json

__all__ = [
    "PRESETS",
    "OVERRIDABLE",
    "ABLATIONS",
    "method_and_args",
    "resolve_settings",
    "protocol_round",
    "summarize_run",
    "aggregate_runs",
    "run_benchmark",
    "benchmark_command",
    "benchmark_markdown",
    "plot_dice_per_client",
    "plot_val_dice_per_round",
]

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, 2 cores: tiny images and network. The NVFlare simulator's start/stop and its task polling dominate a run's
    # time, not the training, so the preset spends its budget on local epochs (4 rounds x 4 epochs): with 4 rounds of
    # 1 epoch every method was still near its initialization and the ranking was seed noise (measured: a seed where
    # every method scored 0.15).
    "fast": {  # brain MRI and breast ultrasound (liver's small lesions need more than a tiny CPU budget)
        "clients": ("brain", "breast"), "unseen": "lung", "cases": {"brain": 6, "breast": 60, "lung": 3},
        "synthetic_size": 64, "image_size": 32, "width": 8, "total_epochs": 16, "local_epochs": 4,
        "finetune_epochs": 4, "batch_size": 8, "workers": 2,
    },
    # CPU, where personalization matters: the three organ sites at 64 x 64, width 16, 30 federated epochs (15 rounds
    # x 2), the unseen lung; 2.5-6.5 min per method and seed measured on 2 cores (one run at a time)
    "medium": {
        "clients": ("brain", "liver", "breast"), "unseen": "lung",
        "cases": {"brain": 10, "liver": 8, "breast": 100, "lung": 4},
        "synthetic_size": 64, "image_size": 64, "width": 16, "total_epochs": 30, "local_epochs": 2,
        "finetune_epochs": 5, "batch_size": 8, "workers": 1,
    },
    # one GPU: FL-MedSegBench's 256 x 256 slices and batch 8, the authors' lr 1e-4, 50 federated epochs
    "full": {
        "clients": ("brain", "liver", "breast"), "unseen": "lung",
        "cases": {"brain": 24, "liver": 16, "breast": 150, "lung": 12},
        "synthetic_size": 256, "image_size": 256, "width": 32, "total_epochs": 50, "local_epochs": 1,
        "finetune_epochs": 10, "batch_size": 8, "lr": 1e-4, "device": "cuda", "workers": 1,
    },
}
"""Benchmark settings: partial overrides of the run configuration's training options (``fedoap.config``, every
option but the seed, which each run takes from ``--seeds``) and of the simulated federation's, plus the benchmark's
own ``total_epochs`` and ``workers``. ``rounds = total_epochs // local_epochs`` unless ``rounds`` is given: changing
``local_epochs`` alone trades rounds for local epochs at the same training budget."""

_TRAINING = tuple(f.name for f in fields(TrainingOptions) if f.name != "seed")
_FEDERATION = tuple(f.name for f in fields(FederationOptions))
#: keys a caller may override (``data`` points at real data: one MSD-layout folder per site, used for every seed)
OVERRIDABLE = (*_TRAINING, *_FEDERATION, "total_epochs", "workers")
#: config keys that may differ between an earlier run and now without changing its results
_RESUME_IGNORED = ("data", "tracking")
RUNS_DIR = "runs"
DATA_DIR = "data"


# -- settings ----------------------------------------------------------------------------------------------------------
def resolve_settings(preset: str, overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The preset with the overrides applied, checked (by the options' own checks) and ``rounds`` resolved.

    Raises:
        ValueError: an unknown preset or override key, an invalid option (named), ``rounds`` together with
            ``total_epochs``, or ``total_epochs`` not a multiple of ``local_epochs``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return {**_resolve(PRESETS[preset], overrides), "preset": preset}


def _resolve(base: Mapping[str, Any], overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``base`` (a preset: partial settings with ``total_epochs`` and ``workers``) with the overrides applied and
    checked, ``rounds`` resolved (see :func:`resolve_settings`; other benchmarks start from other bases)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {list(OVERRIDABLE)}")
    if "rounds" in overrides and "total_epochs" in overrides:
        raise ValueError("give rounds or total_epochs, not both")
    s = {**base, **overrides}
    for key in ("total_epochs", "workers"):
        if key in s and (isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1):
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {s[key]!r}")
    training = TrainingOptions(**{k: v for k, v in s.items() if k in _TRAINING and k != "rounds"})
    if "rounds" in overrides:
        training = replace(training, rounds=overrides["rounds"])
    else:
        if s["total_epochs"] % training.local_epochs:
            raise ValueError(f"total_epochs ({s['total_epochs']}) must be a multiple of local_epochs "
                             f"({training.local_epochs})")
        training = replace(training, rounds=s["total_epochs"] // training.local_epochs)
    federation = FederationOptions(**{k: v for k, v in s.items() if k in _FEDERATION})
    resolved = {k: v for k, v in asdict(training).items() if k != "seed"}
    return {**resolved, **asdict(federation), "total_epochs": training.rounds * training.local_epochs,
            "workers": s["workers"]}


#: FedOAP's ablations, selectable in ``--methods`` next to the registered methods: name -> (method, its arguments).
#: Each removes one part of FedOAP (design notes, section 2) and keeps everything else; ``fedoap-no-head-prior`` is
#: the authors' FedOAP (the stall fix off: its default is on except under DP-SGD) and ``fedoap-head-prior`` the fix
#: forced on, so that a table shows FedOAP with and without it.
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedoap-no-dca": ("fedoap", {"cross_attention": False}),  # plain shared UNet bottleneck, no local query
    "fedoap-no-adapter": ("fedoap", {"adapter": False}),  # no local spatial adapter
    "fedoap-no-pbl": ("fedoap", {"use_pbl": False}),  # fine-tuning with the plain loss
    "fedoap-kv-only": ("fedoap", {"partition": "kv_only"}),  # only the key/value branch shared
    "fedoap-bare": ("fedoap", {"cross_attention": False, "adapter": False, "use_pbl": False}),  # all three removed
    "fedoap-no-head-prior": ("fedoap", {"head_prior_init": False}),  # the authors' FedOAP: no stall fix
    "fedoap-head-prior": ("fedoap", {"head_prior_init": True}),  # the stall fix forced on
}


def method_and_args(name: str) -> tuple[str, dict[str, Any]]:
    """The registered method and its constructor arguments behind a benchmark method name."""
    return ABLATIONS[name] if name in ABLATIONS else (name, {})


def _parse_methods(methods: Optional[Sequence[str]]) -> list[str]:
    from fedoap.methods import METHODS

    names = list(METHODS) if methods is None else list(methods)
    if not names:
        raise ValueError("methods is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"methods must be distinct, got {names}")
    unknown = [m for m in names if m not in METHODS and m not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)} or FedOAP's ablations "
                         f"{sorted(ABLATIONS)}")
    return names


def _parse_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    return seeds


def benchmark_command(methods: Sequence[str], seeds: Sequence[int], preset: str, out: str | Path,
                      overrides: Optional[Mapping[str, Any]] = None) -> str:
    """The ``fedoap benchmark`` command line that repeats this benchmark (written into ``benchmark.md``)."""
    parts = ["fedoap", "benchmark", "--methods", ",".join(methods), "--seeds", ",".join(map(str, seeds)),
             "--preset", preset, "--out", str(out)]
    parts += cli_args(**{k: v for k, v in (overrides or {}).items() if v is not None})
    return shlex.join(parts)


# -- one run -----------------------------------------------------------------------------------------------------------
def protocol_round(val_dice: Sequence[Optional[float]]) -> Optional[int]:
    """FL-MedSegBench's model selection: the 0-based round ``r* = argmax_{r >= floor(T/2)} val_dice[r]``.

    Selecting late in training avoids crediting a lucky early round; the first best round wins ties. A missing or
    non-finite value never wins. Returns None when ``val_dice`` is empty or has no finite value in the window.
    """
    start = len(val_dice) // 2
    best, best_round = -math.inf, None
    for r in range(start, len(val_dice)):
        v = val_dice[r]
        if v is not None and math.isfinite(v) and v > best:
            best, best_round = v, r
    return best_round


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values: Sequence[Any]) -> Optional[float]:
    finite = _finite(values)
    return float(np.mean(finite)) if finite else None


#: the unseen organ's scores of LESION_FP_RULE, per site: results.json's ``unseen[site]`` key -> the benchmark's name
_UNSEEN_SCORES = {"lesion_dice": "unseen_lesion_dice", "empty_fp_rate": "unseen_empty_fp_rate",
                  "empty_fp_area": "unseen_empty_fp_area", "pooled_dice": "unseen_pooled_dice"}


def _count(values: Sequence[Any]) -> Optional[int]:
    """The one count the sites report for the same data (the unseen organ's slices), or None when they differ."""
    given = {int(v) for v in _finite(values)}
    return given.pop() if len(given) == 1 else None


def summarize_run(results: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers the benchmark compares, from one run's ``results.json`` content (a results file written before
    LESION_FP_RULE's scores existed gives None for them)."""
    clients: dict[str, Any] = {}
    val_curves, test_curves = results.get("val_dice_per_round", {}), results.get("test_dice_per_round", {})
    unseen = results.get("unseen", {})
    for site, row in results["clients"].items():
        val = val_curves.get(site, [])
        r = protocol_round(val)
        test = test_curves.get(site, [])
        clients[site] = {
            "dice": row["dice"],
            "hd95": row["hd95"],
            "protocol_round": r,
            "protocol_val_dice": val[r] if r is not None else None,
            "protocol_dice": test[r] if r is not None and r < len(test) else None,
            "lesion_dice": row.get("lesion_dice"),
            "empty_fp_rate": row.get("empty_fp_rate"),
            "volume_dice": row.get("volume_dice"),  # per test volume (3D), NIfTI sites only
            "unseen_dice": unseen.get(site, {}).get("dice"),
            **{name: unseen.get(site, {}).get(key) for key, name in _UNSEEN_SCORES.items()},
            "bytes_uploaded_per_round": results["bytes_uploaded_per_round"].get(site),
        }
    dice = {site: c["dice"] for site, c in clients.items() if c["dice"] is not None}
    worst = min(dice, key=dice.get) if dice else None
    n_rounds = max((len(v) for v in val_curves.values()), default=0)
    return {
        "clients": clients,
        "mean_dice": _mean(dice.values()),
        "worst_client": worst,
        "worst_client_dice": dice[worst] if worst else None,
        "mean_hd95": _mean([c["hd95"] for c in clients.values()]),
        "protocol_mean_dice": _mean([c["protocol_dice"] for c in clients.values()]),
        "protocol_worst_client_dice": min(_finite([c["protocol_dice"] for c in clients.values()]), default=None),
        "mean_lesion_dice": _mean([c["lesion_dice"] for c in clients.values()]),
        "mean_empty_fp_rate": _mean([c["empty_fp_rate"] for c in clients.values()]),
        "mean_volume_dice": _mean([c["volume_dice"] for c in clients.values()]),
        "unseen_dice": _mean([c["unseen_dice"] for c in clients.values()]),
        **{name: _mean([c[name] for c in clients.values()]) for name in _UNSEEN_SCORES.values()},
        "unseen_n_lesion": _count([u.get("n_lesion") for u in unseen.values()]),
        "unseen_n_empty": _count([u.get("n_empty") for u in unseen.values()]),
        "bytes_uploaded_per_round_per_client": _mean([c["bytes_uploaded_per_round"] for c in clients.values()]),
        "wall_time_s": results.get("wall_time_s"),
        "val_dice_per_round": [_mean([v[r] for v in val_curves.values() if r < len(v)]) for r in range(n_rounds)],
    }


def _mean_std(values: Sequence[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; None with fewer than 2 values) over seeds."""
    finite = _finite(values)
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
        "n": len(finite),
    }


_CLIENT_METRICS = ("dice", "hd95", "protocol_dice", "lesion_dice", "empty_fp_rate", "volume_dice", "unseen_dice",
                   *_UNSEEN_SCORES.values(), "bytes_uploaded_per_round")
_METHOD_METRICS = ("mean_dice", "worst_client_dice", "mean_hd95", "protocol_mean_dice", "protocol_worst_client_dice",
                   "mean_lesion_dice", "mean_empty_fp_rate", "mean_volume_dice", "unseen_dice",
                   *_UNSEEN_SCORES.values(), "bytes_uploaded_per_round_per_client", "wall_time_s")


def parse_choices(flag: str, names: Optional[Sequence[str]], choices: Sequence[str]) -> list[str]:
    """The chosen names of a benchmark's rows in the table's order (None: all of ``choices``).

    Raises:
        ValueError: an unknown or repeated name, or none (``flag`` names the option).
    """
    names = list(choices if names is None else names)
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"{flag}: unknown name(s) {unknown}; choose from {','.join(choices)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{flag} must name distinct entries, got {names}")
    return [c for c in choices if c in names]


def split_by_status(runs: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], dict[str, Any]]:
    """The successful runs of one row, and the row's status record (``status`` ok / partial / failed, the seeds
    that succeeded and failed) that its aggregate starts from."""
    ok = [r for r in runs if r["status"] == "ok"]
    failed = [r["seed"] for r in runs if r["status"] != "ok"]
    status = "failed" if not ok else ("partial" if failed else "ok")
    return ok, {"status": status, "seeds_ok": [r["seed"] for r in ok], "seeds_failed": failed}


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One method's mean and std over its successful seeds (runs: records of :func:`run_benchmark`)."""
    ok, summary = split_by_status(runs)
    if not ok:
        return summary
    sites = sorted({s for r in ok for s in r["summary"]["clients"]})
    summary["clients"] = {
        site: {m: _mean_std([r["summary"]["clients"].get(site, {}).get(m) for r in ok]) for m in _CLIENT_METRICS}
        for site in sites
    }
    for m in _METHOD_METRICS:
        summary[m] = _mean_std([r["summary"][m] for r in ok])
    n_rounds = max(len(r["summary"]["val_dice_per_round"]) for r in ok)
    summary["val_dice_per_round"] = [
        _mean([r["summary"]["val_dice_per_round"][i] for r in ok if i < len(r["summary"]["val_dice_per_round"])])
        for i in range(n_rounds)
    ]
    return summary


# -- the benchmark -----------------------------------------------------------------------------------------------------
def _seed_data(settings: Mapping[str, Any], out: Path, seed: int) -> Path:
    """The seed's data folder: ``--data`` as given, or the synthetic federation generated once under
    ``out/data/seed<k>`` and kept (:func:`fedoap.simulation.synthetic_federation`), so that a resumed benchmark uses
    the same files.

    Raises:
        ValueError: a site that is not a synthetic organ, or the folder holds data generated with other settings.
    """
    if settings.get("data"):
        return Path(settings["data"]).resolve()
    from fedoap.simulation import synthetic_federation, synthetic_sites

    names = list(settings["clients"]) + ([settings["unseen"]] if settings["unseen"] else [])
    return synthetic_federation(out / DATA_DIR / f"seed{seed}", synthetic_sites(names, settings.get("cases")), seed,
                                settings["synthetic_size"])


@dataclass(frozen=True)
class PlannedRun:
    """One method x seed of the benchmark: an ordinary simulation in its own folder."""

    out: str
    run: RunConfig
    federation: FederationOptions


def _config(settings: Mapping[str, Any], method: str, seed: int, run_dir: Path, data: Path) -> PlannedRun:
    registered, method_args = method_and_args(method)
    training = TrainingOptions(**{k: settings[k] for k in _TRAINING}, seed=seed)
    federation = FederationOptions(**{**{k: settings[k] for k in _FEDERATION}, "data": str(data)})
    run = RunConfig(training=training, method=MethodOptions(name=registered, args=dict(method_args)))
    return PlannedRun(out=str(run_dir), run=run, federation=federation)


def _config_mismatch(stored: Mapping[str, Any], cfg: PlannedRun, user_data: bool) -> list[str]:
    """Keys whose stored value differs from the config this benchmark would run now. The path of generated data is
    not compared (its content follows from the seed, and a benchmark folder may be moved); keys that only one side
    has (an option added since) are not compared either, except ``method_settings``, the method's settings with its
    defaults resolved: a run that did not record them was made by an earlier version, whose defaults may differ
    (FedOAP's head prior was off), so it is never reused."""
    from fedoap.simulation import config_record

    now = config_record(cfg.run, cfg.federation)
    ignored = set(_RESUME_IGNORED) - ({"data"} if user_data else set())
    differ = sorted(k for k in set(now) & set(stored) if k not in ignored and now[k] != stored[k])
    if "method_settings" not in stored:
        differ.append("method_settings (not recorded: made by an earlier version of fedoap)")
    return differ


def _previous_results(run_dir: str | Path, cfg: PlannedRun, user_data: bool) -> Optional[dict[str, Any]]:
    """The ``results.json`` content of a finished run in ``run_dir`` to reuse, or None when there is none.

    Raises:
        ValueError: that run was made with other settings (they are named).
    """
    done = Path(run_dir) / "results.json"
    if not done.is_file():
        return None
    previous = json.loads(done.read_text())
    differ = _config_mismatch(previous.get("config", {}), cfg, user_data)
    if differ:
        raise ValueError(f"{done} was made with other settings ({', '.join(differ)} differ); "
                         "choose another out folder or delete that run")
    return previous


def _run_one(cfg: PlannedRun) -> tuple[dict[str, Any], float]:
    """One run, timed (module level so that a worker process can run it)."""
    from fedoap.simulation import run_simulation

    run_start = time.time()
    return run_simulation(cfg.run, cfg.federation, cfg.out, verbose=False), time.time() - run_start


def _record(method: str, seed: int, out: str, resumed: bool, results: Optional[Mapping[str, Any]],
            seconds: Optional[float], err: Optional[BaseException] = None) -> dict[str, Any]:
    record: dict[str, Any] = {"method": method, "seed": seed, "out": out, "resumed": resumed, "seconds": seconds}
    if err is None:
        try:
            record.update(status="ok", summary=summarize_run(results))
        except Exception as summary_err:  # noqa: BLE001 - a malformed results file fails this run only
            err = summary_err
    if err is not None:
        record.update(status="failed", error=f"{type(err).__name__}: {err}",
                      traceback="".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return record


#: one planned run: seed, method name, its folder, its configuration (None: it could not be built), the results of an
#: earlier invocation to reuse (or None), the error that building its configuration raised (or None)
_Plan = tuple[int, str, str, Optional[PlannedRun], Optional[dict[str, Any]], Optional[BaseException]]


def plan_runs(seeds: Sequence[int], names: Sequence[str], out: Path, user_data: bool,
              seed_context: Callable[[int], Any], config_for: Callable[[str, int, Path, Any], PlannedRun]
              ) -> list[_Plan]:
    """Every run of a benchmark, planned before any starts: per seed its shared context once (its data; an error
    there stops the benchmark), then per name the run in ``out/runs/<name>/seed<k>`` with its configuration and the
    results of an earlier invocation to reuse (checked against it: other settings stop the benchmark), or the error
    that keeps that run from being built (it fails alone)."""
    plan: list[_Plan] = []
    for seed in seeds:
        context = seed_context(seed)
        for name in names:
            run_dir = str(out / RUNS_DIR / name / f"seed{seed}")
            try:
                cfg = config_for(name, seed, Path(run_dir), context)
            except Exception as err:  # noqa: BLE001 - a method that cannot be built fails its runs only
                plan.append((seed, name, run_dir, None, None, err))
                continue
            plan.append((seed, name, run_dir, cfg, _previous_results(run_dir, cfg, user_data), None))
    return plan


def _execute(plan: Sequence[_Plan], workers: int):
    """Yield one record per planned run, in plan order: reused runs and runs whose configuration failed at once, the
    others run ``workers`` at a time. A failing run is recorded with its error and traceback; the others go on."""
    import concurrent.futures
    import multiprocessing

    to_run = [i for i, (_, _, _, cfg, previous, _) in enumerate(plan) if cfg is not None and previous is None]
    pool = None
    if workers > 1 and len(to_run) > 1:
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers,
                                                      mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {i: pool.submit(_run_one, plan[i][3]) for i in to_run} if pool else {}
        for i, (seed, method, out, cfg, previous, error) in enumerate(plan):
            if error is not None:
                yield _record(method, seed, out, False, None, None, error)
                continue
            if previous is not None:
                yield _record(method, seed, out, True, previous, 0.0)
                continue
            try:
                results, seconds = futures[i].result() if pool else _run_one(cfg)
            except Exception as err:  # noqa: BLE001 - one method's failure must not end a long benchmark
                yield _record(method, seed, out, False, None, None, err)
            else:
                yield _record(method, seed, out, False, results, seconds)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def run_benchmark(
    methods: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0, 1, 2),
    preset: str = "fast",
    out: str | Path = "runs/benchmark",
    overrides: Optional[Mapping[str, Any]] = None,
    verbose: bool = True,
    workers: Optional[int] = None,
) -> dict[str, Any]:
    """Run every method on every seed, write ``benchmark.json``, ``benchmark.md`` and two PNG plots in ``out``;
    return the content of ``benchmark.json``.

    Args:
        methods: registered method names (default: all of :data:`fedoap.methods.METHODS`), each with its defaults.
        seeds: one federation per seed: data, split, initial weights and training order.
        preset: a key of :data:`PRESETS`.
        out: the benchmark folder; runs go to ``out/runs/<method>/seed<k>`` and are reused when their
            ``results.json`` exists.
        overrides: settings replacing the preset's (keys of :data:`OVERRIDABLE`; None values are ignored).
        verbose: print one line per run (the simulator prints its rounds regardless).
        workers: runs executed at the same time, each in its own process (its own NVFlare simulator); None: the
            preset's (``fast``: 2, ``full``: 1). On a small CPU machine most of a tiny run is process start-up and
            task polling, so 2 workers on 2 cores nearly halve the wall time; the per-run wall times then include the
            contention (the report says so). Not a setting of the runs: resuming with other workers is fine.

    Raises:
        ValueError: a bad argument (named), or ``out`` holds data or a finished run made with other settings.
    """
    say = print if verbose else (lambda *a, **k: None)
    methods = _parse_methods(methods)
    seeds = _parse_seeds(seeds)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = resolve_settings(preset, overrides)
    out = Path(out).resolve()
    command = benchmark_command(methods, seeds, preset, out, overrides)

    # Each seed's data once, then every run planned and the finished ones checked before anything runs: a benchmark
    # never mixes settings.
    plan = plan_runs(seeds, methods, out, bool(settings.get("data")), lambda seed: _seed_data(settings, out, seed),
                     lambda method, seed, run_dir, data: _config(settings, method, seed, run_dir, data))

    if workers is not None:
        settings["workers"] = workers
    workers = settings["workers"]
    records: list[dict[str, Any]] = []
    start = time.time()
    for _, _, run_dir, _, previous, _ in plan:
        if previous is None and Path(run_dir).exists():  # what a failed or interrupted run left: never read it
            shutil.rmtree(run_dir)
    for i, (record, (seed, method, *_)) in enumerate(zip(_execute(plan, workers), plan), 1):
        records.append(record)
        if record["status"] == "ok":
            sm = record["summary"]
            say(f"[benchmark] {i}/{len(plan)} {method} seed {seed}{' (reused)' if record['resumed'] else ''}: "
                f"Dice {_fmt(sm['mean_dice'])} (worst {_fmt(sm['worst_client_dice'])}), protocol Dice "
                f"{_fmt(sm['protocol_mean_dice'])}, {record['seconds']:.0f} s")
        else:
            say(f"[benchmark] {i}/{len(plan)} {method} seed {seed}: FAILED {record['error']}")

    by_method = {m: aggregate_runs([r for r in records if r["method"] == m]) for m in methods}
    ranking = sorted((m for m in methods if by_method[m]["status"] != "failed"),
                     key=lambda m: -(by_method[m]["mean_dice"]["mean"] or -1.0))
    result = {
        "command": command,
        "preset": preset,
        "settings": {k: v for k, v in settings.items()},
        "methods": methods,
        "seeds": seeds,
        "empty_mask_rule": _empty_mask_rule(),
        "lesion_fp_rule": _lesion_fp_rule(),
        "headline": "personalized",
        "protocol": "test Dice of the round's model (before fine-tuning) at the round with the best validation Dice "
                    "among rounds r >= floor(T/2) (0-based), per site",
        "std": "sample standard deviation over seeds (ddof 1); null with fewer than 2 successful seeds",
        "ranking": ranking,
        "results": by_method,
        "runs": records,
        "n_runs": len(records),
        "n_failed": sum(r["status"] != "ok" for r in records),
        "n_resumed": sum(r["resumed"] for r in records),
        "workers": workers,
        "wall_time_s": time.time() - start,
        "figures": {"dice_per_client": "dice_per_client.png", "val_dice_per_round": "val_dice_per_round.png"},
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_dice_per_client(result, out / "dice_per_client.png")
    plot_val_dice_per_round(result, out / "val_dice_per_round.png")
    write_json(out / "benchmark.json", result)
    (out / "benchmark.md").write_text(benchmark_markdown(result))
    say(f"[benchmark] wrote {out / 'benchmark.json'}, {out / 'benchmark.md'}, {out / 'dice_per_client.png'}, "
        f"{out / 'val_dice_per_round.png'}")
    return to_jsonable(result)


# -- report ------------------------------------------------------------------------------------------------------------
def _empty_mask_rule() -> str:
    from fedoap.eval.metrics import EMPTY_MASK_RULE  # MONAI and torch: imported once the runs start, not to check options

    return EMPTY_MASK_RULE


def _lesion_fp_rule() -> str:
    from fedoap.eval.metrics import LESION_FP_RULE

    return LESION_FP_RULE


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{value:.{digits}f}"


def _fmt_ms(ms: Optional[Mapping[str, Any]], digits: int = 3) -> str:
    """``mean ± std``, or the mean alone with one seed."""
    if not ms or ms.get("mean") is None:
        return "n/a"
    if ms.get("std") is None:
        return _fmt(ms["mean"], digits)
    return f"{_fmt(ms['mean'], digits)} ± {_fmt(ms['std'], digits)}"


def _fmt_bytes(ms: Optional[Mapping[str, Any]]) -> str:
    if not ms or ms.get("mean") is None:
        return "n/a"
    b = ms["mean"]
    return f"{b / 1e6:.3f} MB" if b >= 1e6 else (f"{b / 1e3:.1f} kB" if b >= 1e3 else f"{b:.0f} B")


def _colors(n: int) -> list[Any]:
    """Distinct colors for up to 20 methods (matplotlib's default cycle repeats after 10)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _row_name(method: str, agg: Mapping[str, Any]) -> str:
    if agg["status"] == "partial":
        return f"{method} (failed seeds {','.join(map(str, agg['seeds_failed']))})"
    return method


def _lesion_fp_text(result: Mapping[str, Any]) -> str:
    return result.get("lesion_fp_rule") or _lesion_fp_rule()  # a benchmark.json written before the rule existed


def _unseen_section(result: Mapping[str, Any], ok: Sequence[str]) -> list[str]:
    """The unseen organ's table: the Dice of EMPTY_MASK_RULE next to the scores of LESION_FP_RULE, mean over the
    sites' personalized models, then mean ± std over seeds, with the slice counts each score covers."""
    res, organ = result["results"], result["settings"]["unseen"]
    counts = {}
    for r in result["runs"]:  # the same data for every method of a seed: one count per seed
        if r["status"] == "ok" and r["seed"] not in counts:
            counts[r["seed"]] = (r["summary"].get("unseen_n_lesion"), r["summary"].get("unseen_n_empty"))
    per_seed = "; ".join(f"seed {seed}: {'?' if n_lesion is None else n_lesion} with tumour, "
                         f"{'?' if n_empty is None else n_empty} empty" for seed, (n_lesion, n_empty) in
                         sorted(counts.items()))
    rows = [[_row_name(m, res[m]), _fmt_ms(res[m]["unseen_dice"]), _fmt_ms(res[m].get("unseen_lesion_dice")),
             _fmt_ms(res[m].get("unseen_empty_fp_rate"), 2), _fmt_ms(res[m].get("unseen_empty_fp_area"), 4),
             _fmt_ms(res[m].get("unseen_pooled_dice"))] for m in ok]
    return [f"## Unseen organ ({organ}): lesion Dice and empty-slice false positives", "",
            "Every site's personalized model on every slice of an organ no site trained on; mean over sites, then "
            f"mean ± std over seeds (scores as stated at the top). Slices{': ' + per_seed if per_seed else ''}.",
            ""] + _table(["method", "Dice (empty-mask rule)", "lesion Dice", "empty-slice FP rate",
                          "FP area on empty slices", "pooled Dice"], rows)


def benchmark_markdown(result: Mapping[str, Any]) -> str:
    """The tables a reader compares: one per metric, methods as rows (ranked by personalized Dice)."""
    s, res = result["settings"], result["results"]
    order = list(result["ranking"]) + [m for m in result["methods"] if m not in result["ranking"]]
    ok = [m for m in order if res[m]["status"] != "failed"]
    sites = sorted({site for m in ok for site in res[m]["clients"]})
    lines = [
        f"# Benchmark: {', '.join(result['methods'])}",
        "",
        f"Produced by `{result['command']}` (preset `{result['preset']}`).",
        "",
        f"Setting: sites {', '.join(s['clients'])}" + (f", unseen organ {s['unseen']}" if s["unseen"] else "")
        + f"; data {'from ' + str(s['data']) if s.get('data') else 'synthetic, generated once per seed and shared by every method'}; "
        f"{s['image_size']} x {s['image_size']} slices; UNet width {s['width']}; {s['rounds']} rounds x "
        f"{s['local_epochs']} local epoch(s), then {s['finetune_epochs']} epoch(s) of local fine-tuning for every "
        f"method (best epoch on the validation split); batch {s['batch_size']}, lr {s['lr']}, device {s['device']}; "
        f"seeds {', '.join(map(str, result['seeds']))}; every method with its default options.",
        "",
        f"**Ranking by the personalized score** (test Dice of each site's fine-tuned model, mean over sites): "
        f"{' > '.join(result['ranking']) or 'no method finished'}. The protocol score (FL-MedSegBench) is the "
        f"{result['protocol']}; it is reported alongside, not used for the ranking.",
        "",
        f"Empty masks: {result['empty_mask_rule']}",
        "",
        f"Slices with and without tumour: {_lesion_fp_text(result)}"
        + (" On the unseen organ, where most slices are empty, the Dice above is ~0 for a method that marks a few of "
           "them; compare methods there by lesion Dice (how well it outlines a tumour it never saw) and empty-slice FP "
           "rate (how often it marks one where there is none)." if s["unseen"] else ""),
        "",
        f"Values: mean ± {result['std']}. Bytes: what one site uploads per round (shared parameters only).",
        "",
    ]
    if result.get("workers", 1) > 1:
        lines += [f"Runs: {result['workers']} at a time, each in its own process; a run's wall time includes the "
                  "contention with the others (compare wall times only within one benchmark).", ""]
    if result["n_resumed"]:
        lines += [f"Resume: {result['n_resumed']} of {result['n_runs']} runs were reused from an earlier invocation "
                  "(their `results.json` already existed in `runs/<method>/seed<k>`; wall times are theirs).", ""]
    summary_rows = [[
        _row_name(m, res[m]), _fmt_ms(res[m]["mean_dice"]), _fmt_ms(res[m]["worst_client_dice"]),
        _fmt_ms(res[m]["protocol_mean_dice"]), _fmt_ms(res[m]["mean_hd95"], 1), _fmt_ms(res[m]["unseen_dice"]),
        _fmt_ms(res[m].get("unseen_lesion_dice")), _fmt_ms(res[m].get("unseen_empty_fp_rate"), 2),
        _fmt_bytes(res[m]["bytes_uploaded_per_round_per_client"]), _fmt_ms(res[m]["wall_time_s"], 0),
    ] for m in ok]
    lines += ["## Summary", ""] + _table(
        ["method", "personalized Dice (mean over sites)", "worst site Dice", "protocol Dice", "HD95 px",
         "unseen-organ Dice", "unseen lesion Dice", "unseen empty-slice FP rate", "upload / round / site",
         "wall time s"], summary_rows)
    if s["unseen"]:
        lines += _unseen_section(result, ok)

    per_client = [
        ("Personalized Dice per site (headline)", "dice", "mean_dice", 3),
        ("Personalized HD95 per site (pixels)", "hd95", "mean_hd95", 1),
        ("Protocol Dice per site (best validation round after T/2, before fine-tuning)", "protocol_dice",
         "protocol_mean_dice", 3),
        ("Personalized lesion Dice per site (test slices with tumour only)", "lesion_dice", "mean_lesion_dice", 3),
        ("Personalized empty-slice FP rate per site (test slices without tumour)", "empty_fp_rate",
         "mean_empty_fp_rate", 2),
        ("Personalized per-volume (3D) Dice per site (each test volume's slices stacked; NIfTI sites only, "
         "mean over the sites that have volumes)", "volume_dice", "mean_volume_dice", 3),
    ]
    if s["unseen"]:
        per_client += [
            (f"Unseen organ ({s['unseen']}) Dice of each site's personalized model", "unseen_dice", "unseen_dice", 3),
            (f"Unseen organ ({s['unseen']}) lesion Dice of each site's personalized model", "unseen_lesion_dice",
             "unseen_lesion_dice", 3),
            (f"Unseen organ ({s['unseen']}) empty-slice FP rate of each site's personalized model",
             "unseen_empty_fp_rate", "unseen_empty_fp_rate", 2),
        ]
    for title, key, mean_key, digits in per_client:
        rows = [[_row_name(m, res[m])] + [_fmt_ms(res[m]["clients"].get(site, {}).get(key), digits) for site in sites]
                + [_fmt_ms(res[m].get(mean_key), digits)] for m in ok]
        lines += [f"## {title}", ""] + _table(["method", *sites, "mean"], rows)
    rows = [[_row_name(m, res[m])] + [_fmt_bytes(res[m]["clients"].get(site, {}).get("bytes_uploaded_per_round"))
                                      for site in sites] for m in ok]
    lines += ["## Upload per round per site", ""] + _table(["method", *sites], rows)

    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", "", "Not counted in any mean above; the full traceback is in benchmark.json.", ""]
        lines += _table(["method", "seed", "error"],
                        [[r["method"], str(r["seed"]), r["error"].replace("|", "\\|").replace("\n", " ")]
                         for r in failed])
    lines += ["## Figures", "", "![personalized Dice per site](dice_per_client.png)", "",
              "![validation Dice per round](val_dice_per_round.png)", ""]
    return "\n".join(lines)


def plot_dice_per_client(result: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: personalized test Dice per method per site (and the mean), error bars one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["results"]
    methods = [m for m in result["ranking"]]
    sites = sorted({site for m in methods for site in res[m]["clients"]})
    groups = sites + ["mean"]
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.3 * len(groups) * max(1, len(methods)) + 3)), 5))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    colors = _colors(len(methods))
    for i, m in enumerate(methods):
        cells = [res[m]["clients"].get(site, {}).get("dice", {}) for site in sites] + [res[m]["mean_dice"]]
        means = [np.nan if c.get("mean") is None else c["mean"] for c in cells]
        stds = [0.0 if c.get("std") is None else c["std"] for c in cells]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=m,
               color=colors[i])
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("personalized test Dice per image (mean)")
    ax.set_title(f"Dice per method per site ({result['preset']} preset, {len(result['seeds'])} seed(s))")
    ax.grid(axis="y", alpha=0.3)
    if methods:  # below the axes: with many methods a legend inside would cover the bars
        ax.legend(fontsize=7, ncol=min(len(methods), 7), loc="upper center", bbox_to_anchor=(0.5, -0.08),
                  frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_val_dice_per_round(result: Mapping[str, Any], path: Path) -> Path:
    """Mean validation Dice (over sites and seeds) after each round, per method; the dashed line starts the
    protocol's selection window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["results"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = _colors(len(result["ranking"]))
    for i, m in enumerate(result["ranking"]):
        curve = [np.nan if v is None else v for v in res[m]["val_dice_per_round"]]
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", ms=3, label=m, color=colors[i],
                ls=("-", "--", ":")[(i // 10) % 3])
    rounds = result["settings"]["rounds"]
    ax.axvline(rounds // 2 + 1, color="gray", ls="--", lw=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round (dashed: first round the protocol may select)")
    ax.set_ylabel("validation Dice (mean over sites and seeds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("Validation Dice per round")
    if result["ranking"]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
