"""End to end: ``fedoap simulate --task brats-missing-modality --method fedmepd`` on the real NVFlare simulator, three
sites with modality masks 1111, 1100 and 0011, tiny 16^3 synthetic volumes, two rounds, the server's full-modal set.

Checks the files a user gets: results.json with Dice and HD95 per site and region, the server's history (its training
step ran every round), and the bytes each site uploaded (only the encoders of its own modalities)."""

import json
from pathlib import Path

import pytest

from fedoap.cli import main
from fedoap.protocol import HISTORY_FILE
from fedoap.networks.fedmepd_net import FedMEPDNet

ARGS = ["--task", "brats-missing-modality", "--method", "fedmepd", "--modality-masks", "1111,1100,0011",
        "--volume-size", "16", "--cases", "site-1=3,site-2=3,site-3=3", "--server-cases", "2", "--rounds", "2",
        "--local-epochs", "1", "--finetune-epochs", "1", "--batch-size", "1", "--tracking", "none",
        "--method-args", json.dumps({"channels": [4, 8, 16], "anchors_per_class": 2, "patience": 1})]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fedmepd_sim")
    assert main(["simulate", *ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_have_dice_and_hd95_per_site_and_region(run):
    _, res = run
    assert res["method"] == "fedmepd" and res["task"] == "brats-missing-modality" and res["rounds"] == 2
    assert {s: r["modalities"] for s, r in res["clients"].items()} == {
        "site-1": "flair+t1ce+t1+t2", "site-2": "flair+t1ce", "site-3": "t1+t2"}
    for row in res["clients"].values():
        assert row["n_test"] == 1 and 0.0 <= row["dice"] <= 1.0
        assert set(row["regions"]) == {"wt", "tc", "et"}
        for region in row["regions"].values():
            assert 0.0 <= region["dice"] <= 1.0 and (region["hd95"] is None or region["hd95"] >= 0.0)
        assert row["personal_filters"] >= 0
    assert "WT, TC, ET" in res["region_rule"]
    assert all(len(v) == 2 for v in res["val_dice_per_round"].values())


def test_the_server_trained_every_round_and_sites_sent_only_their_encoders(run):
    _, res = run
    history = json.loads(next((Path(res["workspace"]) / "server").rglob(HISTORY_FILE)).read_text())
    assert [r["accepted"] for r in history["rounds"]] == [3, 3]
    assert all("server_train_loss" in r["aggregation"] for r in history["rounds"])
    net = FedMEPDNet(channels=[4, 8, 16], anchors_per_class=2)
    state = net.state_dict()
    per_encoder = sum(state[k].numel() * 4 for k in net.encoder_keys("flair"))
    sent = res["bytes_uploaded_per_round"]
    assert sent["site-1"] - sent["site-2"] == pytest.approx(2 * per_encoder, rel=0.02)  # two encoders fewer
    assert sent["site-2"] == pytest.approx(sent["site-3"], rel=0.01)
