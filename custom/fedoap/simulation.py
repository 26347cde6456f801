"""One command, one federation on the NVFlare simulator: data, initial model, recipe, ``SimEnv``, results.

``run_simulation`` is what ``fedoap simulate`` calls. It validates every site's data before NVFlare starts (so a bad
file is reported by name at once), writes a seeded initial checkpoint, runs the recipe in ``SimEnv``, then reads what
the server (round history) and every site (personalized results, overlay examples) wrote, and assembles
``results.json`` and the figures. It checks the files, not ``execute()``'s return: the simulator can return normally
after a site failed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fedoap.data import generate_federation, load_site, load_unseen
from fedoap.eval.metrics import EMPTY_MASK_RULE
from fedoap.site.client import SITE_RESULTS_DIR
from fedoap.protocol import HISTORY_FILE
from fedoap.site.outputs import find_site_outputs, load_detail, load_overlays
from fedoap.jsonio import write_json
from fedoap.methods import get_method
from fedoap.methods.centralized import POOLED_SITE
from fedoap.report import plot_dice_per_round, plot_overlays, results_table

__all__ = ["SimulationConfig", "SimulationError", "run_simulation", "unet_model_args", "DEFAULT_CLIENTS", "DEFAULT_UNSEEN"]

DEFAULT_CLIENTS = ("brain", "liver", "breast")
DEFAULT_UNSEEN = "lung"
SIM_JOB_ID = "simulate_job"


def unet_model_args(width: int) -> dict[str, Any]:
    """Backbone arguments for UNet width ``w``: channels w, 2w, 4w, 8w and 16w at the bottleneck (authors: w = 64)."""
    return {"channels": [width, 2 * width, 4 * width, 8 * width], "bottleneck_channels": 16 * width}


class SimulationError(RuntimeError):
    """The federation did not produce its results; the message says which file is missing and which log to read."""


@dataclass
class SimulationConfig:
    """Everything a simulated run depends on (stored in ``results.json`` so the run can be repeated)."""

    out: str = "runs/simulate"
    clients: tuple[str, ...] = DEFAULT_CLIENTS
    unseen: Optional[str] = DEFAULT_UNSEEN
    data: Optional[str] = None
    method: str = "fedoap"
    method_args: dict[str, Any] = field(default_factory=dict)
    width: int = 16
    rounds: int = 12
    local_epochs: int = 2
    finetune_epochs: int = 5
    image_size: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch threads per site; 0: the machine's cores shared among the sites
    processes: int = 0  # simulator client processes (NVFlare's num_threads); 0: one per site
    synthetic_size: int = 128
    overwrite: bool = False
    he: bool = False
    dp: dict[str, Any] = field(default_factory=dict)  # FedOAPRecipe's dp options (dp_update_clip, dp_sgd_noise, ...)

    def model_args(self) -> dict[str, Any]:
        return unet_model_args(self.width)


def _log_config(path: Path) -> Path:
    """NVFlare's log config with the console at ERROR: the run shows our progress lines (the controller prints its
    warnings there too), the log files keep everything from INFO up."""
    from nvflare.fuel.utils.log_utils import default_log_dict

    config = copy.deepcopy(default_log_dict)
    config["handlers"]["consoleHandler"]["level"] = "ERROR"
    path.write_text(json.dumps(config, indent=2))
    return path


def _prepare_data(cfg: SimulationConfig, out: Path) -> tuple[Path, Optional[Path]]:
    sites = list(cfg.clients) + ([cfg.unseen] if cfg.unseen else [])
    if cfg.data:
        root = Path(cfg.data).resolve()
        for site in sites:
            if not (root / site).is_dir():
                raise SimulationError(f"{root / site}: no such site folder (one MSD-layout folder per site)")
    else:
        root = (out / "data").resolve()
        if not all((root / s / "dataset.json").is_file() for s in sites):
            from fedoap.data.synthetic import DEFAULT_SITES

            unknown = [s for s in sites if s not in DEFAULT_SITES]
            if unknown:
                raise SimulationError(f"no synthetic site named {unknown[0]!r}; choose from {sorted(DEFAULT_SITES)}")
            generate_federation(root, sites={s: DEFAULT_SITES[s] for s in sites}, seed=cfg.seed,
                                size=cfg.synthetic_size, overwrite=True)
    unseen = root / cfg.unseen if cfg.unseen else None
    return root, unseen


@contextlib.contextmanager
def _he_context_dir(folder: Optional[Path]):
    """For a simulated federation: TenSEAL contexts in ``folder`` (created once), announced to every simulator
    process through ``FEDOAP_HE_CONTEXT_DIR`` (deployed sites read theirs from their own ``local/`` folder instead)."""
    if folder is None:
        yield
        return
    from fedoap.privacy.contexts import HE_CONTEXT_DIR_ENV
    from fedoap.privacy.he import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, write_contexts

    if not ((folder / SERVER_CONTEXT_FILE).is_file() and (folder / CLIENT_CONTEXT_FILE).is_file()):
        write_contexts(folder)
    previous = os.environ.get(HE_CONTEXT_DIR_ENV)
    os.environ[HE_CONTEXT_DIR_ENV] = str(folder.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(HE_CONTEXT_DIR_ENV, None)
        else:
            os.environ[HE_CONTEXT_DIR_ENV] = previous


def _privacy_summary(cfg: SimulationConfig, history: dict[str, Any]) -> dict[str, Any]:
    """What protected the shared updates, and the epsilon each site's accountant reported after every round."""
    summary: dict[str, Any] = {"he": cfg.he, "dp": dict(cfg.dp)}
    for key in ("dp_update_epsilon", "dp_sgd_epsilon", "dp_sgd_epsilon_per_case"):
        per_site = {
            site: [r["sites"][site].get(key) for r in history["rounds"] if site in r["sites"]] for site in cfg.clients
        }
        if any(v is not None for values in per_site.values() for v in values):
            summary[f"{key}_per_round"] = per_site
            # the federation's guarantee is the weakest site's (None: no finite bound, e.g. a per-case epsilon of
            # slice-level DP-SGD over cases with many slices)
            last = [values[-1] for values in per_site.values() if values]
            summary[f"{key}_federation"] = None if None in last else max(last)
    if cfg.dp:
        summary["delta"] = cfg.dp.get("dp_delta", 1e-5)
    return summary


def _read_site(ws: Path, site: str, pooled: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    process = POOLED_SITE if pooled else site
    folder = ws / process / SIM_JOB_ID / SITE_RESULTS_DIR
    if pooled:
        folder = folder / site
    try:
        paths = find_site_outputs(folder)
    except FileNotFoundError as err:
        raise SimulationError(f"{err}: site {site!r} failed; see {ws / process / 'log.txt'}") from err
    return load_detail(paths.detail), load_overlays(paths.overlays)


def _unpool_history(history: dict[str, Any], sites: Sequence[str]) -> dict[str, Any]:
    """The centralized reference's round history in the per-site form of every other method: the pooled model's
    validation and test Dice on each site's splits (reported as ``val_dice/<site>``), no upload."""
    history = copy.deepcopy(history)
    for record in history["rounds"]:
        pooled = record["sites"].get(POOLED_SITE, {})
        record["sites"] = {site: {**{k: v for k, v in pooled.items() if "/" not in k},
                                  "val_dice": pooled.get(f"val_dice/{site}"), "test_dice": pooled.get(f"test_dice/{site}"),
                                  "bytes_uploaded": 0} for site in sites}
    return history


def run_simulation(cfg: SimulationConfig, verbose: bool = True) -> dict[str, Any]:
    """Run the federation and return the content of ``results.json``.

    Raises:
        SimulationError: the output folder already holds results (without ``overwrite``), a site folder is missing,
            or a site or the server did not write its results.
        fedoap.data.DataValidationError: a data file is missing or invalid (the message names it).
    """
    from nvflare.recipe import SimEnv

    from fedoap.deploy.recipe import FedOAPRecipe

    say = print if verbose else (lambda *a, **k: None)
    out = Path(cfg.out).resolve()
    if (out / "results.json").exists() and not cfg.overwrite:
        raise SimulationError(f"{out / 'results.json'} exists; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if len(cfg.clients) < 1 or len(set(cfg.clients)) != len(cfg.clients):
        raise SimulationError(f"clients must be distinct site names, got {list(cfg.clients)}")

    data_root, unseen_dir = _prepare_data(cfg, out)
    say(f"[fedoap] data: {data_root}")
    for site in cfg.clients:  # fail fast, naming the file, before any NVFlare process starts
        d = load_site(data_root / site, image_size=cfg.image_size, seed=cfg.seed, name=site)
        say(f"[fedoap]   {site}: {d.organ} ({d.modality}), slices train/val/test {len(d.train)}/{len(d.val)}/{len(d.test)}")
    if unseen_dir is not None:
        say(f"[fedoap]   {cfg.unseen} (unseen): {len(load_unseen(unseen_dir, image_size=cfg.image_size))} slices")

    method = get_method(cfg.method, **cfg.method_args)
    torch.manual_seed(cfg.seed)
    model = method.build_model(cfg.model_args())
    initial_ckpt = out / "initial_model.pt"
    torch.save(model.state_dict(), initial_ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    n_shared = sum(model.state_dict()[k].numel() for k in method.shared_keys(model))
    say(f"[fedoap] {cfg.method}: {n_params:,} parameters, {n_shared:,} shared; {len(cfg.clients)} sites, "
        f"{cfg.rounds} rounds x {cfg.local_epochs} local epoch(s), then {cfg.finetune_epochs} fine-tuning epochs")

    # the centralized reference runs as one simulated site that reads every site's data (see methods/centralized.py)
    sim_sites = [POOLED_SITE] if method.pooled else list(cfg.clients)
    pool = {"pool_sites": ",".join(cfg.clients)} if method.pooled else {}
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // min(len(sim_sites), cfg.processes or len(sim_sites)))
    recipe = FedOAPRecipe(
        name=f"{cfg.method}",
        min_clients=len(sim_sites),
        num_rounds=cfg.rounds,
        data_root=str(data_root),
        unseen_dir=str(unseen_dir) if unseen_dir else "",
        method=cfg.method,
        method_args=cfg.method_args,
        model_args=cfg.model_args(),
        train_config={"image_size": cfg.image_size, "batch_size": cfg.batch_size, "lr": cfg.lr,
                      "local_epochs": cfg.local_epochs, "finetune_epochs": cfg.finetune_epochs, "seed": cfg.seed,
                      "device": cfg.device, "threads": threads, **pool},
        initial_ckpt=str(initial_ckpt),
        he=cfg.he,
        dp=cfg.dp,
        task_request_interval=0.2,  # one machine: no reason to idle 2 s between a site's tasks
    )
    workspace = out / "workspace"
    processes = min(cfg.processes, len(sim_sites)) if cfg.processes > 0 else len(sim_sites)
    env = SimEnv(clients=sim_sites, num_clients=len(sim_sites), num_threads=processes,
                 workspace_root=str(workspace), log_config=str(_log_config(out / "log_config.json")))
    start = time.time()
    ws = workspace / recipe.name
    with _he_context_dir(out / "he_keys" if cfg.he else None):
        try:
            recipe.execute(env)
        except RuntimeError as err:  # SimEnv raises on a non-zero simulator status
            raise SimulationError(f"the NVFlare simulator failed ({err}); site logs: {ws}/<site>/log.txt") from err
    wall = time.time() - start

    history_path = ws / "server" / SIM_JOB_ID / HISTORY_FILE
    if not history_path.is_file():
        raise SimulationError(f"{history_path} was not written: the server failed; see {ws / 'server' / 'log.txt'}")
    history = json.loads(history_path.read_text())
    if len(history["rounds"]) != cfg.rounds:
        raise SimulationError(f"the server finished {len(history['rounds'])} of {cfg.rounds} rounds; see {ws / 'server' / 'log.txt'}")
    if method.pooled:  # one record per round for the pooled site: its scores on each site's splits
        history = _unpool_history(history, cfg.clients)

    clients, unseen, overlays, bytes_per_round = {}, {}, {}, {}
    for site in cfg.clients:
        detail, overlays[site] = _read_site(ws, site, pooled=method.pooled)
        m = detail["metrics"]
        clients[site] = {"organ": m["organ"], "dice": m["test_dice"], "hd95": m["test_hd95"], "n_test": m["n_test"],
                         "n_test_empty": m["n_test_empty"], "best_finetune_epoch": m["best_finetune_epoch"],
                         "best_val_dice": m["best_val_dice"]}
        if unseen_dir is not None:
            unseen[site] = {"organ": cfg.unseen, "dice": m.get("unseen_dice"), "hd95": m.get("unseen_hd95")}
        uploads = [r["sites"][site]["bytes_uploaded"] for r in history["rounds"] if site in r["sites"]]
        bytes_per_round[site] = int(max(uploads)) if uploads else 0

    results = {
        "method": cfg.method,
        "rounds": cfg.rounds,
        "clients": clients,
        "unseen": unseen,
        "bytes_uploaded_per_round": bytes_per_round,
        "wall_time_s": wall,
        "parameters": {"total": n_params, "shared": n_shared},
        "empty_mask_rule": EMPTY_MASK_RULE,
        "privacy": _privacy_summary(cfg, history),
        "val_dice_per_round": {
            site: [r["sites"][site].get("val_dice") for r in history["rounds"] if site in r["sites"]]
            for site in cfg.clients
        },
        "test_dice_per_round": {  # the round's model (before fine-tuning) on the test split: the protocol score
            site: [r["sites"][site].get("test_dice") for r in history["rounds"] if site in r["sites"]]
            for site in cfg.clients
        },
        "config": asdict(cfg),
        "workspace": str(ws),
    }
    write_json(out / "results.json", results)
    plot_dice_per_round(history, results, out / "dice_per_round.png")
    plot_overlays(overlays, out / "overlays.png")
    say(results_table(results))
    say(f"[fedoap] wrote {out / 'results.json'}, {out / 'dice_per_round.png'}, {out / 'overlays.png'}")
    return results
