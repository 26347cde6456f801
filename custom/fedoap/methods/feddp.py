"""FedDP: dual personalization. Feature level: the attention's query projection stays on each site ("local query",
LQ), everything else is averaged. Prediction level: the final local fine-tuning adds a BCE weighted, pixel by pixel,
by how much the sites' models disagree on the image ("inconsistency-guided calibration", IGC).

Implements Wang, Jin, Stoyanov, Wang, "FedDP: Dual Personalization in Federated Medical Image Segmentation", IEEE
Transactions on Medical Imaging 43(1), 2024 (doi 10.1109/TMI.2023.3299206), after the authors' code
(``jcwang123/FedDP``: ``scripts/train_fed.py`` with ``fl='ours'`` and the ``part='q'`` aggregation of
``scripts/trainer_utils.py``, then ``scripts/train_ft.py`` with ``'bd'``), on the same backbone as every method here.

What FedDP does, as coded by its authors, and how it maps onto FedOAPNet:

- LQ. Their network is a PVTv2 transformer whose attention blocks compute queries and keys/values from the same
  tokens; every parameter is averaged by sample count except the query projections (``.q.``), which each site trains
  privately. FedOAPNet has one attention block (the decoupled cross-attention of the bottleneck): the query
  projection is ``dca.to_q``, so FedDP keeps only ``dca.to_q`` local (``personal_prefixes``) and shares everything
  else.
- IGC. After the federated rounds each site fine-tunes its whole model with ``seg_loss + lambda * mean(u * BCE)``,
  where ``u`` is the pixel-wise standard deviation over the K sites' models of their predicted probabilities on the
  batch (a frozen copy taken when the fine-tuning starts, the site's own model included), divided by its maximum
  over the batch. The sites' models differ only in their local query weights, so a site can rebuild all K of them
  from the final shared weights and the K query projections.

How FedDP differs from FedOAP, which also keeps ``dca.to_q`` local: FedOAP keeps the whole query path local (the
``query_branch`` block that produces the query features, ``dca.to_q``), plus the spatial ``adapter`` and the output
``head``; FedDP keeps only the query projection local and shares the query branch, the adapter and the head. At the
prediction level FedOAP fine-tunes with the Perturbed Boundary Loss (noise on the logits of its own confidently wrong
pixels); FedDP weights the BCE by the disagreement between the sites' models, which needs every site's query weights.

What leaves a site beyond FedAvg: its query projection, in clear, through the statistics channel
(``site_statistics``: sent after every round, forwarded by the server to every site with each task). Under HE the
shared update is encrypted but these weights are not; client-level DP of the update does not cover them (the recipe
refuses that combination for any method that shares statistics); they are a post-processing of DP-SGD's training,
so sample-level DP-SGD covers them and is allowed.

Choices the paper leaves open, fixed here:

- ``calibration_weight`` (the authors' ``args.lamb``): its default lives in the authors' ``config/base.py``, which
  was not in the public code available here; 1.0 (the two terms weighted equally).
- Segmentation term: every method's fine-tuning loss (``0.5 * BCE + soft Dice``, :class:`~fedoap.losses.BCEDiceLoss`)
  instead of the authors' soft Dice alone; the weighted term is BCE with logits (the authors clamp probabilities to
  ``[1e-5, 1 - 1e-5]`` before the log).
- ``u``: ``torch.std`` over the sites (Bessel-corrected, as the authors' code) of ``sigmoid`` outputs, the models in
  eval mode, no gradient; divided by its maximum over the batch when that is positive. With fewer than two sites'
  query weights (no round yet, or a single site) there is no disagreement to measure and the term is left out.
- The rounds train with the same AdamW as every method (the authors use Adam and clamp each gradient element to
  ``[-1, 1]``); the fine-tuning uses the common budget and model selection on the validation split.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedoap.methods.fedper import FedPer

__all__ = ["FedDP"]


class FedDP(FedPer):
    """FedDP as a method object: local query projection (LQ) in the rounds, inconsistency-guided calibration (IGC) in
    the final fine-tuning.

    Args:
        personal_prefixes: module-name prefixes kept local (the "local query"); default ``["dca.to_q"]``. The
            authors' code also has a ``q_head`` variant (``["dca.to_q", "head"]`` here).
        calibration_weight: ``lambda``, the weight of the inconsistency-weighted BCE in the fine-tuning loss, finite
            and ``>= 0`` (0 leaves IGC out). Default 1.0.

    Raises:
        ValueError: a bad ``personal_prefixes`` (as FedPer), a ``calibration_weight`` that is negative or not a
            finite number; :meth:`receive_statistics` raises for query weights of the wrong keys or sizes.
    """

    name = "feddp"

    def __init__(self, personal_prefixes: Sequence[str] = ("dca.to_q",), calibration_weight: float = 1.0) -> None:
        super().__init__(personal_prefixes)
        if (isinstance(calibration_weight, bool) or not isinstance(calibration_weight, numbers.Real)
                or not math.isfinite(calibration_weight) or calibration_weight < 0):
            raise ValueError(f"calibration_weight must be a finite number >= 0, got {calibration_weight!r}")
        self.calibration_weight = calibration_weight
        self._own_query: Optional[dict[str, Tensor]] = None  # this site's local weights after its last round
        self._site_queries: dict[str, dict[str, Tensor]] = {}  # every site's local weights, by site name
        self._reference: Optional[dict[str, Tensor]] = None  # frozen state at the start of the fine-tuning

    def _local_state(self, model: nn.Module) -> dict[str, Tensor]:
        shared = set(self.shared_keys(model))
        return {k: v for k, v in model.state_dict().items() if k not in shared}

    # -- LQ: what the site shares about its local query, and what it receives ------------------------------------------
    def begin_round(self, model: nn.Module, global_shared: Mapping[str, Tensor]) -> None:
        """New global weights: the fine-tuning's frozen reference is taken again at its first step."""
        self._reference = None

    def end_round(self, model: nn.Module) -> None:
        """Keep a copy of the local query weights the round ended with (what :meth:`site_statistics` sends)."""
        self._own_query = {k: v.detach().cpu().clone() for k, v in self._local_state(model).items()}

    def site_statistics(self, train: Any) -> Optional[dict[str, list[float]]]:
        """This site's local query weights after its last round, flattened (None before the first round)."""
        if self._own_query is None:
            return None
        return {k: v.flatten().tolist() for k, v in self._own_query.items()}

    def receive_statistics(self, model: nn.Module, statistics: Mapping[str, Mapping[str, list[float]]]) -> None:
        """Every site's local query weights (this site's included), reshaped to the model's tensors.

        Raises:
            ValueError: a site whose weights lack a local key, have an extra one, or have the wrong size.
        """
        local = self._local_state(model)
        queries: dict[str, dict[str, Tensor]] = {}
        for site, values in statistics.items():
            if set(values) != set(local):
                raise ValueError(f"{site} sent query weights for {sorted(values)}, expected {sorted(local)}")
            tensors = {}
            for key, ref in local.items():
                flat = torch.as_tensor(values[key], dtype=ref.dtype)
                if flat.numel() != ref.numel():
                    raise ValueError(f"{site}: {key!r} has {flat.numel()} values, expected {ref.numel()}")
                tensors[key] = flat.reshape(ref.shape)
            queries[site] = tensors
        self._site_queries = dict(sorted(queries.items()))
        self._reference = None

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        """Every site's query weights last received and this site's own after its last round (the server forwards
        the former with every task; kept too, so that a resumed site's fine-tuning does not depend on it)."""
        return {"site_queries": self._site_queries, "own_query": self._own_query}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        queries, own = state.get("site_queries"), state.get("own_query")

        def tensors(value: Any) -> bool:
            return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                   for k, v in value.items())

        if not isinstance(queries, dict) or not all(isinstance(s, str) and tensors(q) for s, q in queries.items()) \
                or not (own is None or tensors(own)):
            raise ValueError("FedDP's site state needs the received query weights by site and its own (or None)")
        self._site_queries = dict(sorted(queries.items()))
        self._own_query = own
        self._reference = None

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        # The shared "statistics" are model weights trained under DP-SGD (post-processing, covered by its accountant),
        # not statistics of the data; the fine-tuning never leaves the site.
        return None

    # -- IGC: the fine-tuning loss -------------------------------------------------------------------------------------
    @torch.no_grad()
    def inconsistency(self, model: nn.Module, images: Tensor) -> Optional[Tensor]:
        """``u``: the standard deviation over the sites' models of their probabilities on ``images`` (B, C, H, W),
        divided by its maximum over the batch; None with fewer than two sites' query weights. The sites' models are
        the state of ``model`` when the fine-tuning started with each site's query weights in place of its own."""
        if len(self._site_queries) < 2:
            return None
        if self._reference is None:  # first fine-tuning step after the last load: the model still holds the
            self._reference = {k: v.detach().clone() for k, v in model.state_dict().items()}  # received weights
        was_training = model.training
        model.eval()
        try:
            probs = []
            for queries in self._site_queries.values():
                state = dict(self._reference)
                state.update({k: v.to(device=self._reference[k].device) for k, v in queries.items()})
                probs.append(torch.sigmoid(functional_call(model, state, (images,))))
        finally:
            model.train(was_training)
        u = torch.stack(probs).std(dim=0)
        peak = u.max()
        return u / peak if peak > 0 else u

    def finetune_step_loss(self, model: nn.Module, images: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        """``loss_fn(z, y) + calibration_weight * mean(u * BCE(z, y))`` with ``z = model(images)``."""
        u = self.inconsistency(model, images) if self.calibration_weight > 0 else None
        logits = model(images)
        loss = loss_fn(logits, labels)
        if u is None:
            return loss
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return loss + float(self.calibration_weight) * (u * bce).mean()
