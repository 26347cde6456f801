"""Small personalized model files for the inference tests (fedoap predict, export-bundle).

A federation is not needed to test inference: the network of a FedOAP run (width 8, 32 x 32 slices) is trained for a
few steps on one synthetic site, which takes seconds and gives masks that are neither empty nor full and overlap the
lesions (so that equality and Dice checks are not vacuous). Sites and weights are made once per test process.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from fedoap.config import RunConfig
from fedoap.data.loader import load_site
from fedoap.data.normalization import normalization_for
from fedoap.data.synthetic import ORGANS, generate_site
from fedoap.inference.model_file import ModelCard, Preprocessing, save_model

IMAGE_SIZE = 32
#: organ -> (cases, in-plane size, slices, training steps of BATCH slices)
SITES = {"brain": (5, 48, 8, 25), "breast": (12, 40, 1, 15)}
BATCH = 12


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="fedoap-inference-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.lru_cache(maxsize=None)
def site(organ: str) -> Path:
    """A small synthetic MSD site of ``organ`` (read-only for tests: copy files before changing them)."""
    cases, size, depth, _ = SITES[organ]
    return generate_site(_root() / organ, organ, n_cases=cases, size=size, depth=depth, seed=7)


@functools.lru_cache(maxsize=None)
def _trained(organ: str) -> tuple[dict[str, torch.Tensor], ModelCard]:
    cfg = RunConfig.from_options(method="fedoap", image_size=IMAGE_SIZE, width=8)
    network = cfg.build_model()
    method = cfg.method.instance
    data = load_site(site(organ), image_size=IMAGE_SIZE, split=(0.6, 0.2, 0.2))
    images, labels = torch.from_numpy(data.train.images), torch.from_numpy(data.train.labels)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    network.train()
    for _ in range(SITES[organ][3]):
        batch = torch.randint(0, len(images), (BATCH,), generator=generator)
        logits, target = network(images[batch]), labels[batch]
        probs = torch.sigmoid(logits)
        dice = (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + 1 - dice
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    modality = ORGANS[organ].modality
    card = ModelCard(network=method.model_spec(cfg.training.model_args()),
                     preprocessing=Preprocessing(modality=modality, organ=organ,
                                                 normalization=normalization_for(modality, organ),
                                                 image_size=IMAGE_SIZE, volumetric=ORGANS[organ].is_3d),
                     method={"name": "fedoap", "args": {}}, shared_keys=tuple(method.shared_keys(network)),
                     provenance={"site": organ, "job_id": "tests", "rounds": 0})
    return {k: v.detach().clone() for k, v in network.state_dict().items()}, card


def model_file(path: Path, organ: str = "brain", key: Optional[bytes] = None) -> Path:
    """Write the (cached) trained model of ``organ`` as a personalized model file, encrypted with ``key`` if given."""
    state, card = _trained(organ)
    return save_model(path, state, card, key=key)


def card_of(organ: str) -> ModelCard:
    return _trained(organ)[1]


def weights_of(organ: str) -> dict[str, torch.Tensor]:
    return _trained(organ)[0]
