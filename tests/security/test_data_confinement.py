"""What a site reads stays inside its folder, fits in its memory and cannot poison training.

An adversary who writes ``dataset.json`` (or points a job at a crafted folder) tries to make the loader read a file
outside the site folder (``..``, absolute paths, symlinked files and folders), to exhaust memory with a file whose
header declares a huge image (NIfTI shape, NIfTI header extensions behind a gzip bomb, PNG/JPEG sizes), and to
poison training with NaN/Inf voxels. Every file is real (written by nibabel, Pillow or byte by byte where only a forged
header will do); each test mounts the attack and asserts that it fails with a one-line :class:`DataValidationError`
naming the file relative to the site folder.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedoap.data import DataValidationError, generate_site, load_site, load_unseen, read_dataset_json
from fedoap.data.loader import MAX_NIFTI_HEADER_BYTES

SIZE = 16
DEPTH = 4


@pytest.fixture(scope="module")
def liver(tmp_path_factory) -> Path:
    return generate_site(tmp_path_factory.mktemp("liver") / "liver", "liver", 3, seed=1, size=SIZE, depth=DEPTH)


@pytest.fixture(scope="module")
def breast(tmp_path_factory) -> Path:
    return generate_site(tmp_path_factory.mktemp("breast") / "breast", "breast", 3, seed=1, size=SIZE)


@pytest.fixture
def site(liver, tmp_path) -> Path:
    """A private copy of the 3D (NIfTI) site that a test may damage."""
    return Path(shutil.copytree(liver, tmp_path / "site"))


@pytest.fixture
def site_2d(breast, tmp_path) -> Path:
    """A private copy of the 2D (PNG) site that a test may damage."""
    return Path(shutil.copytree(breast, tmp_path / "site2d"))


@pytest.fixture
def outside(liver, tmp_path) -> Path:
    """Valid cases outside the site folder: what an escaping path would read if the loader followed it."""
    return Path(shutil.copytree(liver, tmp_path / "outside"))


def _dataset(site: Path) -> dict:
    return json.loads((site / "dataset.json").read_text())


def _relist(site: Path, case: int, key: str, path: str) -> None:
    dataset = _dataset(site)
    dataset["training"][case][key] = path
    (site / "dataset.json").write_text(json.dumps(dataset))


def _listed(site: Path, case: int, key: str = "image") -> str:
    return _dataset(site)["training"][case][key].removeprefix("./")


def _refused(site: Path, name: str, *fragments: str, loader=load_unseen, **limits) -> str:
    """The loader must refuse with one line that starts with ``name`` (relative to the site) and never shows
    where the site lives."""
    with pytest.raises(DataValidationError) as info:
        loader(site, image_size=8, **limits)
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    assert "\n" not in message
    assert str(site) not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- paths must stay inside the site folder


def test_unmodified_site_and_outside_copy_load(site, outside):
    """The control for the escape tests below: the files they point at are valid cases, loadable where they are."""
    assert len(load_unseen(site, image_size=8)) == 3 * DEPTH
    assert len(load_unseen(outside, image_size=8)) == 3 * DEPTH


@pytest.mark.parametrize(
    "escape",
    ["../outside/imagesTr/liver_000.nii.gz", "./imagesTr/../../outside/imagesTr/liver_000.nii.gz", ".."],
)
def test_dotdot_escape_is_refused(site, outside, escape):
    _relist(site, 1, "image", escape)
    _refused(site, escape, "'..'", '"training"[1].image')
    _refused(site, escape, "'..'", loader=lambda s, **_: read_dataset_json(s))


def test_absolute_path_is_refused(site, outside):
    target = str(outside / "labelsTr" / "liver_002.nii.gz")
    _relist(site, 2, "label", target)
    _refused(site, target, "absolute", '"training"[2].label', loader=lambda s, **_: load_site(s))


def test_symlinked_file_pointing_outside_is_refused(site, outside):
    name = _listed(site, 0)
    (site / name).unlink()
    (site / name).symlink_to(outside / name)
    _refused(site, name, "outside the site folder", "symlink")


def test_symlinked_folder_pointing_outside_is_refused(site, outside):
    shutil.rmtree(site / "labelsTr")
    (site / "labelsTr").symlink_to(outside / "labelsTr", target_is_directory=True)
    _refused(site, _listed(site, 0, "label"), "outside the site folder")


def test_dangling_and_looping_symlinks_are_refused(site, tmp_path):
    name = _listed(site, 1)
    (site / name).unlink()
    (site / name).symlink_to(tmp_path / "not_there.nii.gz")  # a dangling link out: refused before any open
    _refused(site, name, "outside the site folder")
    (site / name).unlink()
    (site / name).symlink_to(site / name)
    _refused(site, name, "cannot resolve")


def test_test_and_validation_entries_are_confined(site, outside):
    for key, entry in (
        ("test", "../outside/imagesTr/liver_000.nii.gz"),
        ("test", str(outside / "imagesTr" / "liver_000.nii.gz")),
        ("validation", {"image": "./imagesTr/liver_000.nii.gz", "label": "../outside/labelsTr/liver_000.nii.gz"}),
    ):
        dataset = _dataset(site)
        (site / "dataset.json").write_text(json.dumps({**dataset, key: [entry]}))
        shown = entry if isinstance(entry, str) else entry["label"]
        _refused(site, shown, f'"{key}"[0]', loader=lambda s, **_: read_dataset_json(s))
        (site / "dataset.json").write_text(json.dumps(dataset))


def test_dataset_json_symlinked_outside_is_refused(site, outside):
    (site / "dataset.json").unlink()
    (site / "dataset.json").symlink_to(outside / "dataset.json")
    _refused(site, "dataset.json", "outside the site folder", loader=lambda s, **_: read_dataset_json(s))


def test_oversized_dataset_json_is_refused(site):
    with open(site / "dataset.json", "r+b") as f:  # valid JSON behind 16 MiB of whitespace: never parsed
        text = f.read()
        f.seek(0)
        f.write(b" " * (16 * 2**20) + text)
    _refused(site, "dataset.json", "bytes, more than")


def test_symlinks_that_stay_inside_are_followed(site):
    """A symlink inside the site is fine: same data as the files it points to."""
    before = load_unseen(site, image_size=8)
    (site / "scans").symlink_to("imagesTr", target_is_directory=True)
    image = _listed(site, 0)
    (site / "imagesTr" / "alias.nii.gz").symlink_to(Path(image).name)
    _relist(site, 0, "image", "./imagesTr/alias.nii.gz")
    _relist(site, 1, "image", f"./scans/{Path(_listed(site, 1)).name}")
    after = load_unseen(site, image_size=8)
    np.testing.assert_array_equal(before.images, after.images)
    np.testing.assert_array_equal(before.labels, after.labels)


def test_one_file_listed_twice_through_a_symlink_is_refused(site):
    """The same case twice could sit in train and test at once (a leak that inflates the test score)."""
    (site / "imagesTr" / "alias.nii.gz").symlink_to(Path(_listed(site, 0)).name)
    _relist(site, 1, "image", "./imagesTr/alias.nii.gz")
    _refused(site, "dataset.json", "more than once", "imagesTr/alias.nii.gz", loader=lambda s, **_: load_site(s))


# ---------------------------------------------------------------- sizes are checked before pixels are read


def _nifti_header_only(path: Path, shape: tuple[int, ...], klass=nib.Nifti1Header) -> None:
    """A gzip NIfTI whose header declares ``shape`` (float32) and whose voxel data is simply absent."""
    header = klass()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = klass.template_dtype.itemsize + 4
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0\0\0\0")


def _refused_without_allocating(site: Path, name: str, *fragments: str, **limits) -> str:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = _refused(site, name, *fragments, **limits)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
    assert peak < 8 * 2**20, f"allocated {peak} bytes"
    return message


@pytest.mark.parametrize(
    ("shape", "klass", "fragment"),
    [
        ((100_000, 100_000, 1000), nib.Nifti2Header, "max_axis_length=16384"),  # 1e13 voxels, NIfTI-2 int64 dims
        ((10_000, 10_000, 1000), nib.Nifti1Header, "max_voxels=268435456"),  # every axis allowed, 1e11 voxels
        ((20_000, 16, 4), nib.Nifti1Header, "max_axis_length=16384"),  # few voxels, one absurd axis
    ],
)
def test_nifti_header_bomb_is_refused_before_reading(site, shape, klass, fragment):
    name = _listed(site, 1)
    _nifti_header_only(site / name, shape, klass)
    assert (site / name).stat().st_size < 1024
    message = _refused_without_allocating(site, name, fragment, "refused before reading any pixel")
    assert str(shape) in message


def test_nifti_label_bomb_is_refused(site):
    name = _listed(site, 2, "label")
    _nifti_header_only(site / name, (16_000, 16_000, 16))
    _refused_without_allocating(site, name, "max_voxels")


def test_nifti_extension_gzip_bomb_is_refused(site):
    """32 MiB of header extension that gzip squeezes into a few kB: nibabel alone would hold all of it in memory."""
    name = _listed(site, 0)
    extension = 32 * 2**20
    header = nib.Nifti1Header()
    header.set_data_shape((SIZE, SIZE, DEPTH))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352 + extension
    with gzip.open(site / name, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\x01\0\0\0" + struct.pack("<ii", extension, 0))
        zeros = bytes(2**20)
        for _ in range(extension // 2**20):
            f.write(zeros)
        f.write(bytes(SIZE * SIZE * DEPTH * 4))
    assert (site / name).stat().st_size < 2**20

    tracemalloc.start()  # the attack is real: nibabel's own header read allocates the whole extension
    try:
        nib.load(site / name)
        nibabel_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert nibabel_peak > extension

    _refused_without_allocating(site, name, f"MAX_NIFTI_HEADER_BYTES={MAX_NIFTI_HEADER_BYTES}")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG of a few dozen bytes whose IHDR declares ``width x height`` 8-bit gray pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("width", "height", "fragment"),
    [
        (100_000, 100_000, "decompression-bomb"),  # Pillow's DecompressionBombError (over twice its limit)
        (9_500, 9_500, "decompression-bomb"),  # Pillow's DecompressionBombWarning (just over its limit)
        (20_000, 2, "max_axis_length=16384"),  # few pixels, one absurd axis: Pillow lets it through, we do not
    ],
)
def test_png_bomb_is_refused_before_decoding(site_2d, width, height, fragment):
    name = _listed(site_2d, 1)
    _png_header_only(site_2d / name, width, height)
    assert (site_2d / name).stat().st_size < 200
    _refused_without_allocating(site_2d, name, fragment)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_real_2d_image_over_a_lowered_limit_is_refused(site_2d, suffix):
    """A real, decodable image of 300 x 200 RGB pixels against ``max_voxels=10_000``: refused from its header."""
    rng = np.random.default_rng(0)
    name = f"imagesTr/big.{suffix}"
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(site_2d / name)
    Image.fromarray(np.zeros((200, 300), np.uint8)).save(site_2d / "labelsTr" / "big.png")
    _relist(site_2d, 0, "image", f"./{name}")
    _relist(site_2d, 0, "label", "./labelsTr/big.png")
    _refused_without_allocating(site_2d, name, "(200, 300, 3)", "max_voxels=10000", max_voxels=10_000)
    _refused(site_2d, name, "max_axis_length=256", max_axis_length=256)
    assert len(load_unseen(site_2d, image_size=8, max_voxels=200 * 300 * 3)) == 3  # at the limit: loads


def test_limits_are_checked(site):
    for option in ("max_voxels", "max_axis_length"):
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=option):
                load_unseen(site, **{option: bad})


# ---------------------------------------------------------------- non-finite values are refused


@pytest.mark.parametrize(
    ("value", "dtype", "fragment"),
    [
        (np.nan, np.float32, "1 NaN and 0 infinite"),
        (np.inf, np.float32, "0 NaN and 1 infinite"),
        (-np.inf, np.float32, "0 NaN and 1 infinite"),
        (1e300, np.float64, "0 NaN and 1 infinite (or beyond float32)"),  # becomes inf once cast to float32
    ],
)
def test_non_finite_image_is_refused(site, value, dtype, fragment):
    name = _listed(site, 2)
    image = np.asarray(nib.load(site / name).dataobj).astype(dtype)
    image[3, 4, 1] = value
    nib.Nifti1Image(image, np.eye(4)).to_filename(site / name)
    _refused(site, name, fragment, "poison")


def test_non_finite_label_is_refused(site):
    name = _listed(site, 0, "label")
    label = np.asarray(nib.load(site / name).dataobj).astype(np.float32)
    label[0, 0, :] = np.nan
    nib.Nifti1Image(label, np.eye(4)).to_filename(site / name)
    _refused(site, name, f"{DEPTH} NaN", loader=lambda s, **_: load_site(s))


def test_nifti_scaling_beyond_float32_is_refused(site):
    """Small stored integers, but a header slope that scales them past float32 (Inf once the loader casts)."""
    name = _listed(site, 1)
    header = nib.Nifti1Header()
    header.set_data_shape((SIZE, SIZE, DEPTH))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    header["scl_slope"] = 3e38  # written directly: nibabel's own writer would choose a sane slope
    with gzip.open(site / name, "wb") as f:
        f.write(header.binaryblock + b"\0\0\0\0" + np.full((SIZE, SIZE, DEPTH), 10, np.int16).tobytes(order="F"))
    assert np.isfinite(np.asarray(nib.load(site / name).dataobj)).all()  # finite as nibabel returns it
    _refused(site, name, f"0 NaN and {SIZE * SIZE * DEPTH} infinite (or beyond float32)")
