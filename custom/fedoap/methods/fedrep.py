"""FedRep: a shared body (representation) averaged by the server and a local head; each round trains the head with
the body frozen, then the body with the head frozen.

Implements Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for Personalized Federated
Learning", ICML 2021, on the same backbone as FedAvg (FedOAPNet); the body is averaged by sample count.

Choices the paper leaves open, fixed here:

- Which layers are the head: the paper's head is the last linear layer; here, as for FedPer, FedOAPNet's output layer
  ``head`` by default, other module prefixes through ``personal_prefixes``.
- The split of a round: the authors' code trains the head for ``local_ep - local_rep_ep`` epochs, then the body for
  ``local_rep_ep`` epochs (its CIFAR-10 scripts: 11 and 1, i.e. 10 head epochs per body epoch; its CIFAR-100,
  FEMNIST and Sent140 scripts: 15 and 5). Every method here gets the same number of local steps per round, so the
  split is a fraction of the round's steps: the first ``round(head_fraction * steps)`` steps train the head, the rest
  the body. Default ``head_fraction = 10/11`` (the authors' CIFAR-10 ratio). Each phase keeps at least one step when
  the round has two or more; a round of a single step trains the body (otherwise the site would send an unchanged
  body). Under DP-SGD's Poisson sampling a round may run past its expected step count: those steps train the body.
- Freezing: the frozen part gets ``requires_grad = False``, so it has no gradient and AdamW (which skips parameters
  without a gradient) leaves it untouched, weight decay included; the same AdamW (and its moments) serves both phases,
  as every method here keeps one optimizer per site.
- Fine-tuning: the authors' last round trains the head only; here every method ends with the same fine-tuning of all
  parameters, so :meth:`FedRep.end_round` makes every parameter trainable again after each round.
- DP-SGD is refused (:attr:`FedRep.dp_sgd_conflict`): Opacus' per-sample gradient hooks need the set of trainable
  parameters fixed before the model is made private (a frozen layer that gradients still flow through breaks them),
  and FedRep changes it twice per round. Client-level DP of the body update and HE apply as for FedPer.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

from torch import nn

from fedoap.methods.fedper import FedPer, _under

__all__ = ["FedRep"]


class FedRep(FedPer):
    """FedRep as a method object: FedPer's partition, trained in two phases per round.

    Args:
        personal_prefixes: module-name prefixes of the head (local, never sent; matched on dot boundaries); every other
            key is the shared body. Default ``["head"]``.
        head_fraction: share of a round's steps that train the head (the body is frozen), in ``(0, 1)``; the
            remaining steps train the body (the head is frozen). Default ``10/11`` (the authors' 10 head epochs per
            body epoch).

    Raises:
        ValueError: a bad ``personal_prefixes`` (as FedPer), or ``head_fraction`` not a number in ``(0, 1)``.
    """

    name = "fedrep"

    def __init__(self, personal_prefixes: Sequence[str] = ("head",), head_fraction: float = 10 / 11) -> None:
        super().__init__(personal_prefixes)
        if (isinstance(head_fraction, bool) or not isinstance(head_fraction, numbers.Real)
                or not 0.0 < float(head_fraction) < 1.0):
            raise ValueError(f"head_fraction must be a number in (0, 1), got {head_fraction!r}")
        self.head_fraction = head_fraction

    def head_steps(self, steps_per_round: int) -> int:
        """Number of head steps at the start of a round of ``steps_per_round`` steps: ``round(head_fraction * steps)``
        (halves rounded up), kept within ``[1, steps - 1]``; 0 for a round of one step.

        Raises:
            ValueError: ``steps_per_round`` not a positive integer.
        """
        if (isinstance(steps_per_round, bool) or not isinstance(steps_per_round, numbers.Integral)
                or steps_per_round < 1):
            raise ValueError(f"steps_per_round must be a positive integer, got {steps_per_round!r}")
        if steps_per_round == 1:
            return 0
        return min(max(math.floor(float(self.head_fraction) * steps_per_round + 0.5), 1), steps_per_round - 1)

    def is_head(self, key: str) -> bool:
        """Whether parameter ``key`` belongs to the head."""
        return any(_under(key, prefix) for prefix in self.personal_prefixes)

    def begin_step(self, model: nn.Module, step: int, steps_per_round: int) -> None:
        """Head phase (``step < head_steps``): only the head is trainable; body phase: only the body is."""
        train_head = step < self.head_steps(steps_per_round)
        for key, param in model.named_parameters():
            param.requires_grad_(self.is_head(key) == train_head)

    def end_round(self, model: nn.Module) -> None:
        """Every parameter trainable again (evaluation, the next round's first step and the final fine-tuning)."""
        for param in model.parameters():
            param.requires_grad_(True)

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        return ("freezes the body and the head in turn within each round, which Opacus' per-sample gradient hooks do "
                "not support (the trainable parameters must be fixed before the model is made private)")
