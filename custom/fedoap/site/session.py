"""One site's part of a job, as an object: its data, its trainer, its privacy boundary, the personalization at the
end, and what it reports, so that the Client API script (``fedoap.site.client``) is only a task loop.

A session is built once per job (the script runs in-process for the whole job, so the site's local parameters,
optimizer state, DP accountant and data stay in memory across rounds) and answers each task with a :class:`Reply`:

- ``train``: load the server's shared parameters, train ``local_epochs``, evaluate on the validation and test splits
  (aggregate Dice/HD95 only, for the benchmark protocol's best-validation-round score), release the shared parameters
  through the site's privacy boundary with the aggregation weight;
- ``personalize``: load the final shared parameters, fine-tune every parameter with the method's fine-tuning loss
  (PBL for FedOAP), keep the best epoch on the validation split, evaluate on the test split and on the unseen organ,
  write the site's detailed results into its workspace (owner-only, encrypted under its at-rest key), and reply with
  metrics only;
- ``secagg_advertise``, ``secagg_share``, ``secagg_unmask`` (secure aggregation, ``fedoap.privacy.secagg``): the
  round's key exchange before training and the reveal after it, key material only; a ``train`` reply is then the
  masked update. A step the protocol refuses (a swapped key, a server that skips the exchange or asks to unmask one
  site) is an empty reply saying why: the site releases nothing that round and stays in the job.

After every train round the session saves the site's local state (``fedoap.site.checkpoint``: the trainer's model,
optimizer, generators and DP accountants, the method's own state) into its results folder; the first task of a job
resumed after a crash (``robustness.resume_from``) loads the newest state the interrupted run left before that task's
round, so the site continues where it stopped (a site that has none starts fresh).

Client-level DP of the shared update is the stricter of the job's options and the site's mandatory policy, which the
site's privacy filter (``fedoap.site.policy``) announces in the meta of every task; it is fixed when the first task
arrives (one accountant for the whole job), and every released update carries a stamp of what it went through.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from fedoap.config import DataOptions, RunConfig
from fedoap.data import SiteData, SliceSet, load_site, load_unseen
from fedoap.data.normalization import normalization_for
from fedoap.eval.metrics import EMPTY_MASK_RULE, LESION_FP_RULE, per_image_scores, summarize
from fedoap.eval.volume import VOLUME_EMPTY_MASK_RULE, dice_per_case
from fedoap.inference.model_file import ModelCard, Preprocessing, model_file_metadata
from fedoap.methods.centralized import pool_sites
from fedoap.privacy.at_rest import find_site_key, make_private_dir
from fedoap.privacy.budget import DPBudget, JobShape
from fedoap.privacy.dp import DPSGDConfig, UpdateDPConfig
from fedoap.privacy.secagg import SecAggError, SiteSecAgg
from fedoap.protocol import (AGGREGATION_WEIGHT_KEY, DP_STAMP_KEY, NUM_SAMPLES_KEY, NUM_STEPS_KEY, PERSONALIZE_TASK,
                             SECAGG_ADVERTISE_TASK, SECAGG_KEY, SECAGG_REFUSED_KEY, SECAGG_SHARE_TASK, SECAGG_TASKS,
                             SITE_STATISTICS_KEY)
from fedoap.resume import previous_run_dir
from fedoap.site.checkpoint import (global_rng_state, load_site_state, save_site_state, saved_rounds,
                                    set_global_rng_state, state_path)
from fedoap.site.outputs import write_site_outputs
from fedoap.site.policy import budget_from_meta, policy_from_meta
from fedoap.site.privacy import SitePrivacy, public_metrics, stricter
from fedoap.site.site_config import find_site_config, load_site_config
from fedoap.training import LocalTrainer, TrainConfig

__all__ = ["SiteSession", "Reply", "SITE_RESULTS_DIR", "site_data_dirs"]

logger = logging.getLogger(__name__)

#: folder (under the site's workspace, per job) with the files that never leave the site
SITE_RESULTS_DIR = "fedoap"
N_OVERLAYS = 4


@dataclass
class Reply:
    """What a site sends back for one task: the released parameters (empty for metrics only), metrics, meta."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# -- data -------------------------------------------------------------------------------------------------------------
def site_data_dirs(data: DataOptions, site: str, workspace_root: str | os.PathLike) -> tuple[Path, Optional[Path]]:
    """The site's data folder and the unseen organ's (or None): under ``data.data_root`` when the job gives one
    (simulation; a deployed site's executor refuses it), else from the site's own configuration file.

    Raises:
        fedoap.site.site_config.SiteConfigError: no data root and no valid site configuration (names the file).
    """
    if data.data_root:
        return Path(data.data_root) / site, (Path(data.unseen_dir) if data.unseen_dir else None)
    config = load_site_config(find_site_config(workspace_root))
    unseen = Path(data.unseen_dir) if data.unseen_dir else config.unseen_dir
    return config.data_dir, unseen


def _load_data(config: RunConfig, site: str, workspace: Path) -> tuple[list[SiteData], Any, Optional[SliceSet]]:
    """The pooled sites (the centralized reference; else []), this site's data and the unseen organ's slices (the
    brain-tumour task: the site's volumes, ``fedoap.data.brats.BratsData``, no unseen organ)."""
    size, seed = config.training.image_size, config.training.seed
    if config.training.volumetric:
        from fedoap.data.brats import load_brats_splits

        data_dir, _ = site_data_dirs(config.data, site, workspace)
        return [], load_brats_splits(data_dir, size=config.training.volume_size, seed=seed, name=site), None
    if config.data.pool_sites:  # the centralized reference: this one process reads every site's data
        root = Path(config.data.data_root)
        sites = [load_site(root / s, image_size=size, seed=seed, name=s) for s in config.data.pool_sites]
        data = pool_sites(sites)
        unseen_dir = Path(config.data.unseen_dir) if config.data.unseen_dir else None
    else:
        sites = []
        data_dir, unseen_dir = site_data_dirs(config.data, site, workspace)
        data = load_site(data_dir, image_size=size, seed=seed, name=site)
    return sites, data, load_unseen(unseen_dir, image_size=size) if unseen_dir else None


def _overlay_indices(split: SliceSet, n: int) -> np.ndarray:
    """Test images with the largest lesions first, so the overlay figure shows tumors, not empty slices."""
    area = split.labels.reshape(len(split), -1).sum(1)
    return np.argsort(-area, kind="stable")[:n]


def _dp_sgd_release(stats: Mapping[str, Any]) -> Optional[dict]:
    """The DP-SGD steps of the round, as the site's privacy ledger charges them (None without DP-SGD)."""
    if "dp_sgd_round_steps" not in stats:
        return None
    return {"noise_multiplier": float(stats["dp_sgd_noise_multiplier"]),
            "sample_rate": float(stats["dp_sgd_sample_rate"]), "steps": int(stats["dp_sgd_round_steps"]),
            "unit": str(stats.get("dp_sgd_unit", "slice"))}


def _opacus_refusal(model: Any) -> str:
    """Why Opacus cannot train ``model`` with DP-SGD (e.g. BatchNorm mixes the samples of a batch), or ""."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    return f"its network cannot run DP-SGD (Opacus: {errors[0]})" if errors else ""


class VolumeTrainer(LocalTrainer):
    """The generic trainer on whole 3D volumes with one sigmoid channel per tumour region: only the evaluation
    differs (Dice and HD95 per case and region, :func:`fedoap.eval.regions.region_scores`)."""

    def evaluate(self, split: Any) -> Any:
        from fedoap.eval.regions import region_scores

        return region_scores(self.predict(split.images), split.labels, split.spacings)


def _summary(scores: Any) -> dict[str, Any]:
    """The means of a split's scores, per-image (2D) or per-region (3D) alike: at least ``dice`` and ``hd95``."""
    return scores.summary() if hasattr(scores, "summary") else summarize(scores)


class SiteSession:
    """One site's state for one job (see the module docstring).

    Args:
        config: the job's run configuration (read and checked once by the client script).
        site: the site's name. workspace: the site's workspace root (its ``local/`` configuration and keys).
        job_id: names the folder of the site's outputs, ``<workspace>/<job_id>/fedoap``.

    Raises:
        fedoap.site.site_config.SiteConfigError, fedoap.data.DataValidationError, ValueError: the site's own
            configuration, data or at-rest key is unusable (before any training).
    """

    def __init__(self, config: RunConfig, site: str, workspace: str | os.PathLike, job_id: str) -> None:
        self.config = config
        self.site = site
        self.workspace = Path(workspace)
        self.at_rest_key = find_site_key(self.workspace)  # a bad key file fails here, before any training
        self.pooled, self.data, self.unseen = _load_data(config, site, self.workspace)
        self.method = config.method.instance
        self.train_config: TrainConfig = replace(config.training.train_config(),
                                                 dp_lr=config.privacy.dp_sgd_lr or None)
        dp = config.privacy.dp_sgd(total_epochs=config.training.rounds * config.training.local_epochs)
        model = config.build_model()  # seeded as the server's initial checkpoint: local parts start identical
        self.trainer_class = VolumeTrainer if config.training.volumetric else LocalTrainer
        self.trainer = self.trainer_class(model, self.method, self.data.train, self.data.val, self.train_config,
                                          dp=dp)
        self.privacy: Optional[SitePrivacy] = None  # built with the first task, which carries the site's DP policy
        self.out_dir = make_private_dir(self.workspace / job_id / SITE_RESULTS_DIR)
        self.job_id = job_id
        self._secagg_keys = self._secagg_identity()  # a missing key or roster fails here, before any training
        self._secagg: Optional[SiteSecAgg] = None  # the round's protocol state
        self._resume_pending = bool(config.robustness.resume_from)  # a resumed job loads its state at its first task

    @property
    def private(self) -> bool:
        """Whether what the site releases is differentially private (client-level DP or DP-SGD)."""
        return bool(self.privacy and self.privacy.private) or self.trainer.dp is not None

    def handle(self, task_name: str, params: Optional[Mapping[str, Any]], meta: Optional[Mapping[str, Any]],
               current_round: Optional[int] = None) -> Reply:
        """Answer one task: load what the server sent, then train a round or personalize.

        ``current_round`` (the task's round, ``FLModel.current_round``) names the state saved after a train round
        and, at the first task of a resumed job, bounds the state it continues from (rounds before it); None: the
        session neither saves nor resumes.

        Raises:
            ValueError: the state to resume from is unreadable, changed, or of another site or configuration (names
                the file).
            OSError: the round's state cannot be written (the round fails rather than leave no state to resume).
        """
        meta = dict(meta or {})
        if self.privacy is None:
            self.privacy = self._site_privacy(policy_from_meta(meta), budget_from_meta(meta))
            self.privacy.expect(self._broadcast_set())  # a broadcast of other keys or shapes is refused
        if self._resume_pending:  # before the server's parameters are loaded: they replace the saved shared ones
            if current_round is None:
                logger.warning("site %s: the first task of a resumed job has no round; starts fresh", self.site)
            else:
                self.resume(int(current_round))
            self._resume_pending = False
        if task_name in SECAGG_TASKS:  # key material only: no parameters in, none out
            return self._refusing(lambda: self.secagg_step(task_name, meta, current_round))
        global_shared = self.privacy.incoming(params or {})
        self.trainer.load_shared(global_shared)
        statistics = meta.get(SITE_STATISTICS_KEY)
        if statistics:
            self.method.receive_statistics(self.trainer.model, statistics)
        if task_name == PERSONALIZE_TASK:
            reply = Reply(metrics=public_metrics(self.personalize(), self.private))
            for saved in saved_rounds(self.out_dir):  # the job is over: nothing left to resume
                state_path(self.out_dir, saved).unlink(missing_ok=True)
            return reply
        reply = self._refusing(lambda: self.train_round(global_shared, meta, current_round))
        if current_round is not None:
            save_site_state(self.out_dir, int(current_round), self.state(), key=self.at_rest_key)
        return reply

    # -- what a resumed job continues from -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The site's local state between two rounds: the trainer's (:meth:`fedoap.training.LocalTrainer.state`), the
        client-level DP accountant of the released updates (None without one) and the process's random streams."""
        accountant = self.privacy.accountant if self.privacy is not None else None
        coalition = self.privacy.coalition_accountant if self.privacy is not None else None
        return {"site": self.site, "trainer": self.trainer.state(),
                "update_dp": accountant.state_dict() if accountant is not None else None,
                "update_dp_coalition": coalition.state_dict() if coalition is not None else None,
                "rng": global_rng_state()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (call after the first task built the site's privacy boundary).

        Raises:
            ValueError: a state of another site, or one that does not fit this session's trainer.
        """
        self._check_site(state)
        self.trainer.load_state(state["trainer"])
        accountant = self.privacy.accountant if self.privacy is not None else None
        if accountant is not None and state.get("update_dp") is None:
            logger.warning("site %s: the interrupted run released its updates without client-level DP; the epsilon "
                           "reported from here on covers the resumed rounds only", self.site)
        self.load_accounting(state)
        set_global_rng_state(state["rng"])

    def load_accounting(self, state: Mapping[str, Any]) -> None:
        """Only the DP accountants of a :meth:`state` (DP-SGD's and the released updates'), where they exist on both
        sides.

        Raises:
            ValueError: a state of another site, or an accountant state Opacus refuses.
        """
        self._check_site(state)
        dp_sgd = state["trainer"]["dp_sgd"]
        if self.trainer.dp is not None and dp_sgd is not None:
            self.trainer.dp.load_state_dict(dp_sgd)
        accountant = self.privacy.accountant if self.privacy is not None else None
        if accountant is not None and state.get("update_dp") is not None:
            accountant.load_state_dict(state["update_dp"])
        coalition = self.privacy.coalition_accountant if self.privacy is not None else None
        if coalition is not None and state.get("update_dp_coalition") is not None:
            coalition.load_state_dict(state["update_dp_coalition"])

    def _check_site(self, state: Mapping[str, Any]) -> None:
        if state.get("site") != self.site:
            raise ValueError(f"it is the state of site {state.get('site')!r}, not of {self.site!r}")

    def resume(self, task_round: int) -> Optional[int]:
        """Continue, before round ``task_round``, from what the interrupted run of this site left
        (``fedoap.resume.previous_run_dir`` / ``fedoap``): the newest state of a round before ``task_round``; its
        round, or None when there is none (a site that dropped out early has none, and starts fresh).

        The DP accountants come from the newest state of any round: a state of round ``task_round`` or later means the
        site trained, and probably released, that round before the crash, which the server did not keep; its privacy
        was spent all the same, so it is counted (at worst a round too many, never one too few).

        Raises:
            ValueError: a state file is unreadable, changed, or does not fit this session (names the file).
        """
        folder = previous_run_dir(self.config.robustness.resume_from, self.site, self.workspace) / SITE_RESULTS_DIR
        found = load_site_state(folder, task_round - 1, key=self.at_rest_key) if task_round > 0 else None
        newest = load_site_state(folder, sys.maxsize, key=self.at_rest_key)
        if found is not None:
            path = state_path(folder, found[0])
            try:
                self.load_state(found[1])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: cannot resume from it: {err}") from None
            logger.info("site %s resumes from its state after round %d (%s)", self.site, found[0], path)
        else:
            logger.info("site %s: no state of a round before %d in %s; starts fresh", self.site, task_round, folder)
        if newest is not None and (found is None or newest[0] > found[0]):
            path = state_path(folder, newest[0])
            try:
                self.load_accounting(newest[1])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: cannot take its DP accounting: {err}") from None
            logger.warning("site %s: its state after round %d (%s), which the server did not keep, counts in its DP "
                           "accounting", self.site, newest[0], path)
        return found[0] if found is not None else None

    # -- tasks ---------------------------------------------------------------------------------------------------------
    def train_round(self, global_shared: Mapping[str, Any], task_meta: Mapping[str, Any],
                    rnd: Optional[int] = None) -> Reply:
        """One federated round (``rnd``, the task's round, if known): train, evaluate, release the shared update with
        its stamp and weight (masked under secure aggregation, with that round's key exchange)."""
        trainer, data = self.trainer, self.data
        exchange = self._round_exchange(task_meta, rnd)  # refused before training: nothing is trained for nothing
        stats = trainer.train_round()
        val = _summary(trainer.evaluate(data.val))
        # the round's model on the test split too: FL-MedSegBench's protocol score is the test Dice at the best
        # validation round (aggregate numbers only, like val Dice)
        test = _summary(trainer.evaluate(data.test))
        per_site = {}
        for d in self.pooled:  # centralized reference: the pooled model's scores on each site's splits
            per_site.update({f"val_dice/{d.name}": summarize(trainer.evaluate(d.val))["dice"],
                             f"test_dice/{d.name}": summarize(trainer.evaluate(d.test))["dice"]})
        weight = stats["aggregation_weight"]  # training samples; steps for a method that weights by steps (FedGS)
        payload, privacy_metrics = self.privacy.outgoing(trainer.shared_params(), global_shared, weight,
                                                         masker=self._masker(exchange, weight) if exchange else None)
        meta = {NUM_STEPS_KEY: stats["steps"], NUM_SAMPLES_KEY: stats["n_samples"], AGGREGATION_WEIGHT_KEY: weight}
        # DP-SGD's accounting, without the largest case's slice count (a fact about the training data)
        dp_sgd_stats = {k: v for k, v in stats.get("privacy", {}).items() if k != "max_slices_per_case"}
        stamp = self.privacy.stamp(_dp_sgd_release(dp_sgd_stats))
        if payload and stamp is not None:  # what the released update went through (checked by the site's policy)
            meta[DP_STAMP_KEY] = stamp
        site_statistics = self.method.site_statistics(data.train)
        if site_statistics is not None:
            meta[SITE_STATISTICS_KEY] = site_statistics
        metrics = {"train_loss": stats["train_loss"], "val_dice": val["dice"], "test_dice": test["dice"],
                   "test_hd95": test["hd95"], "images_per_s": stats["images_per_s"],
                   "train_seconds": stats["train_seconds"], **per_site}
        metrics.update({f"test_{k}": v for k, v in test.items() if k.startswith(("dice_", "hd95_"))})
        budget = budget_from_meta(task_meta) or {}  # the site's privacy ledger, before this round's release
        budget_left = {f"dp_budget_left/{unit}": state["left"] for unit, state in budget.items()
                       if isinstance(state, dict)}
        return Reply(params=payload, meta=meta,
                     metrics={**public_metrics(metrics, self.private), **dp_sgd_stats, **privacy_metrics, **budget_left})

    # -- secure aggregation ----------------------------------------------------------------------------------------------
    def _secagg_identity(self) -> Optional[tuple[Any, dict[str, bytes]]]:
        """The site's identity key and the roster of every site's public identity key (``local/``, or
        ``$FEDOAP_SECAGG_DIR`` in simulation), under secure aggregation; None without it.

        Raises:
            ValueError: a missing or unsafe key file, a roster without this site or with another key for it.
        """
        if not self.config.privacy.secagg:
            return None
        from fedoap.privacy.secagg_keys import check_roster_has, load_identity, load_roster

        identity, roster = load_identity(self.workspace, self.site), load_roster(self.workspace)
        check_roster_has(roster, [self.site], own=(self.site, identity))
        return identity, roster

    def secagg_step(self, task_name: str, meta: Mapping[str, Any], current_round: Optional[int]) -> Reply:
        """One step of the round's secure aggregation (``fedoap.privacy.secagg``): advertise fresh round keys signed
        by the site's identity, share the mask secrets with the other sites, or reveal the shares that remove the
        masks (never both shares of one site); the reply carries key material only.

        Raises:
            SecAggError: secure aggregation is off, the task has no round, a step out of order or of another round,
                or a message the protocol refuses (a key not signed by its site, a replay, a request to unmask a
                site).
        """
        if self._secagg_keys is None:
            raise SecAggError(f"task {task_name!r}: secure aggregation is off in this job's configuration")
        if current_round is None:
            raise SecAggError(f"task {task_name!r} carries no round")
        rnd, message = int(current_round), meta.get(SECAGG_KEY)
        if task_name == SECAGG_ADVERTISE_TASK:
            identity, roster = self._secagg_keys
            self._secagg = SiteSecAgg(self.site, identity, roster, self.job_id, rnd,
                                      self.config.privacy.secagg_config())
            # the weight this site expects to claim (the server sums them into the round's common scale)
            return Reply(meta={SECAGG_KEY: self._secagg.advertise(),
                               AGGREGATION_WEIGHT_KEY: self.trainer.expected_weight()})
        state = self._secagg_round(rnd)
        if not isinstance(message, Mapping):
            raise SecAggError(f"task {task_name!r} carries no secure aggregation message")
        if task_name == SECAGG_SHARE_TASK:
            return Reply(meta={SECAGG_KEY: state.share_keys(message.get("advertised") or {})})
        sent = list(message.get("sent") or [])
        self._check_noise_shares(len(sent), "sent their update")
        reply = state.unmask(sent, list(message.get("dropped") or []))
        self._secagg = None  # one reveal per round
        return Reply(meta={SECAGG_KEY: reply})

    def _refusing(self, step: Any) -> Reply:
        """``step()``, or, when secure aggregation refuses it (a key not signed by its site, too few survivors, a
        request to unmask a site, a value outside the ring's headroom), an empty reply that says why: the site
        releases nothing this round and stays in the job."""
        try:
            return step()
        except SecAggError as err:
            self._secagg = None  # the round is over for this site
            logger.warning("site %s: secure aggregation refused: %s", self.site, err)
            return Reply(meta={SECAGG_REFUSED_KEY: str(err)[:500]})

    def _secagg_round(self, rnd: Optional[int]) -> SiteSecAgg:
        """The protocol state of round ``rnd`` (None: the round is not checked).

        Raises:
            SecAggError: no key exchange of that round on this site (a step out of order or of another round).
        """
        if self._secagg is None or (rnd is not None and self._secagg.round != rnd):
            shown = f"round {rnd + 1}" if rnd is not None else "this round"
            raise SecAggError(f"secure aggregation: no key exchange of {shown} on this site (a step out of order)")
        return self._secagg

    def _round_exchange(self, task_meta: Mapping[str, Any],
                        rnd: Optional[int] = None) -> Optional[tuple[SiteSecAgg, dict, list, float]]:
        """What the training task says of this round's key exchange, checked before any training: the round's
        protocol state, the key shares sent to this site, the survivors and the common scale; None without secure
        aggregation.

        Raises:
            SecAggError: secure aggregation is on but the task carries no key exchange of this round (the update is
                never released in clear), or a scale that is not a positive number.
        """
        if self._secagg_keys is None:
            return None
        message = task_meta.get(SECAGG_KEY)
        if not isinstance(message, Mapping):
            raise SecAggError("secure aggregation is on, but the training task comes without this round's key "
                              "exchange: the update is not released in clear")
        state = self._secagg_round(rnd)
        scale = message.get("scale")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and np.isfinite(scale) and scale > 0):
            raise SecAggError(f"secure aggregation: the round's scale must be a positive number, got {scale!r}")
        shares = message.get("shares")
        received = shares.get(self.site) if isinstance(shares, Mapping) else None
        survivors = list(message.get("survivors") or [])
        self._check_noise_shares(len(survivors), "take part")
        return state, dict(received or {}), survivors, float(scale)

    def _check_noise_shares(self, n_sites: int, doing: str) -> None:
        """Under distributed DP, refuse a round in which fewer sites than the noise's shares ``m`` ``doing``: their
        sum would carry less noise than the job promises against the server.

        Raises:
            SecAggError: fewer than ``m`` sites.
        """
        dp = self.privacy.update_dp if self.privacy is not None else None
        if dp is not None and dp.shares > 1 and n_sites < dp.shares:
            raise SecAggError(f"distributed DP: only {n_sites} site(s) {doing}, fewer than the {dp.shares} whose noise "
                              "shares add up to the promised noise: refusing")

    @staticmethod
    def _masker(exchange: tuple[Any, dict, list, float], weight: float):
        """The round's masking of the released update (times ``weight``, the site's aggregation weight): every site
        divides by the same public scale (the round's announced total weight), so the sum fits the ring's fixed
        point; the headroom check's summands say that this site's values are its share weight / scale of a sum of
        shares <= 1."""
        state, received, survivors, scale = exchange
        summands = max(1.0, scale / float(weight)) if weight > 0 else None
        return lambda values: state.masked_input(values / scale, received, survivors, summands=summands)

    def personalize(self) -> dict[str, Any]:
        """Fine-tune, evaluate and write the site's detailed results; the metrics sent to the server (the centralized
        reference: every pooled site fine-tunes its own copy, metrics ``<name>/<site>`` and their means)."""
        if self.config.training.volumetric:
            return self._personalize_regions(self.trainer, self.data, self.out_dir)
        if not self.pooled:
            return self._personalize(self.trainer, self.data, self.out_dir)
        metrics: dict[str, Any] = {}
        for data in self.pooled:
            trainer = LocalTrainer(copy.deepcopy(self.trainer.model), self.method, data.train, data.val,
                                   self.train_config)
            site_metrics = self._personalize(trainer, data, make_private_dir(self.out_dir / data.name))
            metrics.update({f"{k}/{data.name}": v for k, v in site_metrics.items()})
        for key in ("test_dice", "test_hd95", "val_dice"):
            metrics[key] = float(np.mean([metrics[f"{key}/{d.name}"] for d in self.pooled]))
        return metrics

    # -- helpers -------------------------------------------------------------------------------------------------------
    def _broadcast_set(self) -> dict[str, Any]:
        """The site's shared keys at their current values: what the server broadcasts (a method may send only part
        of it, e.g. FedMEPD the encoders of the modalities the site holds)."""
        state = self.trainer.model.state_dict()
        return {k: state[k].detach().cpu() for k in self.trainer.shared_keys}

    def _personalize_regions(self, trainer: LocalTrainer, data: Any, out_dir: Path) -> dict[str, Any]:
        """The brain-tumour task's personalization: fine-tune (best epoch on the validation split by mean region
        Dice), then Dice and HD95 per region and case on the test split."""
        from fedoap.eval.regions import REGION_NAMES, REGION_RULE, region_scores

        finetune = trainer.finetune()
        pred = trainer.predict(data.test.images)
        scores = region_scores(pred, data.test.labels, data.test.spacings)
        test = scores.summary()
        metrics: dict[str, Any] = {
            "organ": "brain",
            "test_dice": test["dice"], "test_hd95": test["hd95"], "n_test": test["n_cases"],
            "best_finetune_epoch": finetune["best_epoch"], "best_val_dice": finetune["best_val_dice"],
            "val_dice": finetune["best_val_dice"],
            **{f"test_{k}_{r}": test[f"{k}_{r}"] for r in REGION_NAMES for k in ("dice", "hd95")},
        }
        personal = getattr(self.method, "personal_filters", None)
        if callable(personal):
            metrics["personal_filters"] = int(sum(personal().values()))
        detail = {"site": data.name, "modalities": list(data.modalities), "region_rule": REGION_RULE,
                  "finetune": finetune, "test": test, "test_case_ids": data.test.case_ids, "test_per_case_dice": scores.dice.tolist(),
                  "test_per_case_hd95": scores.hd95.tolist()}
        mid = data.test.images.shape[-1] // 2  # the middle axial slice of up to N_OVERLAYS test cases
        channel = int(np.flatnonzero(data.test.present)[0])
        n = min(N_OVERLAYS, len(data.test))
        write_site_outputs(out_dir, state_dict=trainer.model.state_dict(),
                           overlays={"image": data.test.images[:n, channel, ..., mid],
                                     "label": data.test.labels[:n, 0, ..., mid],
                                     "pred": pred[:n, 0, ..., mid].numpy()},
                           detail={**detail, "metrics": metrics}, key=self.at_rest_key,
                           model_metadata={"method": self.config.method.name, "task": self.config.training.task})
        return metrics

    def _personalize(self, trainer: LocalTrainer, data: SiteData, out_dir: Path) -> dict[str, Any]:
        finetune = trainer.finetune()
        test_pred = trainer.predict(data.test.images)  # once: the per-slice and the per-volume scores share it
        test_scores = per_image_scores(test_pred, torch.from_numpy(data.test.labels))  # = trainer.evaluate(data.test)
        test = summarize(test_scores)
        metrics = {
            "organ": data.organ,
            "test_dice": test["dice"],
            "test_hd95": test["hd95"],
            "n_test": test["n_images"],
            "n_test_empty": test["n_empty_gt"],
            "test_lesion_dice": test["lesion_dice"],  # LESION_FP_RULE: Dice without the empty slices' verdicts
            "test_empty_fp_rate": test["empty_fp_rate"],
            "best_finetune_epoch": finetune["best_epoch"],
            "best_val_dice": finetune["best_val_dice"],
            "val_dice": finetune["best_val_dice"],  # the job's key metric, as in every training round
        }
        detail = {"site": data.name, "empty_mask_rule": EMPTY_MASK_RULE, "lesion_fp_rule": LESION_FP_RULE,
                  "finetune": finetune, "test": test,
                  "test_per_image_dice": test_scores.dice, "test_per_image_hd95": test_scores.hd95}
        if data.volumetric:  # a 3D site: Dice per case over its stacked slices, at the training size
            volume_dice = dice_per_case(test_pred, data.test.labels, data.test.case_ids)
            metrics.update(test_volume_dice=float(np.mean(list(volume_dice.values()))),
                           n_test_volumes=len(volume_dice))
            detail.update(test_per_volume_dice=volume_dice, volume_empty_mask_rule=VOLUME_EMPTY_MASK_RULE)
        if self.unseen is not None:
            # an organ no site trained on has many empty slices: under EMPTY_MASK_RULE a few false positives take its
            # Dice to ~0 for every method, so the scores of LESION_FP_RULE go with it (aggregates of the split only)
            unseen_scores = summarize(trainer.evaluate(self.unseen))
            metrics.update({"unseen_dice": unseen_scores["dice"], "unseen_hd95": unseen_scores["hd95"],
                            "unseen_lesion_dice": unseen_scores["lesion_dice"],
                            "unseen_n_lesion": unseen_scores["n_lesion"],
                            "unseen_empty_fp_rate": unseen_scores["empty_fp_rate"],
                            "unseen_empty_fp_area": unseen_scores["empty_fp_area"],
                            "unseen_n_empty": unseen_scores["n_empty_gt"],
                            "unseen_pooled_dice": unseen_scores["pooled_dice"]})
            detail["unseen"] = unseen_scores
        idx = _overlay_indices(data.test, N_OVERLAYS)
        write_site_outputs(out_dir, state_dict=trainer.model.state_dict(),
                           overlays={"image": data.test.images[idx, 0], "label": data.test.labels[idx, 0],
                                     "pred": test_pred[idx].numpy()[:, 0]},
                           detail={**detail, "metrics": metrics}, key=self.at_rest_key,
                           model_metadata=model_file_metadata(self._model_card(trainer, data, metrics)))
        return metrics

    def _model_card(self, trainer: LocalTrainer, data: SiteData, metrics: Mapping[str, Any]) -> ModelCard:
        """What the personalized model file says about itself: network, preprocessing, method, partition and where it
        came from (the epsilon this site spent on the job, its validation and test Dice)."""
        training = self.config.training
        spent: dict[str, float] = {}
        if trainer.dp is not None:
            spent.update(dp_sgd_epsilon=float(trainer.dp.epsilon()), dp_sgd_delta=float(trainer.dp.config.delta))
        accountant = self.privacy.accountant if self.privacy is not None else None
        if accountant is not None and self.privacy.update_dp is not None:
            delta = float(self.privacy.update_dp.delta)
            spent.update(dp_update_epsilon=float(accountant.epsilon(delta)), dp_update_delta=delta)
        return ModelCard(
            network=self.method.model_spec(training.model_args()),
            preprocessing=Preprocessing(modality=data.modality, organ=data.organ,
                                        normalization=normalization_for(data.modality, data.organ),
                                        image_size=int(training.image_size), volumetric=bool(data.volumetric)),
            method={"name": self.config.method.name, "args": dict(self.config.method.args)},
            shared_keys=tuple(self.method.shared_keys(trainer.model)),
            provenance={"job_id": self.job_id, "site": data.name, "rounds": int(training.rounds),
                        "finetune_epochs": int(training.finetune_epochs), "seed": int(training.seed),
                        "privacy": spent, "val_dice": float(metrics["val_dice"]),
                        "test_dice": float(metrics["test_dice"]), "test_hd95": float(metrics["test_hd95"]),
                        "empty_mask_rule": EMPTY_MASK_RULE,
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def _site_privacy(self, site_policy: Optional[UpdateDPConfig | DPBudget],
                      ledger: Optional[Mapping[str, Any]] = None) -> SitePrivacy:
        """The site's HE context (from its own configuration) and client-level DP settings: the stricter of the job's
        and the site policy's. A site budget (:class:`DPBudget`) is first turned into its mechanism for this job
        (:meth:`_meet_budget`).

        Raises:
            ValueError: the site imposes DP on a method that shares statistics in clear (not covered).
            fedoap.privacy.budget.BudgetRefusal: no mechanism meets the site's budget with a useful noise level.
        """
        if site_policy is not None and self.method.shares_statistics:
            raise ValueError(f"site {self.site!r} imposes DP on every job, but method "
                             f"{self.config.method.name!r} shares statistics of its training data in clear, which that "
                             "DP would not cover")
        if isinstance(site_policy, DPBudget):
            site_policy = self._meet_budget(site_policy, ledger)
        context = None
        if self.config.privacy.he:
            from fedoap.privacy.contexts import find_context_file
            from fedoap.privacy.he import load_context

            context = load_context(find_context_file("client", self.workspace))
        return SitePrivacy(he_context=context, update_dp=stricter(self.config.update_dp(), site_policy))

    def job_shape(self, unit: str) -> JobShape:
        """What this job's noise depends on, with this site's training units (slices, or cases for ``unit`` case)."""
        training, train = self.config.training, self.data.train
        dp = self.trainer.dp
        batch = (dp.batch_size if dp is not None else None) or self.config.privacy.dp_sgd_batch_size \
            or training.batch_size
        units = len(set(train.case_ids)) if unit == "case" else len(train)
        conflict = self.method.dp_sgd_conflict
        conflict = f"method {self.config.method.name!r} {conflict}" if conflict else _opacus_refusal(self.trainer.model)
        return JobShape(rounds=training.rounds, local_epochs=training.local_epochs, batch_size=int(batch),
                        sites=self.config.robustness.min_responses or 1, units=units,
                        dp_sgd_conflict=conflict)

    def _meet_budget(self, budget: DPBudget, ledger: Optional[Mapping[str, Any]]) -> Optional[UpdateDPConfig]:
        """Derive the mechanism that meets the site's per-job ``budget`` (no more than what is left of the lifetime
        budget of its unit, ``ledger``); switch DP-SGD on at that epsilon when it is the mechanism and the job's own
        is weaker (a fresh trainer: nothing has trained yet); the client-level DP to combine with the job's (None:
        DP-SGD)."""
        from fedoap.privacy.budget import plan_mechanism

        mechanism = plan_mechanism(budget, self.job_shape(budget.unit))
        left = ((ledger or {}).get(mechanism.unit) or {}).get("left")
        if isinstance(left, (int, float)) and 0 < left < budget.epsilon:  # the lifetime budget is nearly spent
            budget = replace(budget, epsilon=float(left))
            mechanism = plan_mechanism(budget, self.job_shape(budget.unit))
        logger.info("site %s: its privacy budget (epsilon %g per %s per job, delta %g) gives this job %s", self.site,
                    budget.epsilon, budget.unit, budget.delta, mechanism.describe())
        if mechanism.kind == "client":
            clip = self.config.privacy.dp_update_clip or budget.clip_norm
            return UpdateDPConfig(clip_norm=clip, noise_multiplier=mechanism.noise_multiplier, delta=budget.delta)
        if not self._dp_sgd_meets(budget, mechanism):
            config = self.config.privacy.dp_sgd(total_epochs=self.config.training.rounds
                                                * self.config.training.local_epochs)
            base = config or DPSGDConfig(noise_multiplier=0.0, max_grad_norm=self.config.privacy.dp_sgd_clip,
                                         noise_source=self.config.privacy.dp_sgd_noise_source,
                                         batch_size=self.config.privacy.dp_sgd_batch_size or None)
            # the planned sigma: calibrated for this site's rate and the job's steps, as DPSGD would calibrate it
            dp = replace(base, noise_multiplier=mechanism.noise_multiplier, target_epsilon=None,
                         delta=min(float(budget.delta), base.delta), unit=mechanism.unit)
            self.trainer = self.trainer_class(self.config.build_model(), self.method, self.data.train,
                                              self.data.val, self.train_config, dp=dp)
        return None

    def _dp_sgd_meets(self, budget: DPBudget, mechanism: Any) -> bool:
        """Whether the job's own DP-SGD already spends at most the budget on its unit over the whole job."""
        from fedoap.privacy.ledger import Release, epsilon_of

        dp = self.trainer.dp
        if dp is None or dp.unit not in ("case", mechanism.unit):
            return False
        steps = self.config.training.rounds * self.config.training.local_epochs * dp.steps_per_epoch
        spent = epsilon_of([Release(dp.noise_multiplier, dp.sample_rate, steps)], float(budget.delta))
        return spent <= budget.epsilon * (1 + 1e-9) and float(dp.config.delta) <= budget.delta
