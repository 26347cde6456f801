"""The command line fails fast, before any NVFlare process starts, and names the option, folder or file at fault."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedoap.cli import main
from fedoap.data import generate_site


def test_missing_site_folder_is_named(tmp_path, capsys):
    assert main(["simulate", "--data", str(tmp_path), "--clients", "brain", "--unseen", "none",
                 "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "brain") in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_label_file_is_named_and_left_untouched(tmp_path, capsys):
    site = generate_site(tmp_path / "breast", "breast", n_cases=6, size=32)
    dataset = json.loads((site / "dataset.json").read_text())
    label = site / dataset["training"][0]["label"]
    label.write_bytes(b"not a png")
    assert main(["simulate", "--data", str(tmp_path), "--clients", "breast", "--unseen", "none",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert label.name in err
    assert label.read_bytes() == b"not a png"


def test_generate_data_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "brain").mkdir()
    (tmp_path / "brain" / "mine.txt").write_text("keep me")
    assert main(["generate-data", str(tmp_path), "--size", "32"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "brain" / "mine.txt").read_text() == "keep me"


def test_mu_is_fedprox_only(tmp_path, capsys):
    assert main(["simulate", "--method", "fedavg", "--mu", "0.1", "--clients", "brain", "--unseen", "none",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--mu is FedProx's option" in capsys.readouterr().err


# -- errors up front (issue 11): one line, exit status 2, before anything starts; Ctrl-C is "interrupted" -----------
def _fedoap(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedoap.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.mark.parametrize("option, message", [
    (["--image-size", "7"], "--image-size must be a multiple of 16 (the UNet halves it 4 times), got 7"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--local-epochs", "0"], "--local-epochs must be >= 1, got 0"),
    (["--finetune-epochs", "-1"], "--finetune-epochs must be >= 0, got -1"),
])
def test_bad_options_fail_at_once_in_one_line(tmp_path, option, message):
    start = time.time()
    run = _fedoap("simulate", *option, "--out", str(tmp_path / "out"))
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2 and err == f"fedoap: error: {message}\n"
    assert time.time() - start < 5
    assert not (tmp_path / "out").exists()  # nothing was created


@pytest.mark.parametrize("option, message", [
    (["--min-responses", "-1"], "--min-responses must be >= 0, got -1"),
    (["--min-responses", "3", "--clients", "brain,breast"], "--min-responses 3: the federation has only 2 site(s)"),
    (["--round-timeout", "-5"], "--round-timeout must be a finite number >= 0, got -5.0"),
    (["--resume", "--overwrite"], "--resume continues the run in --out; it cannot be combined with --overwrite"),
    (["--robust-rule", "median", "--he"], "--robust-rule needs every update in clear on the server; --he hides it"),
])
def test_bad_fault_options_fail_before_anything_starts(tmp_path, option, message):
    start = time.time()
    run = _fedoap("simulate", *option, "--out", str(tmp_path / "out"))
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2 and err == f"fedoap: error: {message}\n"
    assert time.time() - start < 20  # importing torch (the method's check) is most of it; a run takes far longer
    assert not (tmp_path / "out").exists()


def test_a_device_this_machine_lacks_fails_at_once(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    start = time.time()
    run = _fedoap("simulate", "--device", "cuda", "--out", str(tmp_path / "out"))
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2 and err == ("fedoap: error: --device cuda: no CUDA device is available on this machine "
                                           "(use --device cpu)\n")
    assert time.time() - start < 20  # importing torch is most of it; a run takes far longer


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for command in (["simulate"], ["benchmark"], ["bench", "train"], ["export-jobs"]):
        assert main([*command, "--out", str(tmp_path / "file" / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fedoap: error: --out {tmp_path / 'file' / 'out'}: cannot write there") \
            and err.count("\n") == 1


def test_ctrl_c_during_data_generation_is_interrupted_not_a_traceback(tmp_path):
    run = _fedoap("generate-data", str(tmp_path / "data"), "--size", "256")
    deadline = time.time() + 60
    while not list((tmp_path / "data").glob("*/*")) and time.time() < deadline:
        time.sleep(0.1)  # until it writes its first files
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and err == "fedoap: interrupted\n"
