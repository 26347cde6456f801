"""What a site keeps of a job (its personalized model, overlays of test images, per-image scores), private at rest.

These files never leave the site, and they are as sensitive as its data: the overlays are patient images, the model
was fitted to them, and the per-image Dice/HD95 scores (with the count of empty test slices) describe individual
patients. Every file is therefore written owner-only and atomically (:func:`fedoap.privacy.at_rest.save_private`),
and with the site's at-rest key (``<workspace>/local/fedoap_at_rest.key``) all three are AES-256-GCM encrypted; the
JSON too, since the server already receives the summary metrics it needs and nobody else should read the rest.

Formats (no pickle anywhere, so opening a file never runs code):

- ``personalized_model.safetensors``: the state dict as safetensors (``safetensors.torch``), metadata
  ``{"format": "pt", "fedoap_format": "fedoap-personalized-model/1", ...}``;
- ``overlays.npz``: ``image``, ``label``, ``pred`` arrays (``np.savez_compressed``; read with ``allow_pickle=False``);
- ``personalized.json``: the detailed results (strict JSON).

An encrypted file keeps its name plus ``.enc`` (``overlays.npz.enc``...): a tool that expects an npz or a JSON is
not handed ciphertext silently, and an operator sees which files need the key. Readers still decide by the file's
header, never by its name (:func:`fedoap.privacy.at_rest.load_private`). The plain name (without ``.enc``) is bound
to the ciphertext, so files swapped or renamed do not decrypt. Writing one variant removes the other, so a clear
copy never lingers next to an encrypted one.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedoap.jsonio import to_json_text
from fedoap.privacy.at_rest import load_private, save_private

__all__ = [
    "MODEL_FILE",
    "OVERLAYS_FILE",
    "DETAIL_FILE",
    "ENCRYPTED_SUFFIX",
    "MODEL_FORMAT",
    "SiteOutputs",
    "site_output_paths",
    "find_site_outputs",
    "write_site_outputs",
    "load_personalized_model",
    "load_overlays",
    "load_detail",
    "model_bytes",
    "output_context",
]

MODEL_FILE = "personalized_model.safetensors"
OVERLAYS_FILE = "overlays.npz"
DETAIL_FILE = "personalized.json"
#: appended to the name of a file encrypted with the site's at-rest key
ENCRYPTED_SUFFIX = ".enc"
#: recorded in the model file's safetensors metadata
MODEL_FORMAT = "fedoap-personalized-model/1"


@dataclass(frozen=True)
class SiteOutputs:
    """The paths of a site's three output files."""

    model: Path
    overlays: Path
    detail: Path


def site_output_paths(out_dir: str | os.PathLike, encrypted: bool) -> SiteOutputs:
    """Where the files go in ``out_dir``: the plain names, or with :data:`ENCRYPTED_SUFFIX` when encrypted."""
    suffix = ENCRYPTED_SUFFIX if encrypted else ""
    out_dir = Path(out_dir)
    return SiteOutputs(*(out_dir / f"{name}{suffix}" for name in (MODEL_FILE, OVERLAYS_FILE, DETAIL_FILE)))


def find_site_outputs(out_dir: str | os.PathLike) -> SiteOutputs:
    """The files a site wrote into ``out_dir``, encrypted or not.

    Raises:
        FileNotFoundError: the detailed results are in neither form (the site failed before writing them).
    """
    for encrypted in (True, False):
        paths = site_output_paths(out_dir, encrypted)
        if paths.detail.is_file():
            return paths
    raise FileNotFoundError(f"{Path(out_dir) / DETAIL_FILE} was not written (nor its encrypted form "
                            f"{DETAIL_FILE}{ENCRYPTED_SUFFIX})")


def output_context(path: Path) -> str:
    """What is bound to the ciphertext of a site output file: the file's plain name."""
    name = path.name[: -len(ENCRYPTED_SUFFIX)] if path.name.endswith(ENCRYPTED_SUFFIX) else path.name
    return f"fedoap site output {name}"


def model_bytes(state_dict: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]]) -> bytes:
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state_dict must map names to tensors; {bad[0]!r} does not")
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"model metadata must map strings to strings (safetensors); {bad[0]!r} does not")
    # own contiguous CPU copies: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    return save_safetensors(tensors, metadata={**extra, "format": "pt", "fedoap_format": MODEL_FORMAT})


def _overlay_bytes(overlays: Mapping[str, Any]) -> bytes:
    arrays = {}
    for name, value in overlays.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.dtype == object:
            raise ValueError(f"overlay {name!r} has dtype object, which npz can only store as pickle")
        arrays[str(name)] = array
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_site_outputs(
    out_dir: str | os.PathLike,
    *,
    state_dict: Mapping[str, torch.Tensor],
    overlays: Mapping[str, Any],
    detail: Mapping[str, Any],
    key: Optional[bytes] = None,
    model_metadata: Optional[Mapping[str, str]] = None,
) -> SiteOutputs:
    """Write the personalized model (safetensors), the overlays (npz) and the detailed results (JSON), each
    owner-only and atomically, all encrypted when ``key`` (the site's at-rest key) is given.

    Everything is serialized before the first file is written, so bad input leaves the folder as it was.

    Args:
        out_dir: the site's results folder (created 0700 if missing).
        state_dict: the personalized model's tensors.
        overlays: arrays by name (``image``, ``label``, ``pred``); no object arrays.
        detail: JSON-able results (see :func:`fedoap.jsonio.to_jsonable`).
        key: the site's at-rest key (:func:`fedoap.privacy.at_rest.find_site_key`), or None for clear files.
        model_metadata: strings recorded in the safetensors header, e.g. the method's name.

    Returns:
        the paths written.

    Raises:
        ValueError: a value that cannot be stored without pickle, non-string metadata, or a key that is not 32 bytes.
    """
    blobs = (model_bytes(state_dict, model_metadata), _overlay_bytes(overlays), to_json_text(detail).encode("utf-8"))
    paths = site_output_paths(out_dir, encrypted=key is not None)
    stale = site_output_paths(out_dir, encrypted=key is None)
    for path, old, blob in zip((paths.model, paths.overlays, paths.detail),
                               (stale.model, stale.overlays, stale.detail), blobs):
        save_private(path, blob, key=key, context=output_context(path))
        old.unlink(missing_ok=True)
    return paths


def _read(path: str | os.PathLike, key: Optional[bytes]) -> tuple[Path, bytes]:
    path = Path(path)
    return path, load_private(path, key=key, context=output_context(path))


def load_personalized_model(path: str | os.PathLike, key: Optional[bytes] = None) -> dict[str, torch.Tensor]:
    """The state dict written by :func:`write_site_outputs`; safetensors only, never pickle.

    Raises:
        AtRestError: the file is encrypted and no key (or the wrong key) was given, or it was changed.
        ValueError: the (decrypted) file is not a safetensors file.
    """
    path, data = _read(path, key)
    try:
        return load_safetensors(data)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors model file: {err}") from None


def load_overlays(path: str | os.PathLike, key: Optional[bytes] = None) -> dict[str, np.ndarray]:
    """The overlay arrays written by :func:`write_site_outputs` (read with ``allow_pickle=False``).

    Raises:
        AtRestError: the file is encrypted and no key (or the wrong key) was given, or it was changed.
        ValueError: the (decrypted) file is not an npz archive of plain arrays.
    """
    path, data = _read(path, key)
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not an npz archive of plain arrays: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an npz archive")
    with archive:
        try:
            return {name: archive[name] for name in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not an npz archive of plain arrays: {err}") from None


def load_detail(path: str | os.PathLike, key: Optional[bytes] = None) -> dict[str, Any]:
    """The detailed results written by :func:`write_site_outputs`.

    Raises:
        AtRestError: the file is encrypted and no key (or the wrong key) was given, or it was changed.
        ValueError: the (decrypted) file is not a JSON object.
    """
    path, data = _read(path, key)
    try:
        detail = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file: {err}") from None
    if not isinstance(detail, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(detail).__name__}")
    return detail
