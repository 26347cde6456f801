"""``fedoap bench overhead``'s breakdown: the phases come from the run's clock and NVFlare's log lines, add up to the
run's wall time, and a log without the expected lines is named. (The benchmark itself is a command: the simulation
tests check the same parsing on a real run's logs.)"""

from datetime import datetime

import pytest

from fedoap.bench_overhead import PHASES, log_events, overhead_table, run_phases

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


def _site(spans):
    lines = [(0.5, "ClientTaskWorker", "ClientTaskWorker started to run")]
    for start, end in spans:
        lines += [(start, "ClientRunner", "execute for task (train)"),
                  (end, "ClientRunner", "finished processing task")]
    return lines


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
