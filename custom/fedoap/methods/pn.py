"""PN (Population Normalization): FedAvg on a network whose normalization layers learn their mean and variance as
trainable parameters instead of computing them from the mini-batch.

Implements Wang, Yi, Gong, He, Jin, Zhang, "Population Normalization for Federated Learning", CVPR 2025, as
FL-MedSegBench runs its "PN" method: the UNet built with ``norm='pn'``, plain local training, FedAvg on the server
(every key averaged by sample count). The layer is :class:`~fedoap.networks.population_norm.PopulationNorm`.

Choices the paper leaves open, fixed here:

- The backbone: PN replaces the normalization layers of the convolution blocks (and the adapter) of FedOAPNet:
  :class:`~fedoap.networks.norm_variants.PopulationNormFedOAPNet`; the attention block keeps its GroupNorm. Every
  other method keeps InstanceNorm, so PN differs from FedAvg in the normalization layer and in how the convolutions
  start (next point).
- The initialization (``conv_init``): the benchmark He-initializes every convolution of its UNet (``kaiming_normal_``,
  fan out, ReLU), for every method; FedOAPNet keeps PyTorch's default, which InstanceNorm makes harmless (it rescales
  every block) but PN, the identity at initialization, does not. Measured with PyTorch's default (32 x 32 discs,
  lr 1e-3): at width 8 the activations' standard deviation is 0.04 after the first block and 0.002 at the head
  (FedAvg: 0.5 and 0.4), the encoder's last block gets a gradient of 7.5e-9 (FedAvg: 0.07; exactly 0 at width 4,
  where every adapter channel is dead after its ReLU) and Dice after 30 steps is 0 at widths 4, 8 and 16: the fast
  preset's 0.083. With ``conv_init="he"`` (the default; the decoder's learned upsampling too): gradient 0.05-0.29,
  Dice after 30 steps 0.81-0.97, fast preset 0.321 +- 0.047 (FedAvg 0.710: PN fits faster and generalizes worse
  without per-image normalization). ``conv_init="pytorch"`` keeps the earlier network.
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

__all__ = ["PN"]


class PN(FedAvg):
    """PN as a method object: FedAvg's sharing on the Population-Normalization variant of FedOAPNet.

    Args:
        conv_init: how the network's convolutions start, one of
            :data:`~fedoap.networks.norm_variants.CONV_INITS`: ``"he"`` (default, the benchmark's) or ``"pytorch"``
            (PyTorch's default, with which PN does not train at lr 1e-3; see the module docstring).

    Raises:
        ValueError: an unknown ``conv_init``.
    """

    name = "pn"

    def __init__(self, conv_init: str = "he") -> None:
        from fedoap.networks.norm_variants import CONV_INITS

        if conv_init not in CONV_INITS:
            raise ValueError(f"conv_init must be one of {CONV_INITS}, got {conv_init!r}")
        self.conv_init = conv_init

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": "fedoap.networks.norm_variants.PopulationNormFedOAPNet",
                "args": {**model_args, "conv_init": self.conv_init}}
