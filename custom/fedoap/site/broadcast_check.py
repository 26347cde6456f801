"""What a site checks of the global shared parameters before it trains on them: exactly its own shared keys, each a
dense tensor or array of a real dtype with its own shape, every value finite.

The server is trusted for the model it broadcasts (README, "Honest limits"), but a round whose aggregate went wrong
(a sum that overflowed under HE, a server bug, a poisoned or truncated message) must stop at the site boundary with
a message that names the key, not become NaN weights that the site trains on, evaluates and fine-tunes. The shapes
are the site's own (its trainer's shared parameters): the server and every site build the same initial network.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

__all__ = ["check_broadcast", "expected_shapes"]

_TORCH_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def expected_shapes(shared: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of every shared tensor of the site (``LocalTrainer.shared_params()``), what a broadcast must match."""
    return {str(k): tuple(int(d) for d in np.shape(v)) for k, v in shared.items()}


def check_broadcast(params: Mapping[str, Any], expected: Optional[Mapping[str, tuple[int, ...]]] = None) -> None:
    """Refuse a broadcast the site must not train on.

    Args:
        params: the global shared parameters in clear (decrypted under HE).
        expected: the site's shared keys and shapes (:func:`expected_shapes`); None checks types and values only.

    Raises:
        ValueError: a key the site does not share, a shared key that is missing, a value that is not a dense tensor
            or array of a real dtype, a wrong shape, or NaN/Inf (the message names the key).
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"the broadcast must be a dict of tensors, got a {type(params).__name__}")
    if expected is not None:
        unexpected = sorted(str(k) for k in params if k not in expected)
        if unexpected:
            raise ValueError(f"the broadcast holds {len(unexpected)} key(s) this site does not share, e.g. "
                             f"{unexpected[0]!r}")
        missing = sorted(k for k in expected if k not in params)
        if missing:
            raise ValueError(f"the broadcast lacks {len(missing)} shared key(s), e.g. {missing[0]!r}")
    for key, value in params.items():
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or not (value.is_floating_point() or value.dtype in _TORCH_INTS):
                raise ValueError(f"the broadcast's {key!r} is a {value.layout} tensor of dtype {value.dtype}, not "
                                 "dense real numbers")
            shape = tuple(value.shape)
            finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        elif isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiu":
                raise ValueError(f"the broadcast's {key!r} has dtype {value.dtype}, not real numbers")
            shape = value.shape
            finite = value.dtype.kind != "f" or bool(np.isfinite(value).all())
        else:
            raise ValueError(f"the broadcast's {key!r} is a {type(value).__name__}, not a tensor or array")
        if expected is not None and shape != tuple(expected[key]):
            raise ValueError(f"the broadcast's {key!r} has shape {shape}, this site's is {tuple(expected[key])}")
        if not finite:
            raise ValueError(f"the broadcast's {key!r} contains NaN or Inf")
