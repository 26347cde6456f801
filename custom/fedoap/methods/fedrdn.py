"""FedRDN: FedAvg with an input-level augmentation, training images normalized with a random site's statistics.

Implements Yan, Fu, Li, Xie, Ma, Yang, Zhu, "A Simple Data Augmentation for Feature Distribution Skewed Federated
Learning" (FedRDN, random domain normalization), CVPR 2025 (arXiv 2306.09363), on the same backbone and sharing as
FedAvg. Each site computes the intensity mean and standard deviation of its training images
(:meth:`FedRDN.site_statistics`) and shares them, in clear, through the server with every site. In the federated
rounds each training batch is normalized, ``(x - mu_j) / sigma_j``, with the statistics of a site ``j`` drawn at
random from all the sites' (its own included); at test time, in the final fine-tuning and in every evaluation a site
normalizes with its own statistics. The own statistics live in the model (:class:`SiteNormalizedNet`'s local
buffers ``input_mean``/``input_std``, never shared), so ``model(images)`` applies them; only :meth:`FedRDN.step_loss`
(the federated rounds' loss) uses another site's. Before the server has forwarded any statistics (round 0), the site
normalizes with its own.

Choices the paper leaves open, fixed here (constructor arguments; the defaults are the authors' code's):

- The statistics: per channel, the mean over the training images of each image's mean, and the mean of each image's
  standard deviation (unbiased, as ``torch.std``), as the authors' code (``statisc_data``); FL-MedSegBench takes the
  pooled pixel mean and standard deviation instead.
- One draw per batch (``per_image=False``), as the authors' code (the paper writes the formula per image;
  ``per_image=True`` draws for every image).
- The mean and the standard deviation are drawn independently (``paired=False``: the authors' code calls
  ``random.choice`` once for the means and once for the standard deviations); ``paired=True`` takes both from one site,
  as the paper's text and FL-MedSegBench.
- The draw is over every site that sent statistics, this site included, uniformly (authors' code and paper).
- Statistics with a standard deviation <= 0 are refused; a positive one below 1e-8 is raised to 1e-8 when dividing
  (FL-MedSegBench adds 1e-8).
- The draws come from a generator seeded with ``seed`` and the site's own statistics, so that sites run with the same
  seed do not draw the same sequence.

Privacy: the statistics leave the site in clear, and no DP accountant covers them: sample-level DP-SGD and
client-level DP of the update both refuse this method (``shares_statistics``; DP-SGD also for its own step loss).
Homomorphic encryption of the shared parameters works as for FedAvg (the statistics are not encrypted).
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from fedoap.methods.fedavg import FedAvg

__all__ = ["FedRDN"]

logger = logging.getLogger(__name__)


class FedRDN(FedAvg):
    """FedRDN as a method object: FedAvg's sharing (minus the local input statistics) and loss, training batches
    normalized with a random site's statistics, everything else with the site's own.

    Args:
        per_image: draw statistics for every image instead of once per batch.
        paired: draw the mean and the standard deviation from the same site.
        seed: seed of the draws (mixed with the site's own statistics).

    Raises:
        ValueError: ``per_image`` or ``paired`` not a bool, or ``seed`` not an integer.
    """

    name = "fedrdn"

    def __init__(self, per_image: bool = False, paired: bool = False, seed: int = 0) -> None:
        for name, flag in (("per_image", per_image), ("paired", paired)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.per_image = per_image
        self.paired = paired
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._means: Optional[Tensor] = None  # (S, C): the received statistics, sites in name order
        self._stds: Optional[Tensor] = None

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": "fedoap.networks.site_normalized_net.SiteNormalizedNet", "args": dict(model_args)}

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every key but the site's own input statistics."""
        from fedoap.networks.site_normalized_net import INPUT_STATISTICS_KEYS

        return sorted(k for k in model.state_dict() if k not in INPUT_STATISTICS_KEYS)

    def site_statistics(self, train: Any) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}`` per channel: the means over the training images of each image's mean and
        of each image's (unbiased) standard deviation."""
        images = np.asarray(train.images, dtype=np.float64)
        pixels = images.reshape(images.shape[0], images.shape[1], -1)
        ddof = 1 if pixels.shape[2] > 1 else 0
        return {"mean": pixels.mean(axis=2).mean(axis=0).tolist(),
                "std": pixels.std(axis=2, ddof=ddof).mean(axis=0).tolist()}

    def begin_training(self, model: nn.Module, train: Any) -> None:
        """Set the model's own statistics from the training split (used from round 0 on) and seed the draws."""
        own = self.site_statistics(train)
        model.set_input_statistics(own["mean"], own["std"])
        mix = zlib.crc32(np.asarray(own["mean"] + own["std"], dtype=np.float64).tobytes())
        self.generator.manual_seed((self.seed * 0x9E3779B1 + mix) % 2**63)

    def receive_statistics(self, model: nn.Module, statistics: Mapping[str, Mapping[str, list[float]]]) -> None:
        """Keep every site's statistics (sorted by site name) as the pool of the draws; an entry of the wrong length
        or with a non-finite value or a std <= 0 is left out (and logged)."""
        n = int(model.in_channels)
        means, stds = [], []
        for site in sorted(statistics):
            entry = statistics[site]
            try:
                mean = torch.as_tensor(entry["mean"], dtype=torch.float32).reshape(-1)
                std = torch.as_tensor(entry["std"], dtype=torch.float32).reshape(-1)
            except (KeyError, TypeError, ValueError, RuntimeError):
                logger.warning("FedRDN: statistics of %s are malformed, left out: %r", site, entry)
                continue
            if mean.numel() != n or std.numel() != n or not (torch.isfinite(mean).all() and torch.isfinite(std).all()) \
                    or (std <= 0).any():
                logger.warning("FedRDN: statistics of %s are unusable, left out: %r", site, entry)
                continue
            means.append(mean)
            stds.append(std)
        if means:
            self._means, self._stds = torch.stack(means), torch.stack(stds)

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        """The draws' generator and the last statistics received (the server forwards them with every task; kept
        too, so that a resumed site draws from the same pool if its first task carries none)."""
        return {"generator": self.generator.get_state(), "means": self._means, "stds": self._stds}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        means, stds = state.get("means"), state.get("stds")
        if (means is None) != (stds is None) or not all(
                v is None or (isinstance(v, Tensor) and v.dim() == 2) for v in (means, stds)):
            raise ValueError("FedRDN's site state needs the received means and stds as (sites, channels) tensors, "
                             "or neither")
        try:
            self.generator.set_state(state["generator"])
        except (KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"FedRDN's saved generator state is unusable: {err}") from None
        self._means, self._stds = means, stds

    def draw_statistics(self, model: nn.Module, batch_size: int) -> tuple[Tensor, Tensor]:
        """The statistics one training batch is normalized with: ``(C,)`` each, or ``(B, C)`` with ``per_image``.
        Drawn from the received pool; the model's own before any was received."""
        if self._means is None:
            return model.input_mean, model.input_std
        shape = (batch_size,) if self.per_image else (1,)
        which_mean = torch.randint(len(self._means), shape, generator=self.generator)
        which_std = which_mean if self.paired else torch.randint(len(self._stds), shape, generator=self.generator)
        mean, std = self._means[which_mean], self._stds[which_std]
        return (mean, std) if self.per_image else (mean[0], std[0])

    def step_loss(self, model: nn.Module, images: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        """The loss on the batch normalized with randomly drawn statistics (:meth:`draw_statistics`)."""
        mean, std = self.draw_statistics(model, images.shape[0])
        return loss_fn(model.forward_normalized(images, mean, std), labels)
