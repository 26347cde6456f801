"""The simulator ended once the job is complete (``fedoap.deploy.sim_env``): the predicate reads only this run's
history, the whole process tree ends (also the workers NVFlare starts in sessions of their own), an unfinished run
keeps its own exit status, and Ctrl-C leaves nothing running. The real NVFlare path is exercised by every simulation
test (``run_simulation`` uses it); these tests pin the rules with stand-in processes."""

import json
import sys
import textwrap
import time

import psutil
import pytest

from fedoap.deploy.sim_env import PromptSimEnv, history_completed, simulator_command

# a stand-in simulator: starts a worker in a session of its own (as NVFlare's simulator starts its sites), writes both
# pids, then sleeps; it would run for 10 minutes unless ended
TREE = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    open(sys.argv[1], "w").write(f"{worker.pid}")
    time.sleep(600)
""")


def _env(tmp_path, finished, **kwargs):
    return PromptSimEnv(finished=finished, clients=["a", "b"], workspace_root=str(tmp_path / "ws"), **kwargs)


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """Whether the process ends (or is a zombie: killed, not yet reaped) within ``within_s`` (a SIGKILL is delivered
    asynchronously: a busy machine may take a moment)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_the_history_predicate_reads_only_a_completed_history_of_this_run(tmp_path):
    path = tmp_path / "fedoap_history.json"
    finished = history_completed(path)
    assert not finished(time.time())  # not written yet
    path.write_text(json.dumps({"status": "completed"}))
    assert not finished(time.time() + 60)  # left by an earlier run (older than this run's start)
    start = time.time() - 60
    assert finished(start)
    path.write_text(json.dumps({"status": "running"}))
    assert not finished(start)
    path.write_text('{"status": "compl')  # caught while being written
    assert not finished(start)


def test_a_finished_run_ends_the_simulator_and_every_process_under_it(tmp_path):
    pid_file, seen = tmp_path / "worker.pid", {}

    def finished(started):
        if pid_file.exists() and pid_file.read_text():
            seen["worker"] = int(pid_file.read_text())
            return True
        return False

    env = _env(tmp_path, finished, grace_s=0.2)
    start = time.monotonic()
    assert env._run([sys.executable, "-c", TREE, str(pid_file)]) == 0
    assert env.ended_early and time.monotonic() - start < 60
    assert _gone(seen["worker"])


def test_an_unfinished_run_keeps_its_exit_status(tmp_path):
    env = _env(tmp_path, lambda started: False)
    assert env._run([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert not env.ended_early


def test_ctrl_c_while_waiting_ends_the_tree_and_propagates(tmp_path):
    pid_file = tmp_path / "worker.pid"

    def interrupted(started):
        if pid_file.exists() and pid_file.read_text():
            raise KeyboardInterrupt
        return False

    env = _env(tmp_path, interrupted)
    with pytest.raises(KeyboardInterrupt):
        env._run([sys.executable, "-c", TREE, str(pid_file)])
    assert _gone(int(pid_file.read_text()))


def test_the_command_is_nvflares_simulator_with_the_envs_settings(tmp_path):
    cmd = simulator_command("/jobs/j", "/ws/j", ["brain", " liver"], 2, 2, "/x/log.json")
    assert cmd[:3] == [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator"]
    assert cmd[3:] == ["/jobs/j", "-w", "/ws/j", "-c", "brain,liver", "-t", "2", "-l/x/log.json"]
    assert simulator_command("/jobs/j", "/ws", None, 3, 1, None)[4:] == ["-w", "/ws", "-n", "3", "-t", "1"]


@pytest.mark.parametrize("kwargs", [{"grace_s": -1}, {"poll_s": 0}])
def test_bad_settings_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match="grace_s must be >= 0 and poll_s > 0"):
        _env(tmp_path, lambda started: False, **kwargs)
    with pytest.raises(ValueError, match="finished must be a callable"):
        PromptSimEnv(finished=None, clients=["a"], workspace_root=str(tmp_path))

