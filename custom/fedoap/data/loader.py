"""
Load a site folder in the Medical Segmentation Decathlon (MSD) layout into memory as 2D slices.

The same code path serves the synthetic federation (:mod:`fedoap.data.synthetic`) and real MSD
tasks: ``dataset.json`` lists ``{"image": "./imagesTr/x", "label": "./labelsTr/x"}`` pairs, images
are 2D (PNG/JPG) or 3D/4D NIfTI, and 3D volumes are cut into slices along their last axis.
Every problem with the data is reported as a :class:`DataValidationError` naming the offending
file relative to the site folder; the loader never modifies or deletes anything on disk.

Whoever can write ``dataset.json`` (or hand a job a crafted folder) is not trusted with more than the
site folder: every listed path must stay inside it (no absolute paths, no ``..``, no symlink leading
out), an image's size is checked from its header before any pixel is read (:data:`MAX_VOXELS`,
:data:`MAX_AXIS_LENGTH`), and NaN/Inf voxels are refused rather than trained on.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from monai.data import NibabelReader, PILReader
from monai.transforms import Resize, Transform
from monai.utils import convert_to_numpy
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header
from nibabel.spatialimages import SpatialImage
from PIL import Image
from PIL.Image import Image as PILImage

from fedoap.data.normalization import CT_WINDOWS, MRI_PERCENTILES, modality_family, normalization_for, normalizer

__all__ = [
    "CT_WINDOWS",
    "MAX_AXIS_LENGTH",
    "MAX_DATASET_JSON_BYTES",
    "MAX_NIFTI_HEADER_BYTES",
    "MAX_VOXELS",
    "MRI_PERCENTILES",
    "DataValidationError",
    "SliceSet",
    "SiteData",
    "read_dataset_json",
    "load_site",
    "load_unseen",
]

MAX_VOXELS: int = 2**28
"""
Default upper bound on the array elements (voxels times channels) of one image or label file, checked
from the header before any pixel is read. A file at the bound takes at most 2 GiB as read (8-byte
values) plus 1 GiB as float32; the largest volumes of the Medical Segmentation Decathlon (liver CTs of
512 x 512 x ~1000 slices, about 2.6e8 voxels) still fit. ``load_site(..., max_voxels=...)`` overrides it.
2D images are also held to Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
about 8.9e7 pixels), which is lower.
"""

MAX_AXIS_LENGTH: int = 16384
"""
Default upper bound on each axis of an image or label: no CT, MR or ultrasound acquisition comes near
it, while one absurd axis is enough to hurt under the voxel bound: along the last axis it becomes that
many slices, each resized to ``image_size x image_size`` and kept in memory.
``load_site(..., max_axis_length=...)`` overrides it.
"""

MAX_NIFTI_HEADER_BYTES: int = 2**24
"""
Upper bound on a NIfTI file's ``vox_offset``, i.e. on the header extensions nibabel reads (and keeps
in memory) while loading the header; a gzip-compressed forged extension could otherwise claim
gigabytes from a file of a few megabytes. Real files start their data at byte 352 or 544, or a few
kilobytes later when an extension is present.
"""

MAX_DATASET_JSON_BYTES: int = 2**24
"""Upper bound on the size of ``dataset.json``; the largest MSD lists are well under a megabyte."""


_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataValidationError(ValueError):
    """
    A site's files are missing, unreadable, unsafe or inconsistent. The one-line message names the file
    relative to its site folder (or as ``dataset.json`` lists it) and the folder's name, so that logs a
    site shares do not reveal where its data lives; only errors about the folder itself name it in full.
    """


@dataclass(frozen=True)
class _SiteFile:
    """A file listed in ``dataset.json``: its name as listed (normalised) and its resolved path inside the site."""

    name: str
    path: Path


@dataclass
class SliceSet:
    """
    One split of a site as 2D slices held in memory.

    Attributes:
        images: float32 ``(N, 1, H, W)``, intensities normalised to [0, 1].
        labels: float32 ``(N, 1, H, W)``, values in {0., 1.}.
        case_ids: the case each slice came from (length N).
    """

    images: np.ndarray
    labels: np.ndarray
    case_ids: list[str]

    def __post_init__(self) -> None:
        if self.images.shape != self.labels.shape or len(self.case_ids) != self.images.shape[0]:
            raise ValueError(
                f"inconsistent SliceSet: images {self.images.shape}, labels {self.labels.shape}, "
                f"{len(self.case_ids)} case ids."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class SiteData:
    """A site split by case into train/val/test; ``modality`` is the family "CT", "MRI", "US" or the raw MSD string;
    ``volumetric`` says whether its images are 3D NIfTI volumes (cut into slices) rather than 2D images."""

    name: str
    organ: str
    modality: str
    train: SliceSet
    val: SliceSet
    test: SliceSet
    volumetric: bool = False


def read_dataset_json(site_dir: str | Path) -> dict:
    """
    Read and validate ``site_dir/dataset.json`` (MSD format).

    Checks that it is a JSON object with a ``"modality"`` object holding key ``"0"`` and a non-empty
    ``"training"`` list of ``{"image": str, "label": str}`` entries with distinct image files, and that
    every path listed under ``"training"``, ``"validation"`` and ``"test"`` stays inside the site folder:
    no absolute path, no ``..`` component, no symlink (of the file or of a folder above it) resolving
    outside. Symlinks are resolved but no image is opened here.

    Args:
        site_dir: site folder.

    Returns:
        the parsed ``dataset.json``.

    Raises:
        DataValidationError: the folder or ``dataset.json`` is missing, too large, not valid JSON,
            malformed, or lists a path that leaves the site folder.
    """
    return _read_site(Path(site_dir))[1]


def load_site(
    site_dir: str | Path,
    image_size: int = 64,
    split: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    name: str | None = None,
    *,
    max_voxels: int = MAX_VOXELS,
    max_axis_length: int = MAX_AXIS_LENGTH,
) -> SiteData:
    """
    Load a site and split it by case into train/val/test.

    The split is a seeded permutation of the cases, so the slices of one case never appear in two
    splits; every split gets at least one case.

    Args:
        site_dir: site folder in the MSD layout.
        image_size: slices are resized to ``image_size x image_size``.
        split: train/val/test fractions of the cases; non-negative, summing to 1.
        seed: seed of the case permutation.
        name: site name; defaults to the folder name.
        max_voxels: most array elements one image or label file may declare (see :data:`MAX_VOXELS`).
        max_axis_length: longest axis one image or label file may declare (see :data:`MAX_AXIS_LENGTH`).

    Returns:
        the site's three splits and its organ and modality family.

    Raises:
        ValueError: ``split`` is not three non-negative fractions summing to 1, or a limit is not a
            positive integer.
        DataValidationError: the site has fewer than 3 cases, or any check of :func:`read_dataset_json`
            or of the image/label files fails (unreadable, over a size limit, non-finite values, ...).
    """
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}.")
    limits = _SizeLimits.checked(max_voxels, max_axis_length)
    site, dataset, files = _read_site(Path(site_dir))
    n_cases = len(files)
    if n_cases < 3:
        raise DataValidationError(f"{site_dir}: {n_cases} case(s); at least 3 are needed for a train/val/test split.")
    cases = _load_cases(site, dataset, files, image_size, limits)

    order = np.random.default_rng(seed).permutation(n_cases)
    bounds = np.cumsum(_split_counts(n_cases, split))[:-1]
    train, val, test = (_stack([cases[i] for i in sorted(part)]) for part in np.split(order, bounds))
    return SiteData(
        name=name or Path(site_dir).name,
        organ=_organ(dataset),
        modality=_modality_family(dataset),
        train=train,
        val=val,
        test=test,
        volumetric=any(image.name.lower().endswith(_NIFTI_SUFFIXES) for image, _ in files),
    )


def load_unseen(
    site_dir: str | Path,
    image_size: int = 64,
    *,
    max_voxels: int = MAX_VOXELS,
    max_axis_length: int = MAX_AXIS_LENGTH,
) -> SliceSet:
    """
    Load every slice of a site without splitting, for evaluating on an organ no client trained on.

    Args:
        site_dir: site folder in the MSD layout.
        image_size: slices are resized to ``image_size x image_size``.
        max_voxels: as in :func:`load_site`.
        max_axis_length: as in :func:`load_site`.

    Raises:
        ValueError: a limit is not a positive integer.
        DataValidationError: as :func:`load_site`, except that any number of cases (>= 1) is accepted.
    """
    limits = _SizeLimits.checked(max_voxels, max_axis_length)
    site, dataset, files = _read_site(Path(site_dir))
    return _stack(_load_cases(site, dataset, files, image_size, limits))


# ---------------------------------------------------------------- confinement to the site folder


@dataclass(frozen=True)
class _Site:
    """A site folder, resolved once: confines listed paths to it and words errors relative to it."""

    root: Path
    shown: str
    given: Path

    @classmethod
    def at(cls, site_dir: Path) -> _Site:
        if not site_dir.is_dir():
            raise DataValidationError(f"{site_dir}: site folder does not exist.")
        try:
            root = site_dir.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise DataValidationError(f"{site_dir}: cannot resolve the site folder ({exc}).") from exc
        return cls(root=root, shown=site_dir.absolute().name or root.name, given=site_dir.absolute())

    def error(self, name: str, problem: str) -> DataValidationError:
        """One-line error ``"<file relative to the site>: <problem> (site '<folder name>')"``."""
        for prefix in sorted({f"{self.root}/", f"{self.given}/"}, key=len, reverse=True):  # as exceptions quote them
            problem = problem.replace(prefix, "")
        shown_name = name if name.isprintable() else repr(name)
        return DataValidationError(f"{shown_name}: {' '.join(problem.split())} (site {self.shown!r})")

    def file(self, listed: str, where: str) -> _SiteFile:
        """Resolve a path listed in ``dataset.json`` at ``where``; refuse any path that can leave the site folder."""
        entry = f"dataset.json {where}"
        if "\x00" in listed:
            raise self.error(listed, f"{entry} contains a NUL character.")
        pure = PurePosixPath(listed)
        if pure.is_absolute():
            raise self.error(listed, f"{entry} is an absolute path; paths must be relative to the site folder.")
        if ".." in pure.parts:
            raise self.error(listed, f"{entry} has a '..' component; paths must stay inside the site folder.")
        name = pure.as_posix()
        if name == ".":
            raise self.error(listed, f"{entry} names no file.")
        try:
            path = (self.root / name).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise self.error(name, f"cannot resolve the path ({type(exc).__name__}: {exc}).") from exc
        if not path.is_relative_to(self.root):
            raise self.error(name, f"{entry} resolves outside the site folder through a symlink; refused.")
        return _SiteFile(name, path)


def _read_site(site_dir: Path) -> tuple[_Site, dict, list[tuple[_SiteFile, _SiteFile]]]:
    """``dataset.json`` of a site, checked, with the (image, label) files of its training cases."""
    site = _Site.at(site_dir)
    dataset = _read_json(site)
    modality = dataset.get("modality")
    if not isinstance(modality, dict) or not isinstance(modality.get("0"), str):
        raise site.error("dataset.json", '"modality" must be an object with a string entry "0".')
    training = dataset.get("training")
    if not isinstance(training, list):
        raise site.error("dataset.json", '"training" must be a list of image/label pairs.')
    if not training:
        raise site.error("dataset.json", 'empty site, "training" lists no cases.')
    for i, entry in enumerate(training):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("image", "label"))):
            raise site.error("dataset.json", f'"training"[{i}] must be {{"image": str, "label": str}}, got {entry!r}.')
    files = [
        (site.file(entry["image"], f'"training"[{i}].image'), site.file(entry["label"], f'"training"[{i}].label'))
        for i, entry in enumerate(training)
    ]
    names_by_path: dict[Path, list[str]] = defaultdict(list)
    for image, _ in files:
        names_by_path[image.path].append(image.name)
    duplicates = sorted(names for names in names_by_path.values() if len(names) > 1)
    if duplicates:  # one case twice could land in train and test at once
        raise site.error("dataset.json", f'"training" lists these image files more than once: {duplicates}.')
    for key in ("validation", "test"):
        _check_listed(site, dataset, key)
    return site, dataset, files


def _read_json(site: _Site) -> dict:
    """``dataset.json`` parsed, refusing one that is a symlink out of the site or larger than the bound."""
    path = (site.root / "dataset.json").resolve()
    if not path.is_relative_to(site.root):
        raise site.error("dataset.json", "resolves outside the site folder through a symlink; refused.")
    if not path.is_file():
        raise site.error("dataset.json", "missing dataset.json (or not a regular file).")
    try:
        size = path.stat().st_size
        if size > MAX_DATASET_JSON_BYTES:
            raise site.error("dataset.json", f"{size} bytes, more than the {MAX_DATASET_JSON_BYTES} allowed.")
        dataset = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise site.error("dataset.json", f"cannot parse JSON ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(dataset, dict):
        raise site.error("dataset.json", f"expected a JSON object, got {type(dataset).__name__}.")
    return dataset


def _check_listed(site: _Site, dataset: dict, key: str) -> None:
    """An optional list (MSD ``"test"``: path strings; others: image/label objects) must also stay in the site."""
    listed = dataset.get(key, [])
    if not isinstance(listed, list):
        raise site.error("dataset.json", f'"{key}" must be a list, got {type(listed).__name__}.')
    for i, entry in enumerate(listed):
        if isinstance(entry, str):
            site.file(entry, f'"{key}"[{i}]')
        elif isinstance(entry, dict) and "image" in entry and all(
            isinstance(entry[field], str) for field in ("image", "label") if field in entry
        ):
            for field in ("image", "label"):
                if field in entry:
                    site.file(entry[field], f'"{key}"[{i}].{field}')
        else:
            raise site.error("dataset.json", f'"{key}"[{i}] must be a path or {{"image": str, ...}}, got {entry!r}.')


# ---------------------------------------------------------------- reading one file, size first


@dataclass(frozen=True)
class _SizeLimits:
    max_voxels: int
    max_axis_length: int

    @classmethod
    def checked(cls, max_voxels: int, max_axis_length: int) -> _SizeLimits:
        for option, value in (("max_voxels", max_voxels), ("max_axis_length", max_axis_length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{option} must be a positive integer, got {value!r}.")
        return cls(int(max_voxels), int(max_axis_length))

    def check(self, site: _Site, file: _SiteFile, shape: tuple[int, ...]) -> None:
        """Refuse a declared shape before its pixels are read."""
        if not shape or min(shape) < 1:
            raise site.error(file.name, f"header declares an invalid shape {shape}.")
        if max(shape) > self.max_axis_length:
            raise site.error(
                file.name,
                f"header declares shape {shape}, an axis longer than max_axis_length={self.max_axis_length}; "
                "refused before reading any pixel.",
            )
        count = math.prod(shape)
        if count > self.max_voxels:
            raise site.error(
                file.name,
                f"header declares shape {shape} ({count} values), more than max_voxels={self.max_voxels}; "
                "refused before reading any pixel.",
            )


def _nifti_header(site: _Site, file: _SiteFile) -> Nifti1Header:
    """The fixed-size NIfTI-1/2 header alone (at most 540 bytes read), before nibabel reads any extension."""
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    with opener(file.path, "rb") as stream:
        raw = stream.read(Nifti2Header.template_dtype.itemsize)
    for klass in (Nifti1Header, Nifti2Header):
        size = klass.template_dtype.itemsize
        if len(raw) >= size and size in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")):
            return klass(raw[:size], check=False)
    raise site.error(file.name, "not a NIfTI-1 or NIfTI-2 file (its header size field is neither 348 nor 540).")


def _read_nifti(site: _Site, file: _SiteFile, limits: _SizeLimits) -> np.ndarray:
    header = _nifti_header(site, file)
    limits.check(site, file, tuple(int(n) for n in header.get_data_shape()))
    dtype = header.get_data_dtype()
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise site.error(file.name, f"unsupported voxel type {dtype}; expected integers or floats of at most 8 bytes.")
    offset = float(header["vox_offset"])
    if offset > MAX_NIFTI_HEADER_BYTES:
        raise site.error(
            file.name,
            f"header places the voxel data at byte {offset:.0f}, beyond MAX_NIFTI_HEADER_BYTES="
            f"{MAX_NIFTI_HEADER_BYTES} (oversized header extensions); refused.",
        )
    reader = NibabelReader()
    image: SpatialImage = reader.read(file.path)
    limits.check(site, file, tuple(int(n) for n in image.shape))  # the shape nibabel will allocate
    data, _ = reader.get_data(image)
    return np.asarray(data)


def _read_2d(site: _Site, file: _SiteFile, limits: _SizeLimits) -> np.ndarray:
    """A PNG/JPEG: Pillow reads the size from the file's header lazily; pixels are decoded only after the check."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file.path, formats=("PNG", "JPEG"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise site.error(
            file.name, f"declared size refused by Pillow's decompression-bomb guard ({exc}); no pixel was decoded."
        ) from exc
    with image:
        width, height = image.size
        bands = len(image.getbands())
        limits.check(site, file, (height, width) + ((bands,) if bands > 1 else ()))
        data, _ = PILReader(reverse_indexing=False).get_data(_to_gray(image))
    return np.asarray(data)


def _check_finite(site: _Site, file: _SiteFile, array: np.ndarray) -> None:
    """NaN/Inf (or floats beyond float32, which become Inf once cast) would poison training: refuse them."""
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if array.dtype.itemsize > 4:
        finite &= np.abs(np.where(finite, array, 0)) <= np.finfo(np.float32).max
    if not finite.all():
        nan = int(np.isnan(array).sum())
        raise site.error(
            file.name,
            f"{nan} NaN and {int(finite.size - finite.sum()) - nan} infinite (or beyond float32) value(s); "
            "refused so that they cannot poison training.",
        )


def _read_array(site: _Site, file: _SiteFile, limits: _SizeLimits) -> np.ndarray:
    """Read one image or label, size checked first; reader failures become DataValidationError."""
    lowered = file.name.lower()
    if lowered.endswith(_NIFTI_SUFFIXES):
        read = _read_nifti
    elif lowered.endswith(_IMAGE_2D_SUFFIXES):
        read = _read_2d
    else:
        raise site.error(
            file.name, f"unsupported file type; expected one of {', '.join(_NIFTI_SUFFIXES + _IMAGE_2D_SUFFIXES)}."
        )
    if not file.path.is_file():
        raise site.error(file.name, "not a regular file." if file.path.exists() else "file does not exist.")
    try:
        array = read(site, file, limits)
    except DataValidationError:
        raise
    except Exception as exc:  # readers raise many types (ImageFileError, OSError, EOFError, zlib.error, ...)
        raise site.error(file.name, f"cannot read file ({type(exc).__name__}: {exc}).") from exc
    _check_finite(site, file, array)
    return array


# ---------------------------------------------------------------- helpers


def _organ(dataset: dict) -> str:
    """Organ from the synthetic ``"organ"`` key, else the MSD task ``"name"`` (e.g. "Lung"), lower-cased."""
    return str(dataset.get("organ") or dataset.get("name", "")).lower()


def _modality_family(dataset: dict) -> str:
    """Map the MSD modality of channel 0 (e.g. "FLAIR", "CT") to the family that picks the normalisation."""
    return modality_family(dataset["modality"]["0"])


def _normalizer(modality: str, organ: str) -> Transform:
    """Per-volume intensity normalisation to [0, 1] (:func:`fedoap.data.normalization.normalization_for`)."""
    return normalizer(normalization_for(modality, organ))


def _split_counts(n_cases: int, fractions: Sequence[float]) -> np.ndarray:
    """Cases per split: largest-remainder rounding, then each empty split takes one case from the largest."""
    exact = np.asarray(fractions, dtype=float) * n_cases
    counts = np.floor(exact).astype(int)
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[: n_cases - counts.sum()]] += 1
    for empty in np.flatnonzero(counts == 0):
        counts[np.argmax(counts)] -= 1
        counts[empty] = 1
    return counts


def _case_id(path: str) -> str:
    name = Path(path).name
    for suffix in _NIFTI_SUFFIXES + _IMAGE_2D_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _to_gray(image: PILImage) -> PILImage:
    """PIL converter: colour and palette images to 8-bit grayscale, grayscale modes untouched."""
    return image.convert("L") if image.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr") else image


def _as_volume(array: np.ndarray, site: _Site, file: _SiteFile, multichannel: bool) -> np.ndarray:
    """
    Bring an array to ``(H, W, slices)``: a 2D image is one slice; a 4D MSD image is channel-last
    (e.g. BraTS FLAIR/T1w/T1gd/T2w) and only channel 0, the modality named by ``modality["0"]``, is kept.
    """
    if multichannel and array.ndim == 4:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise site.error(file.name, f"expected a 2D or 3D array, got shape {array.shape}.")
    return array


def _load_case(
    site: _Site,
    files: tuple[_SiteFile, _SiteFile],
    limits: _SizeLimits,
    normalize: Transform,
    resize_image: Resize,
    resize_label: Resize,
) -> tuple[str, np.ndarray, np.ndarray]:
    """Read, check, normalise (per volume) and resize one case; returns its id and ``(slices, 1, S, S)`` arrays."""
    image_file, label_file = files
    image = _as_volume(_read_array(site, image_file, limits), site, image_file, multichannel=True)
    label = _as_volume(_read_array(site, label_file, limits), site, label_file, multichannel=False)
    if image.shape != label.shape:
        raise site.error(
            label_file.name,
            f"label shape {label.shape} does not match image {image_file.name} shape {image.shape}.",
        )
    values = np.unique(label)
    unexpected = values[(values != 0) & (values != 1)]
    if unexpected.size:
        raise site.error(label_file.name, f"label values must be 0 or 1, found {unexpected[:10].tolist()}.")

    # slices become the channel axis so that one Resize call handles the whole volume
    volume = normalize(np.moveaxis(image, -1, 0).astype(np.float32))
    mask = np.moveaxis(label, -1, 0).astype(np.float32)
    images = convert_to_numpy(resize_image(volume), dtype=np.float32)[:, None]
    labels = convert_to_numpy(resize_label(mask), dtype=np.float32)[:, None]
    return _case_id(image_file.name), images, labels


def _load_cases(
    site: _Site, dataset: dict, files: list[tuple[_SiteFile, _SiteFile]], image_size: int, limits: _SizeLimits
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    normalize = _normalizer(_modality_family(dataset), _organ(dataset))
    resize_image = Resize((image_size, image_size), mode="bilinear")
    resize_label = Resize((image_size, image_size), mode="nearest")
    return [_load_case(site, case, limits, normalize, resize_image, resize_label) for case in files]


def _stack(cases: list[tuple[str, np.ndarray, np.ndarray]]) -> SliceSet:
    return SliceSet(
        images=np.concatenate([images for _, images, _ in cases]),
        labels=np.concatenate([labels for _, _, labels in cases]),
        case_ids=[case_id for case_id, images, _ in cases for _ in range(len(images))],
    )
