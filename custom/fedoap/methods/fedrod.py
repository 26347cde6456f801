"""FedRoD: a shared generic model and, on the site, a personal head whose logits add to the generic head's.

Implements Chen, Chao, "On Bridging Generic and Personalized Federated Learning for Image Classification", ICLR 2022
(FedRoD), on FedOAPNet with a personal head (:class:`fedoap.networks.fedrod_net.FedRoDNet`). Every step of the
federated rounds minimizes

    L_generic(g) + L_personal(g.detach() + p),

with ``g`` the generic logits (body + generic head ``head``) and ``p`` the personal head's logits on the *detached*
input of ``head``: the body and the generic head learn from the generic loss only, the personal head from the
personalized loss only. The server averages everything but the personal head (FedAvg's sharing, sample-weighted
mean); FedOAPNet's spatial adapter is part of the shared body here, as in every baseline. The personalized prediction
(the network's forward, used by the evaluation and the final fine-tuning) is ``g + p``.

One optimizer (AdamW over all parameters, as every method here) trains both parts: AdamW is per-parameter and the two
losses reach disjoint parameters, so this equals training the personal head with its own AdamW after the body's step
(the benchmark's order); the personal head reads the features of the same forward pass (before the body's step).

Choices the paper leaves open, fixed here (each an argument):

- ``generic_loss``: the paper trains the generic head with a balanced softmax (logits shifted by the log of the
  site's class counts) against label imbalance across sites. FL-MedSegBench's FedRoD for segmentation
  (``client_funct_seg.py``) uses its plain segmentation loss (Dice + BCE) for both heads; that is the default
  (``"plain"``). ``"balanced"`` is the balanced softmax for one sigmoid logit: with ``n_fg``, ``n_bg`` the site's
  foreground and background pixel counts, ``sigmoid(z + log(n_fg / n_bg))`` is exactly the balanced softmax of the
  logits ``(z, 0)``, so the generic loss is the segmentation loss of ``z + log((n_fg + 1) / (n_bg + 1))``; the counts
  are those of every training batch the site has seen so far (they never leave the site). The prediction uses the
  unshifted ``z``.
- ``personal_init``: the personal head starts as a copy of the generic head (FL-MedSegBench and PFLlib copy it);
  ``"zeros"`` makes the first personalized prediction equal the generic one.
- The personal loss is the method's segmentation loss (the benchmark's too).

DP-SGD is refused (``dp_sgd_conflict``): the trainer's per-sample DP loss covers one loss of one output only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from fedoap.methods.fedavg import FedAvg

__all__ = ["FedRoD", "GENERIC_LOSSES", "balanced_logits", "PERSONAL_PREFIX"]

#: the generic head's loss: the plain segmentation loss (FL-MedSegBench) or its binary balanced-softmax form
GENERIC_LOSSES = ("plain", "balanced")
#: the state-dict prefix of the personal head, the one part that is never shared
PERSONAL_PREFIX = "personal_head."


def balanced_logits(logits: Tensor, n_foreground: float, n_background: float) -> Tensor:
    """Binary balanced softmax: ``logits + log((n_foreground + 1) / (n_background + 1))`` (counts smoothed by 1)."""
    return logits + math.log((n_foreground + 1.0) / (n_background + 1.0))


class FedRoD(FedAvg):
    """FedRoD as a method object: a generic model shared like FedAvg's, a personal head kept on the site.

    Args:
        generic_loss: ``"plain"`` (default, FL-MedSegBench) or ``"balanced"`` (binary balanced softmax, see the module
            docstring).
        personal_init: ``"copy"`` (default) or ``"zeros"``: how the personal head starts.

    Raises:
        ValueError: an unknown ``generic_loss`` or ``personal_init``; :meth:`step_loss` raises for a model that is not
            a :class:`FedRoDNet`.
    """

    name = "fedrod"

    def __init__(self, generic_loss: str = "plain", personal_init: str = "copy") -> None:
        if generic_loss not in GENERIC_LOSSES:
            raise ValueError(f"generic_loss must be one of {GENERIC_LOSSES}, got {generic_loss!r}")
        from fedoap.networks.fedrod_net import PERSONAL_INITS

        if personal_init not in PERSONAL_INITS:
            raise ValueError(f"personal_init must be one of {PERSONAL_INITS}, got {personal_init!r}")
        self.generic_loss = generic_loss
        self.personal_init = personal_init
        #: foreground and background pixels of the training batches seen so far (``"balanced"`` only)
        self.pixel_counts = [0.0, 0.0]

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": "fedoap.networks.fedrod_net.FedRoDNet",
                "args": {**model_args, "personal_init": self.personal_init}}

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every state-dict key but the personal head's."""
        return sorted(k for k in model.state_dict() if not k.startswith(PERSONAL_PREFIX))

    def _generic(self, generic: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        if self.generic_loss == "plain":
            return loss_fn(generic, labels)
        foreground = float((labels.detach() > 0.5).sum())
        self.pixel_counts[0] += foreground
        self.pixel_counts[1] += labels.numel() - foreground
        return loss_fn(balanced_logits(generic, *self.pixel_counts), labels)

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        """The pixel counts of the training batches seen so far (the balanced generic loss's class prior)."""
        return {"pixel_counts": [float(c) for c in self.pixel_counts]}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        counts = state.get("pixel_counts")
        if (not isinstance(counts, list) or len(counts) != 2
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                           for c in counts)):
            raise ValueError(f"FedRoD's site state needs two pixel counts >= 0, got {counts!r}")
        self.pixel_counts = [float(c) for c in counts]

    def step_loss(self, model: nn.Module, images: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        """``L_generic(g) + L_personal(g.detach() + p)``."""
        from fedoap.networks.fedrod_net import FedRoDNet

        if not isinstance(model, FedRoDNet):
            raise ValueError(f"FedRoD trains a FedRoDNet (generic and personal head), got {type(model).__name__}")
        generic, personal = model.generic_and_personal(images)
        return self._generic(generic, labels, loss_fn) + loss_fn(generic.detach() + personal, labels)

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        return ("trains two heads with two losses per step (the body and generic head on the generic logits, the "
                "personal head on the personalized logits), which the trainer's per-sample DP-SGD loss does not cover")
