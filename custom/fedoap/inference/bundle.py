"""``fedoap export-bundle``: a personalized model file as a MONAI bundle that MONAI's own runner applies to NIfTI files.

The bundle (``DIR``) holds::

    configs/metadata.json    MONAI's bundle metadata (versions, task, network_data_format) + the model card
    configs/inference.json   the pipeline, MONAI components only; runs with ``python -m monai.bundle run``
    models/model.safetensors the weights (no pickle: no model.pt; the config loads them with safetensors)
    docs/README.md           how to run it

and is run as::

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --dataset_dir IN --output_dir OUT

on every ``*.nii.gz``/``*.nii`` of ``IN``, writing ``OUT/<case>_seg.nii.gz`` (uint8 {0, 1}, the input's shape and
affine): the names ``fedoap predict`` writes. The network class is fedoap's (``_target_`` names it), so fedoap
must be installed where the bundle runs; MONAI's runner evaluates the config's ``$`` expressions, so only run
bundles you trust (this one loads its weights with ``safetensors``, which runs no code).

The pipeline reproduces :func:`fedoap.inference.segment.segment` with MONAI parts: ``LoadImaged`` (nibabel) +
``EnsureChannelFirstd``, the card's channel of a 4D image, the card's normalization transform on the whole volume
(:func:`fedoap.data.normalization.normalizer_args`), ``Resized`` to ``(S, S, -1)`` (trilinear; the slice count is
kept, and linear interpolation along a kept axis is the identity), the 2D network slice by slice
(``SliceInferer``), ``Activationsd`` (sigmoid), ``Invertd`` (back to the scan's size), ``AsDiscreted`` and
``SaveImaged``. ``AsDiscreted`` keeps ``p >= t`` where ``segment`` keeps ``p > t``: the config's threshold is the
next float32 above the card's, which makes the two tests identical on float32 probabilities.

Tolerance: the masks can differ from ``fedoap predict``'s by floating-point rounding only. Torch's trilinear resize
with a kept axis and its per-slice bilinear resize round differently in the last bit (2.4e-7 at most), and MONAI takes
percentile bounds with torch where ``segment`` uses numpy (volumes under a million voxels); the probabilities then
differ by at most 6.6e-7 (measured), so a voxel can only flip when its probability lies that close to the threshold.
Measured on 11 synthetic brain MRI and liver CT volumes (5.4 million voxels, 48 to 240 pixels a side): no voxel
differed, and the closest probability to the threshold was 1.8e-6 away. ``tests/test_bundle.py`` allows 1e-4 of the
voxels to differ (a wrong normalization, size or threshold changes far more).

Only volume models slicing along the last axis (the loader's; ``slice_axis`` 2) are exported: a 2D (PNG/JPEG) model
is refused (``fedoap predict`` serves it), as is a card with another slicing axis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["BUNDLE_FILES", "SCHEMA", "export_bundle", "inference_config", "bundle_metadata", "add_options", "run"]

#: the files a bundle consists of, relative to its root
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.safetensors", "docs/README.md")
#: MONAI's current bundle metadata schema (the one with ``required_packages_version``)
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
#: slices per forward pass in the bundle, as ``fedoap predict``'s default
SW_BATCH_SIZE = 32


def _check_exportable(card, source: str) -> None:
    """Raises ValueError for a model the bundle's pipeline would not reproduce."""
    prep = card.preprocessing
    if not prep.volumetric:
        raise ValueError(f"{source}: a 2D model (trained on {prep.modality} PNG/JPEG images); export-bundle writes a "
                         "NIfTI volume pipeline only: segment 2D images with 'fedoap predict'")
    if prep.slice_axis != 2:
        raise ValueError(f"{source}: the model slices volumes along axis {prep.slice_axis}; the bundle's "
                         "SliceInferer pipeline is written for the last axis (2) only: use 'fedoap predict'")


def _threshold_for_at_least(threshold: float) -> float:
    """The float32 just above ``threshold``: for float32 ``p``, ``p >= t'`` (AsDiscreted) is ``p > threshold``."""
    return float(np.nextafter(np.float32(threshold), np.float32(np.inf)))


def inference_config(card) -> dict[str, Any]:
    """``configs/inference.json`` for a card (MONAI config syntax: ``@`` references, ``$`` expressions).

    No ignite: the run is a plain loop, one volume at a time, written as a ``$`` expression. Python's lambdas and
    comprehensions cannot see the parser's ``@`` references from inside, so the loop body takes them as default
    arguments (evaluated where they are visible).
    """
    from fedoap.data.normalization import normalizer_args

    prep = card.preprocessing
    size = int(prep.image_size)
    name, kwargs = normalizer_args(prep.normalization)
    return {
        "imports": ["$import glob", "$import os", "$import numpy as np", "$import torch",
                    "$from safetensors.torch import load_file"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) "
                    "+ glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "image_size": size,
        "channel": int(prep.channel),
        "threshold": _threshold_for_at_least(prep.threshold),
        "sw_batch_size": SW_BATCH_SIZE,
        "network_def": {"_target_": card.network["class_path"], **dict(card.network.get("args", {}))},
        "network": "$@network_def.to(@device).eval()",
        "weights": "$os.path.join(@bundle_root, 'models', 'model.safetensors')",
        "load_weights": "$@network_def.load_state_dict(load_file(@weights), strict=True)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Lambdad", "keys": "image",
                 "func": "$lambda x, c=@channel: x[[c]] if x.shape[0] > 1 else x"},
                {"_target_": f"{name}d", "keys": "image", **kwargs},
                {"_target_": "Resized", "keys": "image", "spatial_size": [size, size, -1], "mode": "trilinear"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SliceInferer", "roi_size": [size, size], "spatial_dim": 2,
                    "sw_batch_size": "@sw_batch_size", "progress": False},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": "@threshold"},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
                 "output_ext": ".nii.gz", "output_dtype": "$np.uint8", "resample": False,
                 "separate_folder": False, "writer": "NibabelWriter", "print_log": False},
            ],
        },
        "segment_batch": "$lambda batch, net=@network, inferer=@inferer, post=@postprocessing, device=@device: "
                         "[post(item) for item in monai.data.decollate_batch("
                         "{**batch, 'pred': inferer(batch['image'].to(device), net)})]",
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": ["$@load_weights", "$list(map(@segment_batch, @dataloader))"],
        "finalize": [],
    }


def _versions() -> dict[str, str]:
    import monai
    import nibabel
    import safetensors
    import torch

    import fedoap

    return {"monai": monai.__version__, "torch": torch.__version__.split("+")[0], "numpy": np.__version__,
            "fedoap": fedoap.__version__, "nibabel": nibabel.__version__, "safetensors": safetensors.__version__}


def bundle_metadata(card) -> dict[str, Any]:
    """``configs/metadata.json``: the fields of MONAI's bundle metadata schema, with the card and its provenance."""
    prep = card.preprocessing
    size = int(prep.image_size)
    versions = _versions()
    site = card.provenance.get("site", "a site")
    return {
        "schema": SCHEMA,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by fedoap {versions['fedoap']} export-bundle"},
        "monai_version": versions["monai"],
        "pytorch_version": versions["torch"],
        "numpy_version": versions["numpy"],
        "required_packages_version": {k: versions[k] for k in ("fedoap", "nibabel", "safetensors")},
        "name": f"fedoap_{prep.organ or 'tumour'}_{prep.modality}_segmentation".lower(),
        "task": f"{prep.organ or 'tumour'} tumour segmentation ({prep.modality}), personalized for {site}",
        "description": (f"The personalized {card.method.get('name', '')} model of {site} from a fedoap federation: a "
                        f"2D network applied slice by slice (last axis) to {prep.modality} NIfTI volumes, "
                        f"{size} x {size} slices, sigmoid > {prep.threshold}. The network class is fedoap's: install "
                        f"fedoap {versions['fedoap']} to run this bundle."),
        "authors": "fedoap export-bundle",
        "copyright": f"the site that trained it ({site})",
        "intended_use": "research; the site's own scans of the modality and organ it trained on",
        "data_source": f"the private data of {site} (never shared)",
        "data_type": "nibabel",
        "image_classes": f"single channel {prep.modality} volume (channel {prep.channel} of a 4D image), "
                         f"normalized per volume to [0, 1] ({prep.normalization})",
        "label_classes": "single channel, 1 is tumour, 0 is everything else",
        "pred_classes": "single channel, 1 is tumour, 0 is everything else",
        "eval_metrics": {k: card.provenance[k] for k in ("test_dice", "val_dice", "test_hd95")
                         if k in card.provenance},
        "references": ["Tashdeed et al., FedOAP, arXiv:2511.18847"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": prep.modality,
                                 "num_channels": 1, "spatial_shape": [size, size], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {"0": prep.modality}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1,
                                 "spatial_shape": [size, size], "dtype": "float32", "value_range": [],
                                 "is_patch_data": False, "channel_def": {"0": "tumour logit"}}},
        },
        "provenance": dict(card.provenance),
        "fedoap_card": json.loads(card.to_json()),
    }


def _readme(card, metadata: dict[str, Any]) -> str:
    prep = card.preprocessing
    return f"""# {metadata['name']}

{metadata['description']}

Exported by `fedoap export-bundle` from a personalized model file. Requirements: MONAI {metadata['monai_version']},
PyTorch, nibabel, safetensors and **fedoap {metadata['required_packages_version']['fedoap']}** (the network class
`{card.network['class_path']}` comes from it). The weights are `models/model.safetensors` (no pickle); they were fitted
to the site's patients: keep the bundle as private as the model file.

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/niftis --output_dir /path/to/masks
```

Every `*.nii.gz` / `*.nii` of `dataset_dir` gives `output_dir/<case>_seg.nii.gz`: uint8, 1 = tumour, the input's
shape and affine (the names `fedoap predict` writes). Add `--device "$torch.device('cpu')"` to force the CPU; a 4D
(channel-last) image is read at channel {prep.channel} (`--channel K` picks another).

## Pipeline

LoadImaged (nibabel), EnsureChannelFirstd, {metadata['image_classes']}, Resized to ({prep.image_size},
{prep.image_size}, slices), the network slice by slice along the last axis (SliceInferer), sigmoid, Invertd back to
the scan's size, threshold {prep.threshold}, SaveImaged. This is `fedoap predict`'s computation; the masks agree with
it up to floating-point rounding at the threshold (see fedoap.inference.bundle).

## Provenance

```json
{json.dumps(card.provenance, indent=2, sort_keys=True)}
```
"""


def export_bundle(model, out_dir: str | Path, *, overwrite: bool = False, source: Optional[str] = None) -> Path:
    """Write ``model`` (a :class:`fedoap.inference.model_file.PersonalizedModel`) as a MONAI bundle in ``out_dir``.

    Every file is written owner-only and atomically; the weights are the model's, in clear (the bundle has no key).

    Raises:
        ValueError: a 2D model or another slicing axis (see :func:`_check_exportable`).
        FileExistsError: ``out_dir`` is a file, or a non-empty folder and ``overwrite`` is False.
    """
    from fedoap.files import PRIVATE_FILE_MODE, make_private_dir, write_atomic
    from fedoap.inference.model_file import model_file_metadata
    from fedoap.site.outputs import model_bytes

    card = model.card
    _check_exportable(card, source or "the model")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty; choose another --out or pass --overwrite to replace the "
                              "bundle's files in it")
    metadata = bundle_metadata(card)
    files = {
        "configs/metadata.json": (json.dumps(metadata, indent=2) + "\n").encode(),
        "configs/inference.json": (json.dumps(inference_config(card), indent=2) + "\n").encode(),
        "models/model.safetensors": model_bytes(model.network.state_dict(), model_file_metadata(card)),
        "docs/README.md": _readme(card, metadata).encode(),
    }
    for name in BUNDLE_FILES:
        path = out / name
        make_private_dir(path.parent)
        write_atomic(path, files[name], PRIVATE_FILE_MODE)
    return out


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the site's personalized_model.safetensors (or .enc)")
    parser.add_argument("--out", required=True, help="the bundle's folder (new or empty)")
    parser.add_argument("--key", help="the site's at-rest key (<workspace>/local/fedoap_at_rest.key) for an "
                                      "encrypted model file; the bundle's weights are written in clear")
    parser.add_argument("--overwrite", action="store_true", help="replace the bundle's files in a non-empty --out")


def run(args: argparse.Namespace) -> None:
    """``fedoap export-bundle``: read the model (``--key`` for an encrypted one), write the bundle, say how to run it."""
    from fedoap.inference.model_file import open_model

    model = open_model(args.model, args.key)
    out = export_bundle(model, args.out, overwrite=args.overwrite, source=args.model)
    print(f"fedoap export-bundle: wrote {out} ({', '.join(BUNDLE_FILES)}); run it with:\n"
          f"  python -m monai.bundle run --config_file {out / 'configs/inference.json'} --bundle_root {out} "
          "--dataset_dir IN --output_dir OUT\n"
          f"(fedoap {_versions()['fedoap']} must be installed there; the weights are in clear: keep the bundle "
          "private)")
