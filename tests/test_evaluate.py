"""``fedoap evaluate`` scores a model file as the federation did and as a clinician would: its per-case 3D Dice is the
hand count of segment()'s masks against the label files, its HD95 is in mm from the NIfTI header, its per-slice mean
is per_image_scores on the loader's slices, and on the site's test split it gives back the numbers the job reported."""

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from PIL import Image

from fedoap.cli import main
from fedoap.config import RunConfig
from fedoap.data import generate_site, load_site, load_unseen
from fedoap.data.normalization import normalization_for
from fedoap.eval.metrics import binarize, per_image_scores
from fedoap.inference.model_file import ModelCard, Preprocessing, load_model, read_card, save_model
from fedoap.inference.segment import segment
from fedoap.privacy.at_rest import create_key, load_key, site_key_path
from fedoap.protocol import PERSONALIZE_TASK, TRAIN_TASK
from fedoap.site.outputs import load_detail, site_output_paths
from fedoap.site.session import SITE_RESULTS_DIR, SiteSession

SIZE = 32  # the training size; the scans are 40 x 40, so masks are resized back


def _card(cfg, net, modality, organ, volumetric, seed=0):
    method = cfg.method.instance
    return ModelCard(network=method.model_spec(cfg.training.model_args()),
                     preprocessing=Preprocessing(modality=modality, organ=organ,
                                                 normalization=normalization_for(modality, organ), image_size=SIZE,
                                                 volumetric=volumetric),
                     method={"name": "fedoap", "args": {}}, shared_keys=tuple(method.shared_keys(net)),
                     provenance={"site": organ, "seed": seed, "test_dice": 0.5})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A brain (NIfTI) and a breast (PNG) site of 40 x 40 scans, and one small network trained a few steps on both
    (so its masks are neither empty nor everything), saved with a card for each."""
    root = tmp_path_factory.mktemp("evaluate")
    brain = generate_site(root / "brain", "brain", n_cases=4, seed=1, size=40, depth=5)
    breast = generate_site(root / "breast", "breast", n_cases=4, seed=1, size=40)
    cfg = RunConfig.from_options(method="fedoap", image_size=SIZE, width=8)
    torch.manual_seed(0)
    net = cfg.build_model()
    sets = [load_unseen(brain, SIZE), load_unseen(breast, SIZE)]
    x = torch.from_numpy(np.concatenate([s.images for s in sets]))
    y = torch.from_numpy(np.concatenate([s.labels for s in sets]))
    weights = torch.tensor([1.0] * len(sets[0]) + [4.0] * len(sets[1]))  # the 4 breast images as often as 20 slices
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    net.train()
    for _ in range(12):
        idx = torch.multinomial(weights, 8, replacement=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]), y[idx], pos_weight=torch.tensor(5.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    models = {"brain": save_model(root / "brain.safetensors", net.state_dict(), _card(cfg, net, "MRI", "brain", True)),
              "breast": save_model(root / "breast.safetensors", net.state_dict(),
                                   _card(cfg, net, "US", "breast", False))}
    return {"root": root, "brain": brain, "breast": breast, "models": models}


def _evaluate(capsys, *args):
    assert main(["evaluate", *map(str, args)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    folder = args[list(args).index("--out") + 1]
    with open(folder / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((folder / "summary.json").read_text()), out


def _hand_dice(pred, label):
    overlap, total = int(np.sum((pred == 1) & (label == 1))), int(np.sum(pred == 1) + np.sum(label == 1))
    return 1.0 if total == 0 else 2 * overlap / total


def _check_slices(rows, summary, model, site):
    """The per-slice columns are the site's own metric: per_image_scores on the loader's slices."""
    slices = load_unseen(site, SIZE)
    with torch.no_grad():
        pred = binarize(model.network(torch.from_numpy(slices.images)))
    scores = per_image_scores(pred, torch.from_numpy(slices.labels))
    assert summary["slices"]["dice"] == pytest.approx(scores.mean_dice(), abs=1e-9)
    assert summary["slices"]["hd95"] == pytest.approx(scores.mean_hd95(), abs=1e-6)
    assert summary["slices"]["n_images"] == len(slices)
    ids = np.asarray(slices.case_ids)
    for row in rows:
        assert float(row["slice_dice_mean"]) == pytest.approx(scores.dice[ids == row["case"]].mean(), abs=1e-9)
        assert int(row["n_slices"]) == int((ids == row["case"]).sum())


def test_nifti_site_per_case_3d_scores_in_mm(world, tmp_path, capsys):
    model = load_model(world["models"]["brain"])
    rows, summary, printed = _evaluate(capsys, "--model", world["models"]["brain"], "--data", world["brain"],
                                       "--out", tmp_path / "out")
    dataset = json.loads((world["brain"] / "dataset.json").read_text())
    assert [r["case"] for r in rows] == [f"brain_{i:03d}" for i in range(4)]
    for row, entry in zip(rows, dataset["training"]):
        image, label = nib.load(world["brain"] / entry["image"]), nib.load(world["brain"] / entry["label"])
        truth = np.asarray(label.dataobj).astype(np.uint8)
        mask = segment(model, np.asarray(image.dataobj))
        assert mask.shape == truth.shape == (40, 40, 5)
        assert float(row["dice_3d"]) == pytest.approx(_hand_dice(mask, truth), abs=1e-12)
        zooms = tuple(float(z) for z in image.header.get_zooms())
        assert row["spacing"] == "x".join(f"{z:g}" for z in zooms) and row["hd95_unit"] == "mm"
        assert zooms[0] != zooms[2] and zooms[0] != 1.0  # anisotropic and not in voxels: the spacing matters
        if truth.any() and mask.any():
            in_mm = compute_hausdorff_distance(torch.from_numpy(mask)[None, None], torch.from_numpy(truth)[None, None],
                                               include_background=True, percentile=95, spacing=list(zooms))
            assert float(row["hd95"]) == pytest.approx(float(in_mm), rel=1e-6)
        assert int(row["gt_voxels"]) == int(truth.sum()) and int(row["pred_voxels"]) == int(mask.sum())
    dice = [float(r["dice_3d"]) for r in rows]
    assert any(0.0 < d < 1.0 for d in dice)  # the masks are neither empty nor perfect: the equalities mean something
    assert summary["volume"]["dice"] == pytest.approx(np.mean(dice)) and summary["volume"]["hd95_unit"] == "mm"
    _check_slices(rows, summary, model, world["brain"])
    assert "the header's voxel spacing" in summary["empty_mask_rules"]["volume"]
    assert summary["model_card"]["provenance"]["site"] == "brain"
    assert summary["command"].startswith("fedoap evaluate --model ") and "--split all" in summary["command"]
    assert "Dice 3D" in printed and "HD95 mm" in printed and "brain_003" in printed


def test_png_site_is_scored_in_pixels(world, tmp_path, capsys):
    model = load_model(world["models"]["breast"])
    rows, summary, printed = _evaluate(capsys, "--model", world["models"]["breast"], "--data", world["breast"],
                                       "--out", tmp_path / "out", "--batch-size", "1")
    dataset = json.loads((world["breast"] / "dataset.json").read_text())
    for row, entry in zip(rows, dataset["training"], strict=True):
        image = np.asarray(Image.open(world["breast"] / entry["image"]))
        truth = np.asarray(Image.open(world["breast"] / entry["label"])).astype(np.uint8)
        mask = segment(model, image)
        assert mask.shape == truth.shape == (40, 40) and row["n_slices"] == "1"
        assert float(row["dice_3d"]) == pytest.approx(_hand_dice(mask, truth), abs=1e-12)
        assert row["hd95_unit"] == "px" and row["spacing"] == ""
    assert summary["volume"]["hd95_unit"] == "px" and "HD95 px" in printed
    assert any(float(r["dice_3d"]) > 0 for r in rows)
    _check_slices(rows, summary, model, world["breast"])


def test_the_test_split_gives_back_what_the_site_reported(tmp_path, capsys):
    """A real site session (one round, no fine-tuning) on 32 x 32 scans, the training size: evaluate --split test on
    its encrypted model file finds the job's test cases, its per-slice Dice and its per-volume Dice."""
    data_root = tmp_path / "data"
    generate_site(data_root / "brain", "brain", n_cases=5, seed=2, size=SIZE, depth=4)
    workspace = tmp_path / "ws"
    create_key(site_key_path(workspace))
    cfg = RunConfig.from_options(rounds=1, local_epochs=2, finetune_epochs=0, image_size=SIZE, width=8, batch_size=4,
                                 seed=1, method="fedoap", data_root=str(data_root))
    session = SiteSession(cfg, "brain", workspace, "job-1")
    reply = session.handle(TRAIN_TASK, session.trainer.shared_params(), {}, 0)
    metrics = session.handle(PERSONALIZE_TASK, reply.params, {}, 1).metrics
    test_cases = list(dict.fromkeys(load_site(data_root / "brain", image_size=SIZE, seed=1).test.case_ids))
    assert metrics["n_test_volumes"] == len(test_cases) and 0.0 <= metrics["test_volume_dice"] <= 1.0

    paths = site_output_paths(workspace / "job-1" / SITE_RESULTS_DIR, encrypted=True)
    key_file = site_key_path(workspace)
    detail = load_detail(paths.detail, key=load_key(key_file))
    assert list(detail["test_per_volume_dice"]) == test_cases
    assert np.mean(list(detail["test_per_volume_dice"].values())) == pytest.approx(metrics["test_volume_dice"])
    card = read_card(paths.model, key=load_key(key_file))
    assert card.provenance["site"] == "brain" and card.provenance["seed"] == 1 and card.preprocessing.volumetric

    rows, summary, printed = _evaluate(capsys, "--model", paths.model, "--key", key_file, "--data",
                                       data_root / "brain", "--out", tmp_path / "out", "--split", "test")
    assert [r["case"] for r in rows] == test_cases
    assert summary["slices"]["dice"] == pytest.approx(metrics["test_dice"], abs=1e-9)
    assert summary["slices"]["n_images"] == metrics["n_test"]
    # scans at the training size: the 3D masks are the training-size masks, so the 3D Dice is the job's volume Dice
    assert summary["volume"]["dice"] == pytest.approx(metrics["test_volume_dice"], abs=1e-9)
    for row in rows:
        assert float(row["dice_3d"]) == pytest.approx(detail["test_per_volume_dice"][row["case"]], abs=1e-9)
    assert "the job reported test Dice" in printed and "--key" in summary["command"]


def test_user_errors_are_one_line_before_any_work(world, tmp_path, capsys):
    out = tmp_path / "out"
    brain, breast = world["models"]["brain"], world["models"]["breast"]
    cases = [
        (["--model", brain, "--data", tmp_path / "nowhere"], "nowhere: site folder does not exist"),
        (["--model", breast, "--data", world["brain"]], r"brain/dataset.json: modality 'MRI' \(MRI\), but the model "
                                                        r"was trained on US"),
        (["--model", tmp_path / "missing.safetensors", "--data", world["brain"]], "missing.safetensors: no such model"),
        (["--model", brain, "--data", world["brain"], "--batch-size", "0"], "--batch-size must be a positive"),
        (["--model", brain, "--data", world["brain"], "--device", "tpu"], "--device 'tpu'"),
        (["--model", brain, "--data", world["brain"], "--key", tmp_path / "no.key"], "no.key cannot be read"),
    ]
    for args, message in cases:
        assert main(["evaluate", *map(str, args), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedoap: error: ") and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
        assert not out.exists()
    encrypted = tmp_path / "personalized_model.safetensors.enc"
    key = bytes(range(32))
    save_model(encrypted, load_model(brain).network.state_dict(), read_card(brain), key=key)
    assert main(["evaluate", "--model", str(encrypted), "--data", str(world["brain"]), "--out", str(out)]) == 2
    assert "give it with --key FILE" in capsys.readouterr().err
    no_seed = tmp_path / "no_seed.safetensors"
    card = read_card(brain)
    save_model(no_seed, load_model(brain).network.state_dict(),
               ModelCard(network=card.network, preprocessing=card.preprocessing, method=card.method,
                         shared_keys=card.shared_keys, provenance={}))
    assert main(["evaluate", "--model", str(no_seed), "--data", str(world["brain"]), "--out", str(out),
                 "--split", "test"]) == 2
    assert "provenance.seed" in capsys.readouterr().err and not out.exists()
