"""Privacy switches together in a real NVFlare simulator run: HE on the shared update, client-level DP and Opacus
DP-SGD. Checks what the server held and saved, and the epsilons each site reported."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedoap.cli import main
from fedoap.server.controller import ENCRYPTED_CHECKPOINT, load_encrypted_checkpoint
from fedoap.protocol import HISTORY_FILE
from fedoap.networks import FedOAPNet
from fedoap.privacy.dp import update_dp_epsilon
from fedoap.privacy.he import HE_KEY_PREFIX, from_params

ARGS = ["--clients", "brain,liver", "--unseen", "none", "--rounds", "2", "--local-epochs", "1",
        "--finetune-epochs", "1", "--image-size", "32", "--width", "4", "--batch-size", "8",
        "--he", "--dp-update-clip", "2.0", "--dp-update-noise", "0.05", "--dp-sgd-epsilon", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("private")
    assert main(["simulate", *ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_server_saw_and_saved_only_ciphertext_for_the_shared_part(run):
    out, res = run
    server = Path(res["workspace"]) / "server" / "simulate_job"
    saved = load_encrypted_checkpoint(server / "app_server" / ENCRYPTED_CHECKPOINT)
    assert saved["round"] == 1
    assert all(k.startswith(HE_KEY_PREFIX) for k in saved["encrypted_shared"])
    update = from_params(saved["encrypted_shared"])
    net = FedOAPNet(channels=[4, 8, 16, 32], bottleneck_channels=64)
    assert update.layout.keys == sorted(net.shared_keys) and update.count == 2
    assert not (server / "app_server" / "FL_global_model.pt").exists()  # no plaintext checkpoint at all

    history = json.loads((server / HISTORY_FILE).read_text())
    plaintext_bytes = res["parameters"]["shared"] * 4
    for record in history["rounds"]:
        assert record["accepted"] == 2
        for site in ("brain", "liver"):
            uploaded = record["sites"][site]["bytes_uploaded"]
            assert plaintext_bytes < uploaded <= 6 * plaintext_bytes
    for site in ("brain", "liver"):
        assert 0.0 <= res["clients"][site]["dice"] <= 1.0


def test_reported_epsilons(run):
    _, res = run
    privacy = res["privacy"]
    assert privacy["he"] is True and privacy["delta"] == 1e-5
    for site in ("brain", "liver"):
        sgd = privacy["dp_sgd_epsilon_per_round"][site]
        assert len(sgd) == 2 and 0 < sgd[0] < sgd[1]
        assert sgd[1] == pytest.approx(8.0, rel=0.05)  # calibrated to the target over the whole job
        update = privacy["dp_update_epsilon_per_round"][site]
        expected = [update_dp_epsilon(0.05, rounds=r, delta=1e-5) for r in (1, 2)]
        np.testing.assert_allclose(update, expected, rtol=1e-9)
