"""
Multi-modal brain-tumour data (BraTS / MSD Task01) with sites that hold only some MR modalities.

FedMEPD (Liu et al., arXiv 2603.04887) trains on brain MRI with four modalities (FLAIR, T1ce, T1, T2) and
three nested tumour regions (whole tumour WT, tumour core TC, enhancing tumour ET); each client site holds
only some modalities and the server holds a small full-modal labelled set. This module is the data layer:

* :func:`regions_from_labels` turns a label map of either convention into the WT/TC/ET masks;
* :func:`generate_brats_site` / :func:`generate_brats_federation` write deterministic synthetic sites;
* :func:`load_brats_site` reads synthetic sites, MSD Task01 folders and BraTS 2018-2021 case folders into
  ``(4, H, W, D)`` float32 images (absent modalities zero-filled) with a ``present`` vector;
* :func:`split_brats_site` splits a loaded site by case into train/val/test.

Layouts on disk
---------------

``layout="four_files"`` (BraTS style, preferred for sites missing modalities: an absent modality's file
simply does not exist)::

    site/
        dataset.json                       optional for real BraTS folders, see below
        <case>/<case>_flair.nii.gz         one 3D file per modality the site holds
        <case>/<case>_t1ce.nii.gz
        <case>/<case>_seg.nii.gz

    "training": [{"case": "<case>", "image": {"flair": "./<case>/<case>_flair.nii.gz", ...},
                  "label": "./<case>/<case>_seg.nii.gz"}, ...]

``layout="single"`` (MSD style): one channel-last 4D NIfTI per case holding the site's modalities only, in
the order of ``dataset.json``'s ``"modality"`` map (``{"0": "FLAIR", "1": "T1ce"}``)::

    site/dataset.json, site/imagesTr/<case>.nii.gz (H, W, D, C), site/labelsTr/<case>.nii.gz (H, W, D)

A real MSD Task01 folder (``"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}``, labels
0-3) is this layout with four channels. Without ``dataset.json``, :func:`load_brats_site` discovers BraTS
2018-2021 case folders ``<case>/<case>_<flair|t1ce|t1|t2|seg>.nii[.gz]`` (also one level down, e.g.
``HGG/<case>/``).

``dataset.json`` of a generated site also records ``"modalities"`` (canonical names present),
``"label_convention"`` ("brats" or "msd") and ``"layout"``.

Label conventions (:data:`LABEL_CONVENTIONS`)
---------------------------------------------

* ``"brats"`` (BraTS 2018-2021): 0 background, 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing;
* ``"msd"`` (MSD Task01): 0 background, 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour;
* ``"brats2023"`` (BraTS 2023, and the authors' preprocessed arrays where 4 became 3): 1 necrotic core,
  2 oedema, 3 enhancing.

WT = any tumour label, TC = necrotic/non-enhancing core + enhancing, ET = enhancing.

Normalization
-------------

Per volume and per present modality, z-score over the brain mask (the voxels where any present modality is
non-zero: BraTS volumes are skull-stripped with an exact-zero background), background left at 0; this is
the preprocessing of the authors' code base (RFNet-style BraTS arrays). ``normalization="percentiles"``
instead maps the :data:`fedoap.data.loader.MRI_PERCENTILES` of the brain voxels to [0, 1] (the rest of the
project's MRI convention); ``"none"`` keeps raw intensities. Absent modalities stay exactly zero.

Security and errors are those of :mod:`fedoap.data.loader` (its helpers are reused): every path stays inside
the site folder, sizes are checked from the NIfTI headers of a whole case before any pixel is read,
NaN/Inf are refused, and every problem is a one-line :class:`~fedoap.data.loader.DataValidationError`
naming the file relative to the site folder (and the case and modality where one is missing).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monai.transforms import Resize
from monai.utils import convert_to_numpy
from scipy.ndimage import gaussian_filter

from fedoap.data.loader import (
    _NIFTI_SUFFIXES,
    MAX_AXIS_LENGTH,
    MAX_VOXELS,
    MRI_PERCENTILES,
    DataValidationError,
    _nifti_header,
    _read_array,
    _read_json,
    _Site,
    _SiteFile,
    _SizeLimits,
    _split_counts,
)
from fedoap.data.synthetic import (
    ORGANS,
    _ellipsoid,
    _grid,
    _irregular_ball,
    _pick_center,
    _smooth_field,
    _write_case,
)

__all__ = [
    "AUTHORS_MASKS",
    "FULL_MASK",
    "LABEL_CONVENTIONS",
    "MODALITIES",
    "REGIONS",
    "BratsCase",
    "BratsData",
    "BratsSite",
    "BratsSplit",
    "generate_brats_federation",
    "generate_brats_site",
    "load_brats_site",
    "load_brats_splits",
    "mask_from_string",
    "regions_from_labels",
    "split_brats_site",
    "VolumeSet",
]

MODALITIES: tuple[str, ...] = ("flair", "t1ce", "t1", "t2")
"""Canonical modality names, in the channel order of every loaded image (the authors' order)."""

REGIONS: tuple[str, ...] = ("wt", "tc", "et")
"""Nested tumour regions, in the channel order of every loaded ``regions`` array."""

FULL_MASK: tuple[bool, ...] = (True, True, True, True)


def mask_from_string(bits: str) -> tuple[bool, ...]:
    """``"1011"`` -> ``(True, False, True, True)`` over :data:`MODALITIES`."""
    if len(bits) != len(MODALITIES) or set(bits) - {"0", "1"}:
        raise ValueError(f"a modality mask is {len(MODALITIES)} characters 0/1 over {MODALITIES}, got {bits!r}.")
    return tuple(bit == "1" for bit in bits)


AUTHORS_MASKS: tuple[tuple[bool, ...], ...] = tuple(
    mask_from_string(bits) for bits in ("1111", "1110", "1011", "1100", "0011", "0100", "0001", "1111")
)
"""The authors' 8 client sites' modality masks over (FLAIR, T1ce, T1, T2)."""

LABEL_CONVENTIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brats": {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)},
    "msd": {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)},
    "brats2023": {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)},
}
"""Label values making up each region, per convention (0 is background in all of them)."""

_LABEL_NAMES: dict[str, dict[str, str]] = {
    "brats": {"0": "background", "1": "necrotic / non-enhancing tumour core", "2": "peritumoral edema",
              "4": "GD-enhancing tumour"},
    "msd": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    "brats2023": {"0": "background", "1": "necrotic tumour core", "2": "peritumoral edema",
                  "3": "enhancing tumour"},
}

_MODALITY_ALIASES: dict[str, str] = {
    "flair": "flair", "t2flair": "flair", "t2-flair": "flair", "t2f": "flair",
    "t1ce": "t1ce", "t1gd": "t1ce", "t1c": "t1ce", "t1-gd": "t1ce", "t1-ce": "t1ce", "t1post": "t1ce",
    "t1": "t1", "t1w": "t1", "t1n": "t1",
    "t2": "t2", "t2w": "t2",
}
"""Modality names found in ``dataset.json`` files (MSD "T1w", "t1gd", "T2w", BraTS 2023 "t1c", ...), lower-cased."""

_DISPLAY = {"flair": "FLAIR", "t1ce": "T1ce", "t1": "T1", "t2": "T2"}


def regions_from_labels(label: np.ndarray, convention: str = "brats") -> np.ndarray:
    """
    The WT/TC/ET masks of a label map.

    Args:
        label: integer (or integral float) label map of any shape.
        convention: a key of :data:`LABEL_CONVENTIONS` ("brats": 1 NCR, 2 ED, 4 ET; "msd": 1 ED, 2 NET, 3 ET).

    Returns:
        bool array ``(3, *label.shape)``: whole tumour, tumour core, enhancing tumour.

    Raises:
        ValueError: unknown convention, or label values outside the convention (e.g. 3 for "brats").
    """
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(LABEL_CONVENTIONS)}.")
    table = LABEL_CONVENTIONS[convention]
    label = np.asarray(label)
    allowed = (0, *table["wt"])
    values = np.unique(label)
    unexpected = values[~np.isin(values, allowed)]
    if unexpected.size:
        raise ValueError(
            f"label values {unexpected[:10].tolist()} are not part of the {convention!r} convention "
            f"(allowed: {list(allowed)})."
        )
    return np.stack([np.isin(label, table[region]) for region in REGIONS])


# ================================================================ synthetic generator

_FOV_MM = 240.0  # in-plane field of view (BraTS: 240 x 240 x 155 at 1 mm)
_SI_MM = 155.0  # extent along the slice axis

# tissue classes of the rendered phantom
_BG, _CSF, _GM, _WM, _ED, _NCR, _ET = range(7)

# relative intensity of each tissue per modality, as in real MRI: FLAIR suppresses CSF and shows oedema
# brightest with a less bright core; T1ce shows a bright enhancing rim around a dark necrotic centre; T1 shows
# the tumour slightly hypointense with little contrast; T2 shows CSF, oedema and core bright.
#                         BG   CSF   GM    WM    ED    NCR   ET
_CONTRAST = {
    "flair": np.array([0.0, 0.12, 0.55, 0.45, 1.00, 0.68, 0.80]),
    "t1ce": np.array([0.0, 0.18, 0.45, 0.62, 0.40, 0.22, 1.15]),
    "t1": np.array([0.0, 0.20, 0.47, 0.62, 0.40, 0.32, 0.44]),
    "t2": np.array([0.0, 1.00, 0.60, 0.42, 0.88, 0.95, 0.72]),
}
_GAIN = {"flair": 900.0, "t1ce": 1200.0, "t1": 700.0, "t2": 1500.0}  # arbitrary scanner units per modality

_LABEL_VALUE = {
    "brats": {_ED: 2, _NCR: 1, _ET: 4},
    "msd": {_ED: 1, _NCR: 2, _ET: 3},
}


def _render_anatomy(rng: np.random.Generator, coords) -> tuple[np.ndarray, np.ndarray]:
    """Tissue class map of a skull-stripped head with one glioma, and the (non-tumour) texture field."""
    pixel = float(coords[0].ravel()[1] - coords[0].ravel()[0])
    z_extent = float(np.abs(coords[2]).max())
    brain_radii = (0.62 * rng.uniform(0.95, 1.05), 0.78 * rng.uniform(0.95, 1.05), 0.85 * z_extent)
    rho = _ellipsoid(coords, (0.0, 0.0, 0.0), brain_radii)
    brain = _irregular_ball(coords, (0.0, 0.0, 0.0), brain_radii, rng, lobes=6, roughness=0.06)

    texture = _smooth_field(rng, coords, frequency=5.0)
    folds = _smooth_field(rng, coords, frequency=9.0)
    tissue = np.zeros(rho.shape, np.uint8)
    tissue[brain] = _GM
    white = (0.8 - rho) * 5.0 + 0.7 * texture > 0.0
    tissue[brain & white] = _WM
    tissue[brain & (rho > 0.8) & (folds > 1.0)] = _CSF  # sulci
    ventricles = np.zeros(rho.shape, bool)
    for side in (-1.0, 1.0):
        ventricles |= _ellipsoid(coords, (side * 0.09, 0.02, 0.1 * z_extent), (0.05, 0.24, 0.3 * z_extent)) < 1.0
    ventricles &= brain
    tissue[ventricles] = _CSF

    # glioma: enhancing rim around a necrotic centre, inside oedema that spreads along white matter
    deep = brain & (rho < 0.55) & ~ventricles
    center = _pick_center(rng, coords, deep)
    r = float(np.exp(rng.uniform(np.log(0.15), np.log(0.27))))
    slice_step = float(coords[2].ravel()[1] - coords[2].ravel()[0]) if coords[2].size > 1 else pixel
    radii = (r * rng.uniform(0.85, 1.2), r * rng.uniform(0.85, 1.2), max(r, 2.5 * slice_step))
    core = _irregular_ball(coords, center, radii, rng, lobes=5, roughness=0.3) & brain & ~ventricles
    necrosis_radii = tuple(a * rng.uniform(0.5, 0.65) for a in radii)
    necrosis = _irregular_ball(coords, center, necrosis_radii, rng, lobes=3, roughness=0.2) & core
    halo = tuple(a * rng.uniform(1.6, 2.2) for a in radii)
    near = _ellipsoid(coords, center, [1.3 * a for a in radii]) < 1.0
    edema = _irregular_ball(coords, center, halo, rng, lobes=6, roughness=0.35) & brain & ~ventricles
    edema &= (tissue == _WM) | near
    tissue[edema] = _ED
    tissue[core] = _ET
    tissue[necrosis] = _NCR
    return tissue, texture


def _render_modality(
    rng: np.random.Generator, coords, tissue: np.ndarray, texture: np.ndarray, modality: str
) -> np.ndarray:
    """One MR contrast of the phantom: tissue intensities, texture, partial volume, bias field, Rician noise,
    skull stripping (exact-zero background); int16 like BraTS files."""
    values = _CONTRAST[modality][tissue]
    lesion = tissue >= _ED
    tumour_texture = _smooth_field(rng, coords, frequency=7.0)
    image = values * (1.0 + 0.05 * np.where(lesion, tumour_texture, texture))
    image = gaussian_filter(image, sigma=(0.6, 0.6, 0.4))  # partial volume at tissue borders
    image *= np.exp(0.12 * _smooth_field(rng, coords, frequency=0.8, waves=4))  # coil bias field
    gain = _GAIN[modality] * rng.uniform(0.8, 1.25)
    sigma = 0.025
    image = np.hypot(image + rng.normal(0.0, sigma, image.shape), rng.normal(0.0, sigma, image.shape))
    image = np.where(tissue != _BG, image * gain, 0.0)
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)


def _render_case(rng: np.random.Generator, coords, labels: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All four modalities (always, so that a case's anatomy does not depend on the site's mask) and the label."""
    tissue, texture = _render_anatomy(rng, coords)
    images = {modality: _render_modality(rng, coords, tissue, texture, modality) for modality in MODALITIES}
    label = np.zeros(tissue.shape, np.uint8)
    for klass, value in _LABEL_VALUE[labels].items():
        label[tissue == klass] = value
    return images, label


def _check_mask(mask: Sequence[bool] | str) -> tuple[bool, ...]:
    if isinstance(mask, str):
        return mask_from_string(mask)
    mask = tuple(bool(m) for m in mask)
    if len(mask) != len(MODALITIES):
        raise ValueError(f"a modality mask has {len(MODALITIES)} entries over {MODALITIES}, got {mask}.")
    if not any(mask):
        raise ValueError("a modality mask must hold at least one modality.")
    return mask


def generate_brats_site(
    out_dir: str | Path,
    modalities_mask: Sequence[bool] | str = FULL_MASK,
    n_cases: int = 4,
    seed: int = 0,
    size: int = 32,
    depth: int = 16,
    layout: str = "four_files",
    labels: str = "brats",
    *,
    case_prefix: str = "BraTS_syn",
    overwrite: bool = False,
) -> Path:
    """
    Write one synthetic multi-modal brain-tumour site holding the modalities of ``modalities_mask``.

    Every case renders all four modalities from its own random stream spawned from ``seed`` and writes the
    present ones, so the same arguments give byte-identical files, and two sites differing only in their
    mask (or layout, or label convention) hold the same anatomy. Spacing is ``240/size`` mm in-plane and
    ``155/depth`` mm between slices (BraTS's 240 x 240 x 155 mm field of view), recorded in the headers.

    Args:
        out_dir: site folder; created if missing.
        modalities_mask: 4 bools (or a string such as ``"0100"``) over :data:`MODALITIES`.
        n_cases: number of cases.
        seed: random seed.
        size: in-plane size in voxels (>= 16).
        depth: number of slices (>= 4).
        layout: ``"four_files"`` (``<case>/<case>_<modality>.nii.gz``, absent modalities have no file) or
            ``"single"`` (``imagesTr/<case>.nii.gz`` channel-last with the present modalities only).
        labels: label convention of the written label maps, ``"brats"`` (0/1/2/4) or ``"msd"`` (0-3).
        case_prefix: case names are ``<case_prefix>_<i:03d>``.
        overwrite: allow writing into a non-empty folder (files of the same name are replaced).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: invalid mask, sizes, layout or label convention, or a non-empty ``out_dir`` without
            ``overwrite``.
    """
    mask = _check_mask(modalities_mask)
    if layout not in ("four_files", "single"):
        raise ValueError(f"layout must be 'four_files' or 'single', got {layout!r}.")
    if labels not in _LABEL_VALUE:
        raise ValueError(f"labels must be one of {sorted(_LABEL_VALUE)}, got {labels!r}.")
    if n_cases < 1 or size < 16 or depth < 4:
        raise ValueError(f"need n_cases >= 1, size >= 16 and depth >= 4, got {n_cases}, {size} and {depth}.")
    if not case_prefix or not case_prefix.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"case_prefix must be letters, digits, '_' or '-', got {case_prefix!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: folder is not empty; pass overwrite=True to replace the generated files in it.")
    out.mkdir(parents=True, exist_ok=True)

    pixel_mm = round(_FOV_MM / size, 4)
    slice_mm = round(_SI_MM / depth, 4)
    coords = _grid(size, depth, z_extent=depth * slice_mm / _FOV_MM)
    spacing = (pixel_mm, pixel_mm, slice_mm)
    present = [m for m, keep in zip(MODALITIES, mask) if keep]
    nifti = ORGANS["brain"]  # _write_case only needs a 3D spec: NIfTI with a deterministic gzip stream

    training = []
    for i, case_seed in enumerate(np.random.SeedSequence(seed).spawn(n_cases)):
        images, label = _render_case(np.random.default_rng(case_seed), coords, labels)
        case = f"{case_prefix}_{i:03d}"
        if layout == "four_files":
            (out / case).mkdir(exist_ok=True)
            files = {}
            for modality in present:
                name = f"{case}/{case}_{modality}.nii.gz"
                _write_case(nifti, images[modality], out / name, spacing)
                files[modality] = f"./{name}"
            label_name = f"{case}/{case}_seg.nii.gz"
            training.append({"case": case, "image": files, "label": f"./{label_name}"})
        else:
            (out / "imagesTr").mkdir(exist_ok=True)
            (out / "labelsTr").mkdir(exist_ok=True)
            _write_case(nifti, np.stack([images[m] for m in present], axis=-1), out / "imagesTr" / f"{case}.nii.gz",
                        spacing)
            label_name = f"labelsTr/{case}.nii.gz"
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./{label_name}"})
        _write_case(nifti, label, out / label_name, spacing)

    dataset = {
        "name": "synthetic_brats",
        "description": "Synthetic skull-stripped multi-modal brain MRI with one glioma per case; "
        f"modalities {'/'.join(_DISPLAY[m] for m in present)}.",
        "organ": "brain",
        "tensorImageSize": "4D" if layout == "single" else "3D",
        "layout": layout,
        "modality": {str(i): _DISPLAY[m] for i, m in enumerate(present)},
        "modalities": present,
        "label_convention": labels,
        "labels": _LABEL_NAMES[labels],
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return out


def generate_brats_federation(
    root: str | Path,
    masks: Sequence[Sequence[bool] | str] = AUTHORS_MASKS,
    n_cases: int | Sequence[int] = 4,
    server_cases: int = 4,
    seed: int = 0,
    size: int = 32,
    depth: int = 16,
    layout: str = "four_files",
    labels: str = "brats",
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """
    Write ``root/site-1 .. site-<len(masks)>`` with those modality masks and a full-modal ``root/server``.

    Each site's seed is derived from ``seed`` and the site's name (so adding a site changes no other), and
    case names carry the site (``BraTS_site1_000``, ``BraTS_server_000``), unique across the federation.

    Args:
        root: parent folder of the site folders.
        masks: one modality mask per client site; defaults to :data:`AUTHORS_MASKS`.
        n_cases: cases per client site, one number for all or one per site.
        server_cases: cases of the server's full-modal labelled set (0: no server folder).
        seed, size, depth, layout, labels, overwrite: as :func:`generate_brats_site`.

    Returns:
        folder name -> site folder (``"site-1"``, ..., ``"server"``).
    """
    counts = [int(n_cases)] * len(masks) if isinstance(n_cases, (int, np.integer)) else [int(n) for n in n_cases]
    if len(counts) != len(masks):
        raise ValueError(f"n_cases lists {len(counts)} counts for {len(masks)} sites.")
    plan = [(f"site-{i}", mask, count) for i, (mask, count) in enumerate(zip(masks, counts), start=1)]
    if server_cases:
        plan.append(("server", FULL_MASK, int(server_cases)))
    paths = {}
    for name, mask, count in plan:
        site_seed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])
        paths[name] = generate_brats_site(
            Path(root) / name, mask, count, seed=site_seed, size=size, depth=depth, layout=layout, labels=labels,
            case_prefix=f"BraTS_{name.replace('-', '')}", overwrite=overwrite,
        )
    return paths


# ================================================================ loading


@dataclass
class BratsCase:
    """
    One loaded case.

    Attributes:
        case_id: case name.
        image: float32 ``(4, H, W, D)`` over :data:`MODALITIES`; absent modalities are all zero.
        present: bool ``(4,)``, which channels hold a modality.
        regions: bool ``(3, H, W, D)`` over :data:`REGIONS` (WT, TC, ET).
        spacing: voxel size in mm of ``image`` (after any resize).
    """

    case_id: str
    image: np.ndarray
    present: np.ndarray
    regions: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class BratsSite:
    """
    A loaded site: its cases, the modalities it holds and how its files were laid out.

    Attributes:
        name: site name (folder name by default).
        modalities: the canonical names of the modalities the site holds, in :data:`MODALITIES` order.
        label_convention: the convention its label files were read with.
        layout: ``"four_files"``, ``"single"`` or ``"brats_folders"`` (discovered without ``dataset.json``).
        cases: the cases, in the order of ``dataset.json`` (or sorted by name when discovered).
    """

    name: str
    modalities: tuple[str, ...]
    label_convention: str
    layout: str
    cases: list[BratsCase] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def present(self) -> np.ndarray:
        """bool ``(4,)``: the modalities the site holds."""
        return np.array([m in self.modalities for m in MODALITIES])

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    def images(self) -> np.ndarray:
        """float32 ``(N, 4, H, W, D)``; needs a common shape (load with ``size=``)."""
        return _stack_cases(self.cases, "image")

    def regions(self) -> np.ndarray:
        """bool ``(N, 3, H, W, D)``; needs a common shape (load with ``size=``)."""
        return _stack_cases(self.cases, "regions")

    def subset(self, indices: Sequence[int]) -> BratsSite:
        return BratsSite(self.name, self.modalities, self.label_convention, self.layout,
                         [self.cases[i] for i in indices])

    def split(self, split: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0) -> BratsSplit:
        return split_brats_site(self, split, seed)


@dataclass
class BratsSplit:
    """A site split by case; each part is a :class:`BratsSite` holding a subset of the cases."""

    train: BratsSite
    val: BratsSite
    test: BratsSite


def _stack_cases(cases: list[BratsCase], attribute: str) -> np.ndarray:
    arrays = [getattr(case, attribute) for case in cases]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"cases have different shapes {sorted(shapes)}; load the site with size=... to stack them.")
    return np.stack(arrays)


def split_brats_site(
    site: BratsSite, split: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0
) -> BratsSplit:
    """
    Split a site by case into train/val/test, as :func:`fedoap.data.loader.load_site` does: a seeded
    permutation of the cases, largest-remainder counts, every split at least one case (so >= 3 cases);
    each part keeps the site's case order.

    Raises:
        ValueError: ``split`` is not three non-negative fractions summing to 1.
        DataValidationError: fewer than 3 cases.
    """
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}.")
    n_cases = len(site.cases)
    if n_cases < 3:
        raise DataValidationError(f"site {site.name!r}: {n_cases} case(s); at least 3 are needed for a split.")
    order = np.random.default_rng(seed).permutation(n_cases)
    bounds = np.cumsum(_split_counts(n_cases, split))[:-1]
    train, val, test = (site.subset(sorted(part.tolist())) for part in np.split(order, bounds))
    return BratsSplit(train, val, test)


@dataclass(frozen=True)
class _CaseFiles:
    """The files of one case: per-modality 3D files, or one 4D file holding ``channels`` in order."""

    case_id: str
    label: _SiteFile
    images: dict[str, _SiteFile]  # four_files / brats_folders
    single: _SiteFile | None = None  # single: the 4D file
    channels: tuple[str, ...] = ()  # single: modality of each channel


def _canonical_modality(site: _Site, raw: object, where: str) -> str:
    name = _MODALITY_ALIASES.get(str(raw).strip().lower().replace("_", "").replace(" ", ""))
    if name is None:
        raise site.error("dataset.json", f"{where}: unknown MR modality {raw!r}; expected one of "
                         f"{', '.join(_DISPLAY.values())} (or T1w, T1gd, T2w, ...).")
    return name


def _declared_modalities(site: _Site, dataset: dict) -> tuple[str, ...]:
    """The modality of each channel, from ``"modality"`` (``{"0": "FLAIR", ...}``), in channel order."""
    modality = dataset.get("modality")
    if not isinstance(modality, dict) or not modality:
        raise site.error("dataset.json", '"modality" must be a non-empty object {"0": "FLAIR", ...}.')
    if sorted(modality) != [str(i) for i in range(len(modality))]:
        raise site.error("dataset.json", f'"modality" keys must be "0".."{len(modality) - 1}", got {sorted(modality)}.')
    channels = tuple(
        _canonical_modality(site, modality[str(i)], f'"modality"["{i}"]') for i in range(len(modality))
    )
    duplicates = sorted({m for m in channels if channels.count(m) > 1})
    if duplicates:
        raise site.error("dataset.json", f'"modality" lists {duplicates} more than once.')
    return channels


def _label_convention(site: _Site, dataset: dict | None, requested: str | None) -> str:
    if requested is not None:
        if requested not in LABEL_CONVENTIONS:
            raise ValueError(f"labels must be one of {sorted(LABEL_CONVENTIONS)}, got {requested!r}.")
        return requested
    if dataset is None:
        return "brats"
    declared = dataset.get("label_convention")
    if declared is not None:
        if declared not in LABEL_CONVENTIONS:
            raise site.error("dataset.json", f'"label_convention" must be one of {sorted(LABEL_CONVENTIONS)}, '
                             f"got {declared!r}.")
        return declared
    names = dataset.get("labels")
    if isinstance(names, dict):  # MSD Task01 names label 1 "edema"; BraTS has a label 4
        if "4" in names:
            return "brats"
        if "edema" in str(names.get("1", "")).lower():
            return "msd"
    raise site.error("dataset.json", 'cannot tell the label convention: add "label_convention" '
                     f"({' or '.join(map(repr, LABEL_CONVENTIONS))}) or pass labels=... to load_brats_site.")


def _case_from_name(name: str) -> str:
    """Case id of a listed file: its file name without the NIfTI suffix and a trailing ``_seg``."""
    stem = name.rsplit("/", 1)[-1]
    for suffix in _NIFTI_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem.removesuffix("_seg")


def _files_from_dataset(site: _Site, dataset: dict) -> tuple[str, tuple[str, ...], list[_CaseFiles]]:
    """Layout, declared modalities and the confined files of every training case listed in ``dataset.json``."""
    channels = _declared_modalities(site, dataset)
    training = dataset.get("training")
    if not isinstance(training, list):
        raise site.error("dataset.json", '"training" must be a list of image/label entries.')
    if not training:
        raise site.error("dataset.json", 'empty site, "training" lists no cases.')
    single = all(isinstance(entry, dict) and isinstance(entry.get("image"), str) for entry in training)
    cases = []
    for i, entry in enumerate(training):
        where = f'"training"[{i}]'
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise site.error("dataset.json", f"{where} must hold a \"label\" path, got {entry!r}.")
        label = site.file(entry["label"], f"{where}.label")
        image = entry.get("image")
        if single:
            image_file = site.file(image, f"{where}.image")
            case_id = entry.get("case") if isinstance(entry.get("case"), str) else _case_from_name(image_file.name)
            cases.append(_CaseFiles(case_id, label, {}, image_file, channels))
            continue
        if not isinstance(image, dict) or not all(isinstance(v, str) for v in image.values()):
            raise site.error("dataset.json", f'{where}.image must be {{"<modality>": path, ...}} (or one path '
                             f"for every case), got {image!r}.")
        case_id = entry.get("case") if isinstance(entry.get("case"), str) else _case_from_name(label.name)
        files = {}
        for key, path in image.items():
            modality = _canonical_modality(site, key, f"{where}.image")
            if modality not in channels:
                raise site.error("dataset.json", f"case {case_id!r} lists a {_DISPLAY[modality]} file but the site's "
                                 f'"modality" does not declare {_DISPLAY[modality]}.')
            files[modality] = site.file(path, f"{where}.image.{key}")
        for modality in channels:
            if modality not in files:
                raise site.error("dataset.json", f"case {case_id!r}: no {_DISPLAY[modality]} ({modality}) image "
                                 f'listed in {where}.image, but the site declares {_DISPLAY[modality]}.')
        cases.append(_CaseFiles(case_id, label, files))
    for key in ("validation", "test"):
        _confine_listed(site, dataset, key)
    return ("single" if single else "four_files"), channels, cases


def _confine_listed(site: _Site, dataset: dict, key: str) -> None:
    """Paths under ``"validation"`` / ``"test"`` are not read, but must stay in the site folder all the same."""
    listed = dataset.get(key, [])
    if not isinstance(listed, list):
        raise site.error("dataset.json", f'"{key}" must be a list, got {type(listed).__name__}.')
    for i, entry in enumerate(listed):
        paths = [(f'"{key}"[{i}]', entry)]
        if isinstance(entry, dict):
            paths = [(f'"{key}"[{i}].{k}', v) for k, v in entry.items() if k in ("image", "label")]
            paths = [(f"{w}.{k}", p) for w, v in paths for k, p in (v.items() if isinstance(v, dict) else [("", v)])]
        for where, path in paths:
            if not isinstance(path, str):
                raise site.error("dataset.json", f"{where.rstrip('.')} must be a path, got {path!r}.")
            site.file(path, where.rstrip("."))


def _discovered_file(site: _Site, path: Path) -> _SiteFile:
    name = path.relative_to(site.root).as_posix()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:
        raise site.error(name, f"cannot resolve the path ({type(exc).__name__}: {exc}).") from exc
    if not resolved.is_relative_to(site.root):
        raise site.error(name, "resolves outside the site folder through a symlink; refused.")
    return _SiteFile(name, resolved)


def _modality_file(folder: Path, case: str, modality: str) -> Path | None:
    for suffix in _NIFTI_SUFFIXES:
        candidate = folder / f"{case}_{modality}{suffix}"
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return None


def _discover_folders(site: _Site, modalities: Sequence[str] | None) -> tuple[tuple[str, ...], list[_CaseFiles]]:
    """BraTS 2018-2021 case folders ``<case>/<case>_<modality>.nii[.gz]`` (one level down too: HGG/, LGG/)."""
    folders = []
    for child in sorted(site.root.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        if _modality_file(child, child.name, "seg"):
            folders.append(child)
        else:
            folders.extend(g for g in sorted(child.iterdir())
                           if g.is_dir() and not g.is_symlink() and _modality_file(g, g.name, "seg"))
    if not folders:
        raise site.error("dataset.json", "missing dataset.json, and no BraTS case folders "
                         "(<case>/<case>_seg.nii.gz) to discover.")
    if modalities is None:
        found = {m for folder in folders for m in MODALITIES if _modality_file(folder, folder.name, m)}
        declared = tuple(m for m in MODALITIES if m in found)
        if not declared:
            raise site.error(folders[0].relative_to(site.root).as_posix(), "no modality files "
                             f"(<case>_{{{','.join(MODALITIES)}}}.nii.gz) in any case folder.")
    else:
        declared = tuple(modalities)
    cases, seen = [], {}
    for folder in folders:
        case = folder.name
        if case in seen:
            raise site.error(folder.relative_to(site.root).as_posix(),
                             f"case {case!r} also found at {seen[case]}; case names must be unique.")
        seen[case] = folder.relative_to(site.root).as_posix()
        files = {}
        for modality in declared:
            path = _modality_file(folder, case, modality)
            if path is None:
                shown = (folder / f"{case}_{modality}.nii.gz").relative_to(site.root).as_posix()
                raise site.error(shown, f"case {case!r}: {_DISPLAY[modality]} ({modality}) image file does not "
                                 f"exist, but the site holds {', '.join(_DISPLAY[m] for m in declared)}.")
            files[modality] = _discovered_file(site, path)
        cases.append(_CaseFiles(case, _discovered_file(site, _modality_file(folder, case, "seg")), files))
    return declared, cases


def _header_shape(
    site: _Site, file: _SiteFile, limits: _SizeLimits, what: str, case_id: str
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A file's shape and spacing from its header alone, held to the size limits before any pixel is read."""
    if not file.name.lower().endswith(_NIFTI_SUFFIXES):
        raise site.error(file.name, f"case {case_id!r}: {what} must be a NIfTI file (.nii or .nii.gz).")
    if not file.path.is_file():
        problem = "not a regular file." if file.path.exists() else "file does not exist."
        raise site.error(file.name, f"case {case_id!r}: {what} {problem}")
    try:
        header = _nifti_header(site, file)
        shape = tuple(int(n) for n in header.get_data_shape())
        zooms = tuple(float(z) for z in header.get_zooms()[:3])
    except DataValidationError:
        raise
    except Exception as exc:  # truncated gzip, unreadable file, ...
        raise site.error(file.name, f"cannot read the NIfTI header ({type(exc).__name__}: {exc}).") from exc
    limits.check(site, file, shape)
    return shape, zooms


def _read_volume(site: _Site, file: _SiteFile, limits: _SizeLimits, channels: int) -> np.ndarray:
    """Read (size checked, finite) and bring to ``(H, W, D, channels)``."""
    array = _read_array(site, file, limits)
    if array.ndim == 3 and channels == 1:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] != channels:
        raise site.error(file.name, f"shape {array.shape}; expected (H, W, D) or (H, W, D, {channels}).")
    return array


def _spatial(site: _Site, file: _SiteFile, shape: tuple[int, ...], channels: int) -> tuple[int, ...]:
    if len(shape) == 3 and channels == 1:
        return shape
    if len(shape) == 4 and shape[3] == channels:
        return shape[:3]
    expected = "(H, W, D)" if channels == 1 else f"(H, W, D, {channels})"
    raise site.error(file.name, f"header declares shape {shape}; expected {expected}"
                     + (f" for the {channels} modalities the site declares." if channels > 1 else "."))


def _normalize(image: np.ndarray, present: np.ndarray, brain: np.ndarray, how: str,
               site: _Site, case: _CaseFiles) -> np.ndarray:
    out = np.zeros(image.shape, np.float32)
    if how == "none":
        out[present] = image[present]
        return out
    for c in np.flatnonzero(present):
        values = image[c][brain].astype(np.float64)
        if how == "zscore":
            center, scale = values.mean(), values.std()
        else:
            low, high = np.percentile(values, MRI_PERCENTILES)
            center, scale = low, high - low
        if not scale > 0:
            shown = case.images[MODALITIES[c]].name if case.images else case.single.name
            raise site.error(shown, f"case {case.case_id!r}: {_DISPLAY[MODALITIES[c]]} is constant inside the "
                             "brain; refused (an empty or corrupt volume would pass for a present modality).")
        normalized = (image[c] - center) / scale
        if how == "percentiles":
            normalized = np.clip(normalized, 0.0, 1.0)
        out[c] = np.where(brain, normalized, 0.0)
    return out


def _load_case(
    site: _Site, case: _CaseFiles, convention: str, limits: _SizeLimits, normalization: str,
    crop: bool, resizers: tuple[Resize, Resize] | None, size: tuple[int, int, int] | None,
) -> BratsCase:
    # headers of every file of the case first: sizes and shapes are refused before any pixel is read
    label_shape, zooms = _header_shape(site, case.label, limits, "label", case.case_id)
    label_spatial = _spatial(site, case.label, label_shape, 1)
    if case.single is not None:
        shape, zooms = _header_shape(site, case.single, limits, "image", case.case_id)
        image_files = [(case.single, _spatial(site, case.single, shape, len(case.channels)))]
    else:
        image_files = []
        for modality, file in case.images.items():
            shape, zooms = _header_shape(site, file, limits, f"{_DISPLAY[modality]} image", case.case_id)
            image_files.append((file, _spatial(site, file, shape, 1)))
    for file, spatial in image_files:
        if spatial != label_spatial:
            raise site.error(case.label.name, f"label shape {label_spatial} does not match image {file.name} "
                             f"shape {spatial} (case {case.case_id!r}).")

    image = np.zeros((len(MODALITIES), *label_spatial), np.float32)
    present = np.zeros(len(MODALITIES), bool)
    if case.single is not None:
        data = _read_volume(site, case.single, limits, len(case.channels))
        for c, modality in enumerate(case.channels):
            image[MODALITIES.index(modality)] = data[..., c]
            present[MODALITIES.index(modality)] = True
    else:
        for modality, file in case.images.items():
            image[MODALITIES.index(modality)] = _read_volume(site, file, limits, 1)[..., 0]
            present[MODALITIES.index(modality)] = True
    label = _read_volume(site, case.label, limits, 1)[..., 0]
    try:
        regions = regions_from_labels(label, convention)
    except ValueError as exc:
        raise site.error(case.label.name, f"case {case.case_id!r}: {exc}") from exc

    brain = (image[present] != 0).any(axis=0)
    if not brain.any():
        brain = np.ones(brain.shape, bool)
    image = _normalize(image, present, brain, normalization, site, case)
    spacing = tuple(z if math.isfinite(z) and z > 0 else 1.0 for z in zooms)
    if crop and not brain.all():
        box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(brain))
        image, regions = image[(slice(None), *box)], regions[(slice(None), *box)]
    if resizers is not None:
        old = image.shape[1:]
        image = convert_to_numpy(resizers[0](image), dtype=np.float32)
        image[~present] = 0.0
        regions = convert_to_numpy(resizers[1](regions.astype(np.float32)), dtype=np.float32) > 0.5
        spacing = tuple(s * o / n for s, o, n in zip(spacing, old, size))
    return BratsCase(case.case_id, np.ascontiguousarray(image, np.float32), present, regions, spacing)


def load_brats_site(
    site_dir: str | Path,
    *,
    size: int | Sequence[int] | None = None,
    labels: str | None = None,
    normalization: str = "zscore",
    crop: bool = False,
    modalities: Sequence[str] | None = None,
    discover: bool = True,
    name: str | None = None,
    max_voxels: int = MAX_VOXELS,
    max_axis_length: int = MAX_AXIS_LENGTH,
) -> BratsSite:
    """
    Load a multi-modal brain-tumour site (synthetic, MSD Task01 or BraTS case folders) into memory.

    Args:
        site_dir: site folder with ``dataset.json`` (either layout of the module docstring) or, when
            ``discover`` and there is no ``dataset.json``, BraTS 2018-2021 case folders.
        size: resize every case to ``size`` (an int: a cube; or ``(H, W, D)``): trilinear for images,
            nearest for regions, spacing scaled to match. ``None`` keeps each case's shape.
        labels: label convention of the label files; by default ``dataset.json``'s ``"label_convention"``,
            else inferred from its ``"labels"`` names (a label "4" -> "brats", label 1 "edema" -> "msd"),
            and "brats" for discovered folders. Given explicitly, it overrides ``dataset.json``.
        normalization: ``"zscore"`` (default, the authors'), ``"percentiles"`` or ``"none"``
            (see the module docstring).
        crop: crop each case to the bounding box of its brain (non-zero voxels) before any resize.
        modalities: for discovered folders, the modalities every case must hold (canonical names); by
            default every modality found in any case, which every case must then hold.
        discover: allow loading BraTS case folders from a site without ``dataset.json``.
        name: site name; defaults to the folder name.
        max_voxels, max_axis_length: size limits per file, as in :func:`fedoap.data.loader.load_site`.

    Returns:
        the site's cases, with ``image`` ``(4, H, W, D)`` (absent modalities zero), ``present`` and
        ``regions`` ``(3, H, W, D)``.

    Raises:
        ValueError: invalid option.
        DataValidationError: missing folder or files (a missing modality file names the case and the
            modality), a path leaving the site folder, a file over a size limit, shapes that do not match
            (naming both files and shapes), unknown label values, NaN/Inf, ...
    """
    if normalization not in ("zscore", "percentiles", "none"):
        raise ValueError(f"normalization must be 'zscore', 'percentiles' or 'none', got {normalization!r}.")
    limits = _SizeLimits.checked(max_voxels, max_axis_length)
    if size is not None:
        size = (int(size),) * 3 if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be a positive int or three positive ints, got {size}.")
    if modalities is not None:
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}.")
        modalities = tuple(m for m in MODALITIES if m in modalities)

    site = _Site.at(Path(site_dir))
    has_json = (site.root / "dataset.json").exists() or (site.root / "dataset.json").is_symlink()
    if has_json or not discover:
        dataset = _read_json(site)
        layout, channels, cases = _files_from_dataset(site, dataset)
        declared = tuple(m for m in MODALITIES if m in channels)
        convention = _label_convention(site, dataset, labels)
    else:
        layout = "brats_folders"
        declared, cases = _discover_folders(site, modalities)
        convention = _label_convention(site, None, labels)
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise site.error("dataset.json", f"cases listed more than once: {duplicates[:10]}.")

    resizers = None
    if size is not None:
        resizers = (Resize(size, mode="trilinear"), Resize(size, mode="nearest"))
    loaded = [_load_case(site, case, convention, limits, normalization, crop, resizers, size) for case in cases]
    return BratsSite(name or Path(site_dir).name, declared, convention, layout, loaded)


# ================================================================ what a site trains on


@dataclass
class VolumeSet:
    """
    One split of a brain-tumour site as the generic trainer reads it (``fedoap.training.LocalTrainer``): whole
    volumes as samples.

    Attributes:
        images: float32 ``(N, 4, H, W, D)``, absent modalities zero.
        labels: float32 ``(N, 3, H, W, D)``, the WT/TC/ET region masks (one sigmoid channel each).
        case_ids: one per volume (the DP unit "case" is the sample itself).
        present: bool ``(4,)``, the modalities the site holds.
        spacings: voxel size of every volume (HD95 in mm).
    """

    images: np.ndarray
    labels: np.ndarray
    case_ids: list[str]
    present: np.ndarray
    spacings: list[tuple[float, float, float]]

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def of(cls, site: BratsSite) -> VolumeSet:
        """The stacked volumes of a loaded site (loaded with ``size=``, so that they stack)."""
        return cls(images=site.images().astype(np.float32), labels=site.regions().astype(np.float32),
                   case_ids=site.case_ids, present=site.present, spacings=[c.spacing for c in site.cases])


@dataclass
class BratsData:
    """A brain-tumour site split by case into train/val/test :class:`VolumeSet`s."""

    name: str
    modalities: tuple[str, ...]
    train: VolumeSet
    val: VolumeSet
    test: VolumeSet


def load_brats_splits(site_dir: str | Path, size: int, seed: int = 0, name: str | None = None) -> BratsData:
    """
    Load a site (:func:`load_brats_site`, every case resized to ``size``^3) and split it by case
    (:func:`split_brats_site`, seeded).

    Raises:
        DataValidationError: as :func:`load_brats_site`, fewer than 3 cases, or a site without any modality.
    """
    site = load_brats_site(site_dir, size=size, name=name)
    if not site.modalities:
        raise DataValidationError(f"site {site.name!r}: no modality of {MODALITIES} in {site_dir}.")
    parts = split_brats_site(site, seed=seed)
    return BratsData(site.name, site.modalities, VolumeSet.of(parts.train), VolumeSet.of(parts.val),
                     VolumeSet.of(parts.test))
