"""FedOAPNet with a second, personal output head on detached features: FedRoD's network.

Chen, Chao, "On Bridging Generic and Personalized Federated Learning for Image Classification", ICLR 2022: the
generic head ``head`` (shared) predicts from the body's features; the personal head ``personal_head`` (kept on the
site) reads the same features *detached* and its logits are added to the generic ones. The personalized prediction
(``forward``) is generic + personal logits; :meth:`FedRoDNet.generic_and_personal` returns the two separately, for
training.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .fedoap_net import FedOAPNet

__all__ = ["FedRoDNet", "PERSONAL_INITS"]

#: how the personal head starts: a copy of the generic head (FL-MedSegBench, PFLlib) or all zeros (the personalized
#: prediction then starts as the generic one)
PERSONAL_INITS = ("copy", "zeros")


class FedRoDNet(FedOAPNet):
    """FedOAPNet plus ``personal_head``, a 1x1 convolution of the same shape as ``head`` applied to the detached input
    of ``head`` (the spatial adapter's output, the last feature map before the logits).

    Args:
        personal_init: ``"copy"`` (start as a copy of ``head``) or ``"zeros"``. Default ``"copy"``.
        backbone_args: FedOAPNet's constructor arguments (stored unchanged by FedOAPNet).

    Raises:
        ValueError: an unknown ``personal_init``, or FedOAPNet's own argument errors.

    Example::

        >>> net = FedRoDNet(channels=(4, 8, 16, 32), bottleneck_channels=64)
        >>> x = torch.randn(2, 1, 64, 64)
        >>> generic, personal = net.generic_and_personal(x)
        >>> torch.allclose(net(x), generic + personal)
        True
    """

    def __init__(self, personal_init: str = "copy", **backbone_args: Any) -> None:
        if personal_init not in PERSONAL_INITS:
            raise ValueError(f"personal_init must be one of {PERSONAL_INITS}, got {personal_init!r}")
        super().__init__(**backbone_args)
        self.personal_init = personal_init
        self.personal_head = copy.deepcopy(self.head)
        if personal_init == "zeros":
            nn.init.zeros_(self.personal_head.weight)
            nn.init.zeros_(self.personal_head.bias)

    def generic_and_personal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generic logits (body + ``head``) and personal logits (``personal_head`` on the detached input of
        ``head``): no gradient of the personal logits reaches the body."""
        captured: dict[str, torch.Tensor] = {}

        def keep_input(module: nn.Module, args: tuple) -> None:
            captured["feature"] = args[0]

        handle = self.head.register_forward_pre_hook(keep_input)
        try:
            generic = super().forward(x)
        finally:
            handle.remove()
        return generic, self.personal_head(captured["feature"].detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The personalized prediction: generic + personal logits ``(B, out_channels, H, W)``."""
        generic, personal = self.generic_and_personal(x)
        return generic + personal
