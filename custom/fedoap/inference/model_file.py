"""A personalized model as one self-describing file: safetensors weights plus a JSON card in the same header.

A hospital that ends a job keeps ``personalized_model.safetensors``: the weights, and in the safetensors metadata
(key :data:`CARD_KEY`) everything needed to use them without NVFlare or the job's configuration: the network's class
and constructor arguments, the preprocessing the site trained with (modality, intensity normalization, slice size,
slicing axis, channel, threshold), the method and its shared/local partition, and provenance (job, site, rounds, the
epsilon the site spent, its test Dice). No pickle is involved: opening a model file runs no code, and the network
named in a card must be one of ``fedoap.networks`` (:data:`NETWORK_PACKAGE`), so a crafted card cannot make the
loader import an arbitrary module.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from fedoap.data.normalization import normalizer_args

__all__ = ["CARD_KEY", "CARD_VERSION", "NETWORK_PACKAGE", "Preprocessing", "ModelCard", "PersonalizedModel",
           "read_card", "load_model", "open_model", "resolve_device", "load_weights_into", "model_file_metadata",
           "save_model"]

#: the safetensors metadata key that holds the card (a JSON string)
CARD_KEY = "fedoap_card"
#: bumped when a card's meaning changes; a reader refuses a version it does not know
CARD_VERSION = 1
#: a card may only name networks of this package
NETWORK_PACKAGE = "fedoap.networks."
#: most bytes of a safetensors header read to find the card (the header lists every tensor; a few MB at most)
_MAX_HEADER_BYTES = 2**26


@dataclass(frozen=True)
class Preprocessing:
    """How a scan becomes the network's input, as the site trained: normalize the whole volume
    (:mod:`fedoap.data.normalization`), cut it into 2D slices along ``slice_axis``, resize each slice to
    ``image_size`` x ``image_size`` (bilinear); the mask is sigmoid(logit) > ``threshold``.

    Attributes:
        modality: the modality family the site's ``dataset.json`` declares ("CT", "MRI", "US", or the raw name).
        organ: the site's organ (picks the CT window).
        normalization: ``{"kind": "window"|"percentiles", ...}`` (:func:`fedoap.data.normalization.normalization_for`).
        image_size: the side of the square slices the network saw.
        slice_axis: the axis of a 3D volume cut into slices (the loader's: the last, 2).
        channel: the channel of a 4D (multi-modal, channel-last) image the site trained on.
        threshold: probability above which a pixel is tumour.
        volumetric: True when the site's images were 3D NIfTI volumes, False for 2D images (PNG/JPEG).
    """

    modality: str
    organ: str
    normalization: Mapping[str, Any]
    image_size: int
    slice_axis: int = 2
    channel: int = 0
    threshold: float = 0.5
    volumetric: bool = True

    def __post_init__(self) -> None:
        normalizer_args(self.normalization)  # raises on an unknown kind or bad bounds
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis!r}")
        if not isinstance(self.channel, int) or self.channel < 0:
            raise ValueError(f"channel must be a non-negative integer, got {self.channel!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {self.threshold!r}")


@dataclass(frozen=True)
class ModelCard:
    """Everything about a personalized model but its weights.

    Attributes:
        network: ``{"class_path": "fedoap.networks....", "args": {...}}`` (the method's ``model_spec``).
        preprocessing: how inputs are prepared (:class:`Preprocessing`).
        method: ``{"name": ..., "args": {...}}``.
        shared_keys: the state-dict keys the federation averaged; every other key stayed at the site.
        provenance: job id, site, rounds, epsilon spent, test/val Dice, ... (free-form JSON values).
        version: :data:`CARD_VERSION`.
    """

    network: Mapping[str, Any]
    preprocessing: Preprocessing
    method: Mapping[str, Any]
    shared_keys: tuple[str, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    version: int = CARD_VERSION

    def __post_init__(self) -> None:
        class_path = self.network.get("class_path") if isinstance(self.network, Mapping) else None
        if not isinstance(class_path, str) or not class_path.startswith(NETWORK_PACKAGE):
            raise ValueError(f"the card's network must be a class of {NETWORK_PACKAGE[:-1]}, got {class_path!r}")
        if not isinstance(self.network.get("args", {}), Mapping):
            raise ValueError("the card's network args must be a JSON object")
        if self.version != CARD_VERSION:
            raise ValueError(f"model card version {self.version!r} is not {CARD_VERSION}, the one this fedoap reads")

    def local_keys(self, state_dict: Mapping[str, Any]) -> list[str]:
        """The keys of ``state_dict`` that never left the site."""
        shared = set(self.shared_keys)
        return [k for k in state_dict if k not in shared]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        """Raises: ValueError when the text is not a card (names the problem)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the model card is not JSON: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError("the model card must be a JSON object")
        try:
            return cls(network=doc["network"], preprocessing=Preprocessing(**doc["preprocessing"]),
                       method=doc["method"], shared_keys=tuple(doc["shared_keys"]),
                       provenance=doc.get("provenance", {}), version=doc.get("version"))
        except KeyError as err:
            raise ValueError(f"the model card has no {err.args[0]!r}") from None
        except TypeError as err:
            raise ValueError(f"the model card is malformed: {err}") from None

    def build_network(self) -> nn.Module:
        """The card's network, freshly initialized (weights come from :func:`load_weights_into`).

        Raises:
            ValueError: the class does not exist in :data:`NETWORK_PACKAGE` or is not a network, or the arguments do
                not fit it.
        """
        module_name, _, class_name = self.network["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            raise ValueError(f"network {self.network['class_path']!r} does not exist in this fedoap") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)) \
                or not cls.__module__.startswith(NETWORK_PACKAGE):
            raise ValueError(f"{self.network['class_path']!r} is not a network (torch.nn.Module) of "
                             f"{NETWORK_PACKAGE[:-1]}")
        try:
            return cls(**dict(self.network.get("args", {})))
        except (TypeError, ValueError) as err:
            raise ValueError(f"network {class_name} refuses the card's arguments: {err}") from None


@dataclass
class PersonalizedModel:
    """A network with its personalized weights, in eval mode, and its card."""

    network: nn.Module
    card: ModelCard


def model_file_metadata(card: ModelCard) -> dict[str, str]:
    """The safetensors metadata that carries ``card`` (for :func:`fedoap.site.outputs.write_site_outputs`)."""
    return {CARD_KEY: card.to_json()}


def save_model(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], card: ModelCard,
               key: Optional[bytes] = None) -> Path:
    """Write a model file (owner-only, atomically; AES-256-GCM encrypted with a site's at-rest ``key``), the form a
    site writes after personalization.

    Raises:
        ValueError: the weights do not fit the card's network (checked before anything is written).
    """
    from fedoap.privacy.at_rest import save_private
    from fedoap.site.outputs import model_bytes, output_context

    load_weights_into(card.build_network(), state_dict, f"{path}: the card's network")
    path = Path(path)
    save_private(path, model_bytes(state_dict, model_file_metadata(card)), key=key, context=output_context(path))
    return path


def _header_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (an 8-byte little-endian length, then a JSON header)."""
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors model file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ValueError(f"{path} is not a safetensors model file (header length {length})")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors model file (header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _read(path: Path, key: Optional[bytes]) -> bytes:
    from fedoap.privacy.at_rest import load_private
    from fedoap.site.outputs import output_context

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    return load_private(path, key=key, context=output_context(path))


def read_card(path: str | os.PathLike, key: Optional[bytes] = None) -> ModelCard:
    """The card of a model file (encrypted at rest with the site's ``key``, or clear).

    Raises:
        FileNotFoundError: no such file.
        AtRestError: encrypted and no key, or the wrong one.
        ValueError: not a safetensors file, or one without a card (a model of the first version), or a bad card;
            the message names the file.
    """
    path = Path(path)
    return _card(_header_metadata(_read(path, key), path), path)


def _card(metadata: Mapping[str, str], path: Path) -> ModelCard:
    if CARD_KEY not in metadata:
        raise ValueError(f"{path} has no model card (key {CARD_KEY!r} in its safetensors metadata): it was written "
                         "by an older fedoap or another tool; its weights alone do not say how to use them")
    try:
        return ModelCard.from_json(metadata[CARD_KEY])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_weights_into(network: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``weights`` into ``network`` exactly: every key, every shape.

    Raises:
        ValueError: missing, unexpected or differently shaped tensors, with the first of each named, and ``source``
            (the file) in the message.
    """
    own = network.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape, file vs network", shapes))
                 if v]
        raise ValueError(f"{source}: the weights do not fit the network {type(network).__name__}: "
                         + "; ".join(parts))
    network.load_state_dict(dict(weights), strict=True)
    return network


def load_model(path: str | os.PathLike, key: Optional[bytes] = None,
               device: str | torch.device = "cpu") -> PersonalizedModel:
    """The personalized network of a model file, on ``device`` and in eval mode, with its card. No NVFlare needed.

    Raises:
        FileNotFoundError, AtRestError, ValueError: as :func:`read_card`, or weights that do not fit the card's network.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    data = _read(path, key)
    card = _card(_header_metadata(data, path), path)
    try:
        weights = load_safetensors(data)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors model file: {err}") from None
    try:
        network = card.build_network()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    network = load_weights_into(network, weights, str(path))
    return PersonalizedModel(network=network.to(device).eval(), card=card)


def resolve_device(name: Optional[str]) -> torch.device:
    """The torch device of a ``--device`` option (None: the CPU), checked by the run options' own rules: the name
    (:func:`fedoap.config.device_name`) and whether this machine has it (``TrainingOptions.require_device``).

    Raises:
        ValueError: a name that is not cpu, cuda, cuda:N or mps, or a device this machine does not have.
    """
    from fedoap.config import TrainingOptions, device_name

    name = name or "cpu"
    if device_name(name):
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or mps")
    TrainingOptions(device=name).require_device()
    return torch.device(name)


def open_model(path: str | os.PathLike, key_file: Optional[str | os.PathLike] = None,
               device: Optional[str | torch.device] = None) -> PersonalizedModel:
    """:func:`load_model` for a command's ``--model`` and ``--key``: an encrypted file given without ``--key`` is
    refused naming the option to use.

    Raises:
        FileNotFoundError, ValueError: no such file, an unreadable key, not a model file, weights that do not fit.
    """
    from fedoap.privacy.at_rest import AT_REST_KEY_FILE, AtRestError, load_key

    key = load_key(key_file) if key_file else None
    try:
        return load_model(path, key=key, device=device or "cpu")
    except AtRestError as err:
        if key is None and "encrypted" in str(err):
            raise ValueError(f"{path}: the model file is encrypted at rest; give it with --key FILE (the site's "
                             f"<workspace>/local/{AT_REST_KEY_FILE})") from None
        raise
