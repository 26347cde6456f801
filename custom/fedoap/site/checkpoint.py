"""A site's local state after each round, on disk, so that a job resumed after a crash continues the site where it
stopped instead of from its initial model (what never leaves the site: its local parameters, its optimizer's moments,
its DP accountants, the position of its random streams).

One file per round, ``<run folder>/fedoap/site_state_round_<r>.bin`` (:data:`fedoap.resume.SITE_STATE_PREFIX`),
written owner-only and atomically, AES-256-GCM encrypted under the site's at-rest key when it has one
(:func:`fedoap.privacy.at_rest.save_private`; the file name is bound to the ciphertext, so a file renamed to another
round does not decrypt). The state is as sensitive as the personalized model: it is a model fitted to the site's
patients. Only the newest :data:`KEEP_ROUNDS` rounds are kept.

Format, without pickle (opening a file never runs code): one safetensors file whose tensors are the state's tensors
and whose metadata holds the rest as JSON (``fedoap_state``): nested dicts, lists, strings, numbers, booleans and
None, where a tensor is ``{"__tensor__": name}``, a tuple ``{"__tuple__": [...]}``, a dict with keys that are not
plain strings ``{"__dict__": [[key, value], ...]}`` and a non-finite float ``{"__float__": "inf"}``, so that what
comes back is what went in (an optimizer's integer state keys, Opacus's ``(sigma, q, steps)`` history tuples).

A site's process-wide random streams (torch's CPU generator, which dropout draws from, and CUDA's; numpy's and
Python's global generators) are part of what a round leaves behind: :func:`global_rng_state` captures them and
:func:`set_global_rng_state` puts them back.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedoap.privacy.at_rest import load_private, save_private
from fedoap.resume import SITE_STATE_PREFIX

__all__ = [
    "KEEP_ROUNDS",
    "STATE_FORMAT",
    "state_path",
    "saved_rounds",
    "save_site_state",
    "load_site_state",
    "encode_state",
    "decode_state",
    "global_rng_state",
    "set_global_rng_state",
]

#: rounds whose state files are kept (the newest ones)
KEEP_ROUNDS = 3
#: recorded in the safetensors metadata of every state file
STATE_FORMAT = "fedoap-site-state/1"
_SUFFIX = ".bin"
_NAME = re.compile(rf"^{re.escape(SITE_STATE_PREFIX)}(0|[1-9][0-9]*){re.escape(_SUFFIX)}$")
_JSON_KEY = "fedoap_state"
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


# -- files ------------------------------------------------------------------------------------------------------------
def state_path(folder: str | os.PathLike, round_: int) -> Path:
    """``<folder>/site_state_round_<round_>.bin``."""
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"round must be an integer >= 0, got {round_!r}")
    return Path(folder) / f"{SITE_STATE_PREFIX}{round_}{_SUFFIX}"


def saved_rounds(folder: str | os.PathLike) -> list[int]:
    """The rounds with a state file in ``folder``, ascending ([] if the folder does not exist)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)


def _context(path: Path) -> str:
    """What the ciphertext is bound to: the purpose and the round, through the file's name."""
    return f"fedoap site state {path.name}"


def save_site_state(folder: str | os.PathLike, round_: int, state: Mapping[str, Any],
                    key: Optional[bytes] = None) -> Path:
    """Write the site's state after round ``round_`` (owner-only, atomically, encrypted when ``key`` is given), then
    remove the files of rounds older than the newest :data:`KEEP_ROUNDS` up to ``round_``.

    Raises:
        ValueError: a value of ``state`` that cannot be stored without pickle (names it), or a bad round or key.
        OSError: the folder cannot be written.
    """
    path = state_path(folder, round_)
    blob = encode_state({"round": round_, "state": dict(state)})
    save_private(path, blob, key=key, context=_context(path))
    kept = [r for r in saved_rounds(folder) if r <= round_][-KEEP_ROUNDS:]
    for old in saved_rounds(folder):
        if old < round_ and old not in kept:
            state_path(folder, old).unlink(missing_ok=True)
    return path


def load_site_state(folder: str | os.PathLike, max_round: int,
                    key: Optional[bytes] = None) -> Optional[tuple[int, dict[str, Any]]]:
    """The newest state in ``folder`` of a round ``<= max_round``, as ``(round, state)``; None if there is none.

    Raises:
        ValueError: the newest such file is unreadable, was changed, was written for another round or site (with the
            key), is not a state file, or holds pickle; the message names the file (an older one is not tried: a
            site silently going back rounds would under-count its DP-SGD steps).
    """
    rounds = [r for r in saved_rounds(folder) if r <= max_round]
    if not rounds:
        return None
    path = state_path(folder, rounds[-1])
    try:
        data = load_private(path, key=key, context=_context(path))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the site state: {err.strerror or err}") from None
    document = decode_state(data, str(path))
    if not isinstance(document, dict) or not isinstance(document.get("state"), dict):
        raise ValueError(f"{path}: not a site state (no 'state' object)")
    if document.get("round") != rounds[-1]:
        raise ValueError(f"{path}: holds the state of round {document.get('round')!r}, not of round {rounds[-1]}")
    return rounds[-1], document["state"]


# -- the format -------------------------------------------------------------------------------------------------------
def encode_state(state: Any) -> bytes:
    """``state`` as safetensors bytes (tensors) with the rest as JSON in the metadata (see the module docstring).

    Raises:
        ValueError: a value that is not a tensor, dict, list, tuple, str, int, float, bool or None (names its path).
    """
    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, tensors, set(), "state")
    text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    return save_safetensors(tensors, metadata={"format": "pt", "fedoap_format": STATE_FORMAT, _JSON_KEY: text})


def decode_state(data: bytes, where: str) -> Any:
    """Inverse of :func:`encode_state`.

    Raises:
        ValueError: ``data`` is not a site state file (pickle included), starting with ``where``.
    """
    try:
        tensors = load_safetensors(bytes(data))
        metadata = _metadata(bytes(data))
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not a fedoap site state file (safetensors): {err}") from None
    if metadata.get("fedoap_format") != STATE_FORMAT or not isinstance(metadata.get(_JSON_KEY), str):
        raise ValueError(f"{where}: not a {STATE_FORMAT} file (format {metadata.get('fedoap_format')!r})")
    try:
        return _decode(json.loads(metadata[_JSON_KEY]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: malformed site state: {err}") from None


def _metadata(data: bytes) -> dict[str, Any]:
    """The safetensors header's ``__metadata__`` (the file's first 8 bytes give the header's length)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + size].decode("utf-8"))
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("the header's __metadata__ is not an object")
    return metadata


def _encode(value: Any, tensors: dict[str, torch.Tensor], storages: set[int], where: str) -> Any:
    """The JSON form of ``value``; its tensors go into ``tensors`` (``storages``: the storages they use)."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = _own_cpu_tensor(value, storages)
        return {"__tensor__": name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, storages, f"{where}.{k}") for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors, storages, f"{where} key"),
                              _encode(v, tensors, storages, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise ValueError(f"{where}: a {type(value).__name__} cannot be stored in a site state without pickle")


def _own_cpu_tensor(value: torch.Tensor, taken: set[int]) -> torch.Tensor:
    """``value`` on the CPU, contiguous and the sole user of its storage (safetensors refuses shared storage: tied
    weights, views), copied only when it is not already so: a model's and an optimizer's tensors usually are, and
    copying them would double a checkpoint's cost. ``taken``: the storages already used (updated)."""
    tensor = value.detach()
    pointer = tensor.untyped_storage().data_ptr() if tensor.device.type == "cpu" else 0
    whole = (pointer != 0 and pointer not in taken and tensor.is_contiguous() and tensor.storage_offset() == 0
             and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
    if not whole:
        tensor = tensor.to("cpu", copy=True).contiguous()
        pointer = tensor.untyped_storage().data_ptr()
    if pointer:
        taken.add(pointer)
    return tensor


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag = next((t for t in _TAGS if t in value), None)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in value.items()}
    if len(value) != 1:
        raise ValueError(f"tagged value {tag} has other keys: {sorted(value)}")
    inner = value[tag]
    if tag == "__tensor__":
        return tensors[inner]
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in inner)
    if tag == "__float__":
        if inner not in ("inf", "-inf", "nan"):
            raise ValueError(f"unknown non-finite float {inner!r}")
        return float(inner)
    return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}


# -- process-wide random streams --------------------------------------------------------------------------------------
def global_rng_state() -> dict[str, Any]:
    """The process's global generators: torch's CPU (dropout, PBL's noise), every CUDA device's if CUDA is up, numpy's
    legacy global and Python's ``random``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_global_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what :func:`global_rng_state` captured (CUDA's only when this process has as many devices).

    Raises:
        ValueError: a malformed state.
    """
    try:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"malformed random-generator state: {err}") from None
