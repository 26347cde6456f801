"""Federated methods, selectable by name."""

from __future__ import annotations

from typing import Any

from fedoap.methods.base import FederatedMethod
from fedoap.methods.centralized import Centralized
from fedoap.methods.ditto import Ditto
from fedoap.methods.fedavg import FedAvg
from fedoap.methods.fedawa import FedAWA
from fedoap.methods.fedbn import FedBN
from fedoap.methods.feddp import FedDP
from fedoap.methods.fedgs import FedGS
from fedoap.methods.fedlws import FedLWS
from fedoap.methods.fedmepd import FedMEPD
from fedoap.methods.fednova import FedNova
from fedoap.methods.fedoap import FedOAP
from fedoap.methods.fedper import FedPer
from fedoap.methods.fedprox import FedProx
from fedoap.methods.fedrdn import FedRDN
from fedoap.methods.fedrep import FedRep
from fedoap.methods.fedrod import FedRoD
from fedoap.methods.local import LocalOnly
from fedoap.methods.moon import MOON
from fedoap.methods.pn import PN
from fedoap.methods.siobn import SioBN

#: every method by its command-line name, in the order the benchmark lists them (one line each)
METHODS: dict[str, type[FederatedMethod]] = {
    m.name: m
    for m in (
        FedOAP,
        LocalOnly,
        Centralized,
        FedAvg,
        FedProx,
        MOON,
        FedNova,
        FedAWA,
        FedLWS,
        FedRDN,
        PN,
        Ditto,
        FedBN,
        SioBN,
        FedPer,
        FedRep,
        FedRoD,
        FedDP,
        FedGS,
    )
}

#: methods of the multi-modal brain-tumour task only (``DataOptions.task = "brats-missing-modality"``): 3D networks with
#: their own baselines, kept out of :data:`METHODS` (the 2D organ-slice methods the benchmark and its contract cover)
VOLUME_METHODS: dict[str, type[FederatedMethod]] = {FedMEPD.name: FedMEPD}


def all_methods() -> dict[str, type[FederatedMethod]]:
    """Every method by name, whichever task it serves (read at call time: a registry entry added later counts)."""
    return {**METHODS, **VOLUME_METHODS}


__all__ = ["METHODS", "VOLUME_METHODS", "all_methods", "FederatedMethod", "get_method",
           *(cls.__name__ for cls in all_methods().values())]


def get_method(name: str, **kwargs: Any) -> FederatedMethod:
    """Instantiate a method by its command-line name."""
    methods = all_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(methods)}")
    return methods[name](**kwargs)
