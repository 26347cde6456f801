"""fedoap export-bundle: MONAI's own bundle runner, on the exported configs, writes the masks fedoap predict writes;
the bundle has MONAI's metadata, names fedoap, and holds no pickle."""

import dataclasses
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import inference_models as im
from fedoap.cli import main
from fedoap.inference.bundle import BUNDLE_FILES, export_bundle
from fedoap.inference.model_file import load_model
from fedoap.privacy.at_rest import write_private
from fedoap.site.outputs import model_bytes

#: most voxels allowed to differ from fedoap predict's masks (measured: none; see fedoap.inference.bundle)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def brain_model(tmp_path_factory):
    return im.model_file(tmp_path_factory.mktemp("brain_model") / "personalized_model.safetensors")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedoap: error: ") and "\n" not in err, err
    return err


def test_monai_runner_writes_predicts_masks(brain_model, tmp_path, capsys):
    images = sorted((im.site("brain") / "imagesTr").iterdir())
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(images[0], data / "scan_a.nii.gz")
    source = nib.load(images[1])  # a 4D (channel-last) image: the bundle reads the card's channel, 0
    volume = np.asarray(source.dataobj)
    nib.Nifti1Image(np.stack([volume, volume[::-1] * 3], axis=-1), source.affine,
                    source.header).to_filename(data / "scan_b.nii.gz")

    bundle = tmp_path / "bundle"
    assert main(["export-bundle", "--model", str(brain_model), "--out", str(bundle)]) == 0
    assert "python -m monai.bundle run" in capsys.readouterr().out
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == sorted(BUNDLE_FILES)  # models/model.safetensors only: no model.pt, no pickle
    assert not (bundle / "models" / "model.safetensors").read_bytes().startswith((b"PK", b"\x80"))

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    for field in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description"):
        assert metadata[field]
    assert "fedoap" in metadata["required_packages_version"]
    assert set(metadata["network_data_format"]) == {"inputs", "outputs"}
    assert metadata["provenance"] == dict(im.card_of("brain").provenance)
    assert "fedoap" in (bundle / "docs" / "README.md").read_text()

    ran = subprocess.run([sys.executable, "-m", "monai.bundle", "run",
                          "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                          "--dataset_dir", str(data), "--output_dir", str(tmp_path / "monai")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert main(["predict", "--model", str(brain_model), "--input", str(data), "--out", str(tmp_path / "fedoap"),
                 "--channel", "0"]) == 0

    differing = voxels = 0
    for case in ("scan_a", "scan_b"):
        ours = nib.load(tmp_path / "fedoap" / f"{case}_seg.nii.gz")
        theirs = nib.load(tmp_path / "monai" / f"{case}_seg.nii.gz")
        mask, monai_mask = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        assert monai_mask.dtype == np.uint8 and monai_mask.shape == mask.shape == volume.shape
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-6)
        assert 0 < mask.sum() < mask.size / 2  # not vacuous
        differing += int((mask != monai_mask).sum())
        voxels += mask.size
    assert differing <= TOLERANCE * voxels, f"{differing} of {voxels} voxels differ"


def test_export_refuses_models_it_cannot_reproduce(brain_model, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    write_private(bare, model_bytes(im.weights_of("brain"), None))
    assert main(["export-bundle", "--model", str(bare), "--out", str(tmp_path / "b1")]) == 2
    err = _error(capsys)
    assert str(bare) in err and "has no model card" in err
    assert not (tmp_path / "b1").exists()

    breast = im.model_file(tmp_path / "breast.safetensors", "breast")
    assert main(["export-bundle", "--model", str(breast), "--out", str(tmp_path / "b2")]) == 2
    assert "a 2D model" in _error(capsys)
    assert not (tmp_path / "b2").exists()

    model = load_model(brain_model)
    across = dataclasses.replace(model.card, preprocessing=dataclasses.replace(model.card.preprocessing, slice_axis=0))
    with pytest.raises(ValueError, match="along axis 0"):
        export_bundle(dataclasses.replace(model, card=across), tmp_path / "b3")
    assert not (tmp_path / "b3").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert main(["export-bundle", "--model", str(brain_model), "--out", str(taken)]) == 2
    assert "not empty" in _error(capsys)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
