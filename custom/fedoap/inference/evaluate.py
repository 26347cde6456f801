"""``fedoap evaluate``: score a personalized model file on a labelled folder in the MSD layout, per case in 3D and per
slice as the federation scored it.

A hospital that received its model wants two numbers it can trust: the one the job reported (per slice, at the
training size: the network's binarized output against the label resized nearest, :func:`fedoap.eval.metrics.
per_image_scores`, exactly the site's test metric), and the one a clinician reads (per case, at the scan's own size:
the mask of :mod:`fedoap.inference.segment` against the label file, Dice over every voxel and HD95 in mm from the
NIfTI header's spacing; in pixels for 2D PNG/JPEG images). Both come from one pass of the network per case.

``--split test`` scores only the cases the job's site held out as its test split (the loader's seeded permutation
with the seed in the model's card and the loader's default fractions), so the job's number can be checked; the
default scores every labelled case the folder lists under ``"training"``. Nothing here selects a model or a
threshold: the test split is only measured.

Outputs (owner-only, they describe patients): ``cases.csv`` (one row per case) and ``summary.json`` (means and counts,
both empty-mask rules, the model card's provenance and the command that reproduces the run).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import math
import os
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from monai.transforms import Resize
from monai.utils import convert_to_numpy

from fedoap.data.loader import (MAX_AXIS_LENGTH, MAX_VOXELS, _case_id, _nifti_header, _NIFTI_SUFFIXES, _read_array,
                                _read_site, _Site, _SiteFile, _SizeLimits, _split_counts, load_site)
from fedoap.data.normalization import modality_family
from fedoap.eval.metrics import EMPTY_MASK_RULE, per_image_scores
from fedoap.eval.volume import VOLUME_EMPTY_MASK_RULE, volume_scores
from fedoap.inference.model_file import PersonalizedModel, Preprocessing, open_model, resolve_device
from fedoap.inference.segment import probabilities, to_network_input, to_scan_size

__all__ = ["add_options", "run", "evaluate", "CASES_FILE", "SUMMARY_FILE", "CASE_COLUMNS", "SPLITS"]

CASES_FILE = "cases.csv"
SUMMARY_FILE = "summary.json"
SPLITS = ("all", "test")
#: the columns of ``cases.csv``; ``hd95`` is in ``hd95_unit`` (mm for NIfTI, px for 2D images), the slice columns at
#: the training size (pixels)
CASE_COLUMNS = ("case", "image", "n_slices", "dice_3d", "hd95", "hd95_unit", "empty_gt", "empty_pred", "gt_voxels",
                "pred_voxels", "spacing", "slice_dice_mean", "slice_hd95_mean_px", "n_slices_empty_gt")
#: NIfTI spatial units (``xyzt_units``) in millimetres; "unknown" is read as mm, as the NIfTI standard suggests
_MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
#: rows of the printed table (all of them are in cases.csv)
_PRINTED_CASES = 30


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="the site's personalized model file (personalized_model.safetensors[.enc])")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a labelled folder in the MSD layout (dataset.json; its \"training\" list pairs images with "
                        "labels)")
    p.add_argument("--out", default="runs/evaluate", metavar="DIR",
                   help=f"where {CASES_FILE} and {SUMMARY_FILE} are written (replaced; default runs/evaluate)")
    p.add_argument("--key", metavar="FILE", help="the site's at-rest key (local/fedoap_at_rest.key) for an encrypted "
                   "model file")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="all: every labelled case (default); test: only the site's test split as the job split it "
                        "(the card's seed), to check the number the job reported")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")


def run(args: argparse.Namespace) -> None:
    """The command: evaluate, then print the table."""
    summary = evaluate(args.model, args.data, args.out, key_file=args.key, split=args.split,
                       batch_size=args.batch_size, device=args.device)
    print(format_table(summary))


# -- checks, before any work ------------------------------------------------------------------------------------------
def _output_dir(out: Path) -> Path:
    from fedoap.files import make_private_dir

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    try:
        make_private_dir(out)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write there")
    return out


def _check_modality(dataset: dict, data_dir: Path, prep: Preprocessing) -> None:
    raw = dataset["modality"]["0"]
    family = modality_family(raw)
    if family != prep.modality:
        raise ValueError(f"{data_dir / 'dataset.json'}: modality {raw!r} ({family}), but the model was trained on "
                         f"{prep.modality} scans (its card); refusing to score it on another modality")


def _test_cases(n_cases: int, seed: Any) -> list[int]:
    """The indices (in ``"training"`` order) of the cases ``load_site`` puts in the test split with ``seed`` and its
    default fractions."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--split test needs the seed the job split its data with, but the model's card gives "
                         f"{seed!r} (provenance.seed)")
    if n_cases < 3:
        raise ValueError(f"--split test: the folder lists {n_cases} case(s); a job's train/val/test split needs 3")
    fractions = inspect.signature(load_site).parameters["split"].default
    order = np.random.default_rng(seed).permutation(n_cases)
    bounds = np.cumsum(_split_counts(n_cases, fractions))[:-1]
    return sorted(int(i) for i in np.split(order, bounds)[2])


# -- one case ---------------------------------------------------------------------------------------------------------
def _spacing_mm(site: _Site, file: _SiteFile, ndim: int) -> tuple[float, ...]:
    """The voxel spacing of a NIfTI file's first ``ndim`` axes, in mm (from its header's pixdim and units)."""
    header = _nifti_header(site, file)
    unit = header.get_xyzt_units()[0]
    zooms = tuple(float(z) * _MM_PER_UNIT.get(unit, 1.0) for z in header.get_zooms()[:ndim])
    if len(zooms) != ndim or not all(math.isfinite(z) and z > 0 for z in zooms):
        raise site.error(file.name, f"the header's voxel spacing {zooms} is not {ndim} positive numbers; HD95 in mm "
                                    "cannot be measured")
    return zooms


def _read_case(site: _Site, files: tuple[_SiteFile, _SiteFile], prep: Preprocessing,
               limits: _SizeLimits) -> tuple[np.ndarray, np.ndarray, Optional[tuple[float, ...]]]:
    """The raw image (the card's channel of a 4D image), its {0, 1} label, and the spacing in mm (None: 2D image)."""
    image_file, label_file = files
    image = _read_array(site, image_file, limits)
    label = _read_array(site, label_file, limits)
    if image.ndim == 4:
        if prep.channel >= image.shape[3]:
            raise site.error(image_file.name, f"has {image.shape[3]} channel(s); the model uses channel "
                                              f"{prep.channel}")
        image = image[..., prep.channel]
    if image.ndim not in (2, 3):
        raise site.error(image_file.name, f"expected a 2D image or a 3D volume, got shape {image.shape}.")
    if label.shape != image.shape:
        raise site.error(label_file.name, f"label shape {label.shape} does not match image {image_file.name} "
                                          f"shape {image.shape}.")
    values = np.unique(label)
    unexpected = values[(values != 0) & (values != 1)]
    if unexpected.size:
        raise site.error(label_file.name, f"label values must be 0 or 1, found {unexpected[:10].tolist()}.")
    nifti = image_file.name.lower().endswith(_NIFTI_SUFFIXES)
    spacing = _spacing_mm(site, image_file, image.ndim) if nifti else None
    return image, label.astype(np.uint8), spacing


def _label_slices(label: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The label as the site's loader gives it: ``(slices, 1, S, S)``, each slice resized nearest."""
    slices = label[None] if label.ndim == 2 else np.moveaxis(label, prep.slice_axis, 0)
    resized = Resize((prep.image_size, prep.image_size), mode="nearest")(slices.astype(np.float32))
    return convert_to_numpy(resized, dtype=np.float32)[:, None]


def _score_case(model: PersonalizedModel, image: np.ndarray, label: np.ndarray,
                spacing: Optional[tuple[float, ...]], batch_size: int) -> tuple[dict[str, Any], Any]:
    """The case's row of ``cases.csv`` (without its names) and its per-slice scores."""
    prep = model.card.preprocessing
    probs = probabilities(model, to_network_input(image, prep), batch_size)
    slices = per_image_scores(torch.from_numpy((probs > prep.threshold).astype(np.float32)),
                              torch.from_numpy(_label_slices(label, prep)))
    volume = volume_scores(to_scan_size(probs, image.shape, prep), label, spacing)
    return {
        "n_slices": int(len(probs)),
        "dice_3d": volume.dice,
        "hd95": volume.hd95,
        "hd95_unit": "mm" if spacing is not None else "px",
        "empty_gt": volume.empty_gt,
        "empty_pred": volume.empty_pred,
        "gt_voxels": volume.gt_voxels,
        "pred_voxels": volume.pred_voxels,
        "spacing": "x".join(f"{s:g}" for s in spacing) if spacing is not None else "",
        "slice_dice_mean": slices.mean_dice(),
        "slice_hd95_mean_px": slices.mean_hd95(),
        "n_slices_empty_gt": int(slices.empty_gt.sum()),
    }, slices


# -- the run ----------------------------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _command(model: Path, data: Path, out: Path, key_file: Optional[str], split: str, batch_size: int,
             device: str) -> str:
    parts = ["fedoap", "evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--split", split,
             "--batch-size", str(batch_size), "--device", device]
    if key_file:
        parts += ["--key", str(Path(key_file).absolute())]
    return shlex.join(parts)


def evaluate(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike = "runs/evaluate", *,
             key_file: Optional[str | os.PathLike] = None, split: str = "all", batch_size: int = 32,
             device: str = "cpu") -> dict[str, Any]:
    """Score ``model`` on the labelled cases of ``data``; write ``cases.csv`` and ``summary.json`` into ``out``.

    Returns:
        the summary (as written), with ``"cases"``: the rows of ``cases.csv``.

    Raises:
        ValueError, FileNotFoundError: a bad option, folder, model file or key (one line naming it), a model trained
            on another modality than ``dataset.json`` declares, or a case the loader's checks refuse.
    """
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    torch_device = resolve_device(str(device))
    data_dir, model_path = Path(data).absolute(), Path(model).absolute()
    site, dataset, files = _read_site(data_dir)
    loaded = open_model(model_path, key_file, torch_device)
    prep = loaded.card.preprocessing
    _check_modality(dataset, data_dir, prep)
    chosen = _test_cases(len(files), loaded.card.provenance.get("seed")) if split == "test" else range(len(files))
    out_dir = _output_dir(Path(out).absolute())
    limits = _SizeLimits.checked(MAX_VOXELS, MAX_AXIS_LENGTH)

    from tqdm import tqdm

    rows, slice_scores = [], []
    for index in tqdm(chosen, desc="fedoap evaluate", unit="case", disable=None, leave=False):
        image, label, spacing = _read_case(site, files[index], prep, limits)
        row, slices = _score_case(loaded, image, label, spacing, batch_size)
        rows.append({"case": _case_id(files[index][0].name), "image": files[index][0].name, **row})
        slice_scores.append(slices)

    units = sorted({row["hd95_unit"] for row in rows})
    dice = np.concatenate([s.dice for s in slice_scores])
    hd95 = np.concatenate([s.hd95 for s in slice_scores])
    card = loaded.card
    summary: dict[str, Any] = {
        "model": str(model_path),
        "data": str(data_dir),
        "split": split,
        "dataset": {"name": dataset.get("name"), "modality": dataset["modality"]["0"],
                    "organ": str(dataset.get("organ") or dataset.get("name", "")).lower()},
        "volume": {  # per case, at the scan's size
            "dice": _mean([r["dice_3d"] for r in rows]),
            "hd95": _mean([r["hd95"] for r in rows]) if len(units) == 1 else None,
            "hd95_unit": units[0] if len(units) == 1 else "mixed (see cases.csv)",
            "n_cases": len(rows),
            "n_empty_gt": sum(r["empty_gt"] for r in rows),
            "n_hd95": sum(1 for r in rows if math.isfinite(r["hd95"])),
        },
        "slices": {  # per slice, at the training size: the site's own test metric
            "dice": float(dice.mean()) if dice.size else None,
            "hd95": _mean(hd95.tolist()),
            "hd95_unit": f"px at {prep.image_size}x{prep.image_size}",
            "n_images": int(dice.size),
            "n_empty_gt": int(sum(int(s.empty_gt.sum()) for s in slice_scores)),
            "image_size": prep.image_size,
        },
        "empty_mask_rules": {"volume": VOLUME_EMPTY_MASK_RULE, "slice": EMPTY_MASK_RULE},
        "model_card": {"network": dict(card.network), "method": dict(card.method),
                       "preprocessing": asdict(card.preprocessing), "provenance": dict(card.provenance)},
        "command": _command(model_path, data_dir, out_dir, str(key_file) if key_file else None, split, batch_size,
                            str(device)),
    }
    _write(out_dir, rows, summary)
    return {**summary, "cases": rows, "files": [str(out_dir / CASES_FILE), str(out_dir / SUMMARY_FILE)]}


def _csv_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return str(value)


def _write(out_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Both files owner-only and atomic: per-case scores describe a hospital's patients."""
    from fedoap.files import PRIVATE_FILE_MODE, write_atomic
    from fedoap.jsonio import write_json

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CASE_COLUMNS)
    for row in rows:
        writer.writerow([_csv_value(row[c]) for c in CASE_COLUMNS])
    write_atomic(out_dir / CASES_FILE, text.getvalue().encode("utf-8"), PRIVATE_FILE_MODE)
    write_json(out_dir / SUMMARY_FILE, summary, private=True)


def _fmt(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A short table of what :func:`evaluate` returned: one row per case (the first few), the means, the rules."""
    volume, slices, rows = result["volume"], result["slices"], result["cases"]
    unit = volume["hd95_unit"] if volume["hd95_unit"] in ("mm", "px") else "mm/px"
    header = f"{'case':<24} {'slices':>6} {'Dice 3D':>8} {'HD95 ' + unit:>9} {'slice Dice':>10}"
    lines = [f"{result['model']} on {result['data']} ({result['split']}: {volume['n_cases']} case(s))", header,
             "-" * len(header)]
    for row in rows[:_PRINTED_CASES]:
        lines.append(f"{row['case'][:24]:<24} {row['n_slices']:>6} {_fmt(row['dice_3d'], 3):>8} "
                     f"{_fmt(row['hd95'], 1):>9} {_fmt(row['slice_dice_mean'], 3):>10}")
    if len(rows) > _PRINTED_CASES:
        lines.append(f"... {len(rows) - _PRINTED_CASES} more case(s) in {CASES_FILE}")
    lines.append("-" * len(header))
    lines.append(f"{'mean over cases':<24} {'':>6} {_fmt(volume['dice'], 3):>8} {_fmt(volume['hd95'], 1):>9}")
    lines.append(f"per slice at {slices['image_size']}x{slices['image_size']} (the job's metric): Dice "
                 f"{_fmt(slices['dice'], 3)} over {slices['n_images']} slices ({slices['n_empty_gt']} with an empty "
                 f"ground truth), HD95 {_fmt(slices['hd95'], 1)} px")
    reported = result["model_card"]["provenance"].get("test_dice")
    if result["split"] == "test" and isinstance(reported, (int, float)):
        lines.append(f"the job reported test Dice {_fmt(float(reported), 3)} for this site")
    lines.append(f"volume: {VOLUME_EMPTY_MASK_RULE}")
    lines.append(f"slice: {EMPTY_MASK_RULE}")
    lines.append(f"wrote {', '.join(result['files'])}")
    return "\n".join(lines)
