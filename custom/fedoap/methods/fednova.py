"""FedNova: FedAvg's sharing and local training, with the server averaging *normalized* updates.

Implements Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020, on the same backbone and sharing as FedAvg (FedOAPNet, every parameter shared). Site
``k`` runs ``tau_k`` local steps from the global ``x`` and sends its parameters ``x_k`` with ``tau_k`` (the Client
API's ``NUM_STEPS_CURRENT_ROUND``) and its sample count ``n_k``; the server (its rule
:class:`fedoap.server.rules.FedNovaRule`) applies

    x <- x - tau_eff * sum_k p_k d_k,   d_k = (x - x_k) / a_k,   p_k = n_k / sum_j n_j,   tau_eff = sum_k p_k tau_k.

With equal ``tau_k`` this is FedAvg; with unequal ones, a site that ran more steps no longer pulls the global model
towards its own optimum in proportion to its extra steps.

Choices the paper leaves open, fixed here:

- The normalizer ``a_k``. The paper's ``a_k`` depends on the local solver: ``tau_k`` for plain SGD, a geometric sum
  for SGD with momentum, another for proximal updates; it gives none for Adam(W). Every method here trains with AdamW,
  and FL-MedSegBench's FedNova for Adam (its ``SimpleFedNova4Adam``) counts ``a_k = tau_k``, as does the FedGS
  authors' AdamW variant. We do the same: ``a_k = tau_k``, the common approximation for adaptive local optimizers
  (AdamW's per-coordinate step sizes are not captured by any scalar ``a_k``).
- ``tau_eff = sum_k p_k tau_k`` (the paper's FedNova choice, and that of the authors' code without server momentum);
  the authors' optional server momentum (``gmf``) is not implemented.
- The rule applies to every shared key, parameters and (floating-point) buffers alike; FedOAPNet has no buffers.
- Homomorphic encryption is refused (the rule is not ``linear``): the server needs the global
  ``x`` in clear to form ``d_k`` and ``tau_eff`` from the clear step counts, while under HE it holds only ciphertext
  after the first round. (A linear variant exists, with sites sending ``x - d_k`` and a client-side rescaling by
  ``tau_eff`` after decryption, but it needs a client protocol change and is not implemented.) Client-level DP of the
  update and DP-SGD compose with it (the server only post-processes what sites send).
"""

from __future__ import annotations

from fedoap.methods.fedavg import FedAvg
from fedoap.server.rules import FedNovaRule

__all__ = ["FedNova"]


class FedNova(FedAvg):
    """FedNova as a method object: FedAvg's sharing, loss and local training; the server rule
    :class:`~fedoap.server.rules.FedNovaRule` (normalized averaging with ``a_k = tau_k``, see the module docstring)."""

    name = "fednova"
    server_rule = FedNovaRule
