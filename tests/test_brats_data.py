"""Tests of the multi-modal BraTS data layer (fedoap.data.brats), on tiny volumes written to tmp_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fedoap.data.brats import (
    AUTHORS_MASKS,
    MODALITIES,
    generate_brats_federation,
    generate_brats_site,
    load_brats_site,
    mask_from_string,
    regions_from_labels,
    split_brats_site,
)
from fedoap.data.loader import DataValidationError

SIZE = 24
DEPTH = 8


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _site(tmp_path: Path, name: str = "site", mask: str = "1111", n: int = 3, **kwargs) -> Path:
    return generate_brats_site(tmp_path / name, mask, n, seed=kwargs.pop("seed", 5), size=SIZE, depth=DEPTH, **kwargs)


# ---------------------------------------------------------------- regions


def test_regions_from_labels_brats_and_msd():
    brats = np.array([[0, 1], [2, 4]])
    wt, tc, et = regions_from_labels(brats, "brats")
    assert wt.tolist() == [[False, True], [True, True]]
    assert tc.tolist() == [[False, True], [False, True]]
    assert et.tolist() == [[False, False], [False, True]]
    msd = np.array([[0, 2], [1, 3]])  # same tissues: 2 non-enhancing core, 1 oedema, 3 enhancing
    assert np.array_equal(regions_from_labels(msd, "msd"), regions_from_labels(brats, "brats"))
    assert regions_from_labels(np.zeros((2, 3, 4)), "msd").shape == (3, 2, 3, 4)


@pytest.mark.parametrize(("labels", "convention"), [([0, 3], "brats"), ([0, 4], "msd"), ([0, 1.5], "brats")])
def test_regions_from_labels_refuses_unknown_values(labels, convention):
    with pytest.raises(ValueError, match=f"not part of the '{convention}' convention"):
        regions_from_labels(np.array(labels), convention)
    with pytest.raises(ValueError, match="unknown label convention"):
        regions_from_labels(np.zeros(2), "nnunet")


def test_masks():
    assert len(AUTHORS_MASKS) == 8
    assert AUTHORS_MASKS[3] == (True, True, False, False) and AUTHORS_MASKS[6] == (False, False, False, True)
    assert mask_from_string("0100") == (False, True, False, False)
    with pytest.raises(ValueError):
        mask_from_string("012")


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic_and_mask_independent(tmp_path):
    a = _site(tmp_path, "a")
    b = _site(tmp_path, "b")
    assert _snapshot(a) == _snapshot(b)
    assert _snapshot(a) != _snapshot(_site(tmp_path, "c", seed=6))
    # the same seed with another mask holds the same anatomy: its T1ce file is byte-identical
    partial = _site(tmp_path, "d", mask="0100")
    name = "BraTS_syn_000/BraTS_syn_000_t1ce.nii.gz"
    assert (partial / name).read_bytes() == (a / name).read_bytes()
    image = nib.load(a / name)
    assert image.shape == (SIZE, SIZE, DEPTH)
    assert np.allclose(image.header.get_zooms(), (10.0, 10.0, 155 / DEPTH))
    dataset = json.loads((partial / "dataset.json").read_text())
    assert dataset["modalities"] == ["t1ce"] and dataset["modality"] == {"0": "T1ce"}
    assert dataset["label_convention"] == "brats"


def test_modality_contrasts_inside_regions(tmp_path):
    site = load_brats_site(
        generate_brats_site(tmp_path / "s", "1111", 4, seed=11, size=32, depth=16), normalization="none"
    )
    t1_ratio = []
    for case in site.cases:
        flair, t1ce, t1, t2 = case.image
        wt, tc, et = case.regions
        brain = (case.image != 0).any(axis=0)
        oedema, necrosis, normal = wt & ~tc, tc & ~et, brain & ~wt
        assert necrosis.any() and et.any() and oedema.any()
        assert flair[oedema].mean() > 1.3 * flair[normal].mean()  # FLAIR: bright oedema
        assert flair[oedema].mean() > flair[tc].mean()  # ... the core less bright
        assert t1ce[et].mean() > 1.3 * t1ce[necrosis].mean()  # T1ce: bright rim, dark necrotic centre
        assert t1ce[et].mean() > t1ce[normal].mean()
        assert t2[wt].mean() > 1.2 * t2[normal].mean()  # T2: bright oedema and core
        assert t2[necrosis].mean() > t2[normal].mean()
        assert (~brain & wt).sum() == 0 and (case.image[:, ~brain] == 0).all()  # skull-stripped, zero background
        t1_ratio.append(t1[wt].mean() / t1[normal].mean())
    assert 0.75 < np.mean(t1_ratio) < 1.0  # T1: slightly hypointense, little contrast


# ---------------------------------------------------------------- loading


def test_missing_modalities_are_zero_filled(tmp_path):
    site_dir = _site(tmp_path, mask="0100")
    files = sorted(p.name for p in (site_dir / "BraTS_syn_000").iterdir())
    assert files == ["BraTS_syn_000_seg.nii.gz", "BraTS_syn_000_t1ce.nii.gz"]
    site = load_brats_site(site_dir)
    assert site.modalities == ("t1ce",) and site.present.tolist() == [False, True, False, False]
    for case in site.cases:
        assert case.image.shape == (4, SIZE, SIZE, DEPTH) and case.image.dtype == np.float32
        assert case.present.tolist() == [False, True, False, False]
        assert not case.image[[0, 2, 3]].any()
        brain = case.image[1] != 0
        assert abs(case.image[1][brain].mean()) < 1e-4 and abs(case.image[1][brain].std() - 1) < 1e-3  # z-score
        assert case.regions.shape == (3, SIZE, SIZE, DEPTH) and case.regions.dtype == bool
    # the single-file layout of that site holds one channel
    single = _site(tmp_path, "single", mask="0100", layout="single")
    assert nib.load(single / "imagesTr" / "BraTS_syn_000.nii.gz").shape == (SIZE, SIZE, DEPTH, 1)
    assert np.array_equal(load_brats_site(single).images(), site.images())


def test_layouts_and_label_conventions_load_the_same(tmp_path):
    reference = load_brats_site(_site(tmp_path, "four", mask="1011"))
    assert reference.layout == "four_files" and reference.label_convention == "brats"
    variants = (("single", "single", "brats"), ("msd", "single", "msd"), ("fmsd", "four_files", "msd"))
    for name, layout, labels in variants:
        other = load_brats_site(_site(tmp_path, name, mask="1011", layout=layout, labels=labels))
        assert other.label_convention == labels and other.case_ids == reference.case_ids
        assert np.array_equal(other.images(), reference.images())
        assert np.array_equal(other.regions(), reference.regions())
    msd_labels = np.asarray(nib.load(tmp_path / "msd" / "labelsTr" / "BraTS_syn_000.nii.gz").dataobj)
    assert set(np.unique(msd_labels).tolist()) == {0, 1, 2, 3}


def test_real_msd_task01_dataset_json_and_resize(tmp_path):
    """An MSD Task01 folder: FLAIR, T1w, t1gd, T2w channels, labels named like the MSD (convention inferred)."""
    site_dir = _site(tmp_path, layout="single", labels="msd")
    reference = load_brats_site(site_dir)
    for case in sorted((site_dir / "imagesTr").iterdir()):  # reorder channels to the MSD's order
        image = nib.load(case)
        data = np.asarray(image.dataobj)[..., [0, 2, 1, 3]]
        nib.Nifti1Image(data, image.affine).to_filename(case)
    dataset = json.loads((site_dir / "dataset.json").read_text())
    dataset["modality"] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    for key in ("label_convention", "modalities", "layout"):
        del dataset[key]
    (site_dir / "dataset.json").write_text(json.dumps(dataset))
    site = load_brats_site(site_dir)
    assert site.label_convention == "msd" and site.layout == "single"
    assert np.array_equal(site.images(), reference.images())

    cropped = load_brats_site(site_dir, crop=True)
    for full, case in zip(site.cases, cropped.cases):
        brain = (full.image != 0).any(axis=0)
        assert case.image.shape[1:] == tuple(int(np.ptp(i)) + 1 for i in np.nonzero(brain))
        assert case.regions.sum() == full.regions.sum() and case.image.shape[1] < SIZE

    resized = load_brats_site(site_dir, size=(16, 16, 12), normalization="percentiles")
    assert resized.images().shape == (3, 4, 16, 16, 12) and resized.regions().shape == (3, 3, 16, 16, 12)
    assert 0.0 <= resized.images().min() and resized.images().max() <= 1.0
    assert np.allclose(resized.cases[0].spacing, (10.0 * SIZE / 16, 10.0 * SIZE / 16, 155 / DEPTH * DEPTH / 12))


def test_brats_folders_without_dataset_json(tmp_path):
    site_dir = _site(tmp_path, mask="1100")
    reference = load_brats_site(site_dir)
    (site_dir / "dataset.json").unlink()
    (site_dir / "HGG").mkdir()
    shutil.move(site_dir / "BraTS_syn_002", site_dir / "HGG" / "BraTS_syn_002")  # BraTS 2018 HGG/LGG nesting
    site = load_brats_site(site_dir)
    assert site.layout == "brats_folders" and site.modalities == ("flair", "t1ce")
    assert site.case_ids == reference.case_ids
    assert np.array_equal(site.images(), reference.images())
    with pytest.raises(DataValidationError, match="missing dataset.json"):
        load_brats_site(site_dir, discover=False)
    (site_dir / "BraTS_syn_001" / "BraTS_syn_001_t1ce.nii.gz").unlink()
    with pytest.raises(DataValidationError, match=r"BraTS_syn_001_t1ce.nii.gz: case 'BraTS_syn_001': T1ce \(t1ce\)"):
        load_brats_site(site_dir)
    assert load_brats_site(site_dir, modalities=["flair"]).present.tolist() == [True, False, False, False]


def test_split_by_case(tmp_path):
    site = load_brats_site(_site(tmp_path, n=5))
    parts = split_brats_site(site, (0.6, 0.2, 0.2), seed=3)
    ids = parts.train.case_ids + parts.val.case_ids + parts.test.case_ids
    assert sorted(ids) == site.case_ids and (len(parts.train), len(parts.val), len(parts.test)) == (3, 1, 1)
    assert site.split((0.6, 0.2, 0.2), seed=3).test.case_ids == parts.test.case_ids
    with pytest.raises(DataValidationError, match="at least 3"):
        split_brats_site(site.subset([0, 1]))


# ---------------------------------------------------------------- errors


def test_missing_modality_file_names_case_and_modality(tmp_path):
    site_dir = _site(tmp_path, mask="1011")
    (site_dir / "BraTS_syn_001" / "BraTS_syn_001_t2.nii.gz").unlink()
    with pytest.raises(DataValidationError) as info:
        load_brats_site(site_dir)
    message = str(info.value)
    assert "BraTS_syn_001_t2.nii.gz" in message and "case 'BraTS_syn_001'" in message and "T2" in message
    assert str(tmp_path) not in message and "\n" not in message
    # an entry that does not list a modality the site declares
    dataset = json.loads((site_dir / "dataset.json").read_text())
    del dataset["training"][2]["image"]["flair"]
    (site_dir / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(DataValidationError, match=r"case 'BraTS_syn_002': no FLAIR \(flair\) image"):
        load_brats_site(site_dir)


def test_shape_mismatch_names_both_files(tmp_path):
    site_dir = _site(tmp_path)
    label = site_dir / "BraTS_syn_000" / "BraTS_syn_000_seg.nii.gz"
    nib.Nifti1Image(np.zeros((SIZE, SIZE, DEPTH - 1), np.uint8), np.eye(4)).to_filename(label)
    with pytest.raises(DataValidationError) as info:
        load_brats_site(site_dir)
    message = str(info.value)
    assert "BraTS_syn_000_seg.nii.gz" in message and "BraTS_syn_000_flair.nii.gz" in message
    assert f"({SIZE}, {SIZE}, {DEPTH - 1})" in message and f"({SIZE}, {SIZE}, {DEPTH})" in message
    # a single-layout file with fewer channels than the site declares
    single = _site(tmp_path, "single", mask="1100", layout="single")
    image = single / "imagesTr" / "BraTS_syn_001.nii.gz"
    nib.Nifti1Image(np.ones((SIZE, SIZE, DEPTH, 3), np.int16), np.eye(4)).to_filename(image)
    with pytest.raises(DataValidationError, match=r"imagesTr/BraTS_syn_001.nii.gz: header declares shape .* 2 modal"):
        load_brats_site(single)


def test_paths_escaping_the_site_are_refused(tmp_path):
    site_dir = _site(tmp_path)
    outside = tmp_path / "secret.nii.gz"
    shutil.copy(site_dir / "BraTS_syn_000" / "BraTS_syn_000_t1.nii.gz", outside)
    dataset = json.loads((site_dir / "dataset.json").read_text())
    for listed, match in (("../secret.nii.gz", "'..' component"), (str(outside), "absolute path")):
        dataset["training"][1]["image"]["t1"] = listed
        (site_dir / "dataset.json").write_text(json.dumps(dataset))
        with pytest.raises(DataValidationError, match=match):
            load_brats_site(site_dir)
    dataset["training"][1]["image"]["t1"] = "./BraTS_syn_001/BraTS_syn_001_t1.nii.gz"
    for listed in (["../secret.nii.gz"], [{"image": {"flair": "../secret.nii.gz"}, "label": "./x.nii.gz"}]):
        (site_dir / "dataset.json").write_text(json.dumps({**dataset, "test": listed}))
        with pytest.raises(DataValidationError, match=r'dataset.json "test"\[0\].* \'..\' component'):
            load_brats_site(site_dir)
    dataset["training"][1]["image"]["t1"] = "./link.nii.gz"
    (site_dir / "dataset.json").write_text(json.dumps(dataset))
    os.symlink(outside, site_dir / "link.nii.gz")
    with pytest.raises(DataValidationError, match="outside the site folder"):
        load_brats_site(site_dir)
    # discovered folders: a modality file that is a symlink out of the site
    (site_dir / "dataset.json").unlink()
    target = site_dir / "BraTS_syn_002" / "BraTS_syn_002_t1.nii.gz"
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(DataValidationError, match="BraTS_syn_002_t1.nii.gz: resolves outside the site folder"):
        load_brats_site(site_dir)


def test_sizes_checked_before_reading_and_non_finite_refused(tmp_path):
    site_dir = _site(tmp_path)
    with pytest.raises(DataValidationError, match="refused before reading any pixel"):
        load_brats_site(site_dir, max_voxels=SIZE * SIZE * DEPTH - 1)
    with pytest.raises(DataValidationError, match="max_axis_length"):
        load_brats_site(site_dir, max_axis_length=SIZE - 1)
    flair = site_dir / "BraTS_syn_001" / "BraTS_syn_001_flair.nii.gz"
    data = np.asarray(nib.load(flair).dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.Nifti1Image(data, nib.load(flair).affine).to_filename(flair)
    with pytest.raises(DataValidationError, match=r"BraTS_syn_001_flair.nii.gz: 1 NaN"):
        load_brats_site(site_dir)


def test_unknown_label_values_are_refused(tmp_path):
    site_dir = _site(tmp_path, labels="msd")
    dataset = json.loads((site_dir / "dataset.json").read_text())
    dataset["label_convention"] = "brats"  # msd labels 3 read as BraTS: 3 is not a BraTS label
    (site_dir / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(DataValidationError, match=r"_seg.nii.gz: case 'BraTS_syn_000': label values \[3\]"):
        load_brats_site(site_dir)
    assert load_brats_site(site_dir, labels="msd").label_convention == "msd"


# ---------------------------------------------------------------- federation


def test_federation_with_the_authors_masks(tmp_path):
    paths = generate_brats_federation(tmp_path, n_cases=2, server_cases=3, seed=1, size=16, depth=4)
    assert list(paths) == [f"site-{i}" for i in range(1, 9)] + ["server"]
    expected = list(AUTHORS_MASKS) + [(True,) * 4]
    ids = set()
    for (name, path), mask in zip(paths.items(), expected):
        on_disk = {p.name.rsplit("_", 1)[1].split(".")[0] for p in path.glob("*/*.nii.gz")}
        assert on_disk == {m for m, keep in zip(MODALITIES, mask) if keep} | {"seg"}, name
        site = load_brats_site(path)
        assert tuple(site.present.tolist()) == mask and len(site) == (3 if name == "server" else 2)
        ids |= set(site.case_ids)
    assert len(ids) == 2 * 8 + 3  # case names unique across the federation
    # sites share no anatomy: site-1 and site-8 (both full-modal) differ
    assert _snapshot(paths["site-1"]) != _snapshot(paths["site-8"])
