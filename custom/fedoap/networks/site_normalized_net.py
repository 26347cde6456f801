"""FedOAPNet behind an input normalization with the site's own intensity statistics (FedRDN's deployed model).

FedRDN (Yan et al., CVPR 2025) trains on images normalized with the statistics of a randomly chosen site and tests
with the site's own. The own statistics are part of the site's model here: two buffers, ``input_mean`` and
``input_std`` (one value per input channel), that :meth:`SiteNormalizedNet.forward` applies before the backbone, so
that evaluation, fine-tuning and the saved personalized model all use them without a change to the trainer. They are
local: no partition of :data:`~fedoap.networks.fedoap_net.SHARED_PARTITIONS` names them, and FedRDN's ``shared_keys``
leaves them out (:data:`INPUT_STATISTICS_KEYS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedoap.networks.fedoap_net import FedOAPNet

__all__ = ["SiteNormalizedNet", "INPUT_STATISTICS_KEYS", "normalize_input"]

#: state-dict keys of the site's own input statistics (local buffers, never shared)
INPUT_STATISTICS_KEYS: tuple[str, ...] = ("input_mean", "input_std")


def normalize_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / max(std, eps)`` per channel; ``mean`` and ``std`` are ``(C,)`` (one pair for the batch) or
    ``(B, C)`` (one pair per image)."""
    mean = mean.to(x).reshape(*mean.shape, 1, 1)
    std = std.to(x).clamp_min(eps).reshape(*std.shape, 1, 1)
    return (x - mean) / std


class SiteNormalizedNet(FedOAPNet):
    """:class:`~fedoap.networks.fedoap_net.FedOAPNet` whose input is first normalized with the site's own statistics.

    Same constructor arguments as FedOAPNet (stored unchanged as attributes), same parameters and state-dict keys plus
    the buffers ``input_mean`` (zeros) and ``input_std`` (ones): the identity until
    :meth:`set_input_statistics` is called.

    Example::

        >>> net = SiteNormalizedNet(channels=(2, 4, 4, 8), bottleneck_channels=8)
        >>> net.set_input_statistics([0.3], [0.2])
        >>> net(x)                                   # FedOAPNet.forward((x - 0.3) / 0.2)
        >>> net.forward_normalized(x, mean, std)     # FedOAPNet.forward((x - mean) / std), other statistics
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        bottleneck_channels: int = 256,
        attention_dim: int | None = None,
        heads: int = 1,
        partition: str = "authors",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, channels=channels,
                         bottleneck_channels=bottleneck_channels, attention_dim=attention_dim, heads=heads,
                         partition=partition, dropout=dropout)
        self.register_buffer("input_mean", torch.zeros(int(in_channels)))
        self.register_buffer("input_std", torch.ones(int(in_channels)))

    def set_input_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the site's own statistics (one mean and one standard deviation per input channel).

        Raises:
            ValueError: a length other than ``in_channels``, a non-finite value, or a standard deviation <= 0.
        """
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        n = int(self.in_channels)
        if mean_t.numel() != n or std_t.numel() != n:
            raise ValueError(f"expected {n} mean(s) and std(s), one per input channel; got {list(mean)}, {list(std)}")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()) or (std_t <= 0).any():
            raise ValueError(f"statistics must be finite with std > 0; got mean {list(mean)}, std {list(std)}")
        self.input_mean.copy_(mean_t)
        self.input_std.copy_(std_t)

    def forward_normalized(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` normalized with the given statistics (``(C,)`` or ``(B, C)``) instead of the own ones."""
        return super().forward(normalize_input(x, mean, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` normalized with the site's own statistics (see :meth:`FedOAPNet.forward`)."""
        return super().forward(normalize_input(x, self.input_mean, self.input_std))
