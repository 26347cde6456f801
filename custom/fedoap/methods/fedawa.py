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
        settings: the rule's hyperparameters (:meth:`fedoap.server.rules.FedAWARule.check_args` declares them, with
            the authors' defaults): ``server_epochs``, ``server_lr``, ``server_optimizer``, ``reg_distance``,
            ``gamma``, ``logit_init``, ``aggregate_with``.

    Raises:
        ValueError: an invalid argument (see :meth:`fedoap.server.rules.FedAWARule.check_args`).
    """

    name = "fedawa"
    server_rule = FedAWARule

    def __init__(self, **settings: Any) -> None:
        self.settings = self.server_rule.check_args(**settings)  # fail here, before any site starts

    def server_rule_args(self) -> dict[str, Any]:
        return dict(self.settings)
