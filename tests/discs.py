"""Tiny segmentation data for tests that train: bright discs on a dark, slightly noisy background."""

import numpy as np

from fedoap.data import SliceSet


def disc_split(n: int, seed: int, *, size: int = 32, radius: tuple[float, float] = (4.0, 7.0),
               slices_per_case: int = 1, prefix: str = "") -> SliceSet:
    """``n`` images of one disc (radius drawn in ``radius``), the disc as the label; every image has a lesion, so
    predicting nothing scores Dice 0. Consecutive images share a case id, ``slices_per_case`` at a time."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.float32)
        images.append((0.2 + 0.6 * disc + 0.05 * rng.standard_normal((size, size))).astype(np.float32))
        labels.append(disc)
    return SliceSet(np.stack(images)[:, None], np.stack(labels)[:, None],
                    [f"{prefix}c{i // slices_per_case}" for i in range(n)])
