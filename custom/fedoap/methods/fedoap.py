"""FedOAP: decoupled cross-attention with shared key/value weights, a local spatial adapter and a final
boundary-focused fine-tuning with the Perturbed Boundary Loss.

Implements Tashdeed, Rahman, Islam, Hossain, "Personalized Federated Segmentation with Shared Feature Aggregation and
Boundary-Focused Calibration", arXiv 2511.18847. The partition and PBL defaults follow the authors' public code;
model selection during fine-tuning uses the validation split (their code used the test split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fedoap.methods.base import FederatedMethod
from fedoap.methods.fedavg import FEDOAP_NET
from fedoap.server.rules import WeightedMean

__all__ = ["FedOAP"]


class FedOAP(FederatedMethod):
    """FedOAP as a method object.

    Args:
        partition: which parameters are shared: ``"authors"`` (everything but the query path, the adapter and the
            head) or ``"kv_only"`` (only the key/value branch and its projections).
        use_pbl: fine-tune with the Perturbed Boundary Loss (True) or with the plain segmentation loss (ablation).
        pbl_threshold: PBL's confidence threshold on ``|sigmoid(z) - y|``.
        pbl_noise_std: standard deviation of the logit noise on the selected pixels.
        pbl_plain_weight: weight of the plain term.
        pbl_perturbed_weight: weight of the perturbed term.
        cross_attention: the decoupled cross-attention bottleneck; False is the ablation "without DCA" (a plain
            UNet bottleneck, shared).
        adapter: the local spatial adapter; False is the ablation "without adapter".
        warm_start_query: not in the paper (off by default, the authors' behaviour): at the site's first round, once,
            copy the received shared key/value branch into the local query branch (``kv_branch.* ->
            query_branch.*``, ``dca.to_k.* -> dca.to_q.*``), so that the local query path starts from the same
            features as the shared one instead of an independent random initialization. Never repeated (a resumed
            site keeps its trained query path), never applied to a fine-tuning-only trainer after the rounds.
        head_prior_init: not in the paper; None (default): on, except under DP-SGD (:attr:`dp_sgd`, set by the run);
            True: on (refused under DP-SGD); False: off, the authors' behaviour. On over 3 seeds of the ``medium``
            benchmark: mean personalized Dice 0.907 against 0.878, worst site 0.830 against 0.768 (README). When
            the site's trainer is built, once per model, shift the local head's bias so that the network's mean initial logit over the site's
            training images is ``logit(pi)``, ``pi`` the tumour fraction of the site's training labels (clipped to
            ``[1e-4, 0.5]``): the prior-probability initialization of Lin et al. (focal loss, ICCV 2017). The
            default initialization starts with a random logit offset (e.g. +0.5: ~90% of the pixels predicted
            tumour where ~2% are) that AdamW, moving each parameter by about ``lr`` per step, needs most of a short
            run to undo. Computed from the site's own data for a parameter that never leaves the site.
    """

    #: attribute a model gets once its head was prior-initialized (a deep copy keeps it: never applied twice)
    PRIOR_INIT_MARK = "_fedoap_head_prior_init"

    #: (source, target) module prefixes of the warm start of the query path
    WARM_START_PAIRS = (("kv_branch", "query_branch"), ("dca.to_k", "dca.to_q"))

    name = "fedoap"
    server_rule = WeightedMean

    def __init__(
        self,
        partition: str = "authors",
        use_pbl: bool = True,
        pbl_threshold: float = 0.75,
        pbl_noise_std: float = 0.1,
        pbl_plain_weight: float = 0.9,
        pbl_perturbed_weight: float = 0.1,
        cross_attention: bool = True,
        adapter: bool = True,
        warm_start_query: bool = False,
        head_prior_init: Optional[bool] = None,
    ) -> None:
        if head_prior_init is not None and not isinstance(head_prior_init, bool):
            raise ValueError(f"head_prior_init must be true, false or null (on except under DP-SGD), got "
                             f"{head_prior_init!r}")
        if not isinstance(warm_start_query, bool):
            raise ValueError(f"warm_start_query must be true or false, got {warm_start_query!r}")
        if warm_start_query and not cross_attention:
            raise ValueError("warm_start_query needs the cross-attention bottleneck (cross_attention=true): without "
                             "it there is no query branch")
        self.partition = partition
        self.use_pbl = use_pbl
        self.pbl_threshold = pbl_threshold
        self.pbl_noise_std = pbl_noise_std
        self.pbl_plain_weight = pbl_plain_weight
        self.pbl_perturbed_weight = pbl_perturbed_weight
        self.cross_attention = cross_attention
        self.adapter = adapter
        self.warm_start_query = warm_start_query
        self.head_prior_init = head_prior_init
        self._warm_started = False

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": FEDOAP_NET,
                "args": {**model_args, "partition": self.partition, "use_cross_attention": self.cross_attention,
                         "use_adapter": self.adapter}}

    def shared_keys(self, model: nn.Module) -> list[str]:
        from fedoap.networks import FedOAPNet

        if not isinstance(model, FedOAPNet):
            raise TypeError(f"FedOAP needs a FedOAPNet, got {type(model).__name__}")
        return list(model.shared_keys)

    def train_loss(self) -> nn.Module:
        from fedoap.losses import BCEDiceLoss

        return BCEDiceLoss()

    def finetune_loss(self) -> nn.Module:
        from fedoap.losses import BCEDiceLoss, PerturbedBoundaryLoss

        if not self.use_pbl:
            return BCEDiceLoss()
        return PerturbedBoundaryLoss(
            base_loss=BCEDiceLoss(),
            threshold=self.pbl_threshold,
            noise_std=self.pbl_noise_std,
            plain_weight=self.pbl_plain_weight,
            perturbed_weight=self.pbl_perturbed_weight,
        )

    @classmethod
    def warm_start_keys(cls, model: nn.Module) -> dict[str, str]:
        """``{target key: source key}`` of the query path's warm start (every parameter of the query branch and of
        ``dca.to_q`` by its ``kv_branch`` / ``dca.to_k`` counterpart)."""
        state = model.state_dict()
        pairs = {}
        for source, target in cls.WARM_START_PAIRS:
            for key in state:
                if key.startswith(target + "."):
                    pairs[key] = source + key[len(target):]
        return pairs

    def resolved_args(self) -> dict[str, Any]:
        """The base settings with the head prior resolved (its default follows the run)."""
        return {**super().resolved_args(), "head_prior_init": self.uses_head_prior}

    @property
    def uses_head_prior(self) -> bool:
        """Whether the head starts at the site's tumour prior: ``head_prior_init``, or by default unless the run
        trains under DP-SGD."""
        return self.head_prior_init if self.head_prior_init is not None else not self.dp_sgd

    @property
    def dp_sgd_conflict(self) -> str | None:
        """``head_prior_init=True`` reads the training labels outside DP-SGD's clipping and noise (the shared
        updates then depend on it), so DP-SGD refuses it (the default turns it off under DP-SGD instead)."""
        if self.head_prior_init:
            return ("with head_prior_init sets its head from the training labels' tumour fraction, outside DP-SGD's "
                    "clipping and noise")
        return super().dp_sgd_conflict

    def begin_training(self, model: nn.Module, train: Any) -> None:
        """With ``head_prior_init``: set the head's initial bias from the site's training split (once per model)."""
        if self.uses_head_prior and not getattr(model, self.PRIOR_INIT_MARK, False):
            prior_init_head(model, train.images, train.labels)
            setattr(model, self.PRIOR_INIT_MARK, True)

    def begin_round(self, model: nn.Module, global_shared: Mapping[str, Tensor]) -> None:
        """With ``warm_start_query``, the first call (the first round's received shared model) copies the key/value
        path into the local query path, once."""
        if not self.warm_start_query or self._warm_started or not global_shared:
            return
        self._warm_started = True
        state = model.state_dict()
        with torch.no_grad():
            for target, source in self.warm_start_keys(model).items():
                state[target].copy_(state[source])

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        """Whether the query path was warm-started (only with ``warm_start_query``)."""
        return {"warm_started": self._warm_started} if self.warm_start_query else {}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """A resumed site keeps its trained query path: the warm start is not repeated."""
        if not self.warm_start_query:
            return
        started = state.get("warm_started")
        if not isinstance(started, bool):
            raise ValueError(f"FedOAP's site state needs a boolean 'warm_started', got {started!r}")
        self._warm_started = started


def prior_init_head(model: nn.Module, images: Any, labels: Any, clip: tuple[float, float] = (1e-4, 0.5),
                    batch_size: int = 64) -> float:
    """Shift ``model.head``'s bias so that the mean logit of ``model`` over ``images`` becomes ``logit(pi)``, ``pi``
    the foreground fraction of ``labels`` clipped to ``clip``; return the shift (prior-probability initialization,
    Lin et al., ICCV 2017).

    Raises:
        ValueError: a model whose ``head`` has no bias, or no images.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Conv2d) or head.bias is None:
        raise ValueError("head_prior_init needs a model whose head is a Conv2d with a bias")
    images = torch.as_tensor(images)
    if images.shape[0] == 0:
        raise ValueError("head_prior_init needs at least one training image")
    pi = min(max(float(torch.as_tensor(labels, dtype=torch.float64).mean()), clip[0]), clip[1])
    device = head.bias.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            z = model(images[start:start + batch_size].to(device=device, dtype=head.weight.dtype))
            total += float(z.double().sum())
            count += z.numel()
        shift = math.log(pi / (1.0 - pi)) - total / count
        head.bias += shift
    model.train(was_training)
    return shift
