"""End to end: ``fedoap simulate`` on the real NVFlare simulator with 2 sites, 2 rounds and tiny images.

Checks the files a user gets and their values, not ``execute()``'s return (the simulator can return normally after a
site failed).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedoap.cli import main
from fedoap.data import load_site, load_unseen
from fedoap.networks import FedOAPNet

ARGS = ["--clients", "brain,liver", "--unseen", "lung", "--rounds", "2", "--local-epochs", "1",
        "--finetune-epochs", "1", "--image-size", "32", "--width", "4", "--batch-size", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", *ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_file_has_every_field_with_sane_values(run):
    out, res = run
    assert res["method"] == "fedoap" and res["rounds"] == 2
    assert set(res["clients"]) == {"brain", "liver"}
    for site, row in res["clients"].items():
        assert row["organ"] == site
        assert 0.0 <= row["dice"] <= 1.0
        assert row["hd95"] is None or row["hd95"] >= 0.0
        test = load_site(out / "data" / site, image_size=32, seed=3, name=site).test
        assert row["n_test"] == len(test) > 0
        assert res["unseen"][site]["organ"] == "lung"
        assert 0.0 <= res["unseen"][site]["dice"] <= 1.0
        u = res["unseen"][site]  # LESION_FP_RULE: null where no slice of its kind
        lung = load_unseen(out / "data" / "lung", image_size=32)
        assert (u["n_lesion"], u["n_empty"]) == (int((lung.labels.reshape(len(lung), -1).sum(1) > 0).sum()),
                                                 int((lung.labels.reshape(len(lung), -1).sum(1) == 0).sum()))
        assert 0.0 <= u["lesion_dice"] <= 1.0 and 0.0 <= u["pooled_dice"] <= 1.0
        assert u["empty_fp_rate"] is None if u["n_empty"] == 0 else 0.0 <= u["empty_fp_rate"] <= 1.0
        assert row["lesion_dice"] is None or 0.0 <= row["lesion_dice"] <= 1.0
        assert len(res["val_dice_per_round"][site]) == 2
    assert res["wall_time_s"] > 0
    assert "empty ground truth" in res["empty_mask_rule"]


def test_only_shared_parameters_were_uploaded(run):
    out, res = run
    net = FedOAPNet(channels=[4, 8, 16, 32], bottleneck_channels=64)
    shared_bytes = sum(v.numel() * 4 for v in net.shared_state_dict().values())
    total_bytes = sum(v.numel() * 4 for v in net.state_dict().values())
    assert res["parameters"]["shared"] * 4 == shared_bytes
    for site in ("brain", "liver"):
        assert res["bytes_uploaded_per_round"][site] == shared_bytes < total_bytes

    # The server's checkpoint: shared keys moved away from the initial model, local keys never did.
    initial = torch.load(out / "initial_model.pt")
    saved = torch.load(Path(res["workspace"]) / "server" / "simulate_job" / "app_server" / "FL_global_model.pt",
                       weights_only=False)["model"]
    for key in net.local_keys:
        np.testing.assert_array_equal(np.asarray(saved[key]), initial[key].numpy())
    moved = [k for k in net.shared_keys if not np.array_equal(np.asarray(saved[k]), initial[k].numpy())]
    assert len(moved) > len(net.shared_keys) // 2


def test_figures_and_site_local_files(run):
    out, res = run
    for name in ("dice_per_round.png", "overlays.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for site in ("brain", "liver"):
        local = Path(res["workspace"]) / site / "simulate_job" / "fedoap"
        detail = json.loads((local / "personalized.json").read_text())
        assert detail["finetune"]["best_epoch"] in (0, 1)  # chosen on the validation split
        assert len(detail["finetune"]["val_dice_per_epoch"]) == 2
        assert (local / "personalized_model.safetensors").is_file()
        for written in local.iterdir():  # patient images, per-image scores and the model: owner-only
            assert written.stat().st_mode & 0o077 == 0, written


def test_a_hospital_uses_the_personalized_model_after_the_job(run, tmp_path):
    """The model file a real job left describes itself, scores the site's test split exactly as the job reported,
    and segments a new scan keeping its geometry."""
    import nibabel as nib

    from fedoap.inference.model_file import load_model, read_card

    out, res = run
    model = Path(res["workspace"]) / "brain" / "simulate_job" / "fedoap" / "personalized_model.safetensors"
    card = read_card(model)
    assert card.network["class_path"] == "fedoap.networks.fedoap_net.FedOAPNet"
    assert card.method["name"] == "fedoap" and card.provenance["rounds"] == 2 and card.provenance["seed"] == 3
    assert card.provenance["site"] == "brain" and card.provenance["privacy"] == {}  # no DP in this run
    assert card.preprocessing.modality == "MRI" and card.preprocessing.image_size == 32
    assert card.preprocessing.volumetric and card.preprocessing.normalization["kind"] == "percentiles"
    network = load_model(model).network
    assert set(card.shared_keys) == set(network.shared_keys)  # the partition the federation used
    assert card.provenance["test_dice"] == pytest.approx(res["clients"]["brain"]["dice"], abs=1e-12)

    # `fedoap evaluate --split test`: the same test cases, the same per-slice Dice as the job's result
    assert main(["evaluate", "--model", str(model), "--data", str(out / "data" / "brain"), "--split", "test",
                 "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["slices"]["n_images"] == res["clients"]["brain"]["n_test"]
    assert summary["slices"]["dice"] == pytest.approx(res["clients"]["brain"]["dice"], abs=1e-9)
    assert summary["volume"]["n_cases"] == res["clients"]["brain"]["n_test_volumes"]

    # `fedoap predict` on a new scan: a mask of the scan's shape and affine
    scan = sorted((out / "data" / "brain" / "imagesTr").glob("*.nii.gz"))[0]
    assert main(["predict", "--model", str(model), "--input", str(scan), "--out", str(tmp_path / "masks")]) == 0
    (written,) = (tmp_path / "masks").glob("*_seg.nii.gz")
    image, mask = nib.load(scan), nib.load(written)
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_existing_results_are_not_overwritten(run, capsys):
    out, _ = run
    before = (out / "results.json").read_bytes()
    assert main(["simulate", *ARGS, "--out", str(out)]) == 2
    assert "results.json exists" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_ctrl_c_ends_the_simulation_and_every_process_it_started(tmp_path):
    """Ctrl-C as a terminal sends it (to the command's process group) while the simulator runs: "interrupted", exit
    status 130, no traceback, and no process of the run left behind (the simulator runs in a session of its own)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-m", "fedoap.cli", "simulate", *ARGS, "--rounds", "20",
                            "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, start_new_session=True)
    started, deadline, seen = False, time.time() + 240, set()
    while time.time() < deadline and run.poll() is None:
        children = psutil.Process(run.pid).children(recursive=True)
        seen |= {p.pid for p in children}
        if len(children) >= 3:  # the simulator, its server and a site: the federation is running
            started = True
            break
        time.sleep(0.5)
    assert started, run.communicate(timeout=60)
    time.sleep(3)
    seen |= {p.pid for p in psutil.Process(run.pid).children(recursive=True)}
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert err.endswith("fedoap: interrupted\n") and "Traceback" not in err, err
    time.sleep(2)
    left = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, [psutil.Process(pid).cmdline() for pid in left]
