"""NVFlare Client API script of every method: train locally, send only the shared parameters, personalize at the end.

Run in-process (NVFlare's default), the script lives for the whole job, so the site's local parameters, optimizer
state and data stay in memory across rounds. Tasks:

- ``train``: load the server's shared parameters, train ``local_epochs``, evaluate on the validation and test splits
  (aggregate Dice/HD95 only, for the benchmark protocol's best-validation-round score), send the shared parameters
  with the number of training samples (the aggregation weight);
- ``personalize``: load the final shared parameters, fine-tune every parameter with the method's fine-tuning loss
  (PBL for FedOAP), keep the best epoch on the validation split, evaluate on the test split and on the unseen organ,
  write the site's detailed results next to its workspace, and send back metrics only.

The site's data folder (MSD layout) is ``<data-root>/<site name>`` when the job passes ``--data-root`` (the
simulator, where every site shares one file system); a deployed job passes no data path, and each site reads its own
from its configuration, ``<site workspace>/local/fedoap_site.json`` (``fedoap.site.site_config``).

Client-level DP of the shared update is the stricter of the job's options and the site's mandatory policy, which the
site's privacy filter (``fedoap.site.policy``) announces in the meta of every task; it is fixed when the first task
arrives (one accountant for the whole job), and every released update carries a stamp of what it went through.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from fedoap.data import SiteData, SliceSet, load_site, load_unseen
from fedoap.eval.metrics import EMPTY_MASK_RULE, summarize
from fedoap.protocol import AGGREGATION_WEIGHT_KEY, NUM_SAMPLES_KEY, PERSONALIZE_TASK, SITE_STATISTICS_KEY
from fedoap.site.site_config import find_site_config, load_site_config
from fedoap.site.policy import budget_from_meta, policy_from_meta
from fedoap.site.outputs import write_site_outputs
from fedoap.site.privacy import SitePrivacy, public_metrics, stricter
from fedoap.protocol import DP_STAMP_KEY
from fedoap.methods import get_method
from fedoap.privacy.at_rest import find_site_key, make_private_dir
from fedoap.privacy.dp import DPSGDConfig, UpdateDPConfig
from fedoap.training import LocalTrainer, TrainConfig

__all__ = ["build_parser", "main", "SITE_RESULTS_DIR"]

#: folder (under the site's workspace, per job) with the files that never leave the site
SITE_RESULTS_DIR = "fedoap"
N_OVERLAYS = 4


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: a deployed site refuses the data-folder options by their exact names (fedoap.site.executor)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data-root", default="", help="folder with one MSD-layout sub-folder per site (simulation); "
                   "without it the site reads its data folder from its configuration (local/fedoap_site.json)")
    p.add_argument("--unseen-dir", default="", help="MSD-layout folder of the unseen organ (optional; a deployed "
                   "site names it in its configuration)")
    p.add_argument("--pool-sites", default="", help="centralized reference only: comma-separated sites whose training "
                   "data this one process pools (their folders under --data-root)")
    p.add_argument("--method", default="fedoap")
    p.add_argument("--method-args", default="{}", help="JSON object of the method's constructor arguments")
    p.add_argument("--model-args", default="{}", help="JSON object of the network's constructor arguments")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--he", action="store_true", help="encrypt the shared update (TenSEAL CKKS; the context file is "
                   "site configuration: <workspace>/local/client_context.tenseal from the sites' key ceremony, or "
                   "$FEDOAP_HE_CONTEXT_DIR in simulation)")
    p.add_argument("--dp-update-clip", type=float, default=0.0, help="client-level DP: L2 bound of the update (0: off)")
    p.add_argument("--dp-update-noise", type=float, default=0.0, help="client-level DP: noise multiplier sigma")
    p.add_argument("--dp-sgd-noise", type=float, default=0.0, help="DP-SGD noise multiplier (0: off)")
    p.add_argument("--dp-sgd-epsilon", type=float, default=0.0, help="DP-SGD target epsilon over the job (0: off)")
    p.add_argument("--dp-sgd-clip", type=float, default=1.0, help="DP-SGD per-sample gradient norm bound")
    p.add_argument("--dp-sgd-unit", choices=("slice", "case"), default="slice", help="what DP-SGD protects")
    p.add_argument("--dp-sgd-noise-source", choices=("chacha20", "os_seeded"), default="chacha20",
                   help="DP-SGD gradient noise source (both keyed by the OS, never by the job)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta at which epsilon is reported")
    p.add_argument("--rounds", type=int, default=1, help="federated rounds of the job (DP-SGD calibration)")
    return p


def _site_output_dir(job_id: str) -> Path:
    return make_private_dir(Path(os.getcwd()) / job_id / SITE_RESULTS_DIR)


def _overlay_indices(split: SliceSet, n: int) -> np.ndarray:
    """Test images with the largest lesions first, so the overlay figure shows tumors, not empty slices."""
    area = split.labels.reshape(len(split), -1).sum(1)
    return np.argsort(-area, kind="stable")[:n]


def personalize(trainer: LocalTrainer, data: SiteData, unseen: Optional[SliceSet], out_dir: Path,
                key: Optional[bytes] = None) -> dict:
    """Fine-tune, evaluate, write the site's detailed results (owner-only; encrypted under the site's at-rest ``key``
    when it has one, ``fedoap.site.outputs``); return the metrics sent to the server."""
    finetune = trainer.finetune()
    test_scores = trainer.evaluate(data.test)
    test = summarize(test_scores)
    metrics = {
        "organ": data.organ,
        "test_dice": test["dice"],
        "test_hd95": test["hd95"],
        "n_test": test["n_images"],
        "n_test_empty": test["n_empty_gt"],
        "best_finetune_epoch": finetune["best_epoch"],
        "best_val_dice": finetune["best_val_dice"],
        "val_dice": finetune["best_val_dice"],  # the job's key metric, as in every training round
    }
    detail = {"site": data.name, "empty_mask_rule": EMPTY_MASK_RULE, "finetune": finetune, "test": test,
              "test_per_image_dice": test_scores.dice, "test_per_image_hd95": test_scores.hd95}
    if unseen is not None:
        unseen_scores = summarize(trainer.evaluate(unseen))
        metrics.update({"unseen_dice": unseen_scores["dice"], "unseen_hd95": unseen_scores["hd95"]})
        detail["unseen"] = unseen_scores
    idx = _overlay_indices(data.test, N_OVERLAYS)
    write_site_outputs(out_dir, state_dict=trainer.model.state_dict(),
                       overlays={"image": data.test.images[idx, 0], "label": data.test.labels[idx, 0],
                                 "pred": trainer.predict(data.test.images[idx]).numpy()[:, 0]},
                       detail={**detail, "metrics": metrics}, key=key)
    return metrics


def _concat(name: str, parts: Sequence[tuple[str, SliceSet]]) -> SliceSet:
    return SliceSet(images=np.concatenate([s.images for _, s in parts]),
                    labels=np.concatenate([s.labels for _, s in parts]),
                    case_ids=[f"{site}/{c}" for site, s in parts for c in s.case_ids])


def pool_sites(sites: Sequence[SiteData]) -> SiteData:
    """The centralized reference's data: every site's train, validation and test splits, each the union of the sites'
    splits of the same name (the per-site splits are unchanged, so every method is tested on the same slices)."""
    return SiteData(name="pooled", organ="+".join(d.organ for d in sites), modality="+".join(d.modality for d in sites),
                    train=_concat("train", [(d.name, d.train) for d in sites]),
                    val=_concat("val", [(d.name, d.val) for d in sites]),
                    test=_concat("test", [(d.name, d.test) for d in sites]))


def personalize_pooled(trainer: LocalTrainer, sites: Sequence[SiteData], unseen: Optional[SliceSet], out_dir: Path,
                       config: TrainConfig, key: Optional[bytes] = None) -> dict:
    """Centralized reference: every site fine-tunes its own copy of the pooled model on its own splits (the same
    fine-tuning budget as every method); results per site under ``out_dir/<site>``. Returns flat metrics
    (``test_dice/<site>``, ..., and their means)."""
    metrics: dict = {}
    for data in sites:
        site_trainer = LocalTrainer(copy.deepcopy(trainer.model), trainer.method, data.train, data.val, config)
        site_metrics = personalize(site_trainer, data, unseen, make_private_dir(out_dir / data.name), key)
        metrics.update({f"{k}/{data.name}": v for k, v in site_metrics.items() if k != "organ"})
    for key in ("test_dice", "test_hd95", "val_dice"):
        metrics[key] = float(np.mean([metrics[f"{key}/{d.name}"] for d in sites]))
    return metrics


def _dp_sgd(args: argparse.Namespace) -> Optional[DPSGDConfig]:
    """Sample-level DP-SGD settings, or None when it is off."""
    if args.dp_sgd_noise <= 0 and args.dp_sgd_epsilon <= 0:
        return None
    return DPSGDConfig(
        max_grad_norm=args.dp_sgd_clip,
        unit=args.dp_sgd_unit,
        noise_source=args.dp_sgd_noise_source,
        noise_multiplier=args.dp_sgd_noise if args.dp_sgd_noise > 0 else None,
        target_epsilon=args.dp_sgd_epsilon if args.dp_sgd_epsilon > 0 else None,
        delta=args.dp_delta,
        total_epochs=args.rounds * args.local_epochs,
    )


def site_data_dirs(args: argparse.Namespace, site: str, workspace_root: str) -> tuple[Path, Optional[Path]]:
    """The site's data folder and the unseen organ's (or None): under ``--data-root`` when the job gives one
    (simulation), else from the site's configuration file.

    Raises:
        fedoap.site.site_config.SiteConfigError: no data root and no valid site configuration (names the file).
    """
    if args.data_root:
        return Path(args.data_root) / site, (Path(args.unseen_dir) if args.unseen_dir else None)
    config = load_site_config(find_site_config(workspace_root))
    unseen = Path(args.unseen_dir) if args.unseen_dir else config.unseen_dir
    return config.data_dir, unseen


def _job_update_dp(args: argparse.Namespace) -> Optional[UpdateDPConfig]:
    """The job's own client-level DP of the update, or None."""
    if args.dp_update_clip <= 0:
        return None
    return UpdateDPConfig(clip_norm=args.dp_update_clip, noise_multiplier=args.dp_update_noise, delta=args.dp_delta)


def _site_privacy(args: argparse.Namespace, site: str, site_policy: Optional[UpdateDPConfig] = None,
                  shares_statistics: bool = False) -> SitePrivacy:
    """The site's HE context (from its own configuration) and client-level DP settings: the stricter of the job's and
    the site policy's.

    Raises:
        ValueError: the site imposes client-level DP on a method that shares statistics in clear (not covered).
    """
    if site_policy is not None and shares_statistics:
        raise ValueError(f"site {site!r} imposes client-level DP on every job, but method {args.method!r} shares "
                         "statistics of its training data in clear, which that DP would not cover")
    context = None
    if args.he:
        from fedoap.privacy.contexts import find_context_file
        from fedoap.privacy.he import load_context

        context = load_context(find_context_file("client", os.getcwd()))
    update_dp = stricter(_job_update_dp(args), site_policy)
    return SitePrivacy(he_context=context, update_dp=update_dp)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    flare.init()
    site = flare.get_site_name()
    at_rest_key = find_site_key(os.getcwd())  # a bad key file fails here, before any training
    pooled = [s for s in args.pool_sites.split(",") if s]
    if pooled:  # the centralized reference: this one process reads every site's data
        if not args.data_root:
            raise ValueError("--pool-sites (the centralized reference) needs --data-root with every site's folder")
        sites = [load_site(Path(args.data_root) / s, image_size=args.image_size, seed=args.seed, name=s)
                 for s in pooled]
        data = pool_sites(sites)
        unseen_dir = Path(args.unseen_dir) if args.unseen_dir else None
    else:
        sites = []
        data_dir, unseen_dir = site_data_dirs(args, site, os.getcwd())
        data = load_site(data_dir, image_size=args.image_size, seed=args.seed, name=site)
    unseen = load_unseen(unseen_dir, image_size=args.image_size) if unseen_dir else None

    method = get_method(args.method, **json.loads(args.method_args))
    torch.manual_seed(args.seed)  # same seed as the server's initial checkpoint: local parts start identical
    model = method.build_model(json.loads(args.model_args))
    config = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        local_epochs=args.local_epochs,
        finetune_epochs=args.finetune_epochs,
        seed=args.seed,
        device=args.device,
    )
    trainer = LocalTrainer(model, method, data.train, data.val, config, dp=_dp_sgd(args))
    privacy: Optional[SitePrivacy] = None  # built with the first task, which carries the site's DP policy
    out_dir = _site_output_dir(flare.get_job_id())

    while flare.is_running():
        task = flare.receive()
        if privacy is None:
            privacy = _site_privacy(args, site, policy_from_meta(task.meta), method.shares_statistics)
        global_shared = privacy.incoming(task.params or {})
        trainer.load_shared(global_shared)
        statistics = (task.meta or {}).get(SITE_STATISTICS_KEY)
        if statistics:
            method.receive_statistics(trainer.model, statistics)
        if flare.get_task_name() == PERSONALIZE_TASK:
            if sites:
                metrics = personalize_pooled(trainer, sites, unseen, out_dir, config, at_rest_key)
            else:
                metrics = personalize(trainer, data, unseen, out_dir, at_rest_key)
            flare.send(FLModel(params={}, metrics=public_metrics(metrics, privacy.private or trainer.dp is not None)))
            continue
        stats = trainer.train_round()
        val = summarize(trainer.evaluate(data.val))
        # the round's model on the test split too: FL-MedSegBench's protocol score is the test Dice at the best
        # validation round (aggregate numbers only, like val Dice)
        test = summarize(trainer.evaluate(data.test))
        per_site = {}
        for d in sites:  # centralized reference: the pooled model's scores on each site's splits
            per_site.update({f"val_dice/{d.name}": summarize(trainer.evaluate(d.val))["dice"],
                             f"test_dice/{d.name}": summarize(trainer.evaluate(d.test))["dice"]})
        weight = stats["aggregation_weight"]  # training samples; steps for a method that weights by steps (FedGS)
        payload, privacy_metrics = privacy.outgoing(trainer.shared_params(), global_shared, weight)
        meta = {"NUM_STEPS_CURRENT_ROUND": stats["steps"], NUM_SAMPLES_KEY: stats["n_samples"],
                AGGREGATION_WEIGHT_KEY: weight}
        # DP-SGD's accounting, without the largest case's slice count (a fact about the training data)
        dp_sgd_stats = {k: v for k, v in stats.get("privacy", {}).items() if k != "max_slices_per_case"}
        stamp = privacy.stamp(_dp_sgd_release(dp_sgd_stats))
        if payload and stamp is not None:  # what the released update went through (checked by the site's policy)
            meta[DP_STAMP_KEY] = stamp
        site_statistics = method.site_statistics(data.train)
        if site_statistics is not None:
            meta[SITE_STATISTICS_KEY] = site_statistics
        metrics = {"train_loss": stats["train_loss"], "val_dice": val["dice"], "test_dice": test["dice"],
                   "test_hd95": test["hd95"], "images_per_s": stats["images_per_s"],
                   "train_seconds": stats["train_seconds"], **per_site}
        private = privacy.private or trainer.dp is not None
        budget = budget_from_meta(task.meta) or {}  # the site's privacy ledger, before this round's release
        budget_left = {f"dp_budget_left/{unit}": state["left"] for unit, state in budget.items()
                       if isinstance(state, dict)}
        flare.send(
            FLModel(
                params=payload,
                params_type=ParamsType.FULL,
                metrics={**public_metrics(metrics, private), **dp_sgd_stats, **privacy_metrics, **budget_left},
                meta=meta,
            )
        )


def _dp_sgd_release(stats: dict) -> Optional[dict]:
    """The DP-SGD steps of the round, as the site's privacy ledger charges them (None without DP-SGD)."""
    if "dp_sgd_round_steps" not in stats:
        return None
    return {"noise_multiplier": float(stats["dp_sgd_noise_multiplier"]),
            "sample_rate": float(stats["dp_sgd_sample_rate"]), "steps": int(stats["dp_sgd_round_steps"]),
            "unit": str(stats.get("dp_sgd_unit", "slice"))}


if __name__ == "__main__":
    main(sys.argv[1:])
