"""Segment one scan with a personalized model, exactly as its site's training saw scans.

The steps mirror :mod:`fedoap.data.loader`: the whole volume is normalized at once (the card's rule), cut into 2D
slices along the card's slicing axis and resized to the training size (bilinear, MONAI's ``Resize``); the network's
sigmoid probabilities are resized back to the scan's own slice size (bilinear) and thresholded, so the mask has the
scan's shape. ``fedoap predict``, ``fedoap evaluate`` and the exported MONAI bundle all go through these steps.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from monai.transforms import Resize
from monai.utils import convert_to_numpy

from fedoap.data.normalization import normalizer
from fedoap.inference.model_file import PersonalizedModel, Preprocessing

__all__ = ["to_network_input", "probabilities", "to_scan_size", "segment"]


def _as_slices(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """``(slices, H, W)`` float32 of a 2D ``(H, W)`` image or a 3D volume (slices along ``prep.slice_axis``)."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        return np.moveaxis(array, prep.slice_axis, 0)
    raise ValueError(f"expected a 2D image or a 3D volume, got shape {array.shape}")


def to_network_input(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The network's input ``(slices, 1, S, S)`` of a raw 2D image or 3D volume: normalized as a whole, then each
    slice resized to the training size."""
    slices = normalizer(prep.normalization)(_as_slices(image, prep))
    resized = Resize((prep.image_size, prep.image_size), mode="bilinear")(slices)
    return convert_to_numpy(resized, dtype=np.float32)[:, None]


@torch.no_grad()
def probabilities(model: PersonalizedModel, inputs: np.ndarray, batch_size: int = 32,
                  device: Optional[str | torch.device] = None) -> np.ndarray:
    """Sigmoid tumour probabilities ``(slices, 1, S, S)`` of network inputs, ``batch_size`` slices at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    network = model.network.eval()
    device = device or next(network.parameters()).device
    out = []
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size])).to(device)
        out.append(torch.sigmoid(network(batch)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, *inputs.shape[2:]), np.float32)


def to_scan_size(probs: np.ndarray, image_shape: tuple[int, ...], prep: Preprocessing) -> np.ndarray:
    """The ``uint8`` {0, 1} mask of the scan's shape: the probabilities resized back per slice (bilinear), then
    thresholded, and the slices put back along their axis."""
    spatial = tuple(image_shape[:2]) if len(image_shape) == 2 else \
        tuple(n for axis, n in enumerate(image_shape) if axis != prep.slice_axis)
    resized = convert_to_numpy(Resize(spatial, mode="bilinear")(probs[:, 0]), dtype=np.float32)
    mask = (resized > prep.threshold).astype(np.uint8)
    return mask[0] if len(image_shape) == 2 else np.moveaxis(mask, 0, prep.slice_axis)


def segment(model: PersonalizedModel, image: np.ndarray, batch_size: int = 32,
            device: Optional[str | torch.device] = None) -> np.ndarray:
    """The tumour mask (``uint8``, the image's shape) of one raw 2D image or 3D volume."""
    prep = model.card.preprocessing
    probs = probabilities(model, to_network_input(image, prep), batch_size, device)
    return to_scan_size(probs, tuple(np.shape(image)), prep)
