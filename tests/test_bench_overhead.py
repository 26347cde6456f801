"""``fedoap bench overhead``'s breakdown: the phases come from the run's clock and NVFlare's log lines, add up to the
run's wall time, and a log without the expected lines is named. (The benchmark itself is a command: the simulation
tests check the same parsing on a real run's logs.)"""

from datetime import datetime

import pytest

from fedoap.bench_overhead import PHASES, log_events, overhead_table, run_phases
from fedoap.site.client import SESSION_READY

T0 = datetime(2026, 12, 2, 8, 0, 0).timestamp()


def _line(t: float, name: str, message: str) -> str:
    stamp = datetime.fromtimestamp(T0 + t)
    return f"{stamp:%Y-%m-%d %H:%M:%S},{stamp.microsecond // 1000:03d} - {name} - INFO - {message}"


def _workspace(tmp_path, server_lines, sites):
    ws = tmp_path / "ws"
    (ws / "server").mkdir(parents=True)
    (ws / "server" / "log.txt").write_text("\n".join(_line(*x) for x in server_lines) + "\n")
    for site, lines in sites.items():
        (ws / site).mkdir()
        (ws / site / "log.txt").write_text("\n".join(_line(*x) for x in lines) + "\nnot a log line\n")
    return ws


def _site(spans, ready=None):
    """A site's log: its task spans, and the session-ready line (at ``ready``, default: before the first task)."""
    lines = [(0.5, "ClientTaskWorker", "ClientTaskWorker started to run")]
    for start, end in spans:
        lines += [(start, "ClientRunner", "execute for task (train)"),
                  (end, "ClientRunner", "finished processing task")]
    lines.append((0.6 if ready is None else ready, "fedoap.site.client", f"{SESSION_READY}: site"))
    return sorted(lines)


def test_phases_add_up_to_the_wall_time_and_training_is_the_busiest_sites(tmp_path):
    server = [(1.0, "SimulatorRunner", "Create the Simulator Server."),
              (4.0, "ServerRunner", "Server runner starting ..."),
              (12.0, "ServerRunner", "got result from client a for task: name=train"),
              (20.0, "ServerRunner", "got result from client b for task: name=personalize")]
    ws = _workspace(tmp_path, server, {"a": _site([(9.0, 11.5), (13.0, 19.0)]),
                                       "b": _site([(10.0, 12.0), (13.0, 19.8)])})
    results = {"workspace": str(ws), "clients": {"a": {}, "b": {}},
               "timing": {"prepare_s": 2.0, "simulator_started_at": T0, "simulator_s": 21.0, "report_s": 0.5}}
    p = run_phases(results)
    assert p["prepare"] == 2.0 and p["report"] == 0.5
    assert p["simulator_start"] == pytest.approx(4.0)
    assert p["site_start"] == pytest.approx(6.0)  # the last site's first task at 10.0
    assert p["training_eval"] == pytest.approx(8.8)  # b: 2.0 + 6.8
    assert p["hand_off"] == pytest.approx(20.0 - 10.0 - 8.8)
    assert p["teardown"] == pytest.approx(1.0)
    assert p["total"] == pytest.approx(2.0 + 21.0 + 0.5) == pytest.approx(sum(p[k] for k in PHASES))
    assert p["ratio"] == pytest.approx(p["total"] / 8.8)
    table = overhead_table({"phases": {"prompt": p}, "imports": [
        {"process": "server", "imports": "x", "seconds": 1.0, "before": "y, x", "before_seconds": 2.0}]})
    assert "| training_eval | 8.8 |" in table and "| server | `x` | 1.00 | 2.00 | `y, x` |" in table


def test_a_log_without_the_expected_lines_is_named(tmp_path):
    ws = _workspace(tmp_path, [(1.0, "SimulatorRunner", "Create the Simulator Server.")], {"a": _site([(2.0, 3.0)])})
    results = {"workspace": str(ws), "clients": {"a": {}},
               "timing": {"prepare_s": 0.0, "simulator_started_at": T0, "simulator_s": 5.0, "report_s": 0.0}}
    with pytest.raises(ValueError, match=r"server/log.txt: no line with 'Server runner starting'"):
        run_phases(results)
    assert [m for _, m in log_events(ws / "a" / "log.txt")][-1] == "ClientRunner - INFO - finished processing task"


def test_the_first_task_until_the_session_is_ready_is_start_up_not_training(tmp_path):
    """The task script starts with the first task: its imports and data loading (until the site logs that its
    session is ready) count in ``site_start``; a site ready before its first task loses nothing."""
    server = [(4.0, "ServerRunner", "Server runner starting ..."),
              (20.0, "ServerRunner", "got result from client b for task: name=personalize")]
    ws = _workspace(tmp_path, server, {"a": _site([(9.0, 11.5), (13.0, 19.0)]),  # ready before its first task
                                       "b": _site([(10.0, 15.0), (16.0, 19.8)], ready=13.0)})
    results = {"workspace": str(ws), "clients": {"a": {}, "b": {}},
               "timing": {"prepare_s": 0.0, "simulator_started_at": T0, "simulator_s": 21.0, "report_s": 0.0}}
    p = run_phases(results)
    assert p["site_start"] == pytest.approx(13.0 - 4.0)  # b is ready at 13.0, 3 s into its first task
    assert p["training_eval"] == pytest.approx(8.5)  # a: 2.5 + 6.0; b: (15.0 - 13.0) + 3.8 = 5.8
    assert p["hand_off"] == pytest.approx(20.0 - 13.0 - 8.5)
    (ws / "b" / "log.txt").write_text("\n".join(_line(*x) for x in [x for x in _site([(10.0, 15.0)]) if SESSION_READY not in x[2]]) + "\n")
    with pytest.raises(ValueError, match=f"b/log.txt: no line with '{SESSION_READY}'"):
        run_phases(results)
