"""FedMEPD's server step (Liu et al., arXiv 2603.04887): owner-only averaging, then the server's own training on its
small full-modal labelled set, then the multi-scale class anchors (k-means of its fused features once, then an
exponential moving average of the clusters' means every round), broadcast as ``anchors.scale_<s>``.

The server trains and clusters on the global model, so this rule needs it in clear: it is not linear and refuses
homomorphic encryption and secure aggregation (``fedoap.server.rules.check_rule``).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from fedoap.server.rules.owner_mean import OwnerMean

__all__ = ["FedMEPDServerRule"]


def _positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


class FedMEPDServerRule(OwnerMean):
    """Owner-only mean, the server's training step and the anchor refresh.

    Args:
        reference: the initial shared parameters (every encoder, the decoder and the ``anchors.scale_<s>`` buffers).
        server_data: the server's full-modal labelled set (a BraTS/MSD folder, ``fedoap.data.brats``); "": no server
            step and no anchors (the aggregate is the owner mean alone).
        channels, anchors_per_class, heads: the network's (``FedMEPDNet``), to build the server's copy.
        anchors: compute and broadcast anchors (False: the ablation without anchors).
        epochs: passes over the server's set per round; lr: its AdamW rate; batch_size: its batch.
        momentum: the anchors' EMA momentum from the second refresh on (authors: 0.999).
        size: resize the server's cases to ``size``^3 (0: as stored).
        seed: seeds the server's training order and k-means.

    Raises:
        ValueError: an invalid argument (named), or a server set that cannot be loaded.
    """

    name = "fedmepd"
    #: why HE and secure aggregation cannot serve it (in the configuration's refusal)
    plaintext_reason = ("which needs the global model in clear on the server (its training step on the server's "
                        "full-modal set and the k-means anchors of its features)")

    def __init__(self, reference: Mapping[str, Any], server_data: str = "", channels: Sequence[int] = (8, 16, 32, 64),
                 anchors_per_class: int = 4, heads: int = 1, anchors: bool = True, epochs: int = 1,
                 lr: float = 1e-3, batch_size: int = 2, momentum: float = 0.999, size: int = 0,
                 seed: int = 0) -> None:
        self.check_args(server_data=server_data, channels=channels, anchors_per_class=anchors_per_class, heads=heads,
                        anchors=anchors, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, size=size,
                        seed=seed)
        super().__init__(reference)
        self.server_data, self.use_anchors = server_data, anchors
        self.epochs, self.lr, self.batch_size, self.momentum = int(epochs), float(lr), int(batch_size), float(momentum)
        self._generator = torch.Generator().manual_seed(int(seed))
        self._seed = int(seed)
        self._assignments: Optional[list[dict[int, torch.Tensor]]] = None  # per scale, per class: cluster of each case
        self.last_summary: dict[str, Any] = {}
        if not server_data:
            self.net = None
            return
        from fedoap.data.brats import load_brats_site
        from fedoap.losses import BCEDiceLoss
        from fedoap.networks.fedmepd_net import FedMEPDNet

        site = load_brats_site(Path(server_data), size=int(size) or None, name="server")
        if len(site) == 0 or not bool(site.present.all()):
            raise ValueError(f"server_data {server_data!r}: the server's set must hold cases with all four modalities")
        self.images = torch.from_numpy(site.images())
        self.regions = torch.from_numpy(site.regions().astype(np.float32))
        torch.manual_seed(int(seed))
        self.net = FedMEPDNet(channels=tuple(int(c) for c in channels), anchors_per_class=int(anchors_per_class),
                              heads=int(heads), anchor_attention=False)
        missing = [k for k in self.shapes if k not in self.net.state_dict()]
        if missing:
            raise ValueError(f"the server's FedMEPDNet has no {missing[0]!r}: channels or heads differ from the sites'")
        self.loss = BCEDiceLoss()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-5)

    @classmethod
    def check_args(cls, **args: Any) -> None:
        known = {"server_data", "channels", "anchors_per_class", "heads", "anchors", "epochs", "lr", "batch_size",
                 "momentum", "size", "seed"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"server rule {cls.name!r} takes no argument {unknown}; it takes {sorted(known)}")
        if not isinstance(args.get("server_data", ""), str):
            raise ValueError(f"server_data must be a folder path or '', got {args['server_data']!r}")
        channels = args.get("channels", (8, 16, 32, 64))
        if isinstance(channels, (str, bytes)) or not all(_positive_int(c) for c in channels) or len(channels) < 2:
            raise ValueError(f"channels must be at least 2 positive integers, got {channels!r}")
        for name in ("anchors_per_class", "heads", "epochs", "batch_size"):
            if name in args and not _positive_int(args[name]):
                raise ValueError(f"{name} must be a positive integer, got {args[name]!r}")
        if "size" in args and not (isinstance(args["size"], numbers.Integral) and args["size"] >= 0):
            raise ValueError(f"size must be an integer >= 0 (0: as stored), got {args['size']!r}")
        if "anchors" in args and not isinstance(args["anchors"], bool):
            raise ValueError(f"anchors must be true or false, got {args['anchors']!r}")
        lr = args.get("lr", 1e-3)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        momentum = args.get("momentum", 0.999)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")

    def result(self) -> dict[str, np.ndarray]:
        """The owner mean, then (with a server set) the server's training step and the anchors."""
        aggregate = super().result()
        if self.net is None:
            return aggregate
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in aggregate.items()
                 if k.startswith(("encoders.", "decoder."))}
        self.net.load_state_dict(state, strict=False)
        loss = self._train()
        trained = self.net.state_dict()
        out = dict(aggregate)
        for key in state:
            out[key] = trained[key].detach().cpu().numpy().astype(np.float32)
        self.last_summary = {"server_train_loss": loss}
        if self.use_anchors:
            anchors = self._anchors()
            for s, tensor in enumerate(anchors):
                key = f"anchors.scale_{s}"
                if key in out:
                    out[key] = tensor.detach().cpu().numpy().astype(np.float32)
        return out

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), **self.last_summary}

    def _train(self) -> float:
        """``epochs`` passes of BCE + Dice over the server's full-modal set; the mean loss."""
        self.net.train()
        n, total, steps = len(self.images), 0.0, 0
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self._generator)
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.net(self.images[idx]), self.regions[idx])
                loss.backward()
                self.optimizer.step()
                total, steps = total + float(loss.detach()), steps + 1
        return total / max(steps, 1)

    @torch.no_grad()
    def _anchors(self) -> list[torch.Tensor]:
        """Per scale ``(classes, k, C)``: k-means of the per-case class prototypes the first time (the assignment is
        kept), then the EMA of the clusters' means under that assignment."""
        from fedoap.methods.fedmepd_rules import class_prototypes, cluster_means, ema, kmeans

        self.net.eval()
        features = self.net.features(self.images)
        current = self.net.anchor_tensors()
        first = self._assignments is None
        if first:
            self._assignments = [{} for _ in features]
        gen = torch.Generator().manual_seed(self._seed)
        out = []
        for s, feat in enumerate(features):
            protos, present = class_prototypes(feat, self.regions)
            k = current[s].shape[1]
            per_class = []
            for c in range(protos.shape[1]):
                points = protos[present[:, c], c]
                if points.shape[0] == 0:  # a class no server case has: its anchors stay as they are
                    per_class.append(current[s][c])
                    continue
                if first:
                    centroids, labels = kmeans(points, k, 30, gen)
                    self._assignments[s][c] = labels
                    per_class.append(centroids)
                else:
                    labels = self._assignments[s].get(c)
                    if labels is None or labels.numel() != points.shape[0]:
                        centroids, labels = kmeans(points, k, 30, gen)
                        self._assignments[s][c] = labels
                        per_class.append(centroids)
                        continue
                    means = cluster_means(points, labels, k, fallback=current[s][c])
                    per_class.append(ema(current[s][c], means, self.momentum))
            out.append(torch.stack(per_class).to(current[s].dtype))
        self.net.set_anchors(out)
        return out
