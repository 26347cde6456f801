"""FedMEPD: modality-specific encoders averaged over their owners, a partially personalized fusion decoder and
server-side multi-scale class anchors that the sites' features attend to.

Implements Liu et al., "Federated Modality-specific Encoders and Partially Personalized Fusion Decoder for Multimodal
Brain Tumor Segmentation", arXiv 2603.04887 (authors' code github.com/ccarliu/FedMEPD, read for the rules, not
copied), on the generic trainer and controller:

- what a site sends: the encoders of the modalities it holds and the decoder (the decoder filters already personal
  carry the last global values, i.e. no update); the attention blocks stay local; the broadcast is every encoder, the
  decoder and the anchors (``shared_keys``), the server's rule (``FedMEPDServerRule``) averages each key over the sites
  that sent it, trains on its full-modal set and refreshes the anchors;
- per decoder filter the site computes, from what it holds in clear, the cosine between the server's update
  (global now minus global last round) and its own update of the round (``filter_cosines``); a filter whose cosine
  stays negative for ``patience`` rounds becomes personal (``FilterPersonalization``) and keeps its local values.

Privacy: client-level DP of the sent update works (the update of the keys sent is clipped and noised). DP-SGD is
refused (:attr:`FedMEPD.dp_sgd_conflict`). HE and secure aggregation are refused for FedMEPD itself: the server's
training step and the k-means anchors need the global model in clear. The rest would fit them: the filter rule runs on
the site from what it holds in clear, and the owner-only mean is a per-key weighted sum whose per-key weights are
public (which sites hold which modality), so the division could follow decryption; this needs an encrypted sum that
divides per key, which the HE path (one total weight) does not have yet. The FedAvg and split baselines are plain
weighted means, which the configuration accepts under HE and secure aggregation.

Baselines on the same network and data (``baseline``): ``"fedavg"`` (every site sends everything, plain weighted mean,
no anchors, no personal filters, no server step), ``"split"`` (FedOAP-style shared/local split: encoders and decoder
body shared by plain mean, the decoder head and the attention local) and ``"local"`` (nothing shared).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from fedoap.methods.base import FederatedMethod
from fedoap.methods.fedmepd_rules import FilterPersonalization, filter_cosines, state_delta
from fedoap.server.rules import FedMEPDServerRule, NoAggregation, WeightedMean

__all__ = ["FedMEPD", "BASELINES"]

#: the baselines this method object also runs ("" is FedMEPD itself)
BASELINES = ("", "fedavg", "split", "local")


class FedMEPD(FederatedMethod):
    """FedMEPD as a method object (one per site: it keeps the site's personalization state).

    Args:
        patience: consecutive rounds of negative cosine that make a decoder filter personal (authors: 10).
        warmup_rounds: rounds before the filter rule starts counting (authors: 30).
        anchors: the server's anchors and the sites' cross-attention to them (False: ablation without anchors).
        personalize_filters: the partially personalized decoder (False: ablation, the whole decoder shared).
        baseline: "" (FedMEPD), "fedavg", "split" or "local" (see the module docstring).
        channels: the network's widths per scale (``FedMEPDNet.channels``; volumes must divide by 2^(len - 1)).
        anchors_per_class: k-means clusters per class and scale (authors: 4). heads: attention heads.
        server_data: the server's full-modal labelled set (folder); "": no server step and no anchors.
        server_epochs, server_lr, server_batch_size: the server's training step per round.
        anchor_momentum: the anchors' EMA momentum (authors: 0.999).
        server_size: resize the server's cases to this cube (0: as stored; the simulator sets the sites' size).
    """

    name = "fedmepd"
    server_rule = FedMEPDServerRule

    def __init__(self, patience: int = 10, warmup_rounds: int = 0, anchors: bool = True,
                 personalize_filters: bool = True, baseline: str = "", channels: Sequence[int] = (8, 16, 32, 64),
                 anchors_per_class: int = 4, heads: int = 1, server_data: str = "", server_epochs: int = 1,
                 server_lr: float = 1e-3, server_batch_size: int = 2, anchor_momentum: float = 0.999,
                 server_size: int = 0) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
        for flag, value in (("anchors", anchors), ("personalize_filters", personalize_filters)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, got {value!r}")
        if isinstance(warmup_rounds, bool) or not isinstance(warmup_rounds, int) or warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be an integer >= 0, got {warmup_rounds!r}")
        FilterPersonalization(patience)  # checks patience
        self.patience, self.warmup_rounds = patience, warmup_rounds
        self.anchors, self.personalize_filters, self.baseline = anchors, personalize_filters, baseline
        self.channels, self.anchors_per_class, self.heads = channels, anchors_per_class, heads
        self.server_data, self.server_epochs, self.server_lr = server_data, server_epochs, server_lr
        self.server_batch_size, self.anchor_momentum, self.server_size = server_batch_size, anchor_momentum, server_size
        if baseline:  # the baselines use neither anchors, nor personal filters, nor the server's data
            self.uses_anchors, self.uses_filters = False, False
            self.server_rule = NoAggregation if baseline == "local" else WeightedMean
        else:
            self.uses_anchors, self.uses_filters = anchors, personalize_filters
        self.server_rule.check_args(**self.server_rule_args())
        # the site's state
        self.owned: Optional[tuple[str, ...]] = None
        self.rule = FilterPersonalization(patience)
        self.rounds_seen = 0
        self._last_global: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}
        self._after: dict[str, Tensor] = {}

    # -- the network and what travels ----------------------------------------------------------------------------------
    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        """The FedMEPD network (the UNet's ``model_args`` do not apply: its widths are :attr:`channels`)."""
        return {"class_path": "fedoap.networks.fedmepd_net.FedMEPDNet",
                "args": {"channels": list(self.channels), "anchors_per_class": self.anchors_per_class,
                         "heads": self.heads, "anchor_attention": self.uses_anchors}}

    def shared_keys(self, model: nn.Module) -> list[str]:
        """What the server broadcasts: every encoder and the decoder, and (with anchors) the anchor buffers; what a
        site sends of it is :meth:`shared_payload`."""
        from fedoap.networks.fedmepd_net import FedMEPDNet  # MONAI: on the sites, not the server's workflow

        if not isinstance(model, FedMEPDNet):
            raise TypeError(f"FedMEPD needs a FedMEPDNet, got {type(model).__name__}")
        if self.baseline == "local":
            return []
        keys = list(model.shared_keys)
        if self.baseline == "split":
            keys = [k for k in keys if not k.startswith("decoder.head.")]
        if self.uses_anchors:
            keys += [k for k in model.anchor_keys if k != "anchors.initialized"]
        return sorted(keys)

    def server_rule_args(self) -> dict[str, Any]:
        if self.server_rule is not FedMEPDServerRule:
            return {}
        return {"server_data": self.server_data, "channels": list(self.channels),
                "anchors_per_class": self.anchors_per_class, "heads": self.heads, "anchors": self.uses_anchors,
                "epochs": self.server_epochs, "lr": self.server_lr, "batch_size": self.server_batch_size,
                "momentum": self.anchor_momentum, "size": self.server_size}

    def train_loss(self) -> nn.Module:
        from fedoap.losses import BCEDiceLoss

        return BCEDiceLoss()

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        return ("trains 3D volumes through per-modality encoders gated by the site's modalities, which Opacus's "
                "per-sample gradients were not validated on")

    # -- the site's side -----------------------------------------------------------------------------------------------
    def begin_training(self, model: nn.Module, train: Any) -> None:
        """The modalities the site holds (``train.present``): its encoders run on them only, and it sends only their
        weights."""
        present = tuple(bool(p) for p in getattr(train, "present"))
        model.set_default_present(present)
        self.owned = tuple(m for m, p in zip(model.modalities, present) if p)

    def _decoder_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("decoder.")}

    def begin_round(self, model: nn.Module, global_shared: Mapping[str, Tensor]) -> None:
        """With the round's broadcast loaded: mark the anchors set once they arrive, count the filters' cosines and
        put the site's personal filters back (the broadcast overwrote them)."""
        if self.uses_anchors and any(float(global_shared[k].abs().sum()) > 0 for k in global_shared
                                     if k.startswith("anchors.")):
            model.set_anchors([t.detach().clone() for t in model.anchor_tensors()])
        if not self.uses_filters or not global_shared:
            return
        received = {k: v.detach().clone() for k, v in global_shared.items() if k.startswith("decoder.")}
        groups = model.decoder_filter_groups()
        if self._last_global and self._before and self._after:
            if self.rounds_seen >= self.warmup_rounds:
                cosines = filter_cosines(state_delta(received, self._last_global),
                                         state_delta(self._after, self._before), groups)
                self.rule.update(cosines)
            merged = self.rule.merge(received, self._after, groups)
            model.load_state_dict(merged, strict=False)
        self.rounds_seen += 1
        self._last_global = received
        self._before = self._decoder_state(model)

    def end_round(self, model: nn.Module) -> None:
        if self.uses_filters:
            self._after = self._decoder_state(model)

    def shared_payload(self, model: nn.Module, shared: dict[str, Tensor]) -> dict[str, Tensor]:
        """The encoders of the site's modalities and the decoder (its personal filters at the last global values:
        they bring no update); never the anchors, which are the server's. The FedAvg baseline sends everything."""
        if self.baseline:
            return shared
        owned = tuple(f"encoders.{m}." for m in (self.owned or ()))
        out = {k: v for k, v in shared.items() if k.startswith("decoder.") or k.startswith(owned)}
        if self.uses_filters and self._last_global:
            decoder = {k: v for k, v in out.items() if k.startswith("decoder.")}
            out.update(self.rule.merge(decoder, self._last_global, model.decoder_filter_groups()))
        return out

    def personal_filters(self) -> dict[str, int]:
        """How many filters of each decoder convolution are personal on this site."""
        return {name: int(mask.sum()) for name, mask in self.rule.personal_masks().items()}

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        return {"personalization": self.rule.state_dict(), "rounds_seen": self.rounds_seen,
                "last_global": dict(self._last_global), "before": dict(self._before), "after": dict(self._after)}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        try:
            self.rule.load_state_dict(state["personalization"])
            self.rounds_seen = int(state["rounds_seen"])
            self._last_global, self._before, self._after = (
                {k: torch.as_tensor(v) for k, v in state[name].items()} for name in ("last_global", "before", "after"))
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"FedMEPD's site state is incomplete: {err}") from None
