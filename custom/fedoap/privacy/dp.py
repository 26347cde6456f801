"""Differential privacy for a site: sample-level DP-SGD on the client and client-level DP on the shared update.

Two mechanisms, both Gaussian, both accounted with Opacus (Rényi DP by default):

* **Sample-level DP-SGD** (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): every per-sample
  gradient is clipped to ``max_grad_norm``, the clipped sum gets ``N(0, (sigma * max_grad_norm)^2)`` noise, and
  minibatches are drawn by Poisson sampling so that the accountant's privacy amplification by subsampling holds.
  It protects each DP record of a site against everyone who sees any model trained on it (the server, the other
  sites, whoever gets the global model): a 2D slice (``unit="slice"``) or a whole case, i.e. a patient's volume
  (``unit="case"``: cases are sampled and give one slice each); slice-level epsilon comes with its group-privacy
  bound over the largest case (:func:`group_epsilon`). :class:`DPSGD` wraps Opacus so that ``LocalTrainer``'s loop
  stays the same with and without privacy: one :meth:`DPSGD.make_private` call, in the style of
  ``opacus.PrivacyEngine.make_private``.
* **Client-level DP on the shared update** (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
  Language Models", ICLR 2018): the site's update (local - global shared parameters) is clipped to L2 norm ``C`` as a
  whole and gets ``N(0, (sigma * C)^2)`` noise on every coordinate *on the site*, before it is encrypted or sent, so
  the server never sees the unnoised update (:func:`clip_and_noise`, :class:`UpdateDPAccountant`).

Randomness: a DP guarantee holds only against an adversary who cannot predict the noise (or, for the amplification
by subsampling, the sampling). Nothing here takes a generator a job can seed: noise comes from
:func:`fedoap.privacy.secure_random.secure_normal` (ChaCha20 keyed by ``os.urandom``), Poisson sampling from
``os.urandom``, and the optional GPU path from a generator reseeded from the OS at every epoch. Only non-private
training stays reproducible from the job's seed.

Adjacency: both accountants use Opacus's add/remove-one convention (sensitivity = the clip norm): one slice (or
case) added to or removed from a site's training set (DP-SGD), or a site's update present versus absent (client
level). Against replace-one adjacency the sensitivity doubles, i.e. the same epsilon holds for half the noise
multiplier.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedoap.losses import BCEDiceLoss, PerturbedBoundaryLoss
from fedoap.privacy.secure_random import os_seeded_generator, reseed, secure_normal
from fedoap.checks import is_finite_number as _is_real

# Opacus (1.3 s to import: it pulls torch.distributed's tensor machinery) is imported where DP runs, not where this
# module's configurations are read: a site or server that trains without DP never loads it.
if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

__all__ = [
    "UpdateDPConfig",
    "clip_and_noise",
    "UpdateDPAccountant",
    "update_dp_epsilon",
    "noise_for_epsilon",
    "DPSGDConfig",
    "DPSGD",
    "group_epsilon",
    "per_sample_loss",
]

_ACCOUNTANTS = ("rdp", "prv")
_GRAD_SAMPLE_MODES = ("hooks", "functorch")
_UNITS = ("slice", "case")
_NOISE_SOURCES = ("chacha20", "os_seeded")



def _check_positive(name: str, value: object) -> None:
    if not _is_real(value) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _check_non_negative(name: str, value: object) -> None:
    if not _is_real(value) or float(value) < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def _check_delta(value: object) -> None:
    if not _is_real(value) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {value!r}.")


def _check_sample_rate(value: object) -> None:
    if not _is_real(value) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {value!r}.")


def _check_count(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _calibrate(**kwargs: Any) -> float:
    """``opacus.accountants.utils.get_noise_multiplier``, without the RDP warnings its bisection raises for the
    candidate noise levels it rejects on the way."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        from opacus.accountants.utils import get_noise_multiplier

        return float(get_noise_multiplier(**kwargs))


def _steps_in(accountant: Any) -> int:
    """Optimizer steps recorded by an Opacus accountant (its history holds ``(sigma, q, steps)`` runs)."""
    return int(sum(entry[2] for entry in accountant.history))


# ====================================================================================================================
# Client-level DP on the shared update (McMahan et al. 2018)
# ====================================================================================================================
@dataclass(frozen=True)
class UpdateDPConfig:
    """Client-level DP of the shared update (McMahan et al., ICLR 2018).

    Args:
        clip_norm: L2 bound ``C`` of the whole update (all shared tensors together), ``> 0``.
        noise_multiplier: ``sigma``; every coordinate of what the server sees gets ``N(0, (sigma * C)^2)`` noise,
            ``>= 0``.
        delta: the delta at which epsilon is reported, in ``(0, 1)``.
        shares: ``m``, how many sites' noise adds up in what the server sees. 1 (local DP): each released update
            carries all of the noise. ``m > 1`` (distributed DP, when the server sees only the sum of at least ``m``
            updates: secure aggregation or HE): each site adds ``N(0, (sigma * C)^2 / m)``
            (:attr:`site_noise_multiplier`), so a sum of ``m`` or more carries at least ``sigma * C``.

    Raises:
        ValueError: if a value is outside its range.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    shares: int = 1

    def __post_init__(self) -> None:
        _check_positive("clip_norm", self.clip_norm)
        _check_non_negative("noise_multiplier", self.noise_multiplier)
        _check_delta(self.delta)
        _check_count("shares", self.shares, 1)

    @property
    def site_noise_multiplier(self) -> float:
        """The noise multiplier of one site's own release: ``sigma / sqrt(shares)``."""
        return float(self.noise_multiplier) / math.sqrt(self.shares)


def clip_and_noise(
    update: Mapping[str, torch.Tensor | np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Clip a site's update to global L2 norm ``clip_norm`` and add Gaussian noise, on the site (McMahan et al. 2018).

    ``update`` must be the *difference* local - global of the shared parameters (clipping full weights would shrink
    the model itself). The norm is taken over all tensors together; the update is scaled by ``min(1, C / norm)``;
    then every coordinate gets independent ``N(0, (sigma * C)^2)`` noise. Noise is added after clipping, so the
    sensitivity of the released update is ``C`` whatever the local training did.

    The noise comes from :func:`~fedoap.privacy.secure_random.secure_normal` (ChaCha20 keyed by ``os.urandom`` for
    every call, never stored), and there is deliberately no way to pass a generator: noise a caller can seed is noise
    whoever knows the seed (the job's ``--seed``, the site's name) regenerates and subtracts. For the same reason the
    update's norm before clipping and the clipping factor are not returned: with the released update they undo the
    clipping (the norm says how far the site moved, the factor rescales the release back to the raw update). They
    must never leave the site, and nothing here hands them out.

    Args:
        update: name -> tensor or array with the update of each shared parameter (floating point, finite).
        clip_norm: ``C > 0``.
        noise_multiplier: ``sigma >= 0`` (0 clips without noise: no privacy, for ablations).

    Returns:
        the noised update (float32 CPU tensors, same keys and shapes) and ``{"noise_std": sigma * C}`` (public: both
        factors are the site's published settings).

    Raises:
        ValueError: if the update is empty, holds a non-floating or non-finite entry, or an argument is out of range.
    """
    _check_positive("clip_norm", clip_norm)
    _check_non_negative("noise_multiplier", noise_multiplier)
    if len(update) == 0:
        raise ValueError("the update is empty: there is nothing to clip and noise.")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in update.items():
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if not tensor.is_floating_point():
            raise ValueError(f"update entry {key!r} has dtype {tensor.dtype}; only floating-point updates can be noised.")
        tensors[key] = tensor.detach().to("cpu")
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))
    if not math.isfinite(norm):
        raise ValueError("the update holds a non-finite value (NaN or inf); refusing to release it.")
    scale = min(1.0, float(clip_norm) / norm) if norm > 0 else 1.0
    std = float(noise_multiplier) * float(clip_norm)
    # one draw for the whole update: one fresh key, and the per-call cost is paid once rather than per tensor
    sizes = [t.numel() for t in tensors.values()]
    noise = secure_normal((sum(sizes),), std, dtype=torch.float32).split(sizes) if std > 0 else None
    out: dict[str, torch.Tensor] = {}
    for i, (key, tensor) in enumerate(tensors.items()):
        clipped = (tensor.double() * scale).float()
        out[key] = clipped + noise[i].view(tensor.shape) if noise is not None else clipped
    return out, {"noise_std": std}


class UpdateDPAccountant:
    """(epsilon, delta) of client-level DP for one site over the rounds (McMahan et al. 2018), with Opacus's RDP
    accountant.

    One :meth:`step` per round in which the site released a clipped, noised update: one sampled Gaussian mechanism
    with noise multiplier ``sigma`` and sample rate ``q`` (``q = 1``: every site takes part in every round, so there
    is no amplification by subsampling). The guarantee is *per site* against the server as the adversary: it bounds
    what the sequence of a site's released updates reveals about that site's whole data set. With ``q = 1`` epsilon
    grows roughly like ``sqrt(2 * rounds * ln(1 / delta)) / sigma`` and is large unless ``sigma`` is large: over 50
    rounds at delta 1e-5, sigma 1 gives epsilon 57, sigma 2 gives 22, sigma 5 gives 7.1, sigma 10 gives 3.2. Noise of
    std ``sigma * C`` on a single site's update is heavy, so the useful regime is few rounds or a loose epsilon; this
    is why it is paired with sample-level DP-SGD, whose Poisson subsampling makes each step far cheaper.

    Args:
        noise_multiplier: ``sigma >= 0`` used every round.
        sample_rate: probability that the site takes part in a round, in ``(0, 1]``.

    Raises:
        ValueError: if an argument is out of range.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float = 1.0) -> None:
        _check_non_negative("noise_multiplier", noise_multiplier)
        _check_sample_rate(sample_rate)
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        from opacus.accountants import RDPAccountant

        self.accountant = RDPAccountant()

    def step(self) -> None:
        """Record one round's release."""
        self.accountant.step(noise_multiplier=float(self.noise_multiplier), sample_rate=float(self.sample_rate))

    @property
    def rounds(self) -> int:
        """Rounds recorded so far."""
        return _steps_in(self.accountant)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first round, inf with ``sigma = 0``).

        Raises:
            ValueError: if ``delta`` is not in (0, 1).
        """
        _check_delta(delta)
        if self.rounds == 0:
            return 0.0
        if float(self.noise_multiplier) == 0.0:
            return math.inf
        return float(self.accountant.get_epsilon(delta=float(delta)))

    def state_dict(self) -> dict[str, Any]:
        """The accountant's state, to persist it where the client process restarts every round."""
        return dict(self.accountant.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` (Opacus validates it)."""
        self.accountant.load_state_dict(dict(state))


def update_dp_epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon of ``rounds`` client-level releases with noise multiplier ``sigma`` (same accountant as
    :class:`UpdateDPAccountant`), e.g. to print the budget of a job before it runs.

    Raises:
        ValueError: if an argument is out of range.
    """
    _check_count("rounds", rounds, 0)
    _check_delta(delta)
    accountant = UpdateDPAccountant(noise_multiplier, sample_rate)
    for _ in range(int(rounds)):
        accountant.step()
    return accountant.epsilon(delta)


def noise_for_epsilon(target_epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier (to Opacus's search tolerance of 0.01 in epsilon) whose ``rounds`` client-level
    releases spend at most ``target_epsilon`` at ``delta`` (``opacus.accountants.utils.get_noise_multiplier``, RDP).

    Raises:
        ValueError: if an argument is out of range (Opacus raises a ValueError too if the budget is unreachable).
    """
    _check_positive("target_epsilon", target_epsilon)
    _check_count("rounds", rounds, 1)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    return _calibrate(
        target_epsilon=float(target_epsilon),
        target_delta=float(delta),
        sample_rate=float(sample_rate),
        steps=int(rounds),
        accountant="rdp",
    )


# ====================================================================================================================
# Sample-level DP-SGD with Opacus (Abadi et al. 2016)
# ====================================================================================================================
def per_sample_loss(loss: nn.Module) -> nn.Module:
    """The per-image version of a segmentation loss, as DP-SGD needs it.

    DP-SGD clips the gradient of each sample's own loss, so the batch loss must be the mean of per-sample losses
    (Opacus ``loss_reduction="mean"``). :class:`~fedoap.losses.BCEDiceLoss` with ``batch=True`` pools the Dice
    statistics over the batch: a sample's gradient then depends on the other samples, the "per-sample gradients"
    Opacus computes are not the gradients of anything per sample, and the clipping bound (hence the guarantee) does
    not hold. Under DP-SGD the Dice term therefore switches to per image (``batch=False``); the BCE term is already
    a per-pixel mean, i.e. the mean over images of per-image means. The Perturbed Boundary Loss is per-sample when
    its base loss is (its mask and noise are per pixel).

    Returns:
        a new loss (``loss`` itself if it is already per-sample).

    Raises:
        ValueError: for a loss not known to be a mean of per-sample losses.
    """
    if isinstance(loss, BCEDiceLoss):
        if not loss.batch:
            return loss
        return BCEDiceLoss(
            bce_weight=loss.bce_weight,
            dice_weight=loss.dice_weight,
            smooth_nr=loss.smooth_nr,
            smooth_dr=loss.smooth_dr,
            batch=False,
        )
    if isinstance(loss, PerturbedBoundaryLoss):
        base = per_sample_loss(loss.seg_loss)
        if base is loss.seg_loss:
            return loss
        return PerturbedBoundaryLoss(
            base_loss=base,
            threshold=loss.threshold,
            noise_std=loss.noise_std,
            plain_weight=loss.plain_weight,
            perturbed_weight=loss.perturbed_weight,
            generator=loss.generator,
        )
    if isinstance(loss, (nn.BCEWithLogitsLoss, nn.MSELoss, nn.L1Loss)) and loss.reduction == "mean":
        if getattr(loss, "weight", None) is None and getattr(loss, "pos_weight", None) is None:
            return loss
    raise ValueError(
        f"{type(loss).__name__} is not known to be a mean of per-sample losses, which DP-SGD requires "
        "(Opacus loss_reduction='mean'); use BCEDiceLoss(batch=False) or a PerturbedBoundaryLoss over it."
    )


@dataclass(frozen=True)
class DPSGDConfig:
    """Sample-level DP-SGD settings (Abadi et al. 2016) for one site and one whole job.

    Give exactly one of ``noise_multiplier`` and ``target_epsilon``. With ``target_epsilon`` the noise multiplier is
    calibrated once for the whole job: ``total_epochs`` (rounds x local epochs) of DP-SGD steps must spend at most
    ``target_epsilon`` at ``delta``.

    Args:
        max_grad_norm: per-sample gradient clipping bound, ``> 0``.
        noise_multiplier: ``sigma >= 0``: noise std / ``max_grad_norm``.
        target_epsilon: the job's budget, ``> 0``.
        delta: target delta, in ``(0, 1)``; a common choice is below ``1 / n_train`` (of cases, with ``unit="case"``).
        total_epochs: local DP-SGD epochs over the whole job; needed with ``target_epsilon``.
        accountant: Opacus accounting mechanism, ``"rdp"`` (default) or ``"prv"``.
        grad_sample_mode: how Opacus computes per-sample gradients, ``"hooks"`` (per-layer rules) or ``"functorch"``.
        unit: what one DP record is. ``"slice"`` (default): every 2D slice is Poisson-sampled on its own, so the
            guarantee protects one slice; a patient whose volume gave ``k`` slices is only covered by group privacy
            over ``k`` records (:meth:`DPSGD.case_epsilon` reports it). ``"case"``: cases are Poisson-sampled and a
            sampled case gives one slice drawn uniformly at random, so every step holds at most one clipped gradient
            per case and the accountant's epsilon protects a whole patient.
        noise_source: where the gradient noise comes from; neither can be seeded by the job. ``"chacha20"``
            (default): :func:`~fedoap.privacy.secure_random.secure_normal`, a cryptographic stream keyed by the OS
            at every step, drawn on the CPU. ``"os_seeded"``: ``torch.normal`` from a generator on the parameters'
            device seeded with 63 bits of OS entropy at every epoch, with Opacus's four-normal sum against
            floating-point attacks; meant for a GPU, where a CPU stream of one value per parameter per step would
            dominate the step, at the price of a non-cryptographic generator with a 63-bit secret seed.
        batch_size: the expected batch of DP-SGD's Poisson sampling (None: the trainer's batch size). DP-SGD wants
            larger batches than plain training: the noise on the mean gradient is ``sigma / batch``, and sigma grows
            slowly with the rate.
        noise_prefetch: with ``"chacha20"``, draw each step's noise ahead on a background thread while the step
            computes (default; :class:`~fedoap.privacy.dp_optimizer.SecureNoiseDPOptimizer`), or inside the step.

    Raises:
        ValueError: if a value is out of range or the noise is given both ways or neither way.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    total_epochs: int | None = None
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    unit: str = "slice"
    noise_source: str = "chacha20"
    batch_size: int | None = None
    noise_prefetch: bool = True

    def __post_init__(self) -> None:
        _check_positive("max_grad_norm", self.max_grad_norm)
        if self.batch_size is not None:
            _check_count("batch_size", self.batch_size, 1)
        _check_delta(self.delta)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}."
            )
        if self.noise_multiplier is not None:
            _check_non_negative("noise_multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _check_positive("target_epsilon", self.target_epsilon)
            if self.total_epochs is None:
                raise ValueError("target_epsilon needs total_epochs (rounds x local epochs) to calibrate the noise.")
        if self.total_epochs is not None:
            _check_count("total_epochs", self.total_epochs, 1)
        if self.accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {_ACCOUNTANTS}, got {self.accountant!r}.")
        if self.grad_sample_mode not in _GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {_GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}.")
        if self.unit not in _UNITS:
            raise ValueError(f"unit must be one of {_UNITS}, got {self.unit!r}.")
        if self.noise_source not in _NOISE_SOURCES:
            raise ValueError(f"noise_source must be one of {_NOISE_SOURCES}, got {self.noise_source!r}.")
        if not isinstance(self.noise_prefetch, bool):
            raise ValueError(f"noise_prefetch must be True or False, got {self.noise_prefetch!r}.")


def _poisson_mask(n: int, rate: float) -> torch.Tensor:
    """``n`` independent Bernoulli(``rate``) draws straight from the OS's CSPRNG (``os.urandom``): a unit is in when
    its 64-bit word is below ``rate * 2**64`` (exact for ``rate >= 2**-11``, off by under ``2**-64`` below). There is
    no seed to recover, and it costs microseconds for thousands of units."""
    if rate >= 1.0:
        return torch.ones(n, dtype=torch.bool)
    threshold = np.uint64(int(rate * 2.0**64))
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return torch.from_numpy(words < threshold)


def group_epsilon(history: list[tuple[float, float, int]], group_size: int, delta: float) -> float:
    """Epsilon at ``delta`` for a group of ``group_size`` records (e.g. a patient's slices) of a DP-SGD run whose
    accountant history is ``history`` (``(noise_multiplier, sample_rate, steps)`` runs, Opacus's format).

    The standard group-privacy bound of (epsilon, delta)-DP: a mechanism that is ``(e0, d0)``-DP for one record is
    ``(k e0, d0 (e^{k e0} - 1) / (e^{e0} - 1))``-DP for ``k`` records (chain ``k`` add/remove steps; the delta sum is
    ``d0 * sum_{i<k} e^{i e0} <= k e^{(k-1) e0} d0``, the usual form). ``e0(d0)`` comes from the RDP analysis of the
    sampled Gaussian mechanism (Mironov et al. 2019, Opacus's orders); ``d0`` is searched on a grid (ratio 10^(1/8),
    down to ``delta * 1e-150``) for the smallest ``k e0`` whose group delta stays ``<= delta``. The delta factor grows
    like ``e^{(k-1) e0}``, so the bound is only useful when ``k * e0`` is small: slice-level DP-SGD protects a patient
    with many slices very little, which is the point of reporting it. Returns inf if no ``d0`` on the grid works.

    Raises:
        ValueError: if ``group_size`` is not an integer >= 1 or ``delta`` is not in (0, 1).
    """
    _check_count("group_size", group_size, 1)
    _check_delta(delta)
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as _rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(np.asarray(_rdp.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders)) for s, q, n in history)
    k = int(group_size)
    best = math.inf
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        for j in range(1201):
            log_d0 = math.log(delta) - j * math.log(10.0) / 8.0
            e0, _ = _rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=math.exp(log_d0))
            e0 = float(e0)
            if not math.isfinite(e0):
                continue
            log_group_delta = log_d0 + float(np.logaddexp.reduce(np.arange(k) * e0))
            if log_group_delta <= math.log(delta):
                best = min(best, k * e0)
    return best


class DPSGD:
    """Sample-level DP-SGD (Abadi et al. 2016) for ``LocalTrainer``, built on Opacus.

    Create one per site and per *job* (not per round): the accountant composes every DP-SGD step of every round, so
    :meth:`epsilon` is the site's spent budget so far.

    How it fits the trainer (the body of the loop does not change, only where its batches come from):

    * :meth:`make_private` attaches Opacus's per-sample-gradient hooks to the model *in place* (Opacus
      ``wrap_model=False``): no ``GradSampleModule`` wrapper, so ``state_dict()`` keys keep their names (no
      ``_module.`` prefix) and the shared parameters travel by their original names. It returns the same model and
      a :class:`SecureNoiseDPOptimizer` (or, with ``noise_source="os_seeded"``, a ``DPOptimizer`` on an OS-seeded
      generator): per-sample clipping, noise, mean over the *expected* batch size, each step counted by the
      accountant at exactly the rate :meth:`batches` samples with.
    * :meth:`batches` replaces the shuffled minibatches: each epoch yields the index tensors of Poisson-sampled
      batches, for the trainer to index its arrays with, as before. With ``unit="slice"`` each slice is in with
      probability ``sample_rate``; with ``unit="case"`` each *case* is, and a sampled case contributes one of its
      slices drawn uniformly (``secrets.randbelow``), so no step holds two slices of one patient.
    * Randomness that protects is unpredictable to everyone but the site: the Poisson draws come from
      ``os.urandom`` (:func:`_poisson_mask`), the slice within a case from ``secrets``, the noise from
      :func:`~fedoap.privacy.secure_random.secure_normal` (or a generator reseeded from the OS at every epoch). No
      seed exists that a job argument sets, none is stored, and the trainer's seeded generator is never used here:
      a server that knows the job's seed cannot replay which images were sampled nor subtract the noise, so the
      amplification by subsampling the accountant counts holds against it (Opacus's own sampler and noise would
      take a job-seeded ``torch.Generator``, since its ``secure_mode`` needs ``torchcsprng``).
    * Sample rate: ``q = 1 / ceil(n_units / batch_size)`` over the units (slices, or cases), Opacus's convention;
      an epoch is ``ceil(n_units / batch_size)`` draws, the expected batch ``int(n_units * q) <= batch_size``. With
      ``unit="case"`` an epoch thus visits every case once in expectation but only one slice of it: a local epoch
      trains on about ``n_cases`` slices, not ``n_slices``; more local epochs train more and cost more epsilon.
    * Why the case unit protects a patient: removing a case removes at most one clipped gradient (norm <= C) from
      each step's sum, present with probability ``q``: the sampled Gaussian mechanism at rate ``q`` over cases. The
      uniform choice of the slice only mixes mechanisms that each satisfy that bound, and Rényi (and hockey-stick)
      divergences are jointly quasi-convex, so the mixture does too.
    * Empty batches: Poisson sampling can draw nothing. Opacus's semantics for that step is a noise-only update that
      the accountant counts; :meth:`batches` performs exactly that step itself (zero clipped sum + noise, through the
      DP optimizer) and yields only non-empty batches, so the trainer never runs the model on an empty batch.
    * Loss: the trainer must use a mean of per-sample losses; :func:`per_sample_loss` switches the batch-pooled Dice
      to per-image Dice.

    Regularizers that do not flow through the model's forward (a proximal term on the parameters) are *dropped* by
    Opacus: the DP optimizer replaces the gradient by the noised clipped per-sample sum.

    Args:
        config: DP-SGD settings.
        n_train: number of training slices of the site.
        batch_size: the trainer's nominal batch size.
        case_ids: the case of each training slice (``SliceSet.case_ids``); needed with ``unit="case"``, and with
            ``unit="slice"`` to report the per-case epsilon (:meth:`case_epsilon`).

    Raises:
        ValueError: if ``n_train`` or ``batch_size`` is not a positive integer, ``case_ids`` does not name one case
            per slice or is missing with ``unit="case"``, or the target epsilon is unreachable.

    Example::

        >>> dp = DPSGD(DPSGDConfig(noise_multiplier=1.0, unit="case"), len(train), 16, case_ids=train.case_ids)
        >>> model, optimizer = dp.make_private(model, optimizer)
        >>> loss_fn = per_sample_loss(BCEDiceLoss())
        >>> for idx in dp.batches(optimizer):
        ...     optimizer.zero_grad(set_to_none=True)
        ...     loss_fn(model(images[idx]), labels[idx]).backward()
        ...     optimizer.step()
        >>> dp.epsilon(), dp.case_epsilon()
    """

    def __init__(self, config: DPSGDConfig, n_train: int, batch_size: int,
                 case_ids: Sequence[str] | None = None) -> None:
        if not isinstance(config, DPSGDConfig):
            raise ValueError(f"config must be a DPSGDConfig, got {type(config).__name__}.")
        _check_count("n_train", n_train, 1)
        _check_count("batch_size", batch_size, 1)
        self.config = config
        self.n_train = int(n_train)
        self.batch_size = int(batch_size)
        self._case_slices: list[list[int]] | None = None
        self.n_cases: int | None = None
        self.max_slices_per_case: int | None = None
        if case_ids is not None:
            if isinstance(case_ids, (str, bytes)) or len(case_ids) != self.n_train:
                raise ValueError(f"case_ids must name the case of each of the {self.n_train} training slices, got "
                                 f"{len(case_ids) if not isinstance(case_ids, (str, bytes)) else 'a string'}.")
            groups: dict[Any, list[int]] = {}
            for index, case in enumerate(case_ids):
                groups.setdefault(case, []).append(index)
            self._case_slices = list(groups.values())
            self.n_cases = len(groups)
            self.max_slices_per_case = max(len(v) for v in groups.values())
        elif config.unit == "case":
            raise ValueError("unit 'case' needs case_ids (the case of every training slice) to sample cases.")
        self.unit = config.unit
        self.n_units = self.n_cases if config.unit == "case" else self.n_train
        self.steps_per_epoch = math.ceil(self.n_units / self.batch_size)
        self.sample_rate = 1.0 / self.steps_per_epoch
        self.expected_batch_size = int(self.n_units * self.sample_rate)
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        else:
            self.noise_multiplier = _calibrate(
                target_epsilon=float(config.target_epsilon),
                target_delta=float(config.delta),
                sample_rate=self.sample_rate,
                steps=int(config.total_epochs) * self.steps_per_epoch,
                accountant=config.accountant,
            )
        with warnings.catch_warnings():  # Opacus warns that torchcsprng is off: our randomness does not use it
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            from opacus import PrivacyEngine

            self.engine = PrivacyEngine(accountant=config.accountant, secure_mode=False)
        self._hooks: Any = None
        self._model: nn.Module | None = None
        self._noise_generator: torch.Generator | None = None
        self._optimizers: list[DPOptimizer] = []

    # -- wrapping ----------------------------------------------------------------------------------------------------
    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, DPOptimizer]:
        """Make ``model`` and ``optimizer`` private; call once per job.

        Opacus's ``PrivacyEngine.make_private`` does the model side (validation, per-sample hooks in place, no grad
        accumulation under Poisson sampling); its optimizer and data loader are not used, because they draw from
        generators a job could seed: the DP optimizer and the sampler are this object's own.

        Args:
            model: the site's network (no BatchNorm: Opacus's validator rejects it; no in-place activations,
                which break Opacus's hooks).
            optimizer: its optimizer over the model's parameters.

        Returns:
            the same ``model`` (hooks attached in place, state-dict keys unchanged) and the DP optimizer.

        Raises:
            RuntimeError: if called twice.
            ValueError: if Opacus rejects the model or optimizer.
        """
        if self._hooks is not None:
            raise RuntimeError("make_private was already called; create one DPSGD per site and job.")
        import fedoap.privacy.grad_samplers  # noqa: F401 - registers our per-sample rules (convolutions)

        units = DataLoader(TensorDataset(torch.arange(self.n_units)), batch_size=self.batch_size)
        hooks, _, _ = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=units,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=float(self.config.max_grad_norm),
            loss_reduction="mean",
            poisson_sampling=True,
            grad_sample_mode=self.config.grad_sample_mode,
            wrap_model=False,
        )
        self._hooks = hooks
        self._model = model
        if self.config.noise_source == "os_seeded":
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            self._noise_generator = os_seeded_generator(device)
        return model, self._private(optimizer)

    def private_optimizer(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """Wrap another optimizer of the same model (e.g. for private fine-tuning) with the same clipping, noise and
        sampling, its steps counted by the same accountant.

        Raises:
            RuntimeError: before :meth:`make_private`.
        """
        self._require_private()
        return self._private(optimizer)

    def _private(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        settings = dict(noise_multiplier=self.noise_multiplier, max_grad_norm=float(self.config.max_grad_norm),
                        expected_batch_size=self.expected_batch_size, loss_reduction="mean")
        from opacus.optimizers import DPOptimizer

        from fedoap.privacy.dp_optimizer import SecureNoiseDPOptimizer

        if self._noise_generator is None:
            dp_optimizer: DPOptimizer = SecureNoiseDPOptimizer(optimizer, prefetch=self.config.noise_prefetch,
                                                               **settings)
        else:  # Opacus's secure_mode noise path (four normals) on our OS-seeded generator
            dp_optimizer = DPOptimizer(optimizer, generator=self._noise_generator, secure_mode=True, **settings)
        # the rate the sampler below draws with, by construction
        dp_optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self._optimizers.append(dp_optimizer)
        return dp_optimizer

    # -- sampling ----------------------------------------------------------------------------------------------------
    def batches(self, optimizer: DPOptimizer | None = None) -> Iterator[torch.Tensor]:
        """One epoch of Poisson-sampled batches: ``steps_per_epoch`` draws, each yielding the int64 indices of the
        sampled slices (with ``unit="case"``: one slice of each sampled case); an empty draw is not yielded but
        turned into the noise-only step of ``optimizer``. An ``"os_seeded"`` noise generator is reseeded from the OS
        at the start of every epoch.

        Args:
            optimizer: the DP optimizer the trainer steps (default: the one from :meth:`make_private`).

        Raises:
            RuntimeError: before :meth:`make_private`.
            ValueError: if ``optimizer`` is not a DP optimizer of this object.
        """
        self._require_private()
        optimizer = self._optimizers[0] if optimizer is None else optimizer
        if not any(optimizer is known for known in self._optimizers):
            raise ValueError("optimizer is not a DPOptimizer made by this DPSGD; its steps would not be accounted.")
        return self._draw(optimizer)

    def _draw(self, optimizer: DPOptimizer) -> Iterator[torch.Tensor]:
        if self._noise_generator is not None:
            reseed(self._noise_generator)
        for _ in range(self.steps_per_epoch):
            indices = self._sample()
            if len(indices) == 0:
                self._noise_only_step(optimizer)
                continue
            yield indices

    def _sample(self) -> torch.Tensor:
        """One Poisson draw of the units; with cases, one uniformly chosen slice of each sampled case."""
        units = _poisson_mask(self.n_units, self.sample_rate).nonzero().reshape(-1)
        if self.unit == "slice":
            return units.to(torch.int64)
        slices = [self._case_slices[c] for c in units.tolist()]
        return torch.tensor([s[secrets.randbelow(len(s))] for s in slices], dtype=torch.int64)

    @staticmethod
    def _noise_only_step(optimizer: DPOptimizer) -> None:
        """The DP step of an empty batch: clipped sum 0, plus noise, scaled and accounted (Opacus's semantics)."""
        optimizer.zero_grad(set_to_none=True)
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- accounting --------------------------------------------------------------------------------------------------
    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far by every DP-SGD step of this site (at ``delta``, default the configured one), per
        DP record: per slice with ``unit="slice"``, per case with ``unit="case"``."""
        delta, trivial = self._delta_or_trivial(delta)
        return trivial if trivial is not None else float(self.engine.get_epsilon(delta))

    def _delta_or_trivial(self, delta: float | None) -> tuple[float, float | None]:
        """The checked delta (default the configured one), and the epsilon when no accountant is needed: 0 before
        the first step, inf without noise (else None)."""
        delta = self.config.delta if delta is None else delta
        _check_delta(delta)
        if self.steps == 0:
            return float(delta), 0.0
        if self.noise_multiplier == 0.0:
            return float(delta), math.inf
        return float(delta), None

    def case_epsilon(self, delta: float | None = None) -> float | None:
        """Epsilon that protects a whole case (patient) at ``delta``: :meth:`epsilon` itself with ``unit="case"``
        or when no case has more than one slice; with ``unit="slice"``, the group-privacy bound over the largest
        number of slices of one case (:func:`group_epsilon`, from the RDP analysis whatever the accountant). None
        with ``unit="slice"`` and no ``case_ids``."""
        if self.unit == "case" or self.max_slices_per_case == 1:
            return self.epsilon(delta)
        if self.max_slices_per_case is None:
            return None
        delta, trivial = self._delta_or_trivial(delta)
        if trivial is not None:
            return trivial
        return group_epsilon(list(self.engine.accountant.history), self.max_slices_per_case, delta)

    @property
    def steps(self) -> int:
        """DP-SGD steps accounted so far (noise-only steps included)."""
        return _steps_in(self.engine.accountant)

    def state_dict(self) -> dict[str, Any]:
        """The accountant's state, to persist where the client process restarts every round (no randomness state:
        there is none to keep)."""
        return dict(self.engine.accountant.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the accountant's state (Opacus validates it)."""
        self.engine.accountant.load_state_dict(copy.deepcopy(dict(state)))

    # -- non-private work on the same model --------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Turn the per-sample hooks off, e.g. for non-private fine-tuning whose result never leaves the site (a
        plain optimizer would otherwise trip Opacus's grad-accumulation check). Evaluation under ``torch.no_grad`` or
        in eval mode needs no pause."""
        self._require_private()
        self._hooks.disable_hooks()
        for p in self._model.parameters():
            p.grad_sample = None
        try:
            yield
        finally:
            self._hooks.enable_hooks()

    def close(self) -> None:
        """Remove the hooks and Opacus's attributes from the model and stop the optimizers' noise drawn ahead (end
        of the job)."""
        if self._hooks is not None:
            self._hooks.cleanup()
        for optimizer in self._optimizers:
            if hasattr(optimizer, "close"):
                optimizer.close()

    def _require_private(self) -> None:
        if self._hooks is None:
            raise RuntimeError("call make_private(model, optimizer) first.")


def __getattr__(name: str) -> Any:
    """``SecureNoiseDPOptimizer`` lives in :mod:`fedoap.privacy.dp_optimizer` (it subclasses Opacus's optimizer, so
    defining it loads Opacus); it is still importable from here."""
    if name == "SecureNoiseDPOptimizer":
        from fedoap.privacy.dp_optimizer import SecureNoiseDPOptimizer

        return SecureNoiseDPOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
