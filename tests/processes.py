"""The processes a test started, found by what their command lines hold (Linux /proc), to kill one at a chosen
moment or to check that none is left."""

import os
import signal
import subprocess
from pathlib import Path


def pids_with(*markers: str) -> list[int]:
    """PIDs whose command line holds every marker (e.g. a process kind and this test's own folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(m in cmdline for m in markers):
            found.append(int(proc.name))
    return found


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """The exit status of a run started in its own session, or, after ``timeout`` seconds, kill its whole process
    group and fail with the end of its log."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not finish in {timeout:.0f} s: {log.read_text()[-3000:]}")
