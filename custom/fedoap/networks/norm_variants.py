"""FedOAPNet with another normalization layer, for the baselines that are defined by their normalization.

FedOAPNet normalizes every convolution block (and its adapter) with affine InstanceNorm, which has no running
statistics: on it SioBN would be FedAvg and PN would not exist. These subclasses change only the class attribute
``norm_layer`` (constructor, layout, partition and state-dict key names are FedOAPNet's; a BatchNorm variant adds the
``running_mean`` / ``running_var`` / ``num_batches_tracked`` buffers). The attention block keeps its GroupNorm, which
is part of the decoupled cross-attention design.
"""

from __future__ import annotations

from fedoap.networks import population_norm  # noqa: F401  (registers "population" in MONAI's Norm factory)
from fedoap.networks.fedoap_net import FedOAPNet

__all__ = ["BatchNormFedOAPNet", "PopulationNormFedOAPNet"]


class BatchNormFedOAPNet(FedOAPNet):
    """FedOAPNet with ``nn.BatchNorm2d`` (affine, running statistics, PyTorch's momentum 0.1) in every convolution
    block and in the adapter; in eval mode it normalizes with the running statistics. Opacus cannot train it
    (BatchNorm mixes the samples of a batch). Same constructor arguments as :class:`FedOAPNet`."""

    norm_layer = ("batch", {})


class PopulationNormFedOAPNet(FedOAPNet):
    """FedOAPNet with :class:`~fedoap.networks.population_norm.PopulationNorm` (trainable mean and variance) in every
    convolution block and in the adapter. Same constructor arguments as :class:`FedOAPNet`."""

    norm_layer = ("population", {})
