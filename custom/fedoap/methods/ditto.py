"""Ditto: each site trains the global model for the federation and, next to it, a personal model kept near it.

Implements Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021,
on a pair of FedOAPNets (:class:`fedoap.networks.ditto_pair.DittoPair`: ``global_model`` and ``personal``). Every
step of the federated rounds minimizes, on the same batch,

    L(w) + L(v) + lambda/2 * ||v - w_g||^2,

with ``w`` the site's copy of the global model (sent to the server and averaged like FedAvg, by sample count), ``v``
the personal model (never sent) and ``w_g`` the global model received at the start of the round (a snapshot taken in
``begin_round``). The losses separate: ``w`` gets the gradient of ``L(w)`` only, ``v`` that of
``L(v) + lambda/2 ||v - w_g||^2`` only. One optimizer (AdamW over all parameters, as every method here) trains both;
AdamW is per-parameter, so this is exactly training the two models with two AdamWs, one step each per batch (the
authors' code also takes one personal and one global step per batch). The network's forward is the personal model's,
so the evaluation and the final fine-tuning act on the personal model (its global copy gets no gradient there).

Choices the paper leaves open, fixed here (each an argument):

- ``lam`` (lambda): the paper tunes it per data set (the authors' scripts use 1, chosen from {0.05, ..., 2});
  FL-MedSegBench sets ``mu = 0.001`` for Ditto (``main_seg.py``), the default here, as for FedProx.
- ``personal_init``: the authors' code starts every personal model as a copy of the initial global model
  (``"copy"``, default); the site then also sets it to the first global model it receives, so it starts from that
  model even if the server's initial model differs from the site's. FL-MedSegBench draws the personal model's
  initialization separately (``"independent"``; no copy then).
- The personal model takes as many local steps as the global one (the authors: the same local iterations for both;
  FL-MedSegBench: the same number of local epochs).
- The proximal term is in every step (FL-MedSegBench leaves it out of each epoch's first batch, a quirk not kept).

DP-SGD is refused (``dp_sgd_conflict``): the trainer's per-sample DP loss covers one loss of one output only.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from fedoap.methods.fedavg import FedAvg

__all__ = ["Ditto", "GLOBAL_PREFIX", "PERSONAL_PREFIX"]

#: state-dict prefixes of the site's global copy (the only shared part) and of the personal model
GLOBAL_PREFIX = "global_model."
PERSONAL_PREFIX = "personal."


class Ditto(FedAvg):
    """Ditto as a method object: only the global copy is shared; the personal model trains next to it with a proximal
    term towards the round's global model.

    Args:
        lam: lambda, weight of the proximal term, finite and ``>= 0``. Default 1e-3 (FL-MedSegBench).
        personal_init: ``"copy"`` (default, the authors') or ``"independent"`` (FL-MedSegBench).

    Raises:
        ValueError: ``lam`` negative or not a finite number, an unknown ``personal_init``; :meth:`step_loss` raises
            for a model that is not a :class:`DittoPair`.
    """

    name = "ditto"

    def __init__(self, lam: float = 1e-3, personal_init: str = "copy") -> None:
        if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        from fedoap.networks.ditto_pair import PERSONAL_INITS

        if personal_init not in PERSONAL_INITS:
            raise ValueError(f"personal_init must be one of {PERSONAL_INITS}, got {personal_init!r}")
        self.lam = lam
        self.personal_init = personal_init
        self._anchor: dict[str, Tensor] = {}
        self._started = False

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": "fedoap.networks.ditto_pair.DittoPair",
                "args": {**model_args, "personal_init": self.personal_init}}

    def shared_keys(self, model: nn.Module) -> list[str]:
        """The global copy's state-dict keys only."""
        return sorted(k for k in model.state_dict() if k.startswith(GLOBAL_PREFIX))

    def begin_round(self, model: nn.Module, global_shared: Mapping[str, Tensor]) -> None:
        """Snapshot ``w_g`` (the received global parameters, keyed by the personal model's parameter names); with
        ``personal_init="copy"``, the first call also copies the received global model into the personal one."""
        personal = {k: p for k, p in model.named_parameters() if k.startswith(PERSONAL_PREFIX)}
        anchor = {}
        for key, value in global_shared.items():
            target = PERSONAL_PREFIX + key[len(GLOBAL_PREFIX):]
            if key.startswith(GLOBAL_PREFIX) and target in personal:
                anchor[target] = torch.as_tensor(value).detach().to(
                    device=personal[target].device, dtype=personal[target].dtype).clone()
        self._anchor = anchor
        if not self._started and anchor:
            self._started = True
            if self.personal_init == "copy":
                with torch.no_grad():
                    for key, value in anchor.items():
                        personal[key].copy_(value)

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        """Whether the personal model was started (the anchor is taken again from every round's global model)."""
        return {"started": self._started}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """A resumed site keeps its trained personal model: it is not copied from the next global model again."""
        started = state.get("started")
        if not isinstance(started, bool):
            raise ValueError(f"Ditto's site state needs a boolean 'started', got {started!r}")
        self._started = started

    def proximal_term(self, model: nn.Module) -> Optional[Tensor]:
        """``lam/2 * ||v - w_g||^2`` over the personal parameters with a snapshot; None before the first round."""
        if not self._anchor:
            return None
        squares = [(param - self._anchor[key]).pow(2).sum()
                   for key, param in model.named_parameters() if key in self._anchor]
        return 0.5 * self.lam * torch.stack(squares).sum()

    def step_loss(self, model: nn.Module, images: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        """``L(global_model(x)) + L(personal(x)) + lam/2 ||v - w_g||^2``."""
        from fedoap.networks.ditto_pair import DittoPair

        if not isinstance(model, DittoPair):
            raise ValueError(f"Ditto trains a DittoPair (global copy and personal model), got {type(model).__name__}")
        loss = loss_fn(model.global_model(images), labels) + loss_fn(model.personal(images), labels)
        prox = self.proximal_term(model)
        return loss if prox is None else loss + prox

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        return ("trains a personal model next to the global one, with a proximal term of the weights (not of a "
                "sample) in the same step loss, which the trainer's per-sample DP-SGD loss and clipping do not cover")
