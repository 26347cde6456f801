"""JSON files a user reads: strict JSON (NaN/Inf become null), written atomically so a crash never leaves half a file
(owner-only on request, for results about a site's patients)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.files import PRIVATE_FILE_MODE, make_private_dir, write_atomic

__all__ = ["to_jsonable", "to_json_text", "write_json"]


def to_jsonable(value: Any) -> Any:
    """Plain Python values only: numpy scalars and arrays become numbers and lists, non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def to_json_text(data: Any) -> str:
    """``data`` as indented strict JSON text (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(data), indent=2, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any, *, private: bool = False) -> Path:
    """Write ``data`` as indented strict JSON through a unique temporary file and an atomic rename.

    The whole text is made before any file is touched, so data that cannot be serialized leaves the old file as it
    was. Each writer gets its own temporary file (two writers of the same path never mix their bytes; the last rename
    wins).

    Args:
        private: write an owner-only (0600) file in a folder created 0700, for results that describe a site's
            patients; otherwise the usual mode (0666 less the umask).
    """
    text = to_json_text(data).encode("utf-8")
    path = Path(path)
    if private:
        make_private_dir(path.parent)
        return write_atomic(path, text, PRIVATE_FILE_MODE)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, text, mode=None)
