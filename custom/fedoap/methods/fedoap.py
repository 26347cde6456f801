"""FedOAP: decoupled cross-attention with shared key/value weights, a local spatial adapter and a final
boundary-focused fine-tuning with the Perturbed Boundary Loss.

Implements Tashdeed, Rahman, Islam, Hossain, "Personalized Federated Segmentation with Shared Feature Aggregation and
Boundary-Focused Calibration", arXiv 2511.18847. The partition and PBL defaults follow the authors' public code;
model selection during fine-tuning uses the validation split (their code used the test split).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedoap.losses import BCEDiceLoss, PerturbedBoundaryLoss
from fedoap.methods.base import FederatedMethod
from fedoap.networks import FedOAPNet
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
    """

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
    ) -> None:
        self.partition = partition
        self.use_pbl = use_pbl
        self.pbl_threshold = pbl_threshold
        self.pbl_noise_std = pbl_noise_std
        self.pbl_plain_weight = pbl_plain_weight
        self.pbl_perturbed_weight = pbl_perturbed_weight
        self.cross_attention = cross_attention
        self.adapter = adapter

    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        return {"class_path": f"{FedOAPNet.__module__}.{FedOAPNet.__name__}",
                "args": {**model_args, "partition": self.partition, "use_cross_attention": self.cross_attention,
                         "use_adapter": self.adapter}}

    def shared_keys(self, model: nn.Module) -> list[str]:
        if not isinstance(model, FedOAPNet):
            raise TypeError(f"FedOAP needs a FedOAPNet, got {type(model).__name__}")
        return list(model.shared_keys)

    def train_loss(self) -> nn.Module:
        return BCEDiceLoss()

    def finetune_loss(self) -> nn.Module:
        if not self.use_pbl:
            return BCEDiceLoss()
        return PerturbedBoundaryLoss(
            base_loss=BCEDiceLoss(),
            threshold=self.pbl_threshold,
            noise_std=self.pbl_noise_std,
            plain_weight=self.pbl_plain_weight,
            perturbed_weight=self.pbl_perturbed_weight,
        )
