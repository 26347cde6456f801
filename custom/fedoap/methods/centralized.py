"""Centralized training on the pooled data: the upper reference, which no federation may run.

One model (the same backbone as FedAvg, FedOAPNet) trains on the union of every site's training split, for the same
number of rounds and local epochs as the federated methods (one epoch over the pooled data per local epoch, so it
takes as many steps as all the sites together). Model selection uses the union of the validation splits. At the end
every site fine-tunes its own copy of the pooled model on its own training split with the same fine-tuning budget as
every method (best epoch on its validation split) and is tested on its own test split, so the benchmark compares
every method on the same slices. FL-MedSegBench reports centralized training as the reference a federated method
tries to reach.

How it runs on the same engine, all of its special handling here: the simulation starts one NVFlare site
(:data:`POOLED_SITE`) whose session reads every site's folder (the run configuration's ``pool_sites``) and trains on
:func:`pool_sites`; the null rule (``NoAggregation``) combines nothing; the simulation reads the pooled site's history
back per site with :func:`unpool_history`. That one process seeing every
site's images is exactly what a real federation forbids: it exists for the comparison only, and it refuses HE and DP
(there is no update leaving a site to protect).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from torch import nn

from fedoap.methods.fedavg import FedAvg
from fedoap.server.rules import NoAggregation

if TYPE_CHECKING:  # the data package (MONAI) only where sites are pooled, never on the server
    from fedoap.data import SiteData, SliceSet

__all__ = ["Centralized", "POOLED_SITE", "pool_sites", "unpool_history"]

#: name of the single simulated site of the centralized reference
POOLED_SITE = "pooled"


def _concat(parts: Sequence[tuple[str, SliceSet]]) -> SliceSet:
    from fedoap.data import SliceSet

    return SliceSet(images=np.concatenate([s.images for _, s in parts]),
                    labels=np.concatenate([s.labels for _, s in parts]),
                    case_ids=[f"{site}/{c}" for site, s in parts for c in s.case_ids])


def pool_sites(sites: Sequence[SiteData]) -> SiteData:
    """The pooled site's data: every site's train, validation and test splits, each the union of the sites' splits
    of the same name (the per-site splits are unchanged, so every method is tested on the same slices)."""
    from fedoap.data import SiteData

    return SiteData(name=POOLED_SITE, organ="+".join(d.organ for d in sites),
                    modality="+".join(d.modality for d in sites),
                    train=_concat([(d.name, d.train) for d in sites]),
                    val=_concat([(d.name, d.val) for d in sites]),
                    test=_concat([(d.name, d.test) for d in sites]))


def unpool_history(history: dict[str, Any], sites: Sequence[str]) -> dict[str, Any]:
    """The pooled site's server history in the per-site form of every other method: per round, the pooled model's
    validation and test Dice on each site's splits (reported as ``val_dice/<site>``), no upload; and each site's
    personalized results (reported as ``<metric>/<site>``)."""
    history = copy.deepcopy(history)
    for record in history["rounds"]:
        pooled = record["sites"].get(POOLED_SITE, {})
        record["sites"] = {site: {**{k: v for k, v in pooled.items() if "/" not in k},
                                  "val_dice": pooled.get(f"val_dice/{site}"), "test_dice": pooled.get(f"test_dice/{site}"),
                                  "bytes_uploaded": 0} for site in sites}
    pooled = history.get("personalized", {}).get(POOLED_SITE)
    if pooled is not None:
        history["personalized"] = {site: {k.rsplit("/", 1)[0]: v for k, v in pooled.items() if k.endswith(f"/{site}")}
                                   for site in sites}
    return history


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
