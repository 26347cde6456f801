"""FedAWA: FedAvg's sharing and local training, with aggregation weights the server learns from the client vectors.

Implements Shi, Zhao, Zhang, Zhou, Guo, Chang, "FedAWA: Adaptive Optimization of Aggregation Weights in Federated
Learning Using Client Vectors", CVPR 2025 (arXiv 2503.15842), on the same backbone and sharing as FedAvg (FedOAPNet,
every parameter shared). The sites train exactly as under FedAvg; the server (its rule
:class:`fedoap.server.rules.FedAWARule`) keeps one weight logit per site and, every round, takes a few
gradient steps on

    sum_k lambda_k ||tau_k - sum_j lambda_j tau_j||_2 + sum_k lambda_k (1 - cos(x, x_k)),   lambda = softmax(logits),

with ``tau_k = x_k - x`` the site's client vector, then aggregates ``sum_k lambda_k x_k``.

Choices the paper leaves open, fixed here (each a constructor argument, passed to the server through
:meth:`server_rule_args`; the defaults are the authors' code's):

- The regularizer. The paper writes a distance between the *aggregate* and the global model; the authors' code sums
  the sites' distances weighted by ``lambda`` (``sum_k lambda_k d(x, x_k)``), with ``d`` the cosine distance (or
  ``"euc"``, the mean squared difference): we do as the code.
- The optimizer of the logits: Adam, lr 1e-3, betas (0.5, 0.999), built afresh every round, ``server_epochs = 1``
  step per round; the logits themselves persist from round to round (the authors keep them in a global variable;
  here the rule object, which lives as long as the job, keeps them).
- The logits start at the normalized sample weights ``p_k`` (so ``softmax(p)``, close to uniform, not ``p``):
  ``logit_init="weights"``; ``"log_weights"`` starts at FedAvg's weights exactly.
- The weights that aggregate are those of the last step's forward pass, before its update (the authors' code; with
  one step per round a round's descent first acts in the next round): ``aggregate_with="last_forward"``;
  ``"updated"`` uses the logits after the step.
- ``gamma`` multiplies the aggregate (the authors' option; 1 = none).
- Client vectors cover every shared key (FedOAPNet has no buffers; the authors' code takes the parameters).

Privacy: the server needs every site's parameters and the global model in clear, so homomorphic encryption is refused
(the rule is not ``linear``). Client-level DP of the update and DP-SGD compose with it (the server only post-processes
what the sites send). The server holds all K updates of a round at once (K times the shared size in float32).
"""

from __future__ import annotations

from typing import Any

from fedoap.methods.fedavg import FedAvg
from fedoap.server.rules import FedAWARule

__all__ = ["FedAWA"]


class FedAWA(FedAvg):
    """FedAWA as a method object: FedAvg's sharing, loss and local training; the server rule
    :class:`~fedoap.server.rules.FedAWARule`.

    Args:
        server_epochs: descent steps on the weight logits per round (authors: 1).
        server_lr: step size of the logits' optimizer (authors: 1e-3 with Adam).
        server_optimizer: ``"adam"`` (betas 0.5, 0.999) or ``"sgd"`` (momentum 0.9, weight decay 5e-4).
        reg_distance: ``"cos"`` or ``"euc"``.
        gamma: factor of the aggregate (1: none).
        logit_init: ``"weights"`` or ``"log_weights"``.
        aggregate_with: ``"last_forward"`` or ``"updated"``.

    Raises:
        ValueError: an invalid argument (see :meth:`fedoap.server.rules.FedAWARule.check_args`).
    """

    name = "fedawa"
    server_rule = FedAWARule

    def __init__(
        self,
        server_epochs: int = 1,
        server_lr: float = 1e-3,
        server_optimizer: str = "adam",
        reg_distance: str = "cos",
        gamma: float = 1.0,
        logit_init: str = "weights",
        aggregate_with: str = "last_forward",
    ) -> None:
        self.server_epochs = server_epochs
        self.server_lr = server_lr
        self.server_optimizer = server_optimizer
        self.reg_distance = reg_distance
        self.gamma = gamma
        self.logit_init = logit_init
        self.aggregate_with = aggregate_with
        self.server_rule.check_args(**self.server_rule_args())  # fail here, before any site starts

    def server_rule_args(self) -> dict[str, Any]:
        return {"server_epochs": self.server_epochs, "server_lr": self.server_lr,
                "server_optimizer": self.server_optimizer, "reg_distance": self.reg_distance, "gamma": self.gamma,
                "logit_init": self.logit_init, "aggregate_with": self.aggregate_with}
