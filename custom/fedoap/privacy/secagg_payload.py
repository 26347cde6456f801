"""What a site's masked update looks like on the wire, and the order of its values: one vector of the shared
parameters (sorted by state-dict key, flattened, times the site's aggregation weight), quantized and masked by
``fedoap.privacy.secagg``, sent as one int32 (or int64) tensor, the two's-complement view of the ring Z_2^32 (or
Z_2^64), under :data:`MASKED_KEY`. Site and server both import this; it imports nothing of either."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["MASKED_KEY", "flatten", "unflatten", "n_values", "to_params", "from_params"]

#: the one parameter key of a masked update
MASKED_KEY = "fedoap_secagg/masked"


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def flatten(params: Mapping[str, Any]) -> np.ndarray:
    """The shared parameters as one float64 vector, keys in sorted order (the order both sides use)."""
    if not params:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([_array(params[k]).ravel() for k in sorted(params)])


def n_values(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many values the shared parameters of these shapes hold."""
    return int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()))


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten`, as float32 tensors of ``shapes``.

    Raises:
        ValueError: the vector does not hold exactly as many values as the shapes.
    """
    if vector.size != n_values(shapes):
        raise ValueError(f"the vector holds {vector.size} values, the shared parameters {n_values(shapes)}")
    out, start = {}, 0
    for key in sorted(shapes):
        size = int(np.prod(shapes[key], dtype=np.int64))
        out[key] = torch.from_numpy(np.ascontiguousarray(vector[start:start + size], dtype=np.float32)
                                    .reshape(shapes[key]))
        start += size
    return out


_SIGNED = {np.dtype(np.uint32): np.int32, np.dtype(np.uint64): np.int64}
_UNSIGNED = {np.dtype(np.int32): np.uint32, np.dtype(np.int64): np.uint64, np.dtype(np.uint32): np.uint32,
             np.dtype(np.uint64): np.uint64}


def to_params(masked: np.ndarray) -> dict[str, torch.Tensor]:
    """A masked uint32/uint64 vector as the result's parameters (int32/int64: the same bits, a dtype every transport
    carries)."""
    masked = np.ascontiguousarray(masked)
    if masked.dtype not in _SIGNED:
        raise ValueError(f"a masked vector is uint32 or uint64, got {masked.dtype}")
    return {MASKED_KEY: torch.from_numpy(masked.view(_SIGNED[masked.dtype]))}


def from_params(params: Mapping[str, Any]) -> np.ndarray:
    """The masked unsigned vector of a result's parameters.

    Raises:
        ValueError: no :data:`MASKED_KEY`, or not a one-dimensional 32- or 64-bit integer vector.
    """
    if MASKED_KEY not in params:
        raise ValueError(f"no masked update ({MASKED_KEY!r}) in the parameters")
    value = params[MASKED_KEY]
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype not in _UNSIGNED or array.ndim != 1:
        raise ValueError(f"the masked update must be a 1-D 32- or 64-bit integer vector, got {array.dtype} of shape "
                         f"{array.shape}")
    return np.ascontiguousarray(array).view(_UNSIGNED[array.dtype])
