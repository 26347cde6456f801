"""NVFlare's simulator, ended as soon as the job says it is finished.

A simulated run of a few seconds of training spent about 6 s more after its last result had arrived: NVFlare's
server polls its end-run readiness, and the simulator's process monitor then sleeps a fixed shutdown grace
(``mpm.run(shutdown_grace_time=3)``) before it exits. :class:`PromptSimEnv` is ``SimEnv`` with one difference: it
runs the same simulator command (``python -m nvflare.private.fed.app.simulator.simulator JOB -w WS -c ... -t ...
-l ...``, the command ``FedJob.simulator_run`` builds) as its own process group, watches a predicate of the
workspace (for a fedoap job: the server's history says ``completed``, which the workflow writes after every site's
results are in and every site wrote its own outputs), and then, after a short grace for the sites to receive the
end of the run, kills it and every process under it. A run that is not finished keeps NVFlare's own ending,
success or failure; Ctrl-C kills the whole tree at once.

Only a simulation ends this way: POC and deployed jobs end as NVFlare ends them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

from nvflare.job_config.api import FedJob
from nvflare.recipe import SimEnv

__all__ = ["PromptSimEnv", "simulator_command", "history_completed"]

SIMULATOR_MODULE = "nvflare.private.fed.app.simulator.simulator"


def simulator_command(job_folder: str, workspace: str, clients: Optional[list[str]], n_clients: int, threads: int,
                      log_config: Optional[str]) -> list[str]:
    """The argument list of NVFlare's simulator for an exported job (as ``FedJob.simulator_run`` runs it)."""
    command = [sys.executable, "-m", SIMULATOR_MODULE, job_folder, "-w", workspace]
    if clients:
        command += ["-c", ",".join(c.strip() for c in clients)]
    else:
        command += ["-n", str(n_clients)]
    command += ["-t", str(threads)]
    if log_config:
        command += [f"-l{log_config}"]
    return command


def history_completed(history_path: str | os.PathLike) -> Callable[[float], bool]:
    """The ``finished`` predicate of a fedoap job: the server's history at ``history_path`` (the workflow's
    ``HISTORY_FILE`` in the server's run folder) was written by this run and says ``completed``."""
    path = Path(history_path)

    def finished(started: float) -> bool:
        try:
            if path.stat().st_mtime < started:
                return False
            return json.loads(path.read_text()).get("status") == "completed"
        except (OSError, ValueError):  # not there yet, or caught while being written
            return False

    return finished


class PromptSimEnv(SimEnv):
    """``SimEnv`` that ends the simulator once ``finished()`` holds (see the module's docstring).

    Args:
        finished: called every ``poll_s`` while the simulator runs, with the time (``time.time()``) it was started;
            True once that run's results are complete (what an earlier run left in the workspace must not count).
        grace_s: how long the simulator may still end by itself after ``finished()`` first holds.
        poll_s: how often ``finished`` is asked.
        kwargs: ``SimEnv``'s arguments.
    """

    def __init__(self, *, finished: Callable[[float], bool], grace_s: float = 0.5, poll_s: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not callable(finished):
            raise ValueError("finished must be a callable")
        if grace_s < 0 or poll_s <= 0:
            raise ValueError(f"grace_s must be >= 0 and poll_s > 0, got {grace_s} and {poll_s}")
        self.finished = finished
        self.grace_s = float(grace_s)
        self.poll_s = float(poll_s)
        #: whether the last run was ended by this class after it had finished (instead of exiting by itself)
        self.ended_early = False

    def deploy(self, job: FedJob) -> str:
        job_id = job.name
        workspace = os.path.join(self.workspace_root, job_id)
        self._ensure_default_component_policy(workspace)
        with tempfile.TemporaryDirectory() as job_root:
            job.export_job(job_root)
            command = simulator_command(os.path.join(job_root, job.name), workspace, self.clients, self.num_clients,
                                        self.num_threads, self.log_config)
            status = self._run(command)
        self.last_run_failed = status != 0
        if self.last_run_failed:
            raise RuntimeError(f"Simulation failed with return code {status}. Logs are in per-site subdirectories "
                               f"under {workspace}, e.g. server/simulate_job/log.txt")
        return job_id

    def _run(self, command: list[str]) -> int:
        """Run the simulator; its return code, or 0 when it was ended after ``finished()`` held."""
        self.ended_early = False
        started = time.time()
        process = subprocess.Popen(command, start_new_session=True, env=os.environ.copy())
        try:
            done_at: Optional[float] = None
            while True:
                try:
                    return process.wait(timeout=self.poll_s)
                except subprocess.TimeoutExpired:
                    pass
                if done_at is None and self.finished(started):
                    done_at = time.monotonic()
                if done_at is not None and time.monotonic() - done_at >= self.grace_s:
                    _end_group(process)
                    self.ended_early = True
                    return 0
        except BaseException:  # Ctrl-C or anything else: nothing of the simulator stays behind
            _end_group(process)
            raise


def _end_group(process: subprocess.Popen, wait_s: float = 10.0) -> None:
    """Kill the simulator and every process under it (SIGKILL, as NVFlare's own Ctrl-C path does: its processes
    answer SIGTERM with a graceful shutdown that sleeps 3 s, and what they write is written atomically).

    The simulator starts each site's worker in a session of its own, so its process group does not reach them: the
    tree is collected (``psutil``, NVFlare's own dependency) before anything is signalled, while the workers are
    still the simulator's descendants."""
    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    # SIGKILL cannot be caught: nothing of the tree runs on. Only the leader is ours to reap; waiting for the others
    # to be reaped by their new parent would only add about a second of polling
    with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
        process.wait(timeout=wait_s)
