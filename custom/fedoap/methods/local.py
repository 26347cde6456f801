"""Local-only training: the reference without federation. Nothing leaves a site.

Each site trains the same backbone as FedAvg (FedOAPNet) alone, for the same number of rounds and local epochs as
the federated methods (the rounds only pace the training: the server sends and receives no parameters), then gets
the same final fine-tuning budget. It is the lower reference of FL-MedSegBench and of every personalized-FL paper:
a federated method is worth its cost only where it beats this.
"""

from __future__ import annotations

from torch import nn

from fedoap.methods.fedavg import FedAvg
from fedoap.server.rules import NoAggregation

__all__ = ["LocalOnly"]


class LocalOnly(FedAvg):
    """Local-only training as a method object: no shared parameter; the null rule (``NoAggregation``) combines
    nothing."""

    name = "local"
    server_rule = NoAggregation

    def shared_keys(self, model: nn.Module) -> list[str]:
        return []

