"""FedGS: federated gradient scaling, which gives batches with small lesions a larger share of the sent update.

Implements Schutte, Corbetta, Beets-Tan, Silva, "FedGS: Federated Gradient Scaling for Heterogeneous Medical Image
Segmentation", MICCAI 2024 workshops (arXiv 2408.11701), following the authors' code (repository
``Trustworthy-AI-UU-NKI/Federated-Learning-Disentanglement``: ``optimizers/myadamw.py``, ``train_test.py``,
``strategies/myfedgs.py``), on the same backbone and sharing as FedAvg (FedOAPNet, every parameter shared).

The rule. For a batch of ``B`` label masks of ``H x W`` pixels,

    p = 1 + (2 / B) * sum over the small lesions i of tanh((log_l(HW / |mask_i|))^2),

where mask ``i`` is small when ``HW / |mask_i| >= small_threshold``; an empty mask is no lesion, and ``p = 1`` when
the batch has no small lesion (:func:`small_lesion_factor`). The site trains with plain AdamW (its local model moves
exactly as AdamW moves it) but accumulates, over the round, ``U = sum_t p_t * lr * m_hat_t / (sqrt(v_hat_t) + eps)``,
the Adam step scaled by the batch's ``p`` (:class:`GradientScaledAdamW`). The server applies
``x <- x - sum_k w_k U_k`` with ``w_k`` proportional to the sites' step counts.

How it maps onto our one trainer and one controller. The site sends ``x - U_k`` as its (full) shared parameters and
reports its step count as its aggregation weight (``weight_by = "steps"``); the server's step-weighted mean of these
"virtual" parameters is exactly ``x - sum_k w_k U_k``. So FedGS runs under the plain weighted mean
(``WeightedMean``), and composes with homomorphic encryption (a weighted sum) and with client-level DP of the update
(which clips and noises ``U_k``, the difference to the global model).

Choices the paper leaves open, fixed here (each an argument):

- ``log_base`` (l): the authors' code uses 100 for PolypGen (endoscopy) and 1000 for LiTS (liver tumors in CT). Our
  sites hold tumor slices from CT/MRI/ultrasound, the LiTS setting, so the default is 1000. It also keeps the factor
  graded over our range of small lesions: with ``HW / |mask|`` from 150 to 4096 (64 x 64 inputs), tanh(log^2) runs
  from 0.48 to 0.90 with l = 1000, but saturates at 0.83 to 1.00 with l = 100.
- ``small_threshold`` (150): the authors' value. Their code decides "small" from precomputed metadata (blob
  detection, the smallest blob's bounding box at 512 x 512) but computes the factor from the whole mask's area
  ``HW / sum(mask_i)``; we use that whole-mask area for both, per image, as the design notes state.
- ``reset_optimizer_state`` (True): the authors' clients are re-created every round (Flower simulation), so AdamW's
  moments and step count start afresh each round; False keeps them across rounds like every other method here.
- ``accumulate_weight_decay`` (False): the authors' accumulated update leaves out AdamW's decoupled weight decay (the
  local model decays, ``U`` does not); True adds ``p * lr * weight_decay * x`` of each step to ``U``.

DP-SGD is refused (``dp_sgd_conflict``): ``p`` is computed from the batch's raw labels and changes the sent update
outside DP-SGD's clipping and noise, so the update would not be a post-processing of the privatized gradients. Use
client-level DP of the update instead (it bounds ``U_k`` whatever produced it).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from fedoap.methods.fedavg import FedAvg
from fedoap.server.rules import WeightedMean

__all__ = ["FedGS", "GradientScaledAdamW", "small_lesion_factor"]


def _positive(name: str, value: Any, minimum: float = 0.0) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= minimum:
        raise ValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
    return value


def small_lesion_factor(labels: Tensor, log_base: float = 1000.0, small_threshold: float = 150.0) -> float:
    """FedGS's batch factor ``p = 1 + (2/B) * sum_i tanh((log_l(HW/|mask_i|))^2)`` over the small lesions.

    Args:
        labels: ``(B, 1, H, W)`` or ``(B, H, W)`` binary masks (a pixel counts as lesion when ``> 0.5``).
        log_base: ``l``, the base of the logarithm (> 1).
        small_threshold: a mask is a small lesion when ``HW / |mask| >= small_threshold``; an empty mask is none.

    Returns:
        ``p >= 1``; exactly 1 when no mask of the batch is a small lesion.

    Example::

        labels = torch.zeros(2, 1, 32, 32); labels[0, 0, 0, 0] = 1   # one 1-pixel lesion, one empty mask
        small_lesion_factor(labels)   # 1 + (2/2) * tanh(log_1000(1024)^2) = 1.765
    """
    if labels.dim() == 4:
        if labels.shape[1] != 1:
            raise ValueError(f"labels must have one channel, got shape {tuple(labels.shape)}")
        labels = labels[:, 0]
    if labels.dim() != 3 or labels.shape[0] == 0:
        raise ValueError(f"labels must be (B, 1, H, W) or (B, H, W) with B >= 1, got shape {tuple(labels.shape)}")
    batch, height, width = labels.shape
    areas = (labels.detach() > 0.5).reshape(batch, -1).sum(dim=1).tolist()
    total = 0.0
    for area in areas:
        if area == 0:
            continue  # an empty mask is not a lesion
        inverse_area = height * width / area
        if inverse_area >= small_threshold:
            total += math.tanh(math.log(inverse_area, log_base) ** 2)
    return 1.0 + 2.0 / batch * total


class GradientScaledAdamW(torch.optim.AdamW):
    """AdamW that also accumulates each step's Adam move scaled by a per-step factor (FedGS's client optimizer).

    ``step(scale=p)`` takes the ordinary AdamW step (the parameters move as with ``torch.optim.AdamW``) and adds
    ``p * lr * m_hat / (sqrt(v_hat) + eps)`` (the same bias-corrected quantities the step used) to the parameter's
    accumulated update, read with :meth:`accumulated` and cleared by :meth:`begin_round`.

    Args:
        params: the parameters to optimize.
        lr, betas, eps, weight_decay, amsgrad: as ``torch.optim.AdamW``.
        accumulate_weight_decay: also add ``p * lr * weight_decay * x`` (the decoupled decay of the step, with ``x``
            before the step) to the accumulated update; FedGS's authors leave it out (False).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        accumulate_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self.accumulate_weight_decay = accumulate_weight_decay
        self._updates: dict[nn.Parameter, Tensor] = {}
        #: steps taken since the last :meth:`begin_round`
        self.round_steps = 0

    def accumulated(self, param: nn.Parameter) -> Optional[Tensor]:
        """The accumulated scaled update of ``param`` since the last :meth:`begin_round` (None if it took no step)."""
        return self._updates.get(param)

    def begin_round(self, reset_state: bool) -> None:
        """Clear the accumulated updates; ``reset_state`` also drops AdamW's moments and step counts."""
        self._updates.clear()
        self.round_steps = 0
        if reset_state:
            self.state.clear()

    def _add(self, param: nn.Parameter, value: Tensor) -> None:
        if param in self._updates:
            self._updates[param].add_(value)
        else:
            self._updates[param] = value.clone()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *, scale: float = 1.0):  # type: ignore[override]
        """One AdamW step; its Adam move times ``scale`` joins the accumulated update."""
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.accumulate_weight_decay:
            for group in self.param_groups:
                if group["weight_decay"] != 0:
                    for p in group["params"]:
                        if p.grad is not None:
                            self._add(p, p.detach() * (scale * group["lr"] * group["weight_decay"]))
        super().step()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = float(state["step"])
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                second = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                move = state["exp_avg"] / denom * (scale * group["lr"] / bias_correction1)
                self._add(p, move)
        self.round_steps += 1
        return loss


class FedGS(FedAvg):
    """FedGS as a method object: FedAvg's sharing and loss; a small-lesion factor scales each step's share of the
    sent update; sites send ``x_global - U`` and weigh by step counts under the weighted mean (``WeightedMean``).

    Args:
        log_base: ``l`` of the factor (> 1); default 1000 (the authors' value for LiTS CT tumors).
        small_threshold: a mask is a small lesion when ``HW/|mask| >= small_threshold`` (> 0); default 150.
        reset_optimizer_state: start AdamW afresh every round, as the authors' code does (default True).
        accumulate_weight_decay: include AdamW's decoupled weight decay in the sent update (default False, as the
            authors).

    Raises:
        ValueError: ``log_base <= 1``, a non-positive threshold, or a non-boolean switch.
    """

    name = "fedgs"
    server_rule = WeightedMean
    weight_by = "steps"

    def __init__(
        self,
        log_base: float = 1000.0,
        small_threshold: float = 150.0,
        reset_optimizer_state: bool = True,
        accumulate_weight_decay: bool = False,
    ) -> None:
        _positive("log_base", log_base, minimum=1.0)
        _positive("small_threshold", small_threshold)
        for flag, value in (("reset_optimizer_state", reset_optimizer_state),
                            ("accumulate_weight_decay", accumulate_weight_decay)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, got {value!r}")
        self.log_base = log_base
        self.small_threshold = small_threshold
        self.reset_optimizer_state = reset_optimizer_state
        self.accumulate_weight_decay = accumulate_weight_decay
        self._optimizer: Optional[GradientScaledAdamW] = None
        self._global: dict[str, Tensor] = {}

    def make_round_optimizer(
        self, params: Iterable[nn.Parameter], lr: float, weight_decay: float
    ) -> GradientScaledAdamW:
        self._optimizer = GradientScaledAdamW(params, lr=lr, weight_decay=weight_decay,
                                              accumulate_weight_decay=self.accumulate_weight_decay)
        return self._optimizer

    def batch_step_scale(self, labels: Tensor) -> float:
        return small_lesion_factor(labels, self.log_base, self.small_threshold)

    def begin_round(self, model: nn.Module, global_shared: Mapping[str, Tensor]) -> None:
        """Keep the received global parameters (CPU copies) and start a new accumulated update."""
        self._global = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in global_shared.items()}
        if self._optimizer is not None:
            self._optimizer.begin_round(reset_state=self.reset_optimizer_state)

    def shared_payload(self, model: nn.Module, shared: dict[str, Tensor]) -> dict[str, Tensor]:
        """``x_global - U`` for every shared parameter that took a step this round; the received global value for one
        that took none; the current value for a buffer (none in FedOAPNet) or before the first round."""
        if not self._global or self._optimizer is None:
            return shared
        params = dict(model.named_parameters())
        out = {}
        for key, value in shared.items():
            if key not in params or key not in self._global:
                out[key] = value
                continue
            update = self._optimizer.accumulated(params[key])
            base = self._global[key].to(value.dtype)
            out[key] = base if update is None else base - update.detach().cpu().to(value.dtype)
        return out
