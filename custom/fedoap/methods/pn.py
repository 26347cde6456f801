"""PN (Population Normalization): FedAvg on a network whose normalization layers learn their mean and variance as
trainable parameters instead of computing them from the mini-batch.

Implements Wang, Yi, Gong, He, Jin, Zhang, "Population Normalization for Federated Learning", CVPR 2025, as
FL-MedSegBench runs its "PN" method: the UNet built with ``norm='pn'``, plain local training, FedAvg on the server
(every key averaged by sample count). The layer is :class:`~fedoap.networks.population_norm.PopulationNorm`.

Choices the paper leaves open, fixed here:

- The backbone: PN replaces the normalization layers of the convolution blocks (and the adapter) of FedOAPNet:
  :class:`~fedoap.networks.norm_variants.PopulationNormFedOAPNet`; the attention block keeps its GroupNorm. Every
  other method keeps InstanceNorm, so PN differs from FedAvg only in the normalization layer.
- Everything is shared, the population statistics included (they are weights like any other: that is what makes
  the normalization layers identical on every site).
- The layer's own choices (variance parameterization, no running statistics, no artificial noise) are documented in
  ``fedoap.networks.population_norm``.
- DP-SGD: the layer treats every sample on its own, so per-sample gradients exist; Opacus computes them for this
  custom layer through its functorch fallback.
"""

from __future__ import annotations

from typing import Any

from fedoap.methods.fedavg import FedAvg
from fedoap.networks.norm_variants import PopulationNormFedOAPNet

__all__ = ["PN"]


class PN(FedAvg):
    """PN as a method object: FedAvg's sharing on the Population-Normalization variant of FedOAPNet."""

    name = "pn"

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": f"{PopulationNormFedOAPNet.__module__}.{PopulationNormFedOAPNet.__name__}",
                "args": dict(model_args)}
