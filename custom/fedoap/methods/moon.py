"""MOON: model-contrastive federated learning, a contrastive term that pulls each site's representation towards the
global model's and away from the site's previous local model's.

Implements Li, He, Song, "Model-Contrastive Federated Learning", CVPR 2021, on the same backbone and sharing as
FedAvg (FedOAPNet, every parameter shared, sample-weighted mean). The local loss of every step of the federated
rounds is

    L = L_seg(model(x), y) + mu * l_con,
    l_con = -log( exp(sim(z, z_glob)/T) / (exp(sim(z, z_glob)/T) + exp(sim(z, z_prev)/T)) ),

averaged over the batch, with ``sim`` the cosine similarity and ``z``, ``z_glob``, ``z_prev`` the representation of
each image by the site's current model, by the round's global model (a frozen copy taken in ``begin_round``, right
after the server's parameters were loaded) and by the site's model at the end of its previous round (a frozen copy
taken in ``end_round``).

Choices the paper leaves open, fixed here (each an argument):

- The representation (``feature_module``, ``pooling``): the paper uses the output of a projection head (a 2-layer
  MLP after the classifier's pooled features). For segmentation FL-MedSegBench (``client_funct_seg.py``,
  ``models_dict/unet2d.py``) takes the decoder's last feature map, the input of the 1x1 output convolution, flattened
  per image, with no projection head. FedOAPNet's head input is the output of its spatial adapter, so the default is
  the output of module ``"adapter"``, flattened (``pooling="flatten"``); ``pooling="mean"`` averages each channel
  over the image instead (a ``C``-dimensional representation). The features are read with a forward hook on the
  named module; the network's forward is unchanged.
- ``mu`` (0.01) and ``temperature`` (0.5): FL-MedSegBench's values (``main_seg.py`` sets ``mu = 0.01`` for MOON; the
  temperature 0.5 is also the paper's default). The paper uses mu = 5 (CIFAR-10) and 1 (CIFAR-100, Tiny-ImageNet).
- The first round: the authors' code has no previous model in the first round (its model pool starts empty, so the
  contrastive logits hold only the positive and the term is 0). Here too the term is left out until the site has
  finished one round. (FL-MedSegBench uses the site's initial model as the first "previous" model; here that is the
  first global model itself, for which the term is the constant log 2 with zero gradient: the same training.)
- One previous model (the paper's buffer size 1).
- The term is added in every step of the federated rounds, with the same optimizer (AdamW) as every method; the
  final fine-tuning uses the plain segmentation loss (it personalizes, away from the global model).

DP-SGD is refused (``dp_sgd_conflict``): the trainer's per-sample DP loss covers one loss of the model output only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedoap.methods.fedavg import FedAvg

__all__ = ["MOON", "POOLINGS", "model_contrastive_loss", "representation"]

#: how a feature map becomes one vector per image: flattened (FL-MedSegBench) or averaged over the spatial positions
POOLINGS = ("flatten", "mean")


def model_contrastive_loss(z: Tensor, z_glob: Tensor, z_prev: Tensor, temperature: float = 0.5) -> Tensor:
    """MOON's ``l_con`` averaged over the batch.

    Args:
        z, z_glob, z_prev: ``(B, D)`` representations by the current, the global and the previous model.
        temperature: ``T > 0``.

    Returns:
        ``mean_i -log( e^{s_g,i/T} / (e^{s_g,i/T} + e^{s_p,i/T}) )`` with ``s_g,i = cos(z_i, z_glob,i)`` and
        ``s_p,i = cos(z_i, z_prev,i)``; lower when ``z`` is nearer ``z_glob`` than ``z_prev``.

    Raises:
        ValueError: tensors that are not ``(B, D)`` of one shape, or a temperature that is not positive.
    """
    if z.dim() != 2 or z.shape != z_glob.shape or z.shape != z_prev.shape:
        raise ValueError(f"z, z_glob and z_prev must be (B, D) of one shape, got {tuple(z.shape)}, "
                         f"{tuple(z_glob.shape)}, {tuple(z_prev.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = torch.stack([F.cosine_similarity(z, z_glob, dim=1), F.cosine_similarity(z, z_prev, dim=1)], dim=1)
    return -torch.log_softmax(logits / temperature, dim=1)[:, 0].mean()


def _pool(feature: Tensor, pooling: str) -> Tensor:
    if pooling == "mean" and feature.dim() > 2:
        return feature.flatten(2).mean(dim=2)
    return feature.flatten(1)


@contextlib.contextmanager
def _capture(model: nn.Module, module_name: str) -> Iterator[dict[str, Tensor]]:
    """Record the output of ``model``'s submodule ``module_name`` during the forward passes inside the block."""
    modules = dict(model.named_modules())
    if module_name not in modules:
        raise ValueError(f"{type(model).__name__} has no module named {module_name!r}")
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        captured["feature"] = output

    handle = modules[module_name].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def representation(model: nn.Module, images: Tensor, module_name: str = "adapter",
                   pooling: str = "flatten") -> tuple[Tensor, Tensor]:
    """The model's output and its ``(B, D)`` representation of ``images``: the output of submodule ``module_name``,
    pooled per image (``pooling`` in :data:`POOLINGS`)."""
    with _capture(model, module_name) as captured:
        output = model(images)
    if "feature" not in captured:
        raise ValueError(f"module {module_name!r} was not called in the forward pass of {type(model).__name__}")
    return output, _pool(captured["feature"], pooling)


def _frozen_copy(model: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(model).eval()
    for param in frozen.parameters():
        param.requires_grad_(False)
    return frozen


class MOON(FedAvg):
    """MOON as a method object: FedAvg's sharing; the segmentation loss plus ``mu`` times the model-contrastive term.

    Args:
        mu: weight of the contrastive term, finite and ``>= 0`` (0 is FedAvg). Default 0.01 (FL-MedSegBench).
        temperature: ``T`` of the contrastive term, finite and ``> 0``. Default 0.5 (paper and FL-MedSegBench).
        feature_module: name of the submodule whose output is the representation. Default ``"adapter"`` (the input of
            FedOAPNet's output head, FL-MedSegBench's choice).
        pooling: ``"flatten"`` (every value of the feature map, FL-MedSegBench) or ``"mean"`` (each channel averaged
            over the image).

    Raises:
        ValueError: a ``mu`` or ``temperature`` out of range, an empty ``feature_module``, or an unknown ``pooling``;
            the first step also raises if the model has no module ``feature_module``.
    """

    name = "moon"

    def __init__(self, mu: float = 0.01, temperature: float = 0.5, feature_module: str = "adapter",
                 pooling: str = "flatten") -> None:
        for label, value, positive in (("mu", mu, False), ("temperature", temperature, True)):
            if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0 or (positive and value == 0)):
                raise ValueError(f"{label} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        if not isinstance(feature_module, str) or not feature_module:
            raise ValueError(f"feature_module must be a module name like 'adapter', got {feature_module!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.mu = mu
        self.temperature = temperature
        self.feature_module = feature_module
        self.pooling = pooling
        self._global: Optional[nn.Module] = None
        self._previous: Optional[nn.Module] = None

    def begin_round(self, model: nn.Module, global_shared: Mapping[str, Tensor]) -> None:
        """Keep a frozen copy of the round's global model (the site's model right after the server's parameters were
        loaded)."""
        self._global = _frozen_copy(model)

    def end_round(self, model: nn.Module) -> None:
        """Keep a frozen copy of the site's model at the end of its round: the next round's previous model."""
        self._previous = _frozen_copy(model)

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        """The previous round's model (the global one is taken again from every round's received parameters)."""
        return {"previous": None if self._previous is None else dict(self._previous.state_dict())}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """The previous round's model, frozen, from its saved parameters."""
        previous = state.get("previous")
        if previous is None:
            self._previous = None
            return
        frozen = _frozen_copy(model)
        try:
            frozen.load_state_dict(previous)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"MOON's saved previous model does not fit: {' '.join(str(err).split())[:200]}") from None
        self._previous = frozen

    def step_loss(self, model: nn.Module, images: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        """``loss_fn(model(x), y) + mu * l_con``; the segmentation loss alone before the site's first round ended (no
        previous model yet) or with ``mu = 0``."""
        output, z = representation(model, images, self.feature_module, self.pooling)
        loss = loss_fn(output, labels)
        if self._previous is None or self._global is None or self.mu == 0:
            return loss
        with torch.no_grad():
            _, z_glob = representation(self._global, images, self.feature_module, self.pooling)
            _, z_prev = representation(self._previous, images, self.feature_module, self.pooling)
        return loss + self.mu * model_contrastive_loss(z, z_glob, z_prev, self.temperature)

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        return ("adds a model-contrastive term computed with frozen copies of the global and the previous model to "
                "each step's loss, which the trainer's per-sample DP-SGD loss does not cover")
