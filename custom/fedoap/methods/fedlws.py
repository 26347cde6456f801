"""FedLWS: FedAvg's sharing and local training, with the server shrinking the aggregate layer by layer.

Implements Shi, Li, Zhao, Guo, Chang, "FedLWS: Federated Learning with Adaptive Layer-wise Weight Shrinking", ICLR
2025 (arXiv 2503.15111), on the same backbone and sharing as FedAvg (FedOAPNet, every parameter shared). The sites
train exactly as under FedAvg; the server (its rule :class:`fedoap.server.rules.FedLWSRule`) multiplies each layer
of the sample-weighted mean ``m`` by

    gamma_l = ||x_l|| / (||x_l|| + tau_l ||m_l - x_l||),
    tau_l   = clip(beta * mean_k ||u_k,l - mean_j u_j,l||, min_tau, max_tau),

with ``x`` the round's global model and ``u_k = x_k - x`` site ``k``'s update: no proxy data, no extra
communication.

Choices the paper leaves open, fixed here (constructor arguments, passed to the server through
:meth:`server_rule_args`; the defaults are the authors' code's): ``beta = 0.03``, ``min_tau = 0.01``,
``max_tau = 0.2``; a "layer" is a module's keys (its weight and bias, the layers the authors' walk over the state
dict forms; ``layers="key"``: every key), and a layer whose global norm is zero is not shrunk. See
``fedoap.server.rules.fedlws`` for the details.

Privacy: the server needs every site's parameters and the global model in clear, so homomorphic encryption is refused
(the rule is not ``linear``). Client-level DP of the update and DP-SGD compose with it (the server only post-processes
what the sites send).
"""

from __future__ import annotations

from typing import Any

from fedoap.methods.fedavg import FedAvg
from fedoap.server.rules import FedLWSRule

__all__ = ["FedLWS"]


class FedLWS(FedAvg):
    """FedLWS as a method object: FedAvg's sharing, loss and local training; the server rule
    :class:`~fedoap.server.rules.FedLWSRule`.

    Args:
        settings: the rule's hyperparameters (:meth:`fedoap.server.rules.FedLWSRule.check_args` declares them, with
            the authors' defaults): ``beta``, ``min_tau``, ``max_tau``, ``layers``.

    Raises:
        ValueError: an invalid argument (see :meth:`fedoap.server.rules.FedLWSRule.check_args`).
    """

    name = "fedlws"
    server_rule = FedLWSRule

    def __init__(self, **settings: Any) -> None:
        self.settings = self.server_rule.check_args(**settings)  # fail here, before any site starts

    def server_rule_args(self) -> dict[str, Any]:
        return dict(self.settings)
