"""``fedoap bench overhead``: where the wall time of a benchmark run goes, and how much of it the sites train.

One run of a preset (fast by default: the run the benchmark table repeats 57 times) is split into phases from the
run's own clock (``results.json``'s ``timing``) and the timestamps of NVFlare's logs:

- ``prepare``: the command's work before the simulator starts (data checks, the recipe, the initial checkpoint);
- ``simulator_start``: from launching NVFlare's simulator to its server's workflow running (process start, imports of
  the server's components);
- ``site_start``: from then to the moment the last site is ready for its first task (the site processes' start,
  their imports, their data). A site's task script starts with its first task, so the first task's span holds the
  script's imports and the session's construction; the site logs :data:`fedoap.site.client.SESSION_READY` when
  those are done, and the span is split there;
- ``training_eval``: what the busiest site spends executing its tasks once ready (local training, validation and
  test per round, fine-tuning and the final evaluation): the time the run is for;
- ``hand_off``: the rest of the task phase (waiting for the other sites, transfers, aggregation, task polling);
- ``teardown``: from the last result to the simulator's exit;
- ``report``: results, tables and figures after it.

The goal the breakdown is held against: a run's wall time within 2x ``training_eval``. Each repetition runs the
simulator twice side by side, ended as soon as the job is complete (``PromptSimEnv``, what every command uses) and
by NVFlare's own ending (what it cost before), and the import time of the server's and the site's code is measured
in fresh processes with and without the libraries they no longer load (MONAI on the server, Opacus where DP-SGD is
off). The log messages parsed are NVFlare 2.9's; a missing one stops the benchmark naming the log.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fedoap.jsonio import write_json

__all__ = ["PHASES", "ENDINGS", "log_events", "run_phases", "import_rows", "bench_overhead", "overhead_table"]

PHASES = ("prepare", "simulator_start", "site_start", "training_eval", "hand_off", "teardown", "report")
#: how the simulator ends: "prompt" (as soon as the job is complete) or "nvflare" (NVFlare's own ending)
ENDINGS = ("prompt", "nvflare")
SIM_JOB = "simulate_job"

# NVFlare 2.9's log messages that mark the phases
_SERVER_READY = "Server runner starting"
_TASK_START = "execute for task"
_TASK_END = "finished processing task"
_RESULT = "got result from client"

#: fresh-process imports: what the server and a site load now, and what they loaded before (the server's persistor
#: built the network, MONAI's, and the workflow imported Opacus; a site imported Opacus without DP-SGD). A site's
#: first optimizer step loads ``torch._dynamo`` (PyTorch's optimizers import it), counted on both sides.
IMPORTS = {
    "server": ("nvflare.app_opt.pt.file_model_persistor, fedoap.server.controller",
               "monai, opacus, fedoap.networks, nvflare.app_opt.pt.file_model_persistor, fedoap.server.controller"),
    "site": ("fedoap.site.client, torch._dynamo", "opacus, fedoap.site.client, torch._dynamo"),
}


def log_events(path: Path) -> list[tuple[float, str]]:
    """``(epoch seconds, message)`` of every line of an NVFlare log (``YYYY-mm-dd HH:MM:SS,mmm - name - LEVEL -
    message``; lines of another form are skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        stamp, sep, rest = line.partition(" - ")
        if not sep:
            continue
        try:
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        events.append((when, rest))
    return events


def _first(events: Sequence[tuple[float, str]], text: str, path: Path) -> float:
    for when, message in events:
        if text in message:
            return when
    raise ValueError(f"{path}: no line with {text!r} (the log format of another NVFlare version?)")


def _last(events: Sequence[tuple[float, str]], text: str, path: Path) -> float:
    for when, message in reversed(events):
        if text in message:
            return when
    raise ValueError(f"{path}: no line with {text!r} (the log format of another NVFlare version?)")


def _task_spans(events: Sequence[tuple[float, str]], path: Path) -> list[tuple[float, float]]:
    """The site's task executions: each ``execute for task`` up to the next ``finished processing task``."""
    spans, start = [], None
    for when, message in events:
        if _TASK_START in message:
            start = when
        elif _TASK_END in message and start is not None:
            spans.append((start, when))
            start = None
    if not spans:
        raise ValueError(f"{path}: no completed task (no {_TASK_START!r} ... {_TASK_END!r} lines)")
    return spans


def run_phases(results: Mapping[str, Any]) -> dict[str, float]:
    """The phases (seconds, :data:`PHASES`) of one finished run from its ``results.json`` content (its ``timing`` and
    ``workspace``), plus ``total`` (their sum: the run's wall time) and ``ratio`` (``total / training_eval``)."""
    timing = results["timing"]
    ws = Path(results["workspace"])
    server_log = ws / "server" / "log.txt"
    server = log_events(server_log)
    ready = _first(server, _SERVER_READY, server_log)
    last_result = _last(server, _RESULT, server_log)
    from fedoap.site.client import SESSION_READY

    first_starts, busy = [], []
    for site in results["clients"]:
        site_log = ws / site / "log.txt"
        events = log_events(site_log)
        spans = _task_spans(events, site_log)
        # the first task waits for the script's imports and the session: start-up, not training
        site_ready = min(max(spans[0][0], _first(events, SESSION_READY, site_log)), spans[0][1])
        spans[0] = (site_ready, spans[0][1])
        first_starts.append(site_ready)
        busy.append(sum(end - start for start, end in spans))
    started = max(first_starts)
    launched = float(timing["simulator_started_at"])
    ended = launched + float(timing["simulator_s"])
    training = max(busy)
    phases = {
        "prepare": float(timing["prepare_s"]),
        "simulator_start": ready - launched,
        "site_start": started - ready,
        "training_eval": training,
        "hand_off": last_result - started - training,
        "teardown": ended - last_result,
        "report": float(timing["report_s"]),
    }
    phases["total"] = sum(phases[p] for p in PHASES)
    phases["ratio"] = phases["total"] / training if training > 0 else float("inf")
    return phases


def _import_seconds(modules: str, repeats: int) -> float:
    """Median wall time of ``python -c "import <modules>"`` in a fresh process."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True, env=os.environ.copy())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_rows(repeats: int = 3) -> list[dict[str, Any]]:
    """For the server and a site: the import time of its code now, and with what it loaded before, side by side."""
    rows = []
    for who, (now, before) in IMPORTS.items():
        t_now, t_before = _import_seconds(now, repeats), _import_seconds(before, repeats)
        rows.append({"process": who, "imports": now, "seconds": t_now, "before": before, "before_seconds": t_before,
                     "saved_s": t_before - t_now})
    return rows


def _median_phases(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in (*PHASES, "total", "ratio")}


def overhead_table(record: Mapping[str, Any]) -> str:
    """The breakdown (median over repetitions, per ending) and the import rows as a Markdown table."""
    endings = list(record["phases"])
    lines = ["| phase | " + " | ".join(f"{e} (s)" for e in endings) + " |",
             "|---|" + "---:|" * len(endings)]
    for phase in (*PHASES, "total"):
        lines.append(f"| {phase} | " + " | ".join(f"{record['phases'][e][phase]:.1f}" for e in endings) + " |")
    lines.append("| total / training_eval | " + " | ".join(f"{record['phases'][e]['ratio']:.2f}" for e in endings)
                 + " |")
    lines += ["", "| process | imports | now (s) | before (s) | imports before |", "|---|---|---:|---:|---|"]
    for row in record["imports"]:
        lines.append(f"| {row['process']} | `{row['imports']}` | {row['seconds']:.2f} | {row['before_seconds']:.2f} "
                     f"| `{row['before']}` |")
    return "\n".join(lines)


def bench_overhead(out: str | os.PathLike, preset: str = "fast", method: str = "fedavg", seed: int = 0,
                   repeats: int = 2, endings: Sequence[str] = ENDINGS, import_repeats: int = 3,
                   overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Run the benchmark, print its table, write ``<out>/bench_overhead.json``; return the record.

    Raises:
        ValueError: an unknown preset, ending or method, ``repeats`` < 1, or a log without the expected lines.
    """
    from fedoap.benchmark import _config, _seed_data, resolve_settings
    from fedoap.simulation import run_simulation

    if repeats < 1 or import_repeats < 1:
        raise ValueError(f"--repeats and --import-repeats must be >= 1, got {repeats} and {import_repeats}")
    unknown = [e for e in endings if e not in ENDINGS]
    if unknown or not endings:
        raise ValueError(f"--endings must name some of {ENDINGS}, got {list(endings)}")
    settings = resolve_settings(preset, overrides)
    out = Path(out).resolve()
    data = _seed_data(settings, out, seed)
    phases: dict[str, list[dict[str, float]]] = {e: [] for e in endings}
    for rep in range(repeats):  # interleaved, so that a change of the machine's load hits both endings alike
        for ending in endings:
            cfg = _config(settings, method, seed, out / "runs" / f"{ending}{rep}", data)
            results = run_simulation(cfg.run, cfg.federation, cfg.out, overwrite=True, verbose=False,
                                     prompt_exit=ending == "prompt")
            phases[ending].append(run_phases(results))
            p = phases[ending][-1]
            print(f"[bench overhead] {ending} #{rep + 1}: {p['total']:.1f} s, training and evaluation "
                  f"{p['training_eval']:.1f} s ({p['ratio']:.2f}x)")
    record = {
        "benchmark": "overhead",
        "preset": preset, "method": method, "seed": seed, "repeats": repeats,
        "settings": settings,
        "phases": {e: _median_phases(runs) for e, runs in phases.items()},
        "runs": phases,
        "imports": import_rows(import_repeats),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["fedoap", "bench", "overhead", "--out", str(out), "--preset", preset, "--method", method,
                             "--seed", str(seed), "--repeats", str(repeats)]),
    }
    print(overhead_table(record))
    write_json(out / "bench_overhead.json", record)
    print(f"[fedoap] wrote {out / 'bench_overhead.json'}")
    return record
