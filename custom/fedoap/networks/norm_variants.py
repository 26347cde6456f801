"""FedOAPNet with another normalization layer, for the baselines that are defined by their normalization.

FedOAPNet normalizes every convolution block (and its adapter) with affine InstanceNorm, which has no running
statistics: on it SioBN would be FedAvg and PN would not exist. These subclasses change only the class attribute
``norm_layer`` (constructor, layout, partition and state-dict key names are FedOAPNet's; a BatchNorm variant adds the
``running_mean`` / ``running_var`` / ``num_batches_tracked`` buffers). The attention block keeps its GroupNorm, which
is part of the decoupled cross-attention design. The Population-Normalization variant also initializes its
convolutions as FL-MedSegBench's UNet does (``conv_init``): at initialization PN is the identity, so nothing rescales
the signal between the layers, and with PyTorch's default initialization it fades block by block until no gradient
reaches the encoder.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedoap.networks import population_norm  # noqa: F401  (registers "population" in MONAI's Norm factory)
from fedoap.networks.fedoap_net import FedOAPNet

__all__ = ["BatchNormFedOAPNet", "PopulationNormFedOAPNet", "CONV_INITS"]

#: how :class:`PopulationNormFedOAPNet` initializes its convolutions: ``"he"`` (FL-MedSegBench's ``Unet2D``: every
#: convolution weight ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, biases PyTorch's default) or
#: ``"pytorch"`` (PyTorch's default, as FedOAPNet)
CONV_INITS = ("he", "pytorch")


class BatchNormFedOAPNet(FedOAPNet):
    """FedOAPNet with ``nn.BatchNorm2d`` (affine, running statistics, PyTorch's momentum 0.1) in every convolution
    block and in the adapter; in eval mode it normalizes with the running statistics. Opacus cannot train it
    (BatchNorm mixes the samples of a batch). Same constructor arguments as :class:`FedOAPNet`."""

    norm_layer = ("batch", {})


class PopulationNormFedOAPNet(FedOAPNet):
    """FedOAPNet with :class:`~fedoap.networks.population_norm.PopulationNorm` (trainable mean and variance) in every
    convolution block and in the adapter. :class:`FedOAPNet`'s constructor arguments, and:

    Args:
        conv_init: one of :data:`CONV_INITS`. ``"he"`` (default): every convolution's weight (``Conv2d``, and the
            decoder's learned upsampling ``ConvTranspose2d``, which the benchmark's UNet does without) as the
            benchmark initializes it, so the signal keeps its scale through the network before the population
            statistics have learned it. ``"pytorch"``: PyTorch's default, which shrinks the activations about
            threefold per block, leaves the encoder's gradients ~1e-8 (width 16) and kills every adapter channel at
            width 4: the network does not train (the fast preset's PN Dice 0.083 was measured with it).

    Raises:
        ValueError: an unknown ``conv_init``, or as :class:`FedOAPNet`.
    """

    norm_layer = ("population", {})

    def __init__(self, *args: Any, conv_init: str = "he", **kwargs: Any) -> None:
        if conv_init not in CONV_INITS:
            raise ValueError(f"conv_init must be one of {CONV_INITS}, got {conv_init!r}")
        super().__init__(*args, **kwargs)
        self.conv_init = conv_init
        if conv_init == "he":
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
