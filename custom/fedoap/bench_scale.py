"""``fedoap bench scale``: a large simulated federation (default 30 sites, several per organ, unequal sizes) with
FedOAP and FedAvg side by side in one run: wall time per round and peak memory of the whole simulator.

The sites cycle over the organs (brain MRI, liver CT, breast ultrasound) and draw their number of cases from a fixed
seeded range, so a federation has small and large hospitals of every organ. Memory is the peak of the summed resident
set size of this process and every process it started (the simulator's server and client processes), sampled every
0.2 s; time per round is the server's own measure (from sending the round's task to the aggregate). Both methods run
on the same data, splits, seed and settings, one after the other, so their figures compare as ratios.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from fedoap.config import FederationOptions, MethodOptions, RunConfig, TrainingOptions
from fedoap.jsonio import write_json

__all__ = ["SCALE_TRAINING", "scale_sites", "bench_scale", "PeakMemory"]

ORGAN_CYCLE = ("brain", "liver", "breast")
#: the scale benchmark's training (a partial override of the defaults): small, the point is the federation's size
SCALE_TRAINING = {"rounds": 3, "local_epochs": 1, "finetune_epochs": 1, "image_size": 32, "width": 8,
                  "batch_size": 8, "threads": 1}
#: the synthetic sites' in-plane size
SCALE_DATA_SIZE = 64


def scale_sites(n_sites: int, smallest: float = 0.25, seed: int = 0) -> dict[str, tuple[str, int]]:
    """``n_sites`` synthetic sites named ``<organ>-<k>``, the organs in turn, each with a seeded number of cases
    between ``smallest`` times and once the organ's default count (:data:`fedoap.data.DEFAULT_SITES`: 24 brain
    volumes, 16 liver volumes, 150 breast images), at least 3 (a train, a validation and a test case).

    Raises:
        ValueError: fewer than one site, or ``smallest`` outside (0, 1].
    """
    from fedoap.data import DEFAULT_SITES

    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if not 0 < smallest <= 1:
        raise ValueError(f"smallest must be in (0, 1], got {smallest}")
    rng = np.random.default_rng(seed)
    sites = {}
    for i in range(n_sites):
        organ = ORGAN_CYCLE[i % len(ORGAN_CYCLE)]
        full = DEFAULT_SITES[organ][1]
        n_cases = max(3, int(round(full * rng.uniform(smallest, 1.0))))
        sites[f"{organ}-{i // len(ORGAN_CYCLE) + 1:02d}"] = (organ, n_cases)
    return sites


class PeakMemory:
    """Samples, in a background thread, the summed RSS of this process and all its descendants (``peak_bytes``: an
    upper bound, pages shared between processes count once per process), their number (``peak_processes``) and the
    machine's used memory above its level at the start (``peak_used_increase_bytes``: closer to the real cost, but
    it includes anything else that started meanwhile)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_processes = 0
        self.baseline_used_bytes = psutil.virtual_memory().used
        self.peak_used_increase_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self._psutil.Process(os.getpid())
        total, count = 0, 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
                count += 1
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_processes = max(self.peak_processes, count)
        used = self._psutil.virtual_memory().used - self.baseline_used_bytes
        self.peak_used_increase_bytes = max(self.peak_used_increase_bytes, used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _row(method: str, results: dict[str, Any], history: dict[str, Any], peak: PeakMemory, wall: float) -> dict:
    rounds = [r["round_seconds"] for r in history["rounds"]]
    dice = [c["dice"] for c in results["clients"].values() if c["dice"] is not None]
    return {
        "method": method,
        "sites": len(results["clients"]),
        "wall_time_s": wall,
        "round_seconds": rounds,
        "mean_round_seconds": float(np.mean(rounds)),
        "mean_round_seconds_after_first": float(np.mean(rounds[1:])) if len(rounds) > 1 else None,
        "peak_rss_bytes": peak.peak_bytes,
        "peak_system_used_increase_bytes": peak.peak_used_increase_bytes,
        "peak_processes": peak.peak_processes,
        "mean_dice": float(np.mean(dice)) if dice else None,
        "worst_site_dice": float(np.min(dice)) if dice else None,
        "bytes_uploaded_per_round_per_site": float(np.mean(list(results["bytes_uploaded_per_round"].values()))),
    }


def scale_table(rows: Sequence[dict[str, Any]]) -> str:
    def num(value: Optional[float]) -> float:
        return float("nan") if value is None else value

    lines = [f"{'method':10s} {'sites':>5s} {'wall s':>8s} {'s/round':>8s} {'sum RSS GB':>11s} {'used +GB':>9s} "
             f"{'procs':>6s} {'mean Dice':>9s} {'worst':>6s} {'MB/site/round':>13s}"]
    for r in rows:
        lines.append(f"{r['method']:10s} {r['sites']:5d} {r['wall_time_s']:8.1f} {r['mean_round_seconds']:8.1f} "
                     f"{r['peak_rss_bytes'] / 2**30:11.2f} {num(r.get('peak_system_used_increase_bytes')) / 2**30:9.2f} "
                     f"{r['peak_processes']:6d} {num(r['mean_dice']):9.3f} {num(r['worst_site_dice']):6.3f} "
                     f"{r['bytes_uploaded_per_round_per_site'] / 1e6:13.3f}")
    return "\n".join(lines)


def bench_scale(training: TrainingOptions = TrainingOptions(**SCALE_TRAINING), n_sites: int = 30,
                methods: Sequence[str] = ("fedoap", "fedavg"), processes: int = 0, smallest: float = 0.25,
                out: str | os.PathLike = "runs/bench_scale", verbose: bool = True) -> dict[str, Any]:
    """Run every method on one large synthetic federation; print a table and write ``<out>/bench_scale.json``.
    Returns its content.

    Args:
        training: the sites' training (its seed also makes the federation: data, split, initialization).
        n_sites: number of sites. methods: methods run side by side.
        processes: simulator client processes (0: one per site).
        smallest: the smallest site's share of its organ's default number of cases.

    Raises:
        fedoap.simulation.SimulationError: a run did not produce its results.
    """
    from fedoap.simulation import run_simulation, synthetic_federation

    say = print if verbose else (lambda *a, **k: None)
    out = Path(out).resolve()
    sites = scale_sites(n_sites, smallest, training.seed)
    data = synthetic_federation(out / "data", sites, training.seed, SCALE_DATA_SIZE, replace=True)
    say(f"[scale] {len(sites)} sites: " + ", ".join(f"{k} ({n} cases)" for k, (_, n) in sites.items()))
    federation = FederationOptions(clients=tuple(sites), unseen=None, data=str(data), processes=processes)
    rows = []
    for method in methods:
        run = RunConfig(training=training, method=MethodOptions(name=method))
        start = time.time()
        with PeakMemory() as peak:
            results = run_simulation(run, federation, out / method, overwrite=True, verbose=False)
        wall = time.time() - start
        history = json.loads((Path(results["workspace"]) / "server" / "simulate_job" / "fedoap_history.json")
                             .read_text())
        rows.append(_row(method, results, history, peak, wall))
        say(f"[scale] {method}: {wall:.0f} s, {rows[-1]['mean_round_seconds']:.1f} s/round, peak summed RSS "
            f"{peak.peak_bytes / 2**30:.2f} GB over {peak.peak_processes} processes, machine's used memory "
            f"+{peak.peak_used_increase_bytes / 2**30:.2f} GB")
    config = {"training": asdict(training), "n_sites": n_sites, "methods": list(methods), "processes": processes,
              "smallest": smallest, "data_size": SCALE_DATA_SIZE}
    report = {"config": config, "sites": {k: list(v) for k, v in sites.items()}, "results": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "notes": "wall_time_s includes data validation, the simulator's start and stop, the rounds and the "
                       "final fine-tuning; round_seconds is the server's time per round; peak RSS sums this process "
                       "and every descendant (shared pages counted once per process, so it over-estimates); "
                       "peak_system_used_increase_bytes is the machine's used memory above its level at the start"}
    if len(rows) > 1:
        ref = rows[-1]
        report["ratios_to_" + ref["method"]] = {
            r["method"]: {"round_seconds": r["mean_round_seconds"] / ref["mean_round_seconds"],
                          "peak_rss": r["peak_rss_bytes"] / ref["peak_rss_bytes"]} for r in rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench_scale.json", report)
    say(scale_table(rows))
    say(f"[scale] wrote {out / 'bench_scale.json'}")
    return report
