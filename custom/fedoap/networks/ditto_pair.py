"""Two FedOAPNets side by side, the global copy and the personal model of a Ditto site.

Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021: each site
trains the global model (which goes to the server) and, next to it, its own personal model. Holding both in one
module lets one trainer, one optimizer and one checkpoint serve the pair; ``forward`` is the personal model's, so
evaluation and the final fine-tuning act on the personal model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .fedoap_net import FedOAPNet

__all__ = ["DittoPair", "PERSONAL_INITS"]

#: how the personal model starts: a copy of the global copy (Ditto's authors) or its own random draw
#: (FL-MedSegBench builds the personal model separately)
PERSONAL_INITS = ("copy", "independent")


class DittoPair(nn.Module):
    """``global_model`` and ``personal``, two FedOAPNets with the same constructor arguments.

    Args:
        personal_init: ``"copy"`` (the personal model starts equal to the global copy) or ``"independent"`` (its own
            random initialization). Default ``"copy"``.
        backbone_args: FedOAPNet's constructor arguments, stored unchanged as ``backbone_args``.

    Raises:
        ValueError: an unknown ``personal_init``, or FedOAPNet's own argument errors.

    Example::

        >>> pair = DittoPair(channels=(4, 8, 16, 32), bottleneck_channels=64)
        >>> x = torch.randn(2, 1, 64, 64)
        >>> torch.equal(pair(x), pair.personal(x))
        True
    """

    def __init__(self, personal_init: str = "copy", **backbone_args: Any) -> None:
        super().__init__()
        if personal_init not in PERSONAL_INITS:
            raise ValueError(f"personal_init must be one of {PERSONAL_INITS}, got {personal_init!r}")
        self.personal_init = personal_init
        self.backbone_args = backbone_args
        self.global_model = FedOAPNet(**backbone_args)
        self.personal = copy.deepcopy(self.global_model) if personal_init == "copy" else FedOAPNet(**backbone_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The personal model's logits."""
        return self.personal(x)
