"""SioBN (SiloBN): BatchNorm's running statistics stay on the site; everything else, BatchNorm's affine weights
included, is shared and averaged by sample count.

Implements Andreux, du Terrail, Beguier, Tramel, "Siloed Federated Learning for Multi-Centric Histopathology
Datasets", MICCAI DART 2020 workshop (LNCS 12444), as FL-MedSegBench's "SioBN" (its server rule ``siobn``: every
key of a BN layer but ``running_mean`` / ``running_var`` / ``num_batches_tracked`` is averaged).

Choices the paper leaves open, fixed here:

- The backbone: FedOAPNet normalizes with affine InstanceNorm, which has no running statistics, so on it SioBN would
  be exactly FedAvg. SioBN therefore trains :class:`~fedoap.networks.norm_variants.BatchNormFedOAPNet`: the same
  network with ``nn.BatchNorm2d`` (PyTorch's defaults: affine, momentum 0.1, eps 1e-5, as the benchmark's UNet) in
  every convolution block and in the adapter; the attention block keeps its GroupNorm (shared, it has no statistics).
  Every other method keeps InstanceNorm, so SioBN differs from them in its normalization layer too.
- Local statistics: every persistent buffer of a BatchNorm layer (``running_mean``, ``running_var``,
  ``num_batches_tracked``); a site evaluates and fine-tunes with its own running statistics.
- DP-SGD: BatchNorm mixes the samples of a batch, so per-sample gradients do not exist and Opacus refuses the model
  (:attr:`SioBN.dp_sgd_conflict`); client-level DP of the update and HE apply as for FedAvg.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedoap.methods.fedavg import FedAvg

__all__ = ["SioBN", "batch_norm_statistics_keys"]


def batch_norm_statistics_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the persistent buffers (running statistics and batch counter) of every BatchNorm layer."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            prefix = f"{name}." if name else ""
            keys.update(prefix + key for key, _ in module.named_buffers(recurse=False)
                        if key not in module._non_persistent_buffers_set)
    return keys


class SioBN(FedAvg):
    """SioBN as a method object: BatchNorm running statistics local, every parameter shared."""

    name = "siobn"

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": "fedoap.networks.norm_variants.BatchNormFedOAPNet",
                "args": dict(model_args)}

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every state-dict key but the BatchNorm running statistics.

        Raises:
            ValueError: a model without BatchNorm layer (SioBN would be FedAvg on it).
        """
        local = batch_norm_statistics_keys(model)
        if not local:
            raise ValueError(f"SioBN needs BatchNorm layers with running statistics; {type(model).__name__} has none "
                             "(on it SioBN would be FedAvg)")
        return sorted(k for k in model.state_dict() if k not in local)

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        return ("trains a BatchNorm network: BatchNorm mixes the samples of a batch, so per-sample gradients (and "
                "Opacus) do not apply")
