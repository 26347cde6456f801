"""The run configuration, declared once: how every site trains, which method, which privacy, and (simulation only)
where the data is.

Every option is one dataclass field with its default, help text and check (:func:`option`). From these fields come
the command line of every command (:func:`add_options`, :func:`from_namespace`), the JSON document that travels with
a job (``app/config/fedoap_run.json``, :data:`RUN_CONFIG_FILE`: written by the recipe, read once by each site with
:meth:`RunConfig.load`) and the partial overrides that presets are (the benchmark's, the exported jobs', the scale
benchmark's). Checks run once, in ``__post_init__``, and fail with one line naming the command-line option, so a bad
option is refused before anything starts. A new option is one field here.

Importing this module imports neither torch nor the methods: a bad option on the command line is refused at once.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

__all__ = [
    "TrainingOptions", "MethodOptions", "PrivacyOptions", "DataOptions", "RobustnessOptions", "RunConfig",
    "FederationOptions",
    "RUN_CONFIG_FILE", "DEFAULT_CLIENTS", "DEFAULT_UNSEEN", "METHOD_FLAGS", "TRACKING_PACKAGES", "TRACKING_CHOICES",
    "check_document", "option", "add_options", "add_method_flags", "from_namespace", "method_from_namespace",
    "run_config_from_namespace", "option_flag", "cli_args", "unet_model_args",
]

#: the run configuration's file name in a job's app config folder (``app/config/``), next to NVFlare's own configs
RUN_CONFIG_FILE = "fedoap_run.json"
DEFAULT_CLIENTS = ("brain", "liver", "breast")
DEFAULT_UNSEEN = "lung"

Check = Callable[[Any], Optional[str]]

#: experiment tracking backends (``TrainingOptions.tracking``) -> the package the server's receiver needs
TRACKING_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
TRACKING_CHOICES = (*TRACKING_PACKAGES, "none")


# -- declaring an option -----------------------------------------------------------------------------------------------
def option(default: Any = MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
           flag: Optional[str] = "", check: Check | Sequence[Check] = (), choices: Sequence[Any] = (),
           parse: Optional[Callable[[str], Any]] = None, show: Optional[Callable[[Any], str]] = None) -> Any:
    """One option as a dataclass field.

    Args:
        default: its default (or ``factory``, for a dict).
        help: what it is, for ``--help``.
        flag: its command-line flag; "" (the default): ``--`` and the field name with dashes; None: not on the command
            line (set by a program, e.g. the simulator's data folders).
        check: functions returning why a value is wrong ("must be >= 1") or None; the error names the flag.
        choices: the values it may take.
        parse: turns the command-line text into the value (default: by the field's type).
        show: turns a value back into command-line text (inverse of ``parse``; default ``str``).
    """
    checks = tuple(check) if isinstance(check, (list, tuple)) else (check,)
    metadata = {"help": help, "flag": flag, "checks": checks, "choices": tuple(choices), "parse": parse,
                "show": show}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}"


def positive(v: float) -> Optional[str]:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def non_negative(v: float) -> Optional[str]:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def image_size(v: int) -> Optional[str]:
    if v % 16:
        return "must be a multiple of 16 (the UNet halves it 4 times)"
    return None if v >= 32 else "must be >= 32 (the bottleneck, at 1/16 of it, needs more than one position)"


def volume_size(v: int) -> Optional[str]:
    return None if v >= 16 and v % 8 == 0 else "must be a multiple of 8 and >= 16 (FedMEPDNet halves it 3 times)"


def modality_masks(v: tuple[str, ...]) -> Optional[str]:
    bad = [m for m in v if len(m) != 4 or set(m) - {"0", "1"} or "1" not in m]
    return f"must be masks of four 0/1 digits with at least one 1, got {bad}" if bad else None


#: the tasks a run can train (``TrainingOptions.task``)
ORGAN_TASK, BRATS_TASK = "organ-slices", "brats-missing-modality"
TASKS = (ORGAN_TASK, BRATS_TASK)


def device_name(v: str) -> Optional[str]:
    return None if re.fullmatch(r"cpu|cuda(:\d+)?|mps", v) else "must be cpu, cuda, cuda:N or mps"


def probability(v: float) -> Optional[str]:
    return None if 0 < v < 1 else "must be in (0, 1)"


def distinct_names(v: tuple[str, ...]) -> Optional[str]:
    if not v or len(set(v)) != len(v) or not all(v):
        return "must be distinct, non-empty site names"
    return None


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _site_counts(text: str) -> dict[str, int]:
    counts = {}
    for item in _csv(text):
        site, sep, n = item.partition("=")
        if not sep:
            raise ValueError(f"expected SITE=N, got {item!r}")
        counts[site.strip()] = int(n)
    return counts


def _show_counts(value: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in value.items())


# -- checking and converting values ------------------------------------------------------------------------------------
def option_flag(f: Field) -> Optional[str]:
    """The command-line flag of a field (None: not on the command line)."""
    flag = f.metadata.get("flag", "")
    return f"--{f.name.replace('_', '-')}" if flag == "" else flag


def _dest(f: Field) -> str:
    """The field's name in an argparse namespace and in the flat option names (``--method-args``: ``method_args``)."""
    flag = option_flag(f)
    return flag[2:].replace("-", "_") if flag else f.name


def _label(f: Field) -> str:
    return option_flag(f) or f.name


def _coerce(f: Field, hint: Any, value: Any) -> Any:
    """``value`` as the field's type (an int is a float, a list a tuple), or ValueError naming the option."""
    def wrong(kind: str) -> ValueError:
        return ValueError(f"{_label(f)} must be {kind}, got {value!r}")

    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of names")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise wrong("an object")
        return dict(value)
    raise TypeError(f"{_label(f)}: unsupported option type {hint!r}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _validate(obj: Any) -> None:
    """Coerce and check every field of an options dataclass (frozen: values are set through ``object``)."""
    hints = _hints(type(obj))
    for f in fields(obj):
        value = _coerce(f, hints[f.name], getattr(obj, f.name))
        object.__setattr__(obj, f.name, value)
        if value is None:
            continue
        choices = f.metadata.get("choices", ())
        if choices and value not in choices:
            raise ValueError(f"{_label(f)} must be one of {list(choices)}, got {value!r}")
        for check in f.metadata.get("checks", ()):
            reason = check(value)
            if reason:
                raise ValueError(f"{_label(f)} {reason}, got {value!r}")


def unet_model_args(width: int) -> dict[str, Any]:
    """Backbone arguments for UNet width ``w``: channels w, 2w, 4w, 8w and 16w at the bottleneck (authors: w = 64)."""
    return {"channels": [width, 2 * width, 4 * width, 8 * width], "bottleneck_channels": 16 * width}


# -- the groups --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingOptions:
    """Training (the same at every site)."""

    rounds: int = option(12, "federated rounds T", check=at_least(1))
    local_epochs: int = option(2, "local epochs per round", check=at_least(1))
    finetune_epochs: int = option(5, "epochs of local fine-tuning at the end (best epoch on the validation split)",
                                  check=at_least(0))
    image_size: int = option(64, "slices are resized to SIZE x SIZE", check=image_size)
    width: int = option(16, "UNet width w: channels w,2w,4w,8w and 16w at the bottleneck (authors: 64)",
                        check=at_least(1))
    batch_size: int = option(16, "training batch size", check=at_least(1))
    lr: float = option(1e-3, "AdamW learning rate", check=positive)
    seed: int = option(0, "seed of the data, the case split, the initial weights and the training order",
                       check=at_least(0))
    device: str = option("cpu", "cpu, cuda, cuda:1, ...", check=device_name)
    threads: int = option(0, "torch threads per site (0: the machine's cores shared among the sites)",
                          check=at_least(0))
    precision: str = option("fp32", "training step precision: bf16 runs each step's forward and backward under bf16 "
                                    "autocast (CPU or CUDA; the loss, weights, optimizer and what is shared stay "
                                    "fp32); not with DP-SGD", choices=("fp32", "bf16"))
    channels_last: bool = option(False, "train in channels-last memory format (weights and batches; the state dict "
                                        "is unchanged)")
    compile: bool = option(False, "compile the site's model in place with torch.compile (same state-dict keys; "
                                  "inductor needs a C compiler on the CPU, Triton on a GPU); not with DP-SGD")
    tracking: str = option("tensorboard", "live training curves through NVFlare's experiment tracking: each site's "
                                          "numeric metrics per round (exactly those it sends with its results) to "
                                          "the server's TensorBoard event files (<server run folder>/tb_events/"
                                          "<site>/) or MLflow run (the mlflow package on the server); none: off",
                           choices=TRACKING_CHOICES)
    dice_reduction: str = option("batch", "soft Dice term of every method's BCE+Dice loss: batch (intersection and "
                                          "sums pooled over the batch) or image (mean of per-image Dice, as the "
                                          "authors' code; an empty mask counts by its smoothing terms)",
                                 choices=("batch", "image"))
    task: str = option("organ-slices", "what the sites segment: organ-slices (one tumour mask per 2D slice, every "
                                       "method of fedoap.methods.METHODS) or brats-missing-modality (3D brain MRI, "
                                       "four modalities of which each site holds some, regions WT/TC/ET; "
                                       "--method fedmepd)", choices=TASKS)
    volume_size: int = option(32, "brats-missing-modality: every case is resized to SIZE^3 voxels",
                              check=volume_size)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def volumetric(self) -> bool:
        """Whether the task is the 3D multi-modal brain-tumour task (``--task brats-missing-modality``)."""
        return self.task == BRATS_TASK

    def model_args(self) -> dict[str, Any]:
        return unet_model_args(self.width)

    def train_config(self):
        """The site trainer's settings (``fedoap.training.TrainConfig``)."""
        from fedoap.training import TrainConfig

        return TrainConfig(batch_size=self.batch_size, lr=self.lr, local_epochs=self.local_epochs,
                           finetune_epochs=self.finetune_epochs, seed=self.seed, device=self.device,
                           precision=self.precision, channels_last=self.channels_last, compile=self.compile)

    def dp_sgd_conflict(self) -> Optional[str]:
        """Why these speed options cannot train under sample-level DP-SGD (one line naming the flag), or None."""
        return self.speed_dp_sgd_conflict(self.precision, self.compile)

    @staticmethod
    def speed_dp_sgd_conflict(precision: str, compile: bool) -> Optional[str]:
        """Why a speed option cannot train under sample-level DP-SGD (Opacus), one line, or None (torch-free: the
        run configuration's check and the trainer's, ``fedoap.training.speed_dp_sgd_conflict``).

        * ``compile``: Opacus's per-sample-gradient hooks (forward and backward hooks storing every layer's
          activations and backprops) do not run under ``torch.compile``; Opacus does not support compiled modules.
        * ``bf16``: under autocast Opacus's hooks compute the per-sample gradients, their norms and the clipping in
          bf16 (8-bit mantissa), so a clipped gradient's norm is bounded by ``--dp-sgd-clip`` only up to rounding:
          the sensitivity the accountant assumes would not strictly hold.

        channels-last is allowed (measured: the hooks' per-sample rules take either memory format)."""
        if compile:
            return ("--compile: Opacus's per-sample-gradient hooks (DP-SGD) do not run under torch.compile; drop "
                    "--compile or DP-SGD")
        if precision != "fp32":
            return (f"--precision {precision}: Opacus's hooks would compute DP-SGD's per-sample gradients and "
                    f"clipping in {precision}, so --dp-sgd-clip would bound them only up to rounding; use "
                    "--precision fp32 with DP-SGD")
        return None

    def require_tracking(self) -> None:
        """Refuse a tracking backend whose package this machine lacks, before anything starts (a check of the machine
        that builds the job and, in simulation, runs its server: the server's receiver imports it; the sites log
        through NVFlare alone, so a site never needs it and a run configuration is not refused for it).

        Raises:
            ValueError: ``--tracking mlflow`` (or tensorboard) without the package installed here.
        """
        import importlib.util

        package = TRACKING_PACKAGES.get(self.tracking)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"--tracking {self.tracking}: the {package} package is not installed on this machine "
                             f"(pip install {package}, or --tracking none)")

    def require_device(self) -> None:
        """Refuse a device this machine does not have (a check of the machine, not of the option: a recipe may name
        a GPU the sites have and the submitting machine has not).

        Raises:
            ValueError: ``--device`` names a CUDA or MPS device that is not available here.
        """
        if self.device == "cpu":
            return
        import torch

        if self.device == "mps":
            if not torch.backends.mps.is_available():
                raise ValueError("--device mps: no MPS device is available on this machine")
            return
        if not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available on this machine (use --device cpu)")
        index = int(self.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


@dataclass(frozen=True)
class MethodOptions:
    """The federated method and its arguments.

    The method is built once, here, which checks its arguments: :attr:`instance` is the method object of this side.
    """

    name: str = option("fedoap", "federated method: fedoap, fedavg, fedprox, fedbn, ditto, ... (every method of "
                                 "fedoap.methods.METHODS); local: each site trains alone, the reference",
                       flag="--method")
    args: dict[str, Any] = option(factory=dict, help="JSON object of the method's constructor arguments",
                                  flag="--method-args", parse=_json_object, show=lambda v: json.dumps(v))

    def __post_init__(self) -> None:
        _validate(self)
        from fedoap.methods import all_methods

        methods = all_methods()
        if self.name not in methods:
            raise ValueError(f"--method: unknown method {self.name!r}; choose one of {sorted(methods)}")
        cls = methods[self.name]
        import inspect

        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(self.args) - set(params) - {"self"})
            if unknown:
                raise ValueError(f"--method-args: method {self.name!r} takes no argument {unknown}; it takes "
                                 f"{sorted(set(params) - {'self'})}")
        try:
            method = cls(**self.args)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--method-args: method {self.name!r}: {err}") from None
        object.__setattr__(self, "_instance", method)

    @property
    def instance(self):
        """The method object (``fedoap.methods.FederatedMethod``), built once per configuration: one per process
        side (the simulator's or the recipe's, each site's)."""
        return self._instance


@dataclass(frozen=True)
class PrivacyOptions:
    """Privacy (any combination)."""

    he: bool = option(False, "encrypt shared updates with TenSEAL CKKS; the server only adds ciphertexts (each site's "
                             "context from its own local/ folder, or $FEDOAP_HE_CONTEXT_DIR in simulation)")
    secagg: bool = option(False, "secure aggregation by pairwise masks (Bonawitz et al., CCS 2017): the server learns "
                                 "only the sum of the shared updates, and removes the masks of sites that drop out "
                                 "with the others' key shares (each site's identity key and the roster from its own "
                                 "local/ folder, or $FEDOAP_SECAGG_DIR in simulation)")
    secagg_neighbours: int = option(0, "secure aggregation: mask with and share keys to this many neighbours per site "
                                       "(SecAgg+, Bell et al., CCS 2020; even; 0: every other site)",
                                    check=(non_negative, lambda v: None if v % 2 == 0 else "must be even"))
    secagg_ring_bits: int = option(32, "secure aggregation: the ring Z_2^bits of the masked values (32: the bytes of "
                                       "float32 plaintext; 64: more headroom, twice the bytes)", choices=(32, 64))
    secagg_frac_bits: int = option(24, "secure aggregation: fraction bits of the fixed-point values (resolution "
                                       "2^-bits of a site's share of the update; in the 32-bit ring an update "
                                       "coordinate must stay below 2^(30-bits), 64 at 24 bits)",
                                   check=lambda v: None if 8 <= v <= 28 else "must be in [8, 28]")
    dp_update_clip: float = option(0.0, "client-level DP: clip each site's shared update to this L2 norm (0: off)",
                                   check=non_negative)
    dp_update_noise: float = option(0.0, "client-level DP: Gaussian noise multiplier sigma (std sigma * clip)",
                                    check=non_negative)
    dp_update_distributed: bool = option(False, "client-level DP shared among the sites (with --he or --secagg, which "
                                                "show the server only sums): each site adds 1/m of the noise "
                                                "variance, m = --min-responses, so any sum of m or more updates "
                                                "carries sigma * C")
    dp_sgd_noise: float = option(0.0, "sample-level DP-SGD (Opacus) with this noise multiplier (0: off)",
                                 check=non_negative)
    dp_sgd_epsilon: float = option(0.0, "sample-level DP-SGD calibrated to this target epsilon over the whole run "
                                        "(0: off)", check=non_negative)
    dp_sgd_clip: float = option(1.0, "DP-SGD per-sample gradient norm bound", check=positive)
    dp_sgd_batch_size: int = option(0, "DP-SGD's expected batch (Poisson rate batch / training units; the noise on "
                                       "the mean gradient is sigma / batch); 0: --batch-size (measured best at epsilon "
                                       "8: README)", check=non_negative)
    dp_sgd_lr: float = option(0.0, "the rounds' AdamW learning rate under DP-SGD; 0: --lr (measured best at epsilon "
                                   "8: README). The final fine-tuning, never released, keeps --lr",
                              check=non_negative)
    dp_sgd_unit: str = option("slice", "what DP-SGD protects: one slice (per-slice sampling and clipping; the "
                                       "per-case epsilon is reported by group privacy) or one case, i.e. patient "
                                       "(cases sampled, one slice each)", choices=("slice", "case"))
    dp_sgd_noise_source: str = option("chacha20", "DP-SGD gradient noise: a ChaCha20 stream keyed by the OS (default) "
                                                  "or torch's generator seeded from the OS every epoch (faster, e.g. "
                                                  "on a GPU); never keyed by the job",
                                      choices=("chacha20", "os_seeded"))
    dp_delta: float = option(1e-5, "delta at which epsilon is reported", check=probability)

    def __post_init__(self) -> None:
        _validate(self)
        if self.dp_sgd_noise > 0 and self.dp_sgd_epsilon > 0:
            raise ValueError("give --dp-sgd-noise or --dp-sgd-epsilon, not both")
        if self.dp_update_noise > 0 and self.dp_update_clip == 0:
            raise ValueError("--dp-update-noise needs --dp-update-clip > 0 (noise is scaled to the clip norm)")
        if self.he and self.secagg:
            raise ValueError("give --he or --secagg, not both: each alone hides every site's update from the server")
        if self.dp_update_distributed and self.dp_update_clip == 0:
            raise ValueError("--dp-update-distributed needs client-level DP (--dp-update-clip > 0)")
        if self.dp_update_distributed and not self.hides_updates:
            raise ValueError("--dp-update-distributed needs --secagg or --he: a site's share of the noise protects "
                             "only inside a sum the server cannot take apart")
        if not self.secagg and (self.secagg_neighbours or self.secagg_frac_bits != 24 or self.secagg_ring_bits != 32):
            raise ValueError("--secagg-neighbours, --secagg-ring-bits and --secagg-frac-bits need --secagg")

    @property
    def hides_updates(self) -> str:
        """The flag of the protection that hides each site's update from the server ("--he", "--secagg"), or ""."""
        return "--he" if self.he else "--secagg" if self.secagg else ""

    def secagg_config(self):
        """The secure aggregation settings (``fedoap.privacy.secagg.SecAggConfig``), or None when off."""
        if not self.secagg:
            return None
        from fedoap.privacy.secagg import SecAggConfig

        return SecAggConfig(frac_bits=self.secagg_frac_bits, neighbours=self.secagg_neighbours,
                            ring_bits=self.secagg_ring_bits)

    @property
    def dp_sgd_on(self) -> bool:
        return self.dp_sgd_noise > 0 or self.dp_sgd_epsilon > 0

    def enabled(self) -> dict[str, Any]:
        """The DP options that are switched on, with the delta they are reported at ({}: no DP)."""
        on: dict[str, Any] = {}
        if self.dp_update_clip > 0:
            on.update(dp_update_clip=self.dp_update_clip, dp_update_noise=self.dp_update_noise)
            if self.dp_update_distributed:
                on["dp_update_distributed"] = True
        if self.dp_sgd_noise > 0:
            on["dp_sgd_noise"] = self.dp_sgd_noise
        if self.dp_sgd_epsilon > 0:
            on["dp_sgd_epsilon"] = self.dp_sgd_epsilon
        if self.dp_sgd_on:
            on.update(dp_sgd_clip=self.dp_sgd_clip, dp_sgd_unit=self.dp_sgd_unit,
                      dp_sgd_noise_source=self.dp_sgd_noise_source)
        if on:
            on["dp_delta"] = self.dp_delta
        return on

    def dp_sgd(self, total_epochs: int):
        """Sample-level DP-SGD settings over ``total_epochs`` (``fedoap.privacy.dp.DPSGDConfig``), or None when off."""
        if not self.dp_sgd_on:
            return None
        from fedoap.privacy.dp import DPSGDConfig

        return DPSGDConfig(max_grad_norm=self.dp_sgd_clip, unit=self.dp_sgd_unit,
                           noise_source=self.dp_sgd_noise_source,
                           noise_multiplier=self.dp_sgd_noise if self.dp_sgd_noise > 0 else None,
                           target_epsilon=self.dp_sgd_epsilon if self.dp_sgd_epsilon > 0 else None,
                           delta=self.dp_delta, total_epochs=total_epochs,
                           batch_size=self.dp_sgd_batch_size or None)

    def update_dp(self, shares: int = 1):
        """The job's client-level DP of the update (``fedoap.privacy.dp.UpdateDPConfig``), or None when off;
        ``shares``: the sites whose noise adds up (``RunConfig.update_dp`` gives it under distributed DP)."""
        if self.dp_update_clip <= 0:
            return None
        from fedoap.privacy.dp import UpdateDPConfig

        return UpdateDPConfig(clip_norm=self.dp_update_clip, noise_multiplier=self.dp_update_noise,
                              delta=self.dp_delta, shares=shares)


@dataclass(frozen=True)
class DataOptions:
    """Where a site reads its data, set by the simulator only (every simulated site shares one file system). A
    deployed job leaves them empty: each site reads its folders from its own configuration (``local/fedoap_site.json``),
    and its executor and app validator refuse a job that sets any of them."""

    data_root: str = option("", "folder with one MSD-layout sub-folder per site", flag=None)
    unseen_dir: str = option("", "MSD-layout folder of the unseen organ (empty: none)", flag=None)
    pool_sites: tuple[str, ...] = option((), "centralized reference only: the sites whose data the one simulated "
                                             "site pools (their folders under data_root)", flag=None)

    def __post_init__(self) -> None:
        _validate(self)
        if self.pool_sites and not self.data_root:
            raise ValueError("pool_sites (the centralized reference) needs data_root with every site's folder")

    def set_fields(self) -> list[str]:
        """The names of the folders this configuration sets (a deployed site accepts none)."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


def _resume_from(v: str) -> Optional[str]:
    from fedoap.resume import check_resume_from  # light: os and re only

    try:
        check_resume_from(v)
    except ValueError:
        return "must be an earlier job's id or an absolute folder"
    return None


def _fraction_below_half(v: float) -> Optional[str]:
    return None if 0 <= v < 0.5 else "must be in [0, 0.5)"


@dataclass(frozen=True)
class RobustnessOptions:
    """Robustness against sites that lie, fail or drop out, and resuming an interrupted job.

    The server bounds what a site claims before any rule sees it (``fedoap.server.intake``): a claimed aggregation
    weight above :attr:`max_site_weight` is refused, one above :attr:`weight_median_multiple` (k) times the median
    of the other sites' claims is clipped to that bound (refused under HE, where the weight is inside the
    ciphertext); a step count (FedNova) must be a whole number in ``[1, max_site_steps]`` and within a factor k of
    the sites' median, either way. The default k, 10, leaves every honest site of the default synthetic federations
    untouched (training slices at most 1.7 times the others' median in the three-site default, about 2.4 in
    ``fedoap bench scale``'s 30 unequal sites); a real federation whose sites differ more in size (a BraTS-sized site
    next to a few hundred ultrasound images) must raise it. The robust rules and the norm bound need the updates in
    clear and replace only the plain weighted mean. ``round_timeout``, ``min_responses`` and ``resume_from`` are read
    by the workflow (dropouts, resuming), not by the intake.
    """

    round_timeout: float = option(0.0, "seconds the server waits for the sites' answers in a round (0: automatic)",
                                  check=non_negative)
    min_responses: int = option(0, "the fewest sites a round may go on with; below it the job stops (0: a majority "
                                   "of the sites)", check=at_least(0))
    max_site_weight: float = option(1e7, "the largest aggregation weight (sample count) a site may claim; a larger "
                                         "claim is refused", check=positive)
    weight_median_multiple: float = option(10.0, "k: a site's claimed weight above k times the median of the other "
                                                 "sites' claims is clipped to it (refused under HE); a FedNova step "
                                                 "count more than a factor k from the sites' median is refused",
                                           check=(positive, at_least(1)))
    max_site_steps: int = option(10_000_000, "the most local steps per round a site may claim (FedNova)",
                                 check=at_least(1))
    robust_rule: str = option("", "combine the updates by a robust rule instead of the weighted mean: median or "
                                  "trimmed_mean (coordinate-wise, unweighted; plaintext only)",
                              choices=("", "median", "trimmed_mean"))
    trim_fraction: float = option(0.1, "trimmed mean: fraction of the sites cut at each end per coordinate "
                                       "(ceil(f K), at least one of 3 or more sites)", check=_fraction_below_half)
    update_norm_bound: float = option(0.0, "scale each site's update (its shared parameters minus the broadcast) "
                                           "down to this L2 norm before combining (0: off; plaintext only)",
                                      check=non_negative)
    max_statistics_values: int = option(2_000_000, "the most numbers a site's shared statistics (FedRDN, FedDP) may "
                                                   "hold; more are ignored", check=at_least(1))
    resume_from: str = option("", "continue an interrupted job: an earlier job's id, or (simulation) an absolute "
                                  "folder with one sub-folder per participant", flag=None, check=_resume_from)

    def __post_init__(self) -> None:
        _validate(self)

    def responses_needed(self, n_sites: int) -> int:
        """The fewest of ``n_sites`` a round may go on with: ``min_responses``, or a majority when it is 0."""
        return self.min_responses or (n_sites // 2 + 1)

    def rule_options(self) -> dict[str, Any]:
        """The keyword arguments of ``fedoap.server.rules.rule_for_job`` (and ``check_rule``) these options give."""
        return {"robust_rule": self.robust_rule,
                "robust_args": {"trim_fraction": self.trim_fraction} if self.robust_rule == "trimmed_mean" else {},
                "update_norm_bound": self.update_norm_bound}


_GROUPS = {"training": TrainingOptions, "method": MethodOptions, "privacy": PrivacyOptions, "data": DataOptions,
           "robustness": RobustnessOptions}


@dataclass(frozen=True)
class RunConfig:
    """Everything a site's client script runs with: one JSON document per job (:meth:`to_json`), checked once.

    Raises:
        ValueError: an invalid option (named, one line), or a combination the method cannot serve: HE with a rule
            that needs plaintext or shares nothing, client-level DP of an update the method does not send or next to
            statistics it sends in clear, DP-SGD with a method that names a ``dp_sgd_conflict``, a robust rule or
            norm bounding with HE or with a method whose rule is not the plain weighted mean.
    """

    training: TrainingOptions = field(default_factory=TrainingOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions)
    data: DataOptions = field(default_factory=DataOptions)
    robustness: RobustnessOptions = field(default_factory=RobustnessOptions)

    def __post_init__(self) -> None:
        for name, cls in _GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be {cls.__name__}, got {type(getattr(self, name)).__name__}")
        method = self.method.instance
        if (getattr(method, "dice_reduction", "batch"), getattr(method, "dp_sgd", False)) != \
                (self.training.dice_reduction, self.privacy.dp_sgd_on):
            # the method object carries the run's loss options to its losses and knows whether the run is under
            # DP-SGD; a method object shared with another configuration is never changed: this one gets its own
            object.__setattr__(self, "method", replace(self.method))
            method = self.method.instance
            method.dice_reduction = self.training.dice_reduction
            method.dp_sgd = self.privacy.dp_sgd_on
        privacy, name = self.privacy, self.method.name
        from fedoap.methods import VOLUME_METHODS

        if self.training.volumetric != (name in VOLUME_METHODS):
            serves = sorted(VOLUME_METHODS) if self.training.volumetric else f"any but {sorted(VOLUME_METHODS)}"
            raise ValueError(f"--task {self.training.task}: method {name!r} does not serve it; use {serves}")
        rule = method.server_rule
        from fedoap.server.rules import ServerRule, WeightedMean

        if not (isinstance(rule, type) and issubclass(rule, ServerRule)):
            raise ValueError(f"method {name!r}: server_rule must be a ServerRule class of fedoap.server.rules, got "
                             f"{rule!r}")
        hidden = privacy.hides_updates  # "--he" or "--secagg": the server sees only the sum of the updates
        what = {"--he": "homomorphic encryption", "--secagg": "secure aggregation"}.get(hidden, "")
        if hidden and not rule.shares:
            raise ValueError(f"{hidden}: method {name!r} shares nothing (server rule {rule.name!r}): there is no "
                             f"update for {what} to protect")
        if hidden and not rule.linear:
            why = getattr(rule, "plaintext_reason", "") or "which needs plaintext on the server"
            raise ValueError(f"{hidden}: method {name!r} combines updates by {rule.name!r}, {why}; {what} supports "
                             "only linear rules (a weighted sum)")
        if privacy.dp_update_clip > 0 and not rule.shares:
            raise ValueError(f"--dp-update-clip: method {name!r} shares nothing: there is no update to clip and noise")
        statistics = ("sends site statistics in clear next to its update (its site_statistics), which {} of the "
                      "update would not {}")
        if method.shares_statistics and privacy.dp_update_clip > 0:
            raise ValueError(f"--dp-update-clip: method {name!r} " + statistics.format("client-level DP", "cover"))
        if method.shares_statistics and hidden:
            raise ValueError(f"{hidden}: method {name!r} " + statistics.format(what, "hide"))
        robust = self.robustness
        for flag, on in (("--robust-rule", bool(robust.robust_rule)),
                         ("--update-norm-bound", robust.update_norm_bound > 0)):
            if on and hidden:
                raise ValueError(f"{flag} needs every update in clear on the server; {hidden} hides it")
            if on and rule is not WeightedMean:
                raise ValueError(f"{flag} replaces the plain weighted mean only; method {name!r} combines updates by "
                                 f"{rule.name!r}")
        if privacy.dp_update_distributed and robust.min_responses < 2:
            raise ValueError("--dp-update-distributed: give --min-responses m >= 2, the fewest sites whose noise "
                             "shares add up in any sum the server sees (each site adds 1/m of the variance; sites "
                             "refuse to mask or unmask a round with fewer)")
        speed = self.training.dp_sgd_conflict()
        if speed and privacy.dp_sgd_on:
            raise ValueError(speed)
        conflict = method.dp_sgd_conflict
        if conflict and privacy.dp_sgd_on:
            flag = "--dp-sgd-noise" if privacy.dp_sgd_noise > 0 else "--dp-sgd-epsilon"
            raise ValueError(f"{flag}: method {name!r} {conflict}; use client-level DP of the update "
                             "(--dp-update-clip) instead")

    def update_dp(self):
        """The job's client-level DP of the update, with its noise shared among ``min_responses`` sites under
        distributed DP (``PrivacyOptions.dp_update_distributed``), else local; None when off."""
        shares = self.robustness.min_responses if self.privacy.dp_update_distributed else 1
        return self.privacy.update_dp(shares=shares)

    # -- building ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_options(cls, **options: Any) -> "RunConfig":
        """A configuration from flat option names (``rounds=3, method="fedprox", method_args={"mu": 0.1}, he=True``),
        the rest at their defaults."""
        return cls().override(**options)

    def override(self, **options: Any) -> "RunConfig":
        """This configuration with some options replaced, by flat name (a preset is such a partial override).

        Raises:
            ValueError: an unknown option name, or an invalid value (named).
        """
        index = _flat_index()
        unknown = sorted(set(options) - set(index))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; choose from {sorted(index)}")
        per_group: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            group, name = index[key]
            per_group.setdefault(group, {})[name] = value
        return replace(self, **{g: replace(getattr(self, g), **v) for g, v in per_group.items()})

    def options(self) -> dict[str, Any]:
        """The user's options by flat name (training, method, privacy, robustness; not the data folders the simulator
        derives, nor where a run resumes from, which does not change how it runs)."""
        return {_dest(f): _plain(getattr(getattr(self, g), f.name))
                for g in ("training", "method", "privacy", "robustness") for f in fields(_GROUPS[g])
                if f.name != "resume_from"}

    def build_model(self):
        """The seeded initial network: the same on the server (its first checkpoint) and at every site, so that the
        local parts start where the shared ones do."""
        import torch

        torch.manual_seed(self.training.seed)
        return self.method.instance.build_model(self.training.model_args())

    # -- one JSON document ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {g: {f.name: _plain(getattr(getattr(self, g), f.name)) for f in fields(cls)}
                for g, cls in _GROUPS.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, document: Any) -> "RunConfig":
        """Raises: ValueError naming the unknown group or option, or the invalid value."""
        return cls(**{name: _GROUPS[name](**values) for name, values in _group_values(document).items()})

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the run configuration is not JSON: {err}") from None
        return cls.from_dict(document)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunConfig":
        """Read and check a run configuration file once.

        Raises:
            ValueError: the file is missing, unreadable or invalid (the message names the file).
        """
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ValueError(f"{path}: cannot read the run configuration: {err.strerror}") from None
        try:
            return cls.from_json(text)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _group_values(document: Any) -> dict[str, Mapping[str, Any]]:
    """A run configuration document's options by group, its shape checked: only known groups and options."""
    if not isinstance(document, Mapping):
        raise ValueError(f"a run configuration is a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - set(_GROUPS))
    if unknown:
        raise ValueError(f"unknown group(s) {unknown} in the run configuration; expected {list(_GROUPS)}")
    groups = {}
    for name, group in _GROUPS.items():
        values = document.get(name, {})
        if not isinstance(values, Mapping):
            raise ValueError(f"{name} must be a JSON object, got {values!r}")
        extra = sorted(set(values) - {f.name for f in fields(group)})
        if extra:
            raise ValueError(f"unknown option(s) {extra} in {name}; expected {[f.name for f in fields(group)]}")
        groups[name] = values
    return groups


def check_document(text: str) -> DataOptions:
    """Check a run configuration document as far as can be done without building its method (which imports torch
    and every method): its shape, every option's type and check, the method's name and arguments' types. Returns the
    data folders it names. For a site's parent process, which vets every job it is asked to deploy within NVFlare's
    deployment timeout; the job's own process builds the method (:meth:`RunConfig.load`) when it starts.

    Raises:
        ValueError: as :meth:`RunConfig.from_json`, but for the method's arguments.
    """
    try:
        groups = _group_values(json.loads(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"the run configuration is not JSON: {err}") from None
    TrainingOptions(**groups["training"])
    PrivacyOptions(**groups["privacy"])
    RobustnessOptions(**groups["robustness"])
    hints = _hints(MethodOptions)
    for f in fields(MethodOptions):
        if f.name in groups["method"]:
            _coerce(f, hints[f.name], groups["method"][f.name])
    return DataOptions(**groups["data"])


def _plain(value: Any) -> Any:
    """A JSON value (a tuple as a list, a dict copied)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _flat_index() -> dict[str, tuple[str, str]]:
    """Flat option name -> (group, field) for every option of a :class:`RunConfig`."""
    return {_dest(f): (g, f.name) for g, cls in _GROUPS.items() for f in fields(cls)}


# -- the simulated federation (this machine only; never sent to a site) -----------------------------------------------
@dataclass(frozen=True)
class FederationOptions:
    """The simulated federation: which sites, whose data."""

    clients: tuple[str, ...] = option(DEFAULT_CLIENTS, "site names (folders under --data, or synthetic organs)",
                                      parse=_csv, show=",".join, check=distinct_names)
    unseen: Optional[str] = option(DEFAULT_UNSEEN, "site never trained on, evaluated by every personalized model; "
                                                   "'none' to skip")
    data: Optional[str] = option(None, "folder of real data: one MSD-layout sub-folder per site (default: a "
                                       "synthetic federation generated under the output folder)")
    cases: dict[str, int] = option(factory=dict, help="synthetic data: cases per site, e.g. brain=6,breast=60 "
                                                      "(default: the organ's)", parse=_site_counts, show=_show_counts)
    synthetic_size: int = option(128, "synthetic data: in-plane size in pixels", check=at_least(16))
    modality_masks: tuple[str, ...] = option((), "brats-missing-modality, synthetic data: one modality mask per "
                                                 "client over flair,t1ce,t1,t2, e.g. 1111,1100,0011 (default: the "
                                                 "authors' eight, 1111,1110,1011,1100,0011,0100,0001,1111)",
                                             parse=_csv, show=",".join, check=modality_masks)
    server_cases: int = option(4, "brats-missing-modality, synthetic data: cases of the server's full-modal "
                                  "labelled set (0: none, so no server step and no anchors)", check=at_least(0))
    processes: int = option(0, "simulator client processes (NVFlare's num_threads; 0: one per site)",
                            check=at_least(0))

    def __post_init__(self) -> None:
        if isinstance(self.unseen, str) and self.unseen.lower() == "none":
            object.__setattr__(self, "unseen", None)
        _validate(self)
        bad = {k: v for k, v in self.cases.items() if isinstance(v, bool) or not isinstance(v, int) or v < 3}
        if bad:
            raise ValueError(f"--cases must give each site at least 3 cases (a train, a validation and a test case), "
                             f"got {bad}")

    def sites(self) -> list[str]:
        """Every site whose data the run reads: the clients, then the unseen organ."""
        return list(self.clients) + ([self.unseen] if self.unseen else [])


# -- the command line --------------------------------------------------------------------------------------------------
def _parser_type(f: Field, hint: Any) -> Callable[[str], Any]:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse
    if typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return {int: int, float: float}.get(hint, str)


def add_options(parser: Any, group: type, *, defaults: Optional[Mapping[str, Any]] = None,
                only: Optional[Iterable[str]] = None, exclude: Iterable[str] = (), preset: bool = False,
                title: Optional[str] = None) -> None:
    """Add the command-line options of ``group``'s fields to an argparse parser.

    Args:
        defaults: defaults that differ from the field's (a command's preset), by field name.
        only, exclude: which fields (by field name; default every field that has a flag).
        preset: the options override a preset: their default is None (not given), and the preset says the rest.
        title: the help section (default: the group's docstring's first line).
    """
    section = parser.add_argument_group(title or (group.__doc__ or group.__name__).splitlines()[0].rstrip("."))
    hints = _hints(group)
    wanted = set(only) if only is not None else None
    for f in fields(group):
        flag = option_flag(f)
        if flag is None or f.name in exclude or (wanted is not None and f.name not in wanted):
            continue
        help_text = f.metadata.get("help", "")
        default = (defaults or {}).get(f.name, f.default if f.default is not MISSING else None)
        if hints[f.name] is bool:
            section.add_argument(flag, dest=_dest(f), action="store_true", default=None if preset else default,
                                 help=help_text)
            continue
        choices = f.metadata.get("choices") or None
        shown = f.metadata.get("show") or str
        if not preset and default not in (None, "", {}, ()):
            help_text += f" (default {shown(default)})"
        section.add_argument(flag, dest=_dest(f), type=_parser_type(f, hints[f.name]), choices=choices,
                             default=None if preset else default, help=help_text, metavar=None if choices else
                             f.name.upper().split("_")[-1])


def from_namespace(group: type, args: Any, base: Any = None) -> Any:
    """The ``group`` options an argparse namespace gives (None: not given), over ``base`` (default: the defaults)."""
    values = {f.name: getattr(args, _dest(f)) for f in fields(group)
              if option_flag(f) and getattr(args, _dest(f), None) is not None}
    return replace(base, **values) if base is not None else group(**values)


def cli_args(**options: Any) -> list[str]:
    """The command-line words that set ``options`` (flat names of :class:`RunConfig` and :class:`FederationOptions`);
    the inverse of :func:`from_namespace`, for commands that write out how to repeat a run."""
    by_dest = {_dest(f): f for cls in (*_GROUPS.values(), FederationOptions) for f in fields(cls) if option_flag(f)}
    words: list[str] = []
    for key, value in options.items():
        f = by_dest.get(key)
        flag = option_flag(f) if f is not None else f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            words += [flag] if value else []
            continue
        show = (f.metadata.get("show") if f is not None else None) or (
            (lambda v: ",".join(map(str, v))) if isinstance(value, (list, tuple)) else str)
        words += [flag, "none" if value is None else show(value)]
    return words


#: command-line shortcuts into a method's constructor arguments: flag -> (method, argument, value given by the flag
#: (None: the flag's own value), argparse settings, help)
METHOD_FLAGS: dict[str, tuple[str, str, Any, dict[str, Any], str]] = {
    "--partition": ("fedoap", "partition", None, {"choices": ["authors", "kv_only"]},
                    "FedOAP's shared set: the authors' partition or the key/value branch only"),
    "--no-pbl": ("fedoap", "use_pbl", False, {}, "fine-tune with the plain loss instead of PBL (ablation)"),
    "--no-dca": ("fedoap", "cross_attention", False, {},
                 "FedOAP without the decoupled cross-attention: a plain shared bottleneck (ablation)"),
    "--no-adapter": ("fedoap", "adapter", False, {}, "FedOAP without the local spatial adapter (ablation)"),
    "--mu": ("fedprox", "mu", None, {"type": float, "metavar": "MU"}, "FedProx's proximal weight mu (default 1e-3)"),
}


def add_method_flags(parser: Any) -> None:
    """Add ``--method``, ``--method-args`` and the shortcuts of :data:`METHOD_FLAGS`."""
    add_options(parser, MethodOptions)
    section = parser.add_argument_group("method shortcuts (into --method-args)")
    for flag, (_, _, const, settings, help_text) in METHOD_FLAGS.items():
        dest = "method_flag_" + flag[2:].replace("-", "_")
        if const is None:
            section.add_argument(flag, dest=dest, default=None, help=help_text, **settings)
        else:
            section.add_argument(flag, dest=dest, action="store_const", const=const, default=None, help=help_text)


def method_from_namespace(args: Any) -> MethodOptions:
    """``--method``, ``--method-args`` and the shortcuts given, as one :class:`MethodOptions`.

    Raises:
        ValueError: a shortcut of another method than ``--method`` (named), or invalid arguments.
    """
    name = getattr(args, "method", None) or MethodOptions.name
    method_args = dict(getattr(args, "method_args", None) or {})
    for flag, (owner, argument, const, _, _) in METHOD_FLAGS.items():
        value = getattr(args, "method_flag_" + flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        if owner != name:
            from fedoap.methods import all_methods

            raise ValueError(f"{flag} is {all_methods()[owner].__name__}'s option; --method is {name!r}")
        method_args[argument] = value
    return MethodOptions(name=name, args=method_args)


def run_config_from_namespace(args: Any, require_device: bool = True) -> RunConfig:
    """The :class:`RunConfig` an argparse namespace gives. The training options are checked first, then (with
    ``require_device``, for a command that trains on this machine) the device and the tracking package, then the
    method, which imports torch and the methods: a bad number is refused at once.

    Raises:
        ValueError: an invalid option (named), a device or tracking package this machine lacks, or a combination the
            method refuses.
    """
    training = from_namespace(TrainingOptions, args)
    if require_device:
        training.require_device()
        training.require_tracking()
    return RunConfig(training=training, method=method_from_namespace(args),
                     privacy=from_namespace(PrivacyOptions, args),
                     robustness=from_namespace(RobustnessOptions, args))
