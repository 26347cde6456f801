"""FedAvg: every parameter of the backbone is shared and averaged by sample count.

Implements McMahan, Moore, Ramage, Hampson, Aguera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, on the same backbone as FedOAP (FedOAPNet), so that the two differ only in what is
shared and how the final fine-tuning is done. Like every method here, each site ends with the same local fine-tuning
budget (plain segmentation loss), so FedAvg is reported as a personalized model too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedoap.methods.base import FederatedMethod
from fedoap.server.rules import WeightedMean

__all__ = ["FedAvg", "FEDOAP_NET"]

#: the backbone every baseline trains (a class path: the server, which builds no network, never imports MONAI)
FEDOAP_NET = "fedoap.networks.fedoap_net.FedOAPNet"


class FedAvg(FederatedMethod):
    """FedAvg as a method object: nothing is local."""

    name = "fedavg"
    server_rule = WeightedMean

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": FEDOAP_NET, "args": dict(model_args)}

    def shared_keys(self, model: nn.Module) -> list[str]:
        return sorted(model.state_dict())

    def train_loss(self) -> nn.Module:
        from fedoap.losses import BCEDiceLoss

        return BCEDiceLoss()
