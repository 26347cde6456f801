"""Faults in the NVFlare simulator, with real processes killed by PID at chosen moments: a site's process dies
mid-job (the others finish, the history and results.json say who dropped out), too few sites remain (the job stops
with a clear status and no empty rounds), and the whole simulation is killed and resumed with ``--resume`` (the
global model after the last round equals an uninterrupted run's)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedoap.resume import SERVER_STATE_FILE
from processes import finish, pids_with

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

FEDOAP = [sys.executable, "-m", "fedoap.cli"]
FAST = ["--local-epochs", "1", "--finetune-epochs", "1", "--image-size", "32", "--width", "8", "--seed", "0",
        "--cases", "brain=3,breast=3,liver=3", "--unseen", "none"]
RUN_TIMEOUT_S = 400


def _processes_under(path: Path, marker: str) -> list[int]:
    """PIDs whose command line holds ``marker`` and ``path`` (this test's own processes only)."""
    return pids_with(marker, str(path))


def _start(out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"{out.name}.log"
    proc = subprocess.Popen([*FEDOAP, "simulate", *FAST, "--out", str(out), *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text():
            return time.time()
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {log}: {log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, log: Path) -> int:
    return finish(proc, log, RUN_TIMEOUT_S)


def _kill_site(out: Path, site: str) -> None:
    pids = _processes_under(out / "workspace", f"--client {site} ")
    assert pids, f"no simulator process of site {site}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _final_global(out: Path, method: str = "fedavg") -> dict[str, np.ndarray]:
    return load_file(str(out / "workspace" / method / "server" / "simulate_job" / SERVER_STATE_FILE))


def test_a_site_killed_mid_job_drops_out_and_the_others_finish(tmp_path):
    out = tmp_path / "dropout"
    proc, log = _start(out, "--method", "fedavg", "--clients", "brain,breast,liver", "--rounds", "2",
                       "--round-timeout", "20", "--min-responses", "2")
    _wait_for(log, "round 1/2", proc)
    killed_at = time.time()
    _kill_site(out, "liver")
    assert _finish(proc, log) == 0, log.read_text()[-3000:]
    finished = time.time() - killed_at
    results = json.loads((out / "results.json").read_text())
    history = json.loads((out / "workspace" / "fedavg" / "server" / "simulate_job" / "fedoap_history.json").read_text())
    assert set(results["clients"]) == {"brain", "breast"}
    assert "liver" in results["not_personalized"]
    assert [r["accepted"] for r in history["rounds"]] == [3, 2]
    assert "liver" in history["rounds"][1]["dropped"], history["rounds"]
    assert history["status"] == "completed" and history["completed_rounds"] == 2
    assert all(np.isfinite(v).all() for v in _final_global(out).values())
    print(f"\n[faults] site killed after round 1: run finished {finished:.0f} s later (round timeout 20 s)")
    assert not _processes_under(out / "workspace", "simulator")  # nothing left running


def test_below_the_minimum_the_job_stops_with_a_clear_status(tmp_path):
    out = tmp_path / "stop"
    proc, log = _start(out, "--method", "fedavg", "--clients", "brain,breast", "--rounds", "3",
                       "--round-timeout", "20", "--min-responses", "2")
    _wait_for(log, "round 1/3", proc)
    _kill_site(out, "breast")
    assert _finish(proc, log) == 2  # one line on stderr, as every error the run reports
    text = log.read_text()
    assert "stopped in round 2" in text and "fewer than the 2 required" in text, text[-2000:]
    assert "Traceback" not in text.split("[fedoap] round 1/3")[-1].split("fedoap: error")[-1]
    history = json.loads((out / "workspace" / "fedavg" / "server" / "simulate_job" / "fedoap_history.json").read_text())
    assert history["completed_rounds"] == 1 and len(history["rounds"]) == 1  # no empty rounds that look like training
    assert history["status"].startswith("stopped in round 2")
    assert not (out / "results.json").exists()
    assert not _processes_under(out / "workspace", "simulator")


def test_a_killed_simulation_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    args = ["--method", "fedoap", "--clients", "brain,breast", "--rounds", "3"]
    whole, log = _start(tmp_path / "whole", *args)
    assert _finish(whole, log) == 0, log.read_text()[-3000:]

    out = tmp_path / "resumed"
    proc, log = _start(out, *args)
    _wait_for(log, "round 2/3", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole simulation: server and sites, mid round 3
    proc.wait(timeout=30)
    for pid in _processes_under(out / "workspace", "simulator"):
        os.kill(pid, signal.SIGKILL)
    assert not (out / "results.json").exists()
    again, log2 = _start(out, *args, "--resume")
    assert _finish(again, log2) == 0, log2.read_text()[-3000:]
    assert "resumed after round 2/3" in log2.read_text()
    expected, got = _final_global(tmp_path / "whole", "fedoap"), _final_global(out, "fedoap")
    assert set(expected) == set(got)
    worst = max(float(np.abs(expected[k] - got[k]).max()) for k in expected)
    assert worst < 1e-5, worst
    a = json.loads((tmp_path / "whole" / "results.json").read_text())["clients"]
    b = json.loads((out / "results.json").read_text())["clients"]
    for site in a:
        assert b[site]["dice"] == pytest.approx(a[site]["dice"], abs=1e-4)
    print(f"\n[faults] resumed simulation: largest difference of the final global model {worst:.2e}; Dice "
          + ", ".join(f"{s} {a[s]['dice']:.4f} vs {b[s]['dice']:.4f}" for s in a))
