"""FedAvg: every parameter of the backbone is shared and averaged by sample count.

Implements McMahan, Moore, Ramage, Hampson, Aguera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, on the same backbone as FedOAP (FedOAPNet), so that the two differ only in what is
shared and how the final fine-tuning is done. Like every method here, each site ends with the same local fine-tuning
budget (plain segmentation loss), so FedAvg is reported as a personalized model too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedoap.losses import BCEDiceLoss
from fedoap.methods.base import FederatedMethod
from fedoap.networks import FedOAPNet
from fedoap.server.rules import WeightedMean

__all__ = ["FedAvg"]


class FedAvg(FederatedMethod):
    """FedAvg as a method object: nothing is local."""

    name = "fedavg"
    server_rule = WeightedMean

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": f"{FedOAPNet.__module__}.{FedOAPNet.__name__}", "args": dict(model_args)}

    def shared_keys(self, model: nn.Module) -> list[str]:
        return sorted(model.state_dict())

    def train_loss(self) -> nn.Module:
        return BCEDiceLoss()
