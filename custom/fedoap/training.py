"""Local training on one site: the same loop for every method, inside the federation or outside it.

The trainer owns the site's model (shared and local parts), its optimizer and its data. The federation only moves
the shared parameters in and out (``load_shared`` / ``shared_params``); everything else stays in this object, which
lives for the whole job when the client script runs in-process, and which ``state`` / ``load_state`` hand over to a
resumed job (``fedoap.site.checkpoint``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from fedoap.config import TrainingOptions
from fedoap.data import SliceSet
from fedoap.eval.metrics import ImageScores, binarize, per_image_scores
from fedoap.methods.base import FederatedMethod
from fedoap.privacy.dp import DPSGD, DPSGDConfig, per_sample_loss

__all__ = ["TrainConfig", "LocalTrainer", "random_flip", "WEIGHT_BY", "PRECISIONS", "COMPILE_BACKENDS",
           "speed_dp_sgd_conflict"]

#: what a method may report as its aggregation weight (``FederatedMethod.weight_by``)
WEIGHT_BY = ("samples", "steps")
#: the training step's compute precision (``TrainConfig.precision``): weights, optimizer state and loss stay fp32
PRECISIONS = ("fp32", "bf16")
#: ``torch.compile`` backends (``TrainConfig.compile_backend``): inductor generates kernels (needs a C compiler on
#: the CPU, Triton on a GPU); aot_eager and eager only trace (tests, debugging)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


#: why a speed option cannot train under sample-level DP-SGD (compile, bf16), one line, or None
speed_dp_sgd_conflict = TrainingOptions.speed_dp_sgd_conflict


class _FP32Loss(nn.Module):
    """A loss computed in fp32 outside autocast, whatever precision the network's forward ran in."""

    def __init__(self, loss: nn.Module, device_type: str) -> None:
        super().__init__()
        self.loss = loss
        self.device_type = device_type

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        def fp32(value: Any) -> Any:
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        with torch.autocast(self.device_type, enabled=False):
            return self.loss(*(fp32(a) for a in args), **{k: fp32(v) for k, v in kwargs.items()})


@dataclass
class TrainConfig:
    """Optimization settings of a site (the authors use AdamW, lr 1e-4, weight decay 1e-5, batch 16; the small CPU
    network trains faster with lr 1e-3)."""

    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    local_epochs: int = 1
    finetune_epochs: int = 5
    augment: bool = True
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 64
    dp_lr: Optional[float] = None  # the rounds' learning rate under DP-SGD (None: lr); fine-tuning keeps lr
    # speed (none changes what is trained, saved or shared: weights, optimizer state and state-dict keys stay fp32)
    precision: str = "fp32"  # "bf16": the forward and backward of every training step under bf16 autocast
    channels_last: bool = False  # the model's 4D weights and the batches in channels-last memory format
    compile: bool = False  # the model's forward compiled in place with torch.compile (nn.Module.compile)
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        for field in ("batch_size", "local_epochs", "eval_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.dp_lr is not None and self.dp_lr <= 0:
            raise ValueError(f"dp_lr must be None or > 0, got {self.dp_lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}")


def random_flip(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Flip each sample left-right and up-down with probability 1/2 each (the same flip for image and label)."""
    n = images.shape[0]
    for dim in (-1, -2):
        flip = torch.rand(n, generator=generator) < 0.5
        if flip.any():
            idx = flip.nonzero().squeeze(1).to(images.device)
            images = images.clone()
            labels = labels.clone()
            images[idx] = images[idx].flip(dim)
            labels[idx] = labels[idx].flip(dim)
    return images, labels


class LocalTrainer:
    """Trains, fine-tunes and evaluates one site's model.

    Args:
        model: the site's network (shared and local parameters).
        method: the federated method (which keys are shared, which losses train and fine-tune).
        train: training split; val: validation split (used for model selection during fine-tuning).
        config: optimization settings.
        dp: sample-level DP-SGD settings, or None for none. Its sampling and noise never come from ``config.seed``
            (see :class:`~fedoap.privacy.dp.DPSGD`): a DP-SGD run is not reproducible, by design; everything else
            (initialization, shuffling without DP, augmentation) is.

    Speed (``config.precision``, ``channels_last``, ``compile``): bf16 autocast runs each training step's forward
    and backward in bf16 (the method's step loss under autocast, the loss function itself in fp32 on fp32 inputs;
    the regularizer, optimizer and weights in fp32); channels-last converts the weights' and the batches' memory
    format (state-dict keys, shapes and dtypes unchanged; :meth:`shared_params` sends contiguous copies);
    ``compile`` compiles the model in place (``nn.Module.compile``: no ``_orig_mod.`` wrapper, so the state dict, the
    shared keys and a saved trainer state keep their names). Evaluation and prediction stay fp32 (compiled if asked).

    Raises:
        ValueError: an empty training split, a method whose ``weight_by`` is unknown, DP-SGD with a method that
            names a ``dp_sgd_conflict`` (a regularizer: a term of the weights, not of a sample, which per-sample
            clipping would not bound; or a step scale computed from the raw labels, as FedGS), or DP-SGD with a
            speed option Opacus cannot serve (:func:`speed_dp_sgd_conflict`: compile, bf16).
    """

    #: under DP-SGD, aim each step's backward pass at the images only (see :meth:`_epoch`); ``fedoap bench train``
    #: turns it off on one trainer to time what it saves
    dp_backward_to_images: bool = True

    def __init__(
        self,
        model: nn.Module,
        method: FederatedMethod,
        train: SliceSet,
        val: SliceSet,
        config: TrainConfig,
        dp: Optional[DPSGDConfig] = None,
    ) -> None:
        if len(train) == 0:
            raise ValueError("the training split is empty")
        if method.weight_by not in WEIGHT_BY:
            raise ValueError(f"method {method.name!r} has weight_by={method.weight_by!r}; choose one of {WEIGHT_BY}")
        conflict = method.dp_sgd_conflict if dp is not None else None
        if conflict:
            raise ValueError(f"method {method.name!r} {conflict}; use client-level DP of the update instead, "
                             "or another method")
        speed_conflict = speed_dp_sgd_conflict(config.precision, config.compile) if dp is not None else None
        if speed_conflict:
            raise ValueError(speed_conflict)
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.method = method
        self.shared_keys = method.shared_keys(model)
        self.train_set, self.val_set = train, val
        self._train_images = torch.from_numpy(train.images)
        self._train_labels = torch.from_numpy(train.labels)
        self.generator = torch.Generator().manual_seed(config.seed)
        method.begin_training(self.model, train)
        self.loss_fn = method.train_loss()
        # DP-SGD takes fewer, larger, noisier steps (a larger expected batch): it may want its own rate
        lr = config.dp_lr if dp is not None and config.dp_lr else config.lr
        self.optimizer = method.make_round_optimizer(self.model.parameters(), lr, config.weight_decay)
        self.dp: Optional[DPSGD] = None
        if dp is not None:  # one privacy engine for the whole job: epsilon composes over the rounds
            self.dp = DPSGD(dp, n_train=len(train), batch_size=dp.batch_size or config.batch_size,
                           case_ids=train.case_ids)
            self.loss_fn = per_sample_loss(self.loss_fn)
            self.model, self.optimizer = self.dp.make_private(self.model, self.optimizer)
        if config.precision == "bf16":
            self.loss_fn = _FP32Loss(self.loss_fn, self.device.type)
        if config.compile:  # in place (nn.Module.compile): the module keeps its identity and its state-dict keys
            self.model.compile(backend=config.compile_backend)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast of a training step's forward (and so its backward), or nothing."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if self.config.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _finetune_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    # -- what crosses the site boundary -----------------------------------------------------------------------------
    def shared_params(self) -> dict[str, torch.Tensor]:
        """What the site sends for its shared keys, detached copies on the CPU: the one thing that leaves the site.
        The current values of the shared keys, unless the method says otherwise (``shared_payload``: FedGS sends the
        global parameters minus its accumulated scaled update)."""
        state = self.model.state_dict()
        return self.method.shared_payload(self.model, {k: state[k].detach().cpu().clone(
            memory_format=torch.contiguous_format) for k in self.shared_keys})

    def load_shared(self, params: Mapping[str, object]) -> None:
        """Load the server's shared parameters; local parameters are left untouched. Then the method's
        ``begin_round`` sees the model and the received tensors (e.g. FedProx takes its anchor).

        Raises:
            ValueError: a key that is not shared, or a shape that differs from the local model.
        """
        state = self.model.state_dict()
        shared = set(self.shared_keys)
        update = {}
        for key, value in params.items():
            if key not in shared:
                raise ValueError(f"the server sent {key!r}, which is not a shared parameter of this site")
            tensor = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
            if tuple(tensor.shape) != tuple(state[key].shape):
                raise ValueError(f"shape of {key!r} from the server is {tuple(tensor.shape)}, expected {tuple(state[key].shape)}")
            update[key] = tensor.to(dtype=state[key].dtype)
        state.update(update)
        self.model.load_state_dict(state)
        self.method.begin_round(self.model, update)

    # -- what a resumed job continues from ---------------------------------------------------------------------------
    def _plain_model(self) -> nn.Module:
        """The site's network itself: Opacus's hooks are attached in place (``wrap_model=False``), but a
        ``GradSampleModule`` wrapper, were there one, would prefix every state-dict key with ``_module.``."""
        if self.dp is None:  # Opacus is loaded only under DP-SGD
            return self.model
        from opacus import GradSampleModule

        return self.model._module if isinstance(self.model, GradSampleModule) else self.model

    def state(self) -> dict[str, Any]:
        """Everything this trainer carries from one round to the next, for a resumed job to continue from: the full
        model (shared and local parameters, buffers), the optimizer's state (Opacus's DP optimizer holds none of its
        own: its ``state_dict`` is its inner optimizer's), the seeded generator of the data order and augmentation,
        DP-SGD's accountant history (its steps so far: a resumed job must not report epsilon from zero) and the
        method's own per-site state (:meth:`~fedoap.methods.base.FederatedMethod.site_state`). Tensors are live
        references: serialize before training on (``fedoap.site.checkpoint`` copies them)."""
        return {
            "model": dict(self._plain_model().state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "dp_sgd": self.dp.state_dict() if self.dp is not None else None,
            "method": self.method.site_state(self._plain_model()),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` of a trainer of the same configuration. The method's ``begin_round`` then
        runs with the next ``load_shared`` as in an uninterrupted job.

        Raises:
            ValueError: a state of another network or optimizer, or one trained without DP-SGD loaded into a trainer
                with DP-SGD (its accountant would count only the rounds after the resume, under-reporting epsilon).
        """
        missing = {"model", "optimizer", "generator", "dp_sgd", "method"} - set(state)
        if missing:
            raise ValueError(f"the trainer state lacks {sorted(missing)}")
        if self.dp is not None and state["dp_sgd"] is None:
            raise ValueError("the saved state was trained without DP-SGD, this trainer has DP-SGD: its accountant "
                             "would not count the earlier rounds' training, so it cannot continue from it")
        model = self._plain_model()
        try:
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            detail = " ".join(str(err).split())
            raise ValueError(f"the saved trainer state does not fit this trainer: {detail[:300]}") from None
        if self.dp is not None:
            self.dp.load_state_dict(state["dp_sgd"])
        self.method.load_site_state(model, state["method"])

    # -- training ----------------------------------------------------------------------------------------------------
    def _is_private(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` takes DP-SGD steps (the federated rounds under DP-SGD; not the fine-tuning, whose
        plain optimizer runs with the hooks paused)."""
        if self.dp is None:
            return False
        from opacus.optimizers import DPOptimizer

        return isinstance(optimizer, DPOptimizer)

    def _index_batches(self, optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
        """Shuffled minibatches from the seeded generator; under DP-SGD, Poisson-sampled ones (slices or cases) from
        the OS's randomness, at the rate the accountant was told."""
        if self._is_private(optimizer):
            return self.dp.batches(optimizer)
        n, b = len(self.train_set), self.config.batch_size
        order = torch.randperm(n, generator=self.generator)
        return (order[start : start + b] for start in range(0, n, b))

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps of one federated round (under DP-SGD: its Poisson draws per epoch, over slices or cases;
        the draws that come out empty are noise-only steps the trainer does not see)."""
        if self.dp is not None:
            return self.config.local_epochs * self.dp.steps_per_epoch
        return self.config.local_epochs * math.ceil(len(self.train_set) / self.config.batch_size)

    def _epoch(
        self, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, federated: bool = False, first_step: int = 0
    ) -> tuple[float, int, int]:
        """One pass over the training split; returns the mean loss, the steps and the images trained on.
        ``federated``: a pass of the federated rounds, where the method computes the step's loss (``step_loss``), its
        regularizer is added to it, its step scale (from the batch's labels) goes to the step and ``begin_step`` is
        called before every step (``first_step``: the round's step index of this epoch's first step); otherwise a
        pass of the fine-tuning, whose step loss is ``finetune_step_loss``."""
        self.model.train()
        regularize = federated and self.method.has_regularizer
        scale_steps = federated and self.method.has_step_scale
        total, steps, images_seen = 0.0, 0, 0
        aim_at_images = self.dp_backward_to_images and self._is_private(optimizer)
        for idx in self._index_batches(optimizer):
            images, labels = self._train_images[idx], self._train_labels[idx]
            if self.config.augment:
                images, labels = random_flip(images, labels, self.generator)
            scale = self.method.batch_step_scale(labels) if scale_steps else None
            images, labels = self._to_device(images), self._to_device(labels)
            if aim_at_images:
                images.requires_grad_(True)  # see below: a DP-SGD step's backward pass aims at the images
            if federated:
                self.method.begin_step(self.model, first_step + steps, self.steps_per_round)
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                if federated:
                    loss = self.method.step_loss(self.model, images, labels, loss_fn)
                else:
                    loss = self.method.finetune_step_loss(self.model, images, labels, loss_fn)
            loss = loss.float()
            if regularize:
                extra = self.method.regularizer(self.model)
                if extra is not None:
                    loss = loss + extra
            if aim_at_images:
                # DP-SGD's optimizer replaces every weight's gradient by the noised sum of its clipped per-sample
                # gradients (which Opacus's hooks compute from each layer's input and output gradient), so the batch
                # gradients of the weights that loss.backward() would also compute are thrown away: asking autograd
                # for the images' gradient alone runs every layer's backward (and hook) without them
                torch.autograd.grad(loss, images)
            else:
                loss.backward()
            if scale is None:
                optimizer.step()
            else:
                optimizer.step(scale=scale)
            total += float(loss.detach())
            steps += 1
            images_seen += len(idx)
        return total / max(steps, 1), steps, images_seen

    def expected_weight(self) -> float:
        """The aggregation weight :meth:`train_round` will report, known before training: the training samples, or
        (a method that weighs by steps) the steps of full batches over ``local_epochs`` epochs, an estimate under
        Poisson sampling. Secure aggregation scales every site's update by the total of these (a common scale)."""
        if self.method.weight_by == "steps":
            return float(math.ceil(len(self.train_set) / self.config.batch_size) * self.config.local_epochs)
        return float(len(self.train_set))

    def train_round(self) -> dict[str, float]:
        """``local_epochs`` epochs with the method's training loss plus its regularizer (and its step scale); returns
        loss (regularizer included), steps, samples, the aggregation weight the site reports with its update
        (``aggregation_weight``: samples or steps, as the method's ``weight_by`` says) and images/s (images trained
        on: under DP-SGD, what Poisson sampling drew).

        Under DP-SGD also ``"privacy"``, what the site's budget ledger and a reader need:

        * ``dp_sgd_epsilon`` (at ``dp_sgd_delta``, the whole job so far, per DP record) and ``dp_sgd_unit``
          (``"slice"`` or ``"case"``);
        * ``dp_sgd_epsilon_per_case``: the epsilon that protects a patient, with ``max_slices_per_case``, the
          group size it is computed for (equal to ``dp_sgd_epsilon`` with unit ``"case"``);
        * ``dp_sgd_round_steps`` (the DP-SGD steps of this round, noise-only ones included), ``dp_sgd_steps`` (all
          rounds), ``dp_sgd_noise_multiplier`` and ``dp_sgd_sample_rate`` (per unit): one round's sampled Gaussian
          mechanisms, enough to compose it in a ledger.

        ``max_slices_per_case`` and the per-case epsilon (a function of it) describe the training data: whoever sends
        them in clear reveals the largest case's slice count."""
        start = time.perf_counter()
        steps_before = self.dp.steps if self.dp is not None else 0
        losses, steps, images = [], 0, 0
        for _ in range(self.config.local_epochs):
            loss, s, seen = self._epoch(self.loss_fn, self.optimizer, federated=True, first_step=steps)
            losses.append(loss)
            steps += s
            images += seen
        self.method.end_round(self.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        stats = {
            "train_loss": float(np.mean(losses)),
            "steps": steps,
            "n_samples": len(self.train_set),
            "aggregation_weight": steps if self.method.weight_by == "steps" else len(self.train_set),
            "train_seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else float("nan"),
        }
        if self.dp is not None:
            stats["privacy"] = {
                "dp_sgd_epsilon": self.dp.epsilon(),
                "dp_sgd_delta": float(self.dp.config.delta),
                "dp_sgd_unit": self.dp.unit,
                "dp_sgd_epsilon_per_case": self.dp.case_epsilon(),
                "max_slices_per_case": self.dp.max_slices_per_case,
                "dp_sgd_round_steps": self.dp.steps - steps_before,
                "dp_sgd_steps": self.dp.steps,
                "dp_sgd_noise_multiplier": self.dp.noise_multiplier,
                "dp_sgd_sample_rate": self.dp.sample_rate,
            }
        return stats

    def finetune(self) -> dict[str, object]:
        """Fine-tune every parameter with the method's fine-tuning loss and keep the checkpoint with the best
        validation Dice (the model before fine-tuning is a candidate too). The test split is never looked at.

        Under DP-SGD the fine-tuning runs with the privacy hooks paused: the personalized model never leaves the
        site, and the guarantee covers what does (the shared updates of every round)."""
        if self.dp is None:
            return self._finetune()
        with self.dp.paused():
            return self._finetune()

    def _finetune(self) -> dict[str, object]:
        loss_fn = self.method.finetune_loss()
        if self.config.precision == "bf16":
            loss_fn = _FP32Loss(loss_fn, self.device.type)
        optimizer = self._finetune_optimizer()
        best_dice = self.evaluate(self.val_set).mean_dice()
        best_epoch, best_state = 0, copy.deepcopy(self.model.state_dict())
        curve = [best_dice]
        for epoch in range(1, self.config.finetune_epochs + 1):
            self._epoch(loss_fn, optimizer)
            dice = self.evaluate(self.val_set).mean_dice()
            curve.append(dice)
            if dice > best_dice:
                best_dice, best_epoch, best_state = dice, epoch, copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(best_state)
        return {"best_epoch": best_epoch, "best_val_dice": best_dice, "val_dice_per_epoch": curve}

    # -- evaluation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: np.ndarray) -> torch.Tensor:
        """Binary masks (N, 1, H, W) on the CPU."""
        self.model.eval()
        out = []
        for start in range(0, len(images), self.config.eval_batch_size):
            batch = self._to_device(torch.from_numpy(images[start : start + self.config.eval_batch_size]))
            out.append(binarize(self.model(batch)).cpu())
        return torch.cat(out) if out else torch.zeros((0, 1, *images.shape[2:]))

    def evaluate(self, split: SliceSet) -> ImageScores:
        """Per-image Dice and HD95 of the current model on a split."""
        return per_image_scores(self.predict(split.images), torch.from_numpy(split.labels))
