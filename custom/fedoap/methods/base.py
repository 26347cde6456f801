"""What a federated method is, as an object: which parameters leave a site, which loss trains locally (and what the
method adds to it), which optimizer runs the rounds and what the site sends, which loss fine-tunes at the end, and
which rule the server applies. One client script, one training loop (``fedoap.training.LocalTrainer``) and one
controller serve every method."""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from fedoap.server.rules import ServerRule, WeightedMean

__all__ = ["FederatedMethod"]


class FederatedMethod(ABC):
    """Base class of every federated method.

    Subclasses store their constructor arguments unchanged (they travel as plain JSON-compatible values between
    the command line, the job config and the client script). A method that keeps per-site state (:meth:`begin_round`)
    belongs to one site's trainer: the client script builds one per site.
    """

    #: name used on the command line (``fedoap simulate --method NAME``)
    name: str = ""
    #: how the server combines the shared parameters: a rule class of ``fedoap.server.rules``, which the controller
    #: builds once per job with :meth:`server_rule_args` (``NoAggregation`` for a method that shares nothing)
    server_rule: type[ServerRule] = WeightedMean
    #: True for the centralized reference only: one model trains on the union of every site's training split (the
    #: simulation runs it as a single site that reads every site's data: a real federation forbids this)
    pooled: bool = False
    #: the aggregation weight a site reports with its update (``LocalTrainer.train_round``'s
    #: ``stats["aggregation_weight"]``): its number of training samples (``"samples"``, FedAvg) or the number of
    #: optimizer steps of the round (``"steps"``)
    weight_by: str = "samples"
    #: how the soft Dice term of every ``BCEDiceLoss`` inside this method's losses is reduced over a batch
    #: (``"batch"``: pooled, the default; ``"image"``: mean of per-image Dice, the authors' code). The run's
    #: ``--dice-reduction`` (``TrainingOptions.dice_reduction``) sets it on the method object; every loss returned by
    #: :meth:`train_loss` and :meth:`finetune_loss` (of any subclass) then gets it, so a method does nothing for it.
    dice_reduction: str = "batch"
    #: whether the run trains under sample-level DP-SGD, set on the method object by the run configuration like
    #: :attr:`dice_reduction`; a method whose default depends on it reads it (FedOAP's head prior: on by default,
    #: off under DP-SGD)
    dp_sgd: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("train_loss", "finetune_loss"):
            if name in cls.__dict__ and not getattr(cls.__dict__[name], "_applies_loss_options", False):
                setattr(cls, name, _with_loss_options(cls.__dict__[name]))

    def resolved_args(self) -> dict[str, Any]:
        """What this method object runs with, defaults resolved: each constructor argument the object keeps under its
        own name, and the run's loss option. A run records it, so that a result made under other defaults is never
        taken for one made now (the benchmark's resume compares it); a subclass whose default follows the run
        reports the value it resolved to (FedOAP's head prior)."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        kept = {p: getattr(self, p) for p in names if hasattr(self, p)}
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in sorted(kept.items())},
                "dice_reduction": self.dice_reduction}

    def apply_loss_options(self, loss: nn.Module) -> nn.Module:
        """``loss`` with this method's :attr:`dice_reduction` set on every ``BCEDiceLoss`` inside it (in place)."""
        from fedoap.losses.segmentation import set_dice_reduction  # MONAI: only where a loss is built (not the server)

        set_dice_reduction(loss, self.dice_reduction)
        return loss

    @abstractmethod
    def model_spec(self, model_args: dict[str, Any]) -> dict[str, Any]:
        """``{"class_path": ..., "args": {...}}`` of the network every site trains (the form NVFlare's persistor
        builds the server's copy from); ``model_args`` are the backbone's constructor arguments."""

    def build_model(self, model_args: dict[str, Any]) -> nn.Module:
        """Instantiate the network of ``model_spec``."""
        spec = self.model_spec(model_args)
        module_name, _, class_name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module_name), class_name)(**spec["args"])

    @abstractmethod
    def shared_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys that leave the site and are averaged; everything else stays local."""

    @abstractmethod
    def train_loss(self) -> nn.Module:
        """Loss of the local epochs inside each federated round."""

    def finetune_loss(self) -> nn.Module:
        """Loss of the final local fine-tuning; by default the training loss."""
        return self.train_loss()

    def begin_training(self, model: nn.Module, train: Any) -> None:
        """Called once when the site's trainer is built (before the first round), with the site's training split; a
        method whose model needs a property of the local data from the first step on sets it here (FedRDN: the
        site's own intensity statistics, which normalize its inputs). By default nothing."""

    def begin_round(self, model: nn.Module, global_shared: Mapping[str, Tensor]) -> None:
        """Called by the trainer right after it loaded the server's shared parameters into ``model`` (at the start of
        every round, and before the final fine-tuning); a method snapshots here what its local loss needs (e.g.
        FedProx's anchor). ``global_shared`` holds the received tensors by state-dict key. By default nothing."""

    def regularizer(self, model: nn.Module) -> Optional[Tensor]:
        """A scalar added to the loss of every training step inside the federated rounds (not in the final
        fine-tuning), or None for no term. By default None.

        The term is a function of the weights, not of a sample: it does not fit DP-SGD's per-sample clipping, so the
        trainer refuses DP-SGD for a method with :attr:`has_regularizer`."""
        return None

    @property
    def has_regularizer(self) -> bool:
        """Whether :meth:`regularizer` can return a term, decided without calling it. By default: whether a subclass
        overrides :meth:`regularizer` (so an override is never silently combined with DP-SGD); a subclass whose
        term is off for some arguments (FedProx with ``mu = 0``) overrides this property too."""
        return type(self).regularizer is not FederatedMethod.regularizer

    def make_round_optimizer(
        self, params: Iterable[nn.Parameter], lr: float, weight_decay: float
    ) -> torch.optim.Optimizer:
        """The optimizer of the federated rounds, built once per trainer (its state lives as long as the site's
        model). By default AdamW, as every method here. The final fine-tuning always uses a fresh plain AdamW."""
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def batch_step_scale(self, labels: Tensor) -> Optional[float]:
        """A factor for this batch's step, computed from the batch's labels (on the CPU, after augmentation), or None
        for none. By default None. A method that returns a factor must build (:meth:`make_round_optimizer`) an
        optimizer whose ``step`` takes it as ``step(scale=factor)``; what the factor scales is the optimizer's
        business (FedGS: the step's share of the update the site sends, not the local step). Called for every step
        of the federated rounds, never in the final fine-tuning."""
        return None

    @property
    def has_step_scale(self) -> bool:
        """Whether :meth:`batch_step_scale` can return a factor; by default whether a subclass overrides it."""
        return type(self).batch_step_scale is not FederatedMethod.batch_step_scale

    def step_loss(self, model: nn.Module, images: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        """The loss of one step of the federated rounds (before the regularizer is added). By default
        ``loss_fn(model(images), labels)``; a method whose local objective needs more than the model's output
        overrides it (MOON: a contrastive term on features; Ditto: the global and the personal model's losses;
        FedRoD: the generic and the personalized head's losses; FedRDN: images normalized with another site's
        statistics). The final fine-tuning and the evaluation never call it: they use ``model(images)``."""
        return loss_fn(model(images), labels)

    @property
    def has_step_loss(self) -> bool:
        """Whether a subclass overrides :meth:`step_loss`."""
        return type(self).step_loss is not FederatedMethod.step_loss

    def finetune_step_loss(self, model: nn.Module, images: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
        """The loss of one step of the final local fine-tuning (``loss_fn`` is :meth:`finetune_loss`). By default
        ``loss_fn(model(images), labels)``; a method whose fine-tuning objective needs more than the model's output
        overrides it (FedDP: a BCE weighted by how much the sites' models disagree on the batch's images)."""
        return loss_fn(model(images), labels)

    def begin_step(self, model: nn.Module, step: int, steps_per_round: int) -> None:
        """Called before every step of the federated rounds with the 0-based step index within the round and the
        round's number of steps (``local_epochs * ceil(n_train / batch_size)``; under DP-SGD's Poisson sampling
        the expected number). A method that trains different parts in different phases of a round (FedRep: head
        first, then body) switches here. By default nothing."""

    def end_round(self, model: nn.Module) -> None:
        """Called after the local training of every round, before the site's payload is formed (MOON keeps the
        round's local model as the next round's "previous" model). By default nothing."""

    def site_state(self, model: nn.Module) -> dict[str, Any]:
        """What this method keeps on the site from one round to the next outside the model and the optimizer, and that
        :meth:`begin_round` does not rebuild from the received parameters, for a resumed job to continue from
        (``fedoap.site.checkpoint``): tensors and JSON values (dicts, lists, str, numbers, bool, None). By default
        nothing. Ditto: whether the personal model was started; MOON: the previous round's model; FedRoD: its pixel
        counts; FedRDN: its generator and the statistics received; FedDP: the query weights received."""
        return {}

    def load_site_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`site_state` returned, into the method of a trainer whose ``model`` already holds the
        saved parameters. By default nothing.

        Raises:
            ValueError: a state this method cannot use.
        """

    def site_statistics(self, train: Any) -> Optional[dict[str, list[float]]]:
        """Summary statistics of the site's training split that the method shares, in clear, with every other site
        through the server (FedRDN: the intensity mean and standard deviation), or None for none (the default).
        Sent with every round's update (meta key ``site_statistics``); the server forwards the latest statistics of
        every site with each task, and the site hands them to :meth:`receive_statistics`."""
        return None

    @property
    def shares_statistics(self) -> bool:
        """Whether :meth:`site_statistics` can return something; by default whether a subclass overrides it."""
        return type(self).site_statistics is not FederatedMethod.site_statistics

    def receive_statistics(self, model: nn.Module, statistics: Mapping[str, Mapping[str, list[float]]]) -> None:
        """The statistics of every site that sent some (by site name, this site's included), called at the start of
        every task once the server has some. By default nothing."""

    def server_rule_args(self) -> dict[str, Any]:
        """Constructor arguments of :attr:`server_rule` besides the reference (JSON values), checked by the rule
        class (``server_rule.check_args``); by default none. FedAWA and FedLWS pass their server-side
        hyperparameters here."""
        return {}

    def shared_payload(self, model: nn.Module, shared: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the site sends for its shared keys after a round, given their current values (``shared``, detached
        CPU copies by key). By default the values themselves; FedGS sends ``x_global - accumulated update``. The
        trainer hands the result over unchanged (client-level DP and HE then apply to it)."""
        return shared

    @property
    def dp_sgd_conflict(self) -> Optional[str]:
        """Why sample-level DP-SGD cannot train this method (it completes "method NAME ..."), or None when it can.

        By default: a regularizer (a term of the weights, not of a sample, so per-sample clipping does not bound it),
        or a step scale (a factor computed from the batch's raw labels that changes the sent update outside DP-SGD's
        clipping and noise, so the update is not a post-processing of the privatized gradients)."""
        if self.has_regularizer:
            return "adds a regularizer to the local loss, which DP-SGD cannot clip per sample"
        if self.has_step_scale:
            return ("scales each step's share of the sent update by a factor computed from the batch's labels, "
                    "outside DP-SGD's clipping and noise (the update would not be covered by its accountant)")
        if self.has_step_loss:
            return ("computes its own step loss (more than one model output or term per batch), which DP-SGD's "
                    "per-sample loss and clipping do not cover")
        if self.shares_statistics:
            return "sends statistics of its training data in clear, which no DP accountant covers"
        return None


def _with_loss_options(build: Any) -> Any:
    """Wrap a subclass's ``train_loss`` / ``finetune_loss`` so that its loss gets the method's loss options."""

    @functools.wraps(build)
    def wrapped(self: FederatedMethod) -> nn.Module:
        loss = build(self)
        return self.apply_loss_options(loss) if isinstance(loss, nn.Module) else loss

    wrapped._applies_loss_options = True  # type: ignore[attr-defined]
    return wrapped
