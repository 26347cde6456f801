"""``fedoap bench predict``: one real tiny run through the CLI (2 synthetic volumes, both sides), its table and JSON,
and its one-line option errors."""

import json

from fedoap.cli import main


def test_bench_predict_times_both_sides_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "predict", "--out", str(out), "--cases", "2", "--scan-size", "40", "--depth", "3",
               "--image-size", "32", "--width", "4", "--batch-size", "4", "--repeats", "1", "--devices", "cpu",
               "--threads", "1"])
    assert rc == 0
    record = json.loads((out / "bench_predict.json").read_text())
    sides = {r["side"]: r for r in record["rows"]}
    assert set(sides) == {"fedoap predict", "plain MONAI SliceInferer loop"}
    assert sides["plain MONAI SliceInferer loop"]["ratio_vs_plain"] == 1.0
    for row in sides.values():
        assert row["device"] == "cpu" and row["seconds"] > 0
        assert abs(row["slices_per_s"] - 3 * row["volumes_per_s"]) < 1e-9 * row["slices_per_s"] + 1e-12
    fedoap = sides["fedoap predict"]
    assert abs(fedoap["ratio_vs_plain"] - sides["plain MONAI SliceInferer loop"]["seconds"] / fedoap["seconds"]) < 1e-9
    table = (out / "bench_predict.md").read_text()
    assert "| cpu | fedoap predict |" in table and record["command"] in table
    assert "ratio vs plain" in capsys.readouterr().out


def test_bench_predict_option_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "predict", "--out", str(tmp_path), "--devices", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--devices" in err[0]
    (tmp_path / "file").write_text("x")
    assert main(["bench", "predict", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err
