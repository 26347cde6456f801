"""Secure aggregation end to end in the NVFlare simulator, with a real site process killed after the round's key
exchange, once its masks are in every other site's update: the server removes them with the survivors' key shares,
and the global model equals the plaintext weighted mean of the survivors (a plaintext run of those sites alone)."""

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
# the round timeout also bounds each key-exchange step, and the first one includes every site's start-up (data,
# network): 15 s was too short on a loaded 2-core CI machine
COMMON = ["--method", "fedavg", "--rounds", "1", "--local-epochs", "1", "--finetune-epochs", "1", "--image-size", "32",
          "--width", "8", "--seed", "0", "--unseen", "none", "--round-timeout", "40", "--min-responses", "2",
          "--weight-median-multiple", "1000"]  # the sites' slice counts differ by more than the default 10x
RUN_TIMEOUT_S = 400


def _start(out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"{out.name}.log"
    proc = subprocess.Popen([*FEDOAP, "simulate", *COMMON, "--out", str(out), *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _finish(proc: subprocess.Popen, log: Path) -> int:
    return finish(proc, log, RUN_TIMEOUT_S)


def _server_files(out: Path) -> Path:
    return out / "workspace" / "fedavg" / "server" / "simulate_job"


def test_a_site_killed_after_the_key_exchange_is_unmasked_and_the_model_is_the_survivors_mean(tmp_path):
    plain, plain_log = _start(tmp_path / "plain", "--clients", "brain,breast", "--cases", "brain=3,breast=3")
    assert _finish(plain, plain_log) == 0, plain_log.read_text()[-3000:]

    out = tmp_path / "secagg"
    # liver trains on more cases, so it is still training when it is killed
    proc, log = _start(out, "--clients", "brain,breast,liver", "--cases", "brain=3,breast=3,liver=12", "--secagg")
    deadline = time.time() + RUN_TIMEOUT_S
    while "secure aggregation keys exchanged" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    pids = pids_with("--client liver ", str(out / "workspace"))
    assert pids, "no simulator process of site liver"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert _finish(proc, log) == 0, log.read_text()[-3000:]

    history = json.loads((_server_files(out) / "fedoap_history.json").read_text())
    (record,) = history["rounds"]
    assert history["secagg"] is True and history["server_rule"] == "masked_sum"
    assert "liver" in record["dropped"], record
    assert record["aggregation"]["secagg"] == {"masked": ["brain", "breast"], "unmasked_dropped": ["liver"]}, record
    expected = load_file(str(_server_files(tmp_path / "plain") / SERVER_STATE_FILE))
    got = load_file(str(_server_files(out) / SERVER_STATE_FILE))
    assert set(expected) == set(got)
    worst = max(float(np.abs(expected[k].astype(np.float64) - got[k]).max()) for k in expected)
    assert worst < 2e-6, worst  # the fixed point's step (2^-24 of a share) and float32
    results = json.loads((out / "results.json").read_text())
    assert results["privacy"]["secagg"] is True and set(results["clients"]) == {"brain", "breast"}
    print(f"\n[secagg] liver killed after the key exchange: global model vs the survivors' plaintext mean, largest "
          f"difference {worst:.1e}")
    assert not pids_with("simulator", str(out / "workspace"))
