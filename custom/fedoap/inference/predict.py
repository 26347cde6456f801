"""``fedoap predict``: segment new scans with a site's personalized model file, the way the site trained.

Inputs are NIfTI volumes (``.nii``/``.nii.gz``, 3D, or 4D channel-last with ``--channel``) or 2D images
(``.png``/``.jpg``/``.jpeg``, colour turned to grayscale as training did), given one by one, as a plain folder (every
such file in it, sorted, not recursive) or as an MSD folder (``dataset.json``: its ``"test"`` images, else its
``"training"`` images). Each case goes through :func:`fedoap.inference.segment.segment`, the training's own
normalization and slice size, and is written as soon as it is done:

- a volume -> ``<case>_seg.nii.gz``: uint8 {0, 1}, the input's shape (a 4D input: its 3D shape), affine and header
  (spacing, qform/sform, units) unchanged but for the data type and scaling;
- a 2D image -> ``<case>_seg.png``: 8-bit grayscale, 0 background and 255 tumour (visible in any viewer; read
  ``mask > 0``), the image's size;
- with ``--overlay``, ``<case>_overlay.png``: the scan in gray with the mask tinted red and outlined in yellow (for a
  volume, the slice with the largest predicted area, or the middle one when nothing is found).

Images are read as the training loader reads them (:mod:`fedoap.data.loader`): the size is checked from the header
before any pixel is decoded, NaN/Inf are refused. Masks are patient data: they are written owner-only (0600) and
atomically (a temporary file, then ``os.replace``), so a stop (bad file, Ctrl-C) leaves every earlier case complete
and no half-written file. The model file is only read.
"""

from __future__ import annotations

import argparse
import gzip
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from fedoap.argtypes import int_at_least

__all__ = ["NIFTI_SUFFIXES", "IMAGE_2D_SUFFIXES", "MASK_POSTFIX", "OVERLAY_POSTFIX", "PNG_FOREGROUND", "CaseResult",
           "case_id", "list_inputs", "check_modality", "predict_paths", "predict_cases",
           "add_options", "run"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg")
#: a mask is written as ``<case><MASK_POSTFIX>.nii.gz`` or ``.png`` (the MONAI bundle writes the same names)
MASK_POSTFIX = "_seg"
OVERLAY_POSTFIX = "_overlay"
#: the value of tumour pixels in a PNG mask (background is 0)
PNG_FOREGROUND = 255


@dataclass(frozen=True)
class CaseResult:
    """One segmented case: its input, the files written for it, and how many slices the network saw."""

    image: Path
    mask: Path
    overlay: Optional[Path]
    slices: int


# ------------------------------------------------------------------------------------------------ what to predict


def _suffix(path: Path) -> Optional[str]:
    lowered = path.name.lower()
    return next((s for s in NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES if lowered.endswith(s)), None)


def _is_volume_file(path: Path) -> bool:
    return _suffix(path) in NIFTI_SUFFIXES


def case_id(path: Path) -> str:
    """The case name of an input file: its name without the image suffix (``brain_003.nii.gz`` -> ``brain_003``)."""
    suffix = _suffix(Path(path))
    name = Path(path).name
    return name[: -len(suffix)] if suffix else name


def check_modality(modality: str, card, source: str) -> None:
    """Refuse inputs of another modality family than the model's (CT vs MRI vs US: the normalization differs).

    Raises:
        ValueError: the families differ; names ``source`` (an option or a file) and both modalities.
    """
    from fedoap.data.normalization import modality_family

    given, trained = modality_family(modality), modality_family(card.preprocessing.modality)
    if given != trained:
        raise ValueError(f"{source}: modality {modality!r} ({given}) does not match the model's {trained} "
                         f"({card.preprocessing.organ or 'unknown organ'}); a model only segments the modality its "
                         "site trained on")


def _msd_inputs(folder: Path, card) -> list[Path]:
    """The images an MSD folder lists: ``"test"`` when it has any, else ``"training"``; paths confined to the folder
    (the loader's checks)."""
    from fedoap.data.loader import _read_site

    site, dataset, training = _read_site(folder)
    if card is not None:
        check_modality(dataset["modality"]["0"], card, str(folder / "dataset.json"))
    test = dataset.get("test") or []
    if test:
        return [site.file(entry if isinstance(entry, str) else entry["image"], f'"test"[{i}]').path
                for i, entry in enumerate(test)]
    return [image.path for image, _ in training]


def list_inputs(path: str | Path, card=None) -> list[Path]:
    """The files ``--input`` names: one file; an MSD folder's listed images (its modality checked against ``card``'s
    when given); or every NIfTI/PNG/JPEG file of a plain folder, sorted, not recursive.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file of another type, a folder without images, an MSD folder of another modality or with a
            bad ``dataset.json`` (named), or two inputs that would write the same mask.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (--input)")
    if path.is_dir():
        if (path / "dataset.json").exists():
            inputs = _msd_inputs(path, card)
        else:
            inputs = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) is not None)
        if not inputs:
            raise ValueError(f"{path}: no {', '.join(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES)} file in this folder")
    else:
        if _suffix(path) is None:
            raise ValueError(f"{path}: unsupported file type; expected one of "
                             f"{', '.join(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES)}")
        inputs = [path]
    _check_distinct(inputs)
    return inputs


def _check_distinct(inputs: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in inputs:
        case = case_id(path)
        if case in seen:
            raise ValueError(f"{path}: case {case!r} again (also {seen[case]}); both would write {case}{MASK_POSTFIX}")
        seen[case] = path


def _check_kinds(inputs: Sequence[Path], card) -> None:
    """A volume model reads NIfTI volumes, a 2D model 2D images; decided from the names, before any file is read."""
    prep = card.preprocessing
    trained = "3D NIfTI volumes" if prep.volumetric else "2D images (PNG/JPEG)"
    for path in inputs:
        if _suffix(path) is None:
            raise ValueError(f"{path}: unsupported file type; expected one of "
                             f"{', '.join(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES)}")
        if _is_volume_file(path) != bool(prep.volumetric):
            given = "a NIfTI volume" if _is_volume_file(path) else "a 2D image"
            raise ValueError(f"{path}: modality mismatch: {given}, but the model was trained on {trained} "
                             f"({prep.modality}, {prep.organ or 'unknown organ'})")


# ----------------------------------------------------------------------------------------------------- reading


class _Inputs:
    """Stands for the loader's site folder: its readers word every problem through ``error``, here naming the file
    as the user gave it."""

    @staticmethod
    def error(name: str, problem: str):
        from fedoap.data.loader import DataValidationError

        return DataValidationError(f"{name}: {' '.join(problem.split())}")


def _read(path: Path, card, channel: Optional[int]):
    """The 2D image or 3D volume to segment (float or integer array) and, for a NIfTI file, its nibabel image (for
    the affine and header of the mask).

    Raises:
        DataValidationError (a ValueError): unreadable, too large, NaN/Inf, or a channel count the options do not
            settle; the message names the file.
    """
    import nibabel as nib

    from fedoap.data.loader import (
        MAX_AXIS_LENGTH,
        MAX_VOXELS,
        _read_array,
        _SiteFile,
        _SizeLimits,
    )

    array = _read_array(_Inputs, _SiteFile(str(path), path), _SizeLimits.checked(MAX_VOXELS, MAX_AXIS_LENGTH))
    if not _is_volume_file(path):
        if array.ndim != 2:
            raise _Inputs.error(str(path), f"expected a grayscale or colour image, got an array of shape "
                                           f"{array.shape}")
        if channel not in (None, 0):
            raise _Inputs.error(str(path), f"--channel {channel}: a 2D image has one channel (0)")
        return array, None
    if array.ndim == 4:
        channels = array.shape[-1]
        if channel is None and channels > 1:
            raise _Inputs.error(str(path), f"a 4D image of {channels} channels (shape {array.shape}), the model "
                                           f"reads one: pick the modality with --channel K (0..{channels - 1}; the "
                                           f"site trained on channel {card.preprocessing.channel}, "
                                           f"{card.preprocessing.modality})")
        k = 0 if channel is None else channel
        if not 0 <= k < channels:
            raise _Inputs.error(str(path), f"--channel {k} is out of range: the image has {channels} channel(s) "
                                           f"(shape {array.shape})")
        array = array[..., k]
    elif array.ndim in (2, 3):
        if channel not in (None, 0):
            raise _Inputs.error(str(path), f"--channel {channel}: a {array.ndim}D image has no channel axis")
    else:
        raise _Inputs.error(str(path), f"expected a 3D volume (or 4D channel-last), got shape {array.shape}")
    return array, nib.load(path)  # the header again, lazily: no pixel is read twice


# ----------------------------------------------------------------------------------------------------- writing


def _nifti_bytes(mask: np.ndarray, source) -> bytes:
    """The gzipped NIfTI of ``mask`` with the source's affine and header (spacing, orientation codes, units kept)."""
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(source)(mask.astype(np.uint8), source.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, 1
    image.header["descrip"] = b"fedoap predict: tumour mask (1)"
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _overlay(image: np.ndarray, mask: np.ndarray, card, volumetric: bool) -> np.ndarray:
    """An RGB picture of one slice: the scan in gray (the card's normalization), tumour tinted red, outlined yellow.

    A volume shows its slice with the largest predicted area (the middle slice when there is none), oriented as
    radiology viewers show an axial NIfTI slice (first axis to the right, second up)."""
    from scipy.ndimage import binary_erosion

    from fedoap.data.normalization import normalizer

    gray = np.asarray(normalizer(card.preprocessing.normalization)(np.asarray(image, np.float32)[None]))[0]
    if volumetric and mask.ndim == 3:
        axis = card.preprocessing.slice_axis
        areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        index = int(np.argmax(areas)) if areas.max() > 0 else mask.shape[axis] // 2
        gray, mask = np.take(gray, index, axis=axis), np.take(mask, index, axis=axis)
    if volumetric:
        gray, mask = np.flipud(gray.T), np.flipud(mask.T)
    rgb = np.repeat((np.clip(gray, 0.0, 1.0) * 255.0)[..., None], 3, axis=-1)
    inside = mask > 0
    rgb[inside] = 0.6 * rgb[inside] + 0.4 * np.array([255.0, 0.0, 0.0])
    rgb[inside & ~binary_erosion(inside)] = (255.0, 255.0, 0.0)
    return np.ascontiguousarray(rgb.round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------------- predicting


def predict_cases(model, inputs: Sequence[Path], out_dir: Path, *, batch_size: int = 32, device=None,
                  overlay: bool = False, channel: Optional[int] = None,
                  progress: bool = True) -> Iterator[CaseResult]:
    """Segment ``inputs`` one case at a time, yielding each case once its files are written (see
    :func:`predict_paths`)."""
    from tqdm import tqdm

    from fedoap.files import PRIVATE_FILE_MODE, make_private_dir, write_atomic
    from fedoap.inference.segment import segment

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        raise ValueError(f"channel must be a non-negative integer, got {channel!r}")
    inputs = [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    card = model.card
    _check_kinds(inputs, card)
    _check_distinct(inputs)
    volumetric = bool(card.preprocessing.volumetric)
    ext = ".nii.gz" if volumetric else ".png"
    targets = [(out_dir / f"{case_id(p)}{MASK_POSTFIX}{ext}", out_dir / f"{case_id(p)}{OVERLAY_POSTFIX}.png")
               for p in inputs]
    resolved = {p.resolve() for p in inputs}
    for mask_path, overlay_path in targets:
        for target in (mask_path, overlay_path) if overlay else (mask_path,):
            if target.resolve() in resolved:
                raise ValueError(f"{target}: is one of the inputs; refusing to write a mask over it (choose another "
                                 "--out)")
    if device is not None:
        model.network.to(device)
    make_private_dir(out_dir)
    bar = tqdm(total=len(inputs), unit="case", desc="fedoap predict", file=sys.stderr,
               disable=None if progress else True)
    try:
        for path, (mask_path, overlay_path) in zip(inputs, targets):
            bar.set_postfix_str(path.name, refresh=False)
            image, nifti = _read(path, card, channel)
            mask = segment(model, image, batch_size=batch_size, device=device)
            if volumetric:
                write_atomic(mask_path, _nifti_bytes(mask, nifti), PRIVATE_FILE_MODE)
            else:
                write_atomic(mask_path, _png_bytes(mask * np.uint8(PNG_FOREGROUND)), PRIVATE_FILE_MODE)
            if overlay:
                write_atomic(overlay_path, _png_bytes(_overlay(image, mask, card, volumetric)), PRIVATE_FILE_MODE)
            slices = 1 if image.ndim == 2 else int(image.shape[card.preprocessing.slice_axis])
            bar.update(1)
            yield CaseResult(path, mask_path, overlay_path if overlay else None, slices)
    finally:
        bar.close()


def predict_paths(model, inputs: Sequence[Path], out_dir: Path, *, batch_size: int = 32, device=None,
                  overlay: bool = False, channel: Optional[int] = None, progress: bool = True) -> list[Path]:
    """Segment each input file with a personalized model and write its mask into ``out_dir``.

    Args:
        model: a :class:`fedoap.inference.model_file.PersonalizedModel` (:func:`~fedoap.inference.model_file.load_model`).
        inputs: NIfTI volumes for a volume model, PNG/JPEG images for a 2D one (:func:`list_inputs`).
        out_dir: created (0700) if missing; existing masks of the same cases are replaced.
        batch_size: slices per forward pass.
        device: where the network runs (it is moved there); None: where it is.
        overlay: also write ``<case>_overlay.png``.
        channel: the channel of 4D (channel-last) volumes to segment; required for those with several.
        progress: a progress bar on stderr (shown on a terminal only).

    Returns:
        the masks written, in the order of ``inputs``.

    Raises:
        ValueError: an input of the wrong kind for the model (before anything is read), or one that cannot be
            read, too large, non-finite or with channels ``channel`` does not settle (named; the cases before it
            stay written).
    """
    return [case.mask for case in predict_cases(model, inputs, out_dir, batch_size=batch_size, device=device,
                                                overlay=overlay, channel=channel, progress=progress)]


# ------------------------------------------------------------------------------------------------- command line


_POSITIVE = int_at_least(1)
_INDEX = int_at_least(0)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the site's personalized_model.safetensors (or .enc)")
    parser.add_argument("--input", required=True,
                        help="a NIfTI volume or PNG/JPEG image, a folder of them, or an MSD folder (dataset.json)")
    parser.add_argument("--out", required=True, help="folder for <case>_seg.nii.gz / <case>_seg.png (created 0700)")
    parser.add_argument("--key", help="the site's at-rest key (<workspace>/local/fedoap_at_rest.key) for an "
                                      "encrypted model file")
    parser.add_argument("--overlay", action="store_true", help="also write <case>_overlay.png (scan with the mask)")
    parser.add_argument("--batch-size", type=_POSITIVE, default=32, help="slices per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--modality", help="the inputs' modality (CT, MRI, FLAIR, US, ...): refused unless the "
                                           "model's family")
    parser.add_argument("--channel", type=_INDEX,
                        help="the channel of 4D (channel-last, multi-modal) volumes that holds the model's modality")


def run(args: argparse.Namespace) -> None:
    """``fedoap predict``: check everything that can be checked before reading an image, then segment case by case
    and print one summary line."""
    from fedoap.inference.model_file import open_model, resolve_device

    device = resolve_device(args.device)
    model = open_model(args.model, args.key, device)
    if args.modality:
        check_modality(args.modality, model.card, f"--modality {args.modality}")
    inputs = list_inputs(args.input, model.card)
    _check_kinds(inputs, model.card)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    start = time.perf_counter()
    done: list[CaseResult] = []
    try:
        for case in predict_cases(model, inputs, out_dir, batch_size=args.batch_size, device=device,
                                  overlay=args.overlay, channel=args.channel):
            done.append(case)
    except ValueError as err:
        kept = f"; the {len(done)} case(s) before it are written in {out_dir}" if done else ""
        raise ValueError(f"{err}{kept}") from None
    seconds = time.perf_counter() - start
    slices = sum(case.slices for case in done)
    rate = slices / seconds if seconds > 0 else math.inf
    print(f"fedoap predict: {len(done)} case(s), {slices} slice(s) in {seconds:.1f} s ({rate:.1f} slices/s) on "
          f"{device.type}; masks in {out_dir}")
