"""Centralized training on the pooled data: the upper reference, which no federation may run.

One model (the same backbone as FedAvg, FedOAPNet) trains on the union of every site's training split, for the same
number of rounds and local epochs as the federated methods (one epoch over the pooled data per local epoch, so it
takes as many steps as all the sites together). Model selection uses the union of the validation splits. At the end
every site fine-tunes its own copy of the pooled model on its own training split with the same fine-tuning budget as
every method (best epoch on its validation split) and is tested on its own test split, so the benchmark compares
every method on the same slices. FL-MedSegBench reports centralized training as the reference a federated method
tries to reach.

How it runs on the same engine: the simulation starts one NVFlare site (``pooled``) whose client script reads every
site's folder (``--pool-sites``); the null rule (``NoAggregation``) combines nothing. That one process seeing every
site's images is exactly what a real federation forbids: it exists for the comparison only, and it refuses HE and DP
(there is no update leaving a site to protect).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from fedoap.methods.fedavg import FedAvg
from fedoap.server.rules import NoAggregation

__all__ = ["Centralized", "POOLED_SITE"]

#: name of the single simulated site of the centralized reference
POOLED_SITE = "pooled"


class Centralized(FedAvg):
    """Centralized reference as a method object: the pooled data, nothing shared, the null rule."""

    name = "centralized"
    server_rule = NoAggregation
    pooled = True

    def shared_keys(self, model: nn.Module) -> list[str]:
        return []

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        return "is the centralized reference on pooled data: no update leaves a site, there is nothing to protect"
