"""Population Normalization: a normalization layer whose mean and variance are trainable parameters.

Implements the layer of Wang, Yi, Gong, He, Jin, Zhang, "Population Normalization for Federated Learning", CVPR 2025,
as FL-MedSegBench codes it (``models_dict/unet2d.py``, its "PN" method). BatchNorm normalizes with the statistics of
the mini-batch, which differ between heterogeneous sites and are noisy for small batches; PN instead learns the
population statistics by gradient descent, like any weight, so they are averaged by the server like any weight and a
sample's output never depends on the other samples of its batch (training and inference compute the same function).

Choices the paper leaves open (or that we could not read in it), fixed here:

- Variance parameterization: the benchmark uses the trainable variance as it is, ``sqrt(var + eps)``, which becomes
  NaN once gradient steps push ``var`` below ``-eps``. Here ``sqrt(|var| + eps)``: the same function wherever
  ``var >= 0``, and defined (with a gradient) everywhere.
- Running statistics: the benchmark's layer also tracks BatchNorm-style running averages of the batch statistics
  but never uses them; they are left out (no buffers).
- The paper's optional artificial noise on the statistics (to mimic BatchNorm's stochasticity with large batches) is
  not in the benchmark's code and its exact form was not available here: not implemented.

Importing this module registers the layer in MONAI's ``Norm`` factory under the name ``"population"``, so MONAI's
blocks build it from ``norm=("population", {})``.
"""

from __future__ import annotations

import math
import numbers

import torch
from monai.networks.layers.factories import Norm
from torch import nn

__all__ = ["PopulationNorm"]


class PopulationNorm(nn.Module):
    """
    ``y = (x - mean) / sqrt(|var| + eps) * weight + bias`` per channel, with ``mean`` and ``var`` trainable parameters
    (initialized to 0 and 1, i.e. the identity before training), for inputs ``(N, C, *spatial)``.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance, ``> 0``. Defaults to 1e-5 (as BatchNorm).
        affine: learn ``weight`` and ``bias`` after the normalization. Defaults to True.

    Raises:
        ValueError: ``num_features`` not a positive integer, ``eps`` not a finite number ``> 0``, or (in ``forward``)
            an input whose dimension 1 is not ``num_features``.

    Example::

        >>> pn = PopulationNorm(8)
        >>> pn(torch.randn(1, 8, 4, 4)).shape   # works with a batch of one: no batch statistics
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        c = int(num_features)
        self.population_mean = nn.Parameter(torch.zeros(c))
        self.population_var = nn.Parameter(torch.ones(c))
        if affine:
            self.weight = nn.Parameter(torch.ones(c))
            self.bias = nn.Parameter(torch.zeros(c))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != int(self.num_features):
            raise ValueError(f"expected input (N, {self.num_features}, ...), got shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.ndim - 2)
        std = torch.sqrt(self.population_var.abs() + float(self.eps))
        y = (x - self.population_mean.view(shape)) / std.view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


if "POPULATION" not in Norm.components:
    Norm.add_factory_callable("population", lambda dim=None: PopulationNorm, "Population Normalization (CVPR 2025)")
