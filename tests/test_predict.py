"""fedoap predict: masks of the scan's geometry, equal to segment(); bad input stops with the file named and earlier
cases kept; modality and channel mismatches refused; the model file's card and key are enforced."""

import dataclasses
import gzip
import hashlib
import shutil
import stat

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import inference_models as im
from fedoap.cli import main
from fedoap.inference.model_file import load_model, model_file_metadata
from fedoap.inference.predict import PNG_FOREGROUND, list_inputs, predict_paths
from fedoap.inference.segment import segment
from fedoap.privacy.at_rest import create_key, write_private
from fedoap.site.outputs import model_bytes


@pytest.fixture(scope="module")
def brain_model(tmp_path_factory):
    return im.model_file(tmp_path_factory.mktemp("brain_model") / "personalized_model.safetensors")


@pytest.fixture(scope="module")
def breast_model(tmp_path_factory):
    return im.model_file(tmp_path_factory.mktemp("breast_model") / "personalized_model.safetensors", "breast")


def _images(organ):
    return sorted((im.site(organ) / "imagesTr").iterdir())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedoap: error: ") and "\n" not in err, err
    return err


def _dice(mask, label):
    mask, label = mask > 0, label > 0
    total = mask.sum() + label.sum()
    return 1.0 if total == 0 else 2.0 * (mask & label).sum() / total


def test_volume_masks_keep_geometry_and_equal_segment(brain_model, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in _images("brain")[:2]:
        shutil.copy(image, inputs)
    digest = _sha(brain_model)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(brain_model), "--input", str(inputs), "--out", str(out), "--overlay",
                 "--batch-size", "5", "--modality", "FLAIR"]) == 0
    assert "fedoap predict: 2 case(s), 16 slice(s)" in capsys.readouterr().out
    model = load_model(brain_model)
    foreground = []
    for image in sorted(inputs.iterdir()):
        case = image.name[: -len(".nii.gz")]
        source, written = nib.load(image), nib.load(out / f"{case}_seg.nii.gz")
        mask = np.asarray(written.dataobj)
        assert mask.dtype == np.uint8 and mask.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        assert written.header.get_zooms() == source.header.get_zooms()
        assert written.header.get_xyzt_units() == source.header.get_xyzt_units()
        np.testing.assert_array_equal(mask, segment(model, np.asarray(source.dataobj)))
        assert set(np.unique(mask)) <= {0, 1}
        foreground.append(mask.mean())
        overlay = Image.open(out / f"{case}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == source.shape[:2]
        assert stat.S_IMODE((out / f"{case}_seg.nii.gz").stat().st_mode) == 0o600
    assert 0 < max(foreground) and max(foreground) < 0.5  # not vacuous: tumour found, not everywhere
    assert _sha(brain_model) == digest  # the model file is only read
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_png_masks_have_the_image_size(breast_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sources = _images("breast")[:4]
    for i, image in enumerate(sources):
        picture = Image.open(image)
        (picture.convert("RGB") if i % 2 else picture).save(inputs / image.name)  # colour ones become gray
    model = load_model(breast_model)
    written = predict_paths(model, list_inputs(inputs), tmp_path / "out", progress=False)
    assert [p.name for p in written] == [f"{s.name[:-4]}_seg.png" for s in sources]
    total = 0
    for source, mask_path in zip(sources, written):
        gray = np.asarray(Image.open(source).convert("L"))
        mask = Image.open(mask_path)
        assert mask.mode == "L" and mask.size == Image.open(source).size
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) <= {0, PNG_FOREGROUND}
        np.testing.assert_array_equal(pixels, segment(model, gray) * PNG_FOREGROUND)
        total += int((pixels > 0).sum())
    assert 0 < total < 4 * gray.size


def test_bad_file_in_the_middle_is_named_and_earlier_cases_stay(brain_model, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    first, _, third = _images("brain")[:3]
    shutil.copy(first, inputs / "a.nii.gz")
    (inputs / "b.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all"))
    shutil.copy(third, inputs / "c.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(brain_model), "--input", str(inputs), "--out", str(out)]) == 2
    err = _error(capsys)
    assert str(inputs / "b.nii.gz") in err and "1 case(s) before it" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz"]
    assert nib.load(out / "a_seg.nii.gz").shape == nib.load(first).shape


def test_non_finite_volume_is_refused(brain_model, tmp_path):
    source = nib.load(_images("brain")[0])
    data = np.asarray(source.dataobj).astype(np.float32)
    data[1, 2, 3] = np.nan
    bad = tmp_path / "nan.nii.gz"
    nib.Nifti1Image(data, source.affine).to_filename(bad)
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: 1 NaN"):
        predict_paths(load_model(brain_model), [bad], tmp_path / "out", progress=False)


def test_4d_volume_needs_a_channel(brain_model, tmp_path, capsys):
    source = nib.load(_images("brain")[0])
    volume = np.asarray(source.dataobj)
    stacked = np.stack([volume[::-1], volume, volume * 2], axis=-1)
    four_d = tmp_path / "multi.nii.gz"
    nib.Nifti1Image(stacked, source.affine).to_filename(four_d)
    command = ["predict", "--model", str(brain_model), "--input", str(four_d), "--out", str(tmp_path / "out")]
    assert main(command) == 2
    err = _error(capsys)
    assert str(four_d) in err and "--channel" in err and "3 channels" in err
    assert main([*command, "--channel", "3"]) == 2
    assert str(four_d) in _error(capsys)
    assert main([*command, "--channel", "1"]) == 0
    mask = np.asarray(nib.load(tmp_path / "out" / "multi_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, segment(load_model(brain_model), volume))


def test_modality_mismatches_are_refused_before_reading(brain_model, breast_model, tmp_path, capsys):
    out = tmp_path / "out"
    volume, picture = _images("brain")[0], _images("breast")[0]
    assert main(["predict", "--model", str(brain_model), "--input", str(volume), "--out", str(out),
                 "--modality", "CT"]) == 2
    err = _error(capsys)
    assert "--modality CT" in err and "MRI" in err
    assert main(["predict", "--model", str(brain_model), "--input", str(picture), "--out", str(out)]) == 2
    err = _error(capsys)
    assert str(picture) in err and "modality mismatch" in err and "3D NIfTI volumes" in err
    assert main(["predict", "--model", str(breast_model), "--input", str(volume), "--out", str(out)]) == 2
    err = _error(capsys)
    assert str(volume) in err and "a NIfTI volume" in err and "2D images" in err
    assert main(["predict", "--model", str(brain_model), "--input", str(im.site("breast")), "--out", str(out)]) == 2
    err = _error(capsys)
    assert "dataset.json" in err and "'US'" in err and "MRI" in err
    assert not out.exists()


def test_model_file_must_fit_its_card_and_have_one(tmp_path, capsys):
    card = im.card_of("brain")
    wider = dataclasses.replace(card, network={**card.network, "args": {**card.network["args"],
                                                                         "channels": [16, 32, 64, 128]}})
    misfit = tmp_path / "misfit.safetensors"
    write_private(misfit, model_bytes(im.weights_of("brain"), model_file_metadata(wider)))
    with pytest.raises(ValueError, match="do not fit"):
        load_model(misfit)
    image = _images("brain")[0]
    assert main(["predict", "--model", str(misfit), "--input", str(image), "--out", str(tmp_path / "out")]) == 2
    assert str(misfit) in _error(capsys)
    bare = tmp_path / "bare.safetensors"
    write_private(bare, model_bytes(im.weights_of("brain"), None))
    assert main(["predict", "--model", str(bare), "--input", str(image), "--out", str(tmp_path / "out")]) == 2
    assert "has no model card" in _error(capsys)


def test_encrypted_model_needs_the_key(tmp_path, capsys):
    key_file = create_key(tmp_path / "site" / "local" / "fedoap_at_rest.key")
    model = im.model_file(tmp_path / "personalized_model.safetensors.enc", key=key_file.read_bytes())
    image = _images("brain")[0]
    command = ["predict", "--model", str(model), "--input", str(image), "--out", str(tmp_path / "out")]
    assert main(command) == 2
    err = _error(capsys)
    assert str(model) in err and "--key" in err
    assert main([*command, "--key", str(key_file)]) == 0
    assert (tmp_path / "out" / f"{image.name[:-7]}_seg.nii.gz").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_refused_without_a_gpu(brain_model, tmp_path, capsys):
    assert main(["predict", "--model", str(brain_model), "--input", str(_images("brain")[0]),
                 "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "no CUDA device" in _error(capsys)


def test_predicted_masks_reproduce_the_models_dice(brain_model, tmp_path):
    """An MSD folder as --input: its listed cases; the Dice of the written masks is segment()'s, and not 0."""
    site = im.site("brain")
    model = load_model(brain_model)
    inputs = list_inputs(site, model.card)
    assert [p.name for p in inputs] == [p.name for p in _images("brain")]
    written = predict_paths(model, inputs, tmp_path / "out", batch_size=3, progress=False)
    from_files, from_segment = [], []
    for image, mask in zip(inputs, written):
        label = np.asarray(nib.load(site / "labelsTr" / image.name).dataobj)
        from_files.append(_dice(np.asarray(nib.load(mask).dataobj), label))
        from_segment.append(_dice(segment(model, np.asarray(nib.load(image).dataobj)), label))
    assert from_files == from_segment
    assert np.mean(from_files) > 0.1
