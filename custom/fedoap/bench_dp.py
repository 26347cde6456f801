"""``fedoap bench dp``: what differential privacy costs FedOAP, as personalized Dice against epsilon.

One table, one row per setting and target epsilon, every row FedOAP with the default ``fedoap simulate`` training
(or the overrides given), on the same data, splits and seeds:

- ``plain``: no DP (epsilon = inf), the reference every Dice drop is measured against;
- ``dp_sgd``: sample-level DP-SGD at every site, calibrated to the target epsilon over the whole run
  (``dp_sgd_epsilon``); every other DP-SGD option at its default, so the table follows the defaults of the day;
- ``client``: client-level DP of each site's shared update (McMahan et al. 2018): clip ``client_clip`` and the
  noise multiplier sigma that spends at most the target over the run's rounds, each round one release
  (:func:`fedoap.privacy.dp.noise_for_epsilon`);
- ``distributed``: the same sigma, shared among the sites inside secure aggregation (or HE): each site adds 1/m of
  the noise variance, m = every site (``min_responses``), so the sum the server sees carries sigma * clip as in
  ``client``, while a site's own update carries less noise: what it spends against a coalition of the other sites
  is reported next to what it spends against the server.

The epsilon *spent* is what the sites' accountants reported (``results.json``'s ``privacy``: the weakest site after
the last round), not the target. The epsilons of different settings protect different units: DP-SGD one training
slice (or case) of a site, client-level DP a site's whole contribution.

Each row x seed is one ordinary :func:`fedoap.simulation.run_simulation` run, planned, executed (``workers`` at a
time), summarized and reused on resume by :mod:`fedoap.benchmark`'s machinery; the data of a seed is generated once
under ``OUT/data/seed<k>`` and shared by every row.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fedoap.benchmark import (_FEDERATION, _TRAINING, RUNS_DIR, _config, _empty_mask_rule, _execute, _fmt, _fmt_ms,
                              _mean_std, _parse_seeds, _previous_results, _resolve, _seed_data, _table, aggregate_runs,
                              parse_choices)
from fedoap.config import PrivacyOptions, TrainingOptions, cli_args
from fedoap.jsonio import to_jsonable, write_json

__all__ = ["SETTINGS", "OVERRIDABLE", "DpRow", "resolve_dp_settings", "parse_settings", "parse_epsilons",
           "plan_rows", "epsilon_spent", "summarize_rows", "bench_dp_command", "dp_table", "bench_dp_markdown",
           "run_bench_dp"]

#: the rows' kinds, in table order
SETTINGS = ("plain", "dp_sgd", "client", "distributed")
DEFAULT_EPSILONS = (1.0, 4.0, 8.0)
DEFAULT_CLIENT_CLIP = 1.0
DISTRIBUTED_VIA = ("secagg", "he")
#: the settings a caller may override: the training (but the seed, from ``seeds``) and the simulated federation,
#: as in ``fedoap benchmark``, plus its ``total_epochs`` and ``workers``
OVERRIDABLE = (*_TRAINING, *_FEDERATION, "total_epochs", "workers")
#: the spent-epsilon keys of a row (``results.json``'s ``privacy[<key>_federation]``)
EPSILON_KEYS = ("dp_sgd_epsilon", "dp_sgd_epsilon_per_case", "dp_update_epsilon", "dp_update_epsilon_coalition")


# -- options -----------------------------------------------------------------------------------------------------------
def _base() -> dict[str, Any]:
    """``fedoap simulate``'s defaults as a benchmark base: its rounds x local epochs, one run at a time."""
    t = TrainingOptions()
    return {"total_epochs": t.rounds * t.local_epochs, "workers": 1}


def resolve_dp_settings(overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The training and federation of every row: ``fedoap simulate``'s defaults with the overrides applied, checked
    as ``fedoap benchmark`` checks its own (``local_epochs`` alone keeps rounds x local epochs).

    Raises:
        ValueError: an unknown override or an invalid option (named).
    """
    return _resolve(_base(), overrides)


def parse_settings(names: Optional[Sequence[str]]) -> list[str]:
    """The chosen settings in table order (None: all).

    Raises:
        ValueError: an unknown or repeated setting, or none.
    """
    return parse_choices("--settings", names, list(SETTINGS))


def parse_epsilons(values: Sequence[Any]) -> list[float]:
    """Target epsilons as floats, ascending.

    Raises:
        ValueError: a value that is not a finite number > 0, a repeated value, or none.
    """
    epsilons = []
    for v in values:
        try:
            eps = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"--epsilons must be numbers, got {v!r}") from None
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"--epsilons must be finite numbers > 0, got {v!r}")
        epsilons.append(eps)
    if not epsilons or len(set(epsilons)) != len(epsilons):
        raise ValueError(f"--epsilons must be distinct numbers, got {list(values)}")
    return sorted(epsilons)


def _check_options(client_clip: float, distributed_via: str, delta: float) -> None:
    if isinstance(client_clip, bool) or not isinstance(client_clip, (int, float)) or not (
            math.isfinite(client_clip) and client_clip > 0):
        raise ValueError(f"--client-clip must be a finite number > 0, got {client_clip!r}")
    if distributed_via not in DISTRIBUTED_VIA:
        raise ValueError(f"--distributed-via must be one of {','.join(DISTRIBUTED_VIA)}, got {distributed_via!r}")
    PrivacyOptions(dp_delta=delta)  # its own check names --dp-delta


# -- the rows ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DpRow:
    """One row of the table: a setting at a target epsilon, and the run options (flat names of
    :class:`fedoap.config.RunConfig`) that make it."""

    name: str  #: also its folder under ``OUT/runs``
    setting: str
    target_epsilon: Optional[float]  #: None: no DP (epsilon = inf)
    options: dict[str, Any]
    noise_multiplier: Optional[float] = None  #: client-level sigma (client, distributed)


def plan_rows(settings: Sequence[str], epsilons: Sequence[float], rounds: int, n_sites: int, delta: float,
              client_clip: float = DEFAULT_CLIENT_CLIP, distributed_via: str = "secagg") -> list[DpRow]:
    """The table's rows, in order: ``plain``, then each DP setting at each epsilon (ascending).

    Raises:
        ValueError: a bad option (named), or ``distributed`` with fewer than 2 sites (no sum to hide a share in).
    """
    settings, epsilons = parse_settings(settings), parse_epsilons(epsilons)
    _check_options(client_clip, distributed_via, delta)
    if "distributed" in settings and n_sites < 2:
        raise ValueError(f"--settings distributed needs at least 2 sites (--clients), got {n_sites}: a site's share "
                         "of the noise protects only inside a sum")
    from fedoap.privacy.dp import noise_for_epsilon  # torch and Opacus: once the options are checked

    rows = [DpRow("plain", "plain", None, {})] if "plain" in settings else []
    for setting in (s for s in settings if s != "plain"):
        for eps in epsilons:
            name = f"{setting}-eps{eps:g}"
            if setting == "dp_sgd":
                rows.append(DpRow(name, setting, eps, {"dp_sgd_epsilon": eps, "dp_delta": delta}))
                continue
            sigma = noise_for_epsilon(eps, rounds, delta)
            options: dict[str, Any] = {"dp_update_clip": float(client_clip), "dp_update_noise": sigma,
                                       "dp_delta": delta}
            if setting == "distributed":
                options.update({distributed_via: True, "dp_update_distributed": True, "min_responses": n_sites})
            rows.append(DpRow(name, setting, eps, options, sigma))
    return rows


# -- results -----------------------------------------------------------------------------------------------------------
def epsilon_spent(results: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """The epsilons a run's sites reported after its last round, the weakest site's (``results.json``'s
    ``privacy[<key>_federation]``; None: not reported, or no finite bound)."""
    privacy = results.get("privacy") or {}
    return {key: privacy.get(f"{key}_federation") for key in EPSILON_KEYS}


def _max(values: Sequence[Optional[float]]) -> Optional[float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return max(finite) if finite else None


def summarize_rows(rows: Sequence[DpRow], records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row: :func:`fedoap.benchmark.aggregate_runs` over its seeds, the epsilon spent (the largest over seeds),
    the worst site of each seed, and the Dice drop vs ``plain`` in points, paired by seed (seeds where both ran).

    Args:
        records: one per run, as :func:`fedoap.benchmark._execute` yields them, with ``row`` (the row's name) and,
            when the run succeeded, ``epsilon_spent`` (:func:`epsilon_spent`).
    """
    def by_seed(name: str) -> dict[int, float]:
        return {r["seed"]: r["summary"]["mean_dice"] for r in records
                if r["row"] == name and r["status"] == "ok" and r["summary"]["mean_dice"] is not None}

    plain = by_seed("plain")
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        runs = [r for r in records if r["row"] == row.name]
        ok = [r for r in runs if r["status"] == "ok"]
        dice = by_seed(row.name)
        out[row.name] = {
            "setting": row.setting,
            "target_epsilon": row.target_epsilon,
            "noise_multiplier": row.noise_multiplier,
            "options": dict(row.options),
            **aggregate_runs(runs),
            "epsilon_spent": {k: _max([r["epsilon_spent"].get(k) for r in ok]) for k in EPSILON_KEYS},
            "worst_sites": [r["summary"]["worst_client"] for r in ok],
            "dice_drop_points": _mean_std([100 * (plain[s] - dice[s]) for s in dice if s in plain]),
        }
    return out


def bench_dp_command(settings: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int], out: str | Path,
                     overrides: Optional[Mapping[str, Any]] = None, client_clip: float = DEFAULT_CLIENT_CLIP,
                     distributed_via: str = "secagg", delta: Optional[float] = None) -> str:
    """The ``fedoap bench dp`` command line that repeats this table (written into ``bench_dp.md``)."""
    parts = ["fedoap", "bench", "dp", "--settings", ",".join(settings), "--epsilons",
             ",".join(f"{e:g}" for e in epsilons), "--seeds", ",".join(map(str, seeds)), "--client-clip",
             f"{client_clip:g}", "--distributed-via", distributed_via, "--out", str(out)]
    if delta is not None:
        parts += ["--dp-delta", f"{delta:g}"]
    parts += cli_args(**{k: v for k, v in (overrides or {}).items() if v is not None})
    return shlex.join(parts)


def _eps(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _spent(res: Mapping[str, Any]) -> tuple[str, str]:
    """The table's two spent-epsilon cells: against the server, against a coalition of the other sites."""
    spent, setting = res["epsilon_spent"], res["setting"]
    if setting == "plain":
        return "∞", "∞"
    if setting == "dp_sgd":  # DP-SGD's noise is the site's own: the server and the other sites learn the same
        return _eps(spent["dp_sgd_epsilon"]), _eps(spent["dp_sgd_epsilon"])
    if setting == "client":
        return _eps(spent["dp_update_epsilon"]), _eps(spent["dp_update_epsilon"])
    return _eps(spent["dp_update_epsilon"]), _eps(spent["dp_update_epsilon_coalition"])


def _worst(res: Mapping[str, Any]) -> str:
    sites = list(dict.fromkeys(s for s in res.get("worst_sites", []) if s))
    return _fmt_ms(res.get("worst_client_dice")) + (f" ({'/'.join(sites)})" if sites else "")


def dp_table(result: Mapping[str, Any]) -> list[str]:
    """The headline table (markdown lines): one row per setting and target epsilon, in ``result["rows"]`` order."""
    rows = []
    for name in result["rows"]:
        res = result["results"][name]
        target = "∞" if res["target_epsilon"] is None else f"{res['target_epsilon']:g}"
        failed = ",".join(map(str, res["seeds_failed"]))
        label = name if res["status"] != "partial" else f"{name} (failed seeds {failed})"
        if res["status"] == "failed":
            rows.append([label, target, "failed", "", "", "", "", ""])
            continue
        rows.append([label, target, *_spent(res), _fmt_ms(res["mean_dice"]), _worst(res),
                     "0 (reference)" if res["setting"] == "plain" else _fmt_ms(res["dice_drop_points"], 1),
                     _fmt_ms(res["wall_time_s"], 0)])
    return _table(["setting", "target ε", "ε spent vs server", "ε spent vs other sites",
                   "personalized Dice (per image, mean over sites; empty masks as stated above)", "worst site Dice",
                   "Dice drop vs plain (points)", "wall time / run (s)"], rows)


def bench_dp_markdown(result: Mapping[str, Any]) -> str:
    """The privacy/utility table, what each column means, and the command that repeats it."""
    s = result["settings"]
    settings = {result["results"][n]["setting"] for n in result["rows"]}
    lines = [
        "# FedOAP: personalized Dice against epsilon",
        "",
        f"Produced by `{result['command']}`.",
        "",
        f"Setting: FedOAP; sites {', '.join(s['clients'])}" + (f", unseen organ {s['unseen']}" if s["unseen"] else "")
        + f"; data {'from ' + str(s['data']) if s.get('data') else 'synthetic, generated once per seed'}; "
        f"{s['image_size']} x {s['image_size']} slices; UNet width {s['width']}; {s['rounds']} rounds x "
        f"{s['local_epochs']} local epoch(s), then {s['finetune_epochs']} epoch(s) of local fine-tuning; batch "
        f"{s['batch_size']}, lr {s['lr']}, device {s['device']}; seeds {', '.join(map(str, result['seeds']))}; "
        f"delta {result['delta']:g}"
        + (f"; client-level clip {result['client_clip']:g}" if {"client", "distributed"} & settings else "")
        + (f"; distributed DP via {result['distributed_via']} with every site's share needed (min responses = "
           f"{len(s['clients'])})" if "distributed" in settings else "") + ".",
        "",
        f"Empty masks: {result['empty_mask_rule']}",
        "",
        f"Values: mean ± {result['std']}. {result['notes']['epsilon_spent']} {result['notes']['units']} "
        f"{result['notes']['drop']} {result['notes']['rounding']}",
        "",
    ]
    if result.get("workers", 1) > 1:
        lines += [f"Runs: {result['workers']} at a time; a run's wall time includes the contention with the others.",
                  ""]
    if result["n_resumed"]:
        lines += [f"Resume: {result['n_resumed']} of {result['n_runs']} runs were reused from an earlier invocation "
                  "(wall times are theirs).", ""]
    lines += ["## Dice against epsilon", ""] + dp_table(result)
    ok = [n for n in result["rows"] if result["results"][n]["status"] != "failed"]
    sites = sorted({site for n in ok for site in result["results"][n]["clients"]})
    if ok:
        rows = [[n] + [_fmt_ms(result["results"][n]["clients"].get(site, {}).get("dice")) for site in sites]
                for n in ok]
        lines += ["## Personalized Dice per site", ""] + _table(["setting", *sites], rows)
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", "", "Not counted in any mean above; the traceback is in bench_dp.json.", ""]
        lines += _table(["setting", "seed", "error"], [[r["row"], str(r["seed"]), r["error"].replace("|", "\\|")
                                                        .replace("\n", " ")] for r in failed])
    return "\n".join(lines)


# -- the benchmark -----------------------------------------------------------------------------------------------------
def _read_spent(record: dict[str, Any]) -> dict[str, Any]:
    """The record with the row's name and, for a run that finished, the epsilon it spent (from its
    ``results.json``; a file without them fails that run only)."""
    record = {"row": record.pop("method"), **record}
    if record["status"] == "ok":
        try:
            record["epsilon_spent"] = epsilon_spent(json.loads((Path(record["out"]) / "results.json").read_text()))
        except (OSError, ValueError, AttributeError) as err:
            record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback="")
    return record


def run_bench_dp(
    settings: Optional[Sequence[str]] = None,
    epsilons: Sequence[Any] = DEFAULT_EPSILONS,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path = "runs/bench_dp",
    overrides: Optional[Mapping[str, Any]] = None,
    client_clip: float = DEFAULT_CLIENT_CLIP,
    distributed_via: str = "secagg",
    delta: Optional[float] = None,
    workers: Optional[int] = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run every row on every seed; print the table and the command that repeats it; write ``OUT/bench_dp.json``
    and ``OUT/bench_dp.md``; return the content of ``bench_dp.json``.

    Args:
        settings: a subset of :data:`SETTINGS` (None: all).
        epsilons: the target epsilons of every DP setting.
        seeds: one federation per seed (data, split, initial weights, training order), shared by every row.
        out: the benchmark folder; runs go to ``out/runs/<row>/seed<k>`` and are reused when their ``results.json``
            exists and was made with the same settings.
        overrides: training and federation settings replacing ``fedoap simulate``'s defaults (keys of
            :data:`OVERRIDABLE`; None values are ignored).
        client_clip: the L2 bound of a site's update under client-level and distributed DP.
        distributed_via: what hides each site's update under distributed DP: ``secagg`` or ``he``.
        delta: the delta of every epsilon (None: :class:`~fedoap.config.PrivacyOptions`'s default).
        workers: runs at the same time, each in its own process (None: 1, or ``overrides["workers"]``).

    Raises:
        ValueError: a bad option (named), or ``out`` holds data or a finished run made with other settings.
    """
    say = print if verbose else (lambda *a, **k: None)
    names, epsilons, seeds = parse_settings(settings), parse_epsilons(epsilons), _parse_seeds(seeds)
    delta_given = delta
    delta = PrivacyOptions().dp_delta if delta is None else delta
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if workers is not None:
        overrides["workers"] = workers
    resolved = resolve_dp_settings(overrides)
    TrainingOptions(device=resolved["device"]).require_device()
    rows = plan_rows(names, epsilons, resolved["rounds"], len(resolved["clients"]), delta, client_clip,
                     distributed_via)
    out = Path(out).resolve()
    command = bench_dp_command(names, epsilons, seeds, out, overrides, client_clip, distributed_via, delta_given)

    # every run configured (its options checked) and the finished ones compared before anything runs
    plan = []
    user_data = bool(resolved.get("data"))
    for seed in seeds:
        data = _seed_data(resolved, out, seed)
        for row in rows:
            run_dir = out / RUNS_DIR / row.name / f"seed{seed}"
            cfg = _config(resolved, "fedoap", seed, run_dir, data)
            cfg = replace(cfg, run=cfg.run.override(**row.options))
            plan.append((seed, row.name, str(run_dir), cfg, _previous_results(run_dir, cfg, user_data), None))
    for _, _, run_dir, _, previous, _ in plan:
        if previous is None and Path(run_dir).exists():  # what a failed or interrupted run left: never read it
            shutil.rmtree(run_dir)

    records: list[dict[str, Any]] = []
    start = time.time()
    for i, record in enumerate(_execute(plan, resolved["workers"]), 1):
        record = _read_spent(record)
        records.append(record)
        if record["status"] == "ok":
            sm = record["summary"]
            spent = ", ".join(f"{k} {v:.2f}" for k, v in record["epsilon_spent"].items() if v is not None)
            say(f"[bench dp] {i}/{len(plan)} {record['row']} seed {record['seed']}"
                f"{' (reused)' if record['resumed'] else ''}: Dice {_fmt(sm['mean_dice'])} (worst "
                f"{_fmt(sm['worst_client_dice'])}){', ' + spent if spent else ''}, {record['seconds']:.0f} s")
        else:
            say(f"[bench dp] {i}/{len(plan)} {record['row']} seed {record['seed']}: FAILED {record['error']}")

    result = {
        "command": command,
        "settings": resolved,
        "rows": [row.name for row in rows],
        "seeds": seeds,
        "epsilons": epsilons,
        "client_clip": float(client_clip),
        "distributed_via": distributed_via,
        "delta": delta,
        "empty_mask_rule": _empty_mask_rule(),
        "headline": "personalized test Dice per image of each site's fine-tuned model, mean over sites per seed",
        "std": "sample standard deviation over seeds (ddof 1); null with fewer than 2 successful seeds",
        "notes": {
            "target_epsilon": "null: no DP (epsilon = inf)",
            "epsilon_spent": "ε spent: what the sites' accountants reported after the last round (the weakest site; "
                             "the largest over seeds); for distributed DP against the server (which sees only sums "
                             "carrying sigma * clip) and against a coalition of the other sites (who can take their "
                             "noise out of a sum: only the site's own 1/m share protects it); without distributed DP "
                             "both are the same.",
            "units": f"The units differ: DP-SGD protects one training {PrivacyOptions().dp_sgd_unit} of a site "
                     "(dp_sgd_unit; the per-case epsilon, by group privacy, is dp_sgd_epsilon_per_case in "
                     "bench_dp.json), client-level and distributed DP a site's whole contribution.",
            "drop": "Dice drop: plain minus the row, in points (x 100), paired by seed over the seeds where both ran.",
            "rounding": "Under DP the sites report their Dice rounded to 2 decimals (their privacy policy, "
                        "fedoap.site.privacy.public_metrics), plain in full: a drop is exact to about 0.5 points.",
        },
        "results": summarize_rows(rows, records),
        "runs": records,
        "n_runs": len(records),
        "n_failed": sum(r["status"] != "ok" for r in records),
        "n_resumed": sum(r["resumed"] for r in records),
        "workers": resolved["workers"],
        "wall_time_s": time.time() - start,
    }
    document = to_jsonable(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench_dp.json", document)
    (out / "bench_dp.md").write_text(bench_dp_markdown(document))
    say("\n".join(["", f"Empty masks: {result['empty_mask_rule']}", "", *dp_table(document),
                   f"reproduce: {command}"]))
    say(f"[bench dp] wrote {out / 'bench_dp.json'}, {out / 'bench_dp.md'}")
    return document
