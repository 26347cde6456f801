"""One command, one federation on the NVFlare simulator: data, recipe, ``SimEnv``, results.

``run_simulation`` is what ``fedoap simulate`` calls (and every run of the benchmarks). It validates every site's
data before NVFlare starts (so a bad file is reported by name at once), builds the recipe from the run configuration
(which writes the seeded initial checkpoint's network once), runs it in ``SimEnv``, then reads what the server (round
history) and every site (personalized results, overlay examples) wrote, and assembles ``results.json`` and the
figures. It checks the files, not the run's return: the simulator can return normally after a site failed.
:func:`synthetic_federation` is the one place any command makes synthetic data.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import threading
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from fedoap.config import FederationOptions, RunConfig
from fedoap.data import generate_federation, load_site, load_unseen
from fedoap.eval.metrics import EMPTY_MASK_RULE, LESION_FP_RULE
from fedoap.site.session import SITE_RESULTS_DIR
from fedoap.protocol import HISTORY_FILE
from fedoap.site.outputs import find_site_outputs, load_overlays
from fedoap.jsonio import to_jsonable, write_json
from fedoap.methods.centralized import POOLED_SITE, unpool_history
from fedoap.report import plot_dice_per_round, plot_overlays, results_table

__all__ = ["SimulationError", "run_simulation", "config_record", "synthetic_sites", "synthetic_federation",
           "SYNTHETIC_MARKER"]

SIM_JOB_ID = "simulate_job"
#: what a synthetic data folder was generated with (seed, size, and each site's organ and number of cases)
SYNTHETIC_MARKER = "synthetic_data.json"


class SimulationError(RuntimeError):
    """The federation did not produce its results; the message says which file is missing and which log to read."""


def config_record(run: RunConfig, federation: FederationOptions) -> dict[str, Any]:
    """The options of a run by flat name (``results.json``'s ``config``: what repeats it, and what the benchmark
    compares before it reuses a run)."""
    return to_jsonable({**run.options(), **asdict(federation), "method_settings": run.method.instance.resolved_args()})


def synthetic_sites(names: Sequence[str], cases: Optional[Mapping[str, int]] = None) -> dict[str, tuple[str, int]]:
    """Synthetic sites named after their organ (:data:`fedoap.data.DEFAULT_SITES`), with ``cases`` replacing an
    organ's default number of cases.

    Raises:
        ValueError: a name that is not a synthetic organ.
    """
    from fedoap.data.synthetic import DEFAULT_SITES

    unknown = [s for s in names if s not in DEFAULT_SITES]
    if unknown:
        raise ValueError(f"no synthetic site named {unknown[0]!r}; choose from {sorted(DEFAULT_SITES)}, or give real "
                         "data (--data)")
    cases = cases or {}
    return {s: (DEFAULT_SITES[s][0], int(cases.get(s, DEFAULT_SITES[s][1]))) for s in names}


def synthetic_federation(root: str | os.PathLike, sites: Mapping[str, tuple[str, int]], seed: int, size: int,
                         replace: bool = False) -> Path:
    """The synthetic data of every command, seeded: ``root/<site>`` for each site (name -> organ and number of cases).

    A site's files depend only on the seed, the size and its own organ and number of cases, so a marker file
    (:data:`SYNTHETIC_MARKER`) records what was generated, a folder is reused as long as it matches, and sites that
    are missing are added.

    Args:
        replace: regenerate a folder made with other settings (else it is refused).

    Raises:
        ValueError: ``root`` holds synthetic data generated with other settings (and not ``replace``).
    """
    root = Path(root).resolve()
    want = {s: [organ, int(n)] for s, (organ, n) in sites.items()}
    marker_path = root / SYNTHETIC_MARKER
    fresh = {"seed": seed, "size": size, "sites": {}}
    marker = json.loads(marker_path.read_text()) if marker_path.is_file() else fresh
    differ = [s for s in want if marker["sites"].get(s) not in (None, want[s])]
    if marker["seed"] != seed or marker["size"] != size or differ:
        if not replace:
            raise ValueError(f"{root} holds synthetic data generated with other settings ({marker}); choose another "
                             "out folder")
        marker = fresh
    missing = [s for s in want if s not in marker["sites"] or not (root / s / "dataset.json").is_file()]
    if missing:
        generate_federation(root, sites={s: tuple(want[s]) for s in missing}, seed=seed, size=size, overwrite=True)
        marker["sites"].update({s: want[s] for s in missing})
        write_json(marker_path, marker)
    return root


def _log_config(path: Path) -> Path:
    """NVFlare's log config with the console at ERROR: the run shows our progress lines (the controller prints its
    warnings there too), the log files keep everything from INFO up."""
    from nvflare.fuel.utils.log_utils import default_log_dict

    config = copy.deepcopy(default_log_dict)
    config["handlers"]["consoleHandler"]["level"] = "ERROR"
    path.write_text(json.dumps(config, indent=2))
    return path


def _count(value: Any) -> Optional[int]:
    """A count a site reported (a float under DP: public metrics are rounded numbers), or None."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _unseen_scores(organ: str, m: Mapping[str, Any]) -> dict[str, Any]:
    """``results.json``'s ``unseen[site]``: the unseen organ's Dice of EMPTY_MASK_RULE, and the scores of
    LESION_FP_RULE that stay comparable when false positives on its empty slices take that Dice to ~0 (None: the site
    did not send them)."""
    return {"organ": organ, "dice": m.get("unseen_dice"), "hd95": m.get("unseen_hd95"),
            "lesion_dice": m.get("unseen_lesion_dice"), "n_lesion": _count(m.get("unseen_n_lesion")),
            "empty_fp_rate": m.get("unseen_empty_fp_rate"), "empty_fp_area": m.get("unseen_empty_fp_area"),
            "n_empty": _count(m.get("unseen_n_empty")), "pooled_dice": m.get("unseen_pooled_dice")}


def _prepare_data(federation: FederationOptions, seed: int, out: Path, replace: bool) -> tuple[Path, Optional[Path]]:
    if federation.data:
        root = Path(federation.data).resolve()
        for site in federation.sites():
            if not (root / site).is_dir():
                raise SimulationError(f"{root / site}: no such site folder (one MSD-layout folder per site)")
    else:
        try:
            sites = synthetic_sites(federation.sites(), federation.cases)
            root = synthetic_federation(out / "data", sites, seed, federation.synthetic_size, replace=replace)
        except ValueError as err:
            raise SimulationError(str(err)) from None
    return root, (root / federation.unseen if federation.unseen else None)


#: the default number of cases of a synthetic brain-tumour site
BRATS_DEFAULT_CASES = 6
#: the folder of the server's full-modal labelled set, next to the sites' folders
BRATS_SERVER_DIR = "server"


def brats_federation(federation: FederationOptions, seed: int, size: int, out: Path,
                     replace: bool) -> tuple[FederationOptions, Path]:
    """The brain-tumour task's federation and data folder: the user's folders (``--data``: one folder per client,
    the server's full-modal set in ``server/`` if any), or a synthetic federation under ``out/brats_data`` with one
    modality mask per client (``--modality-masks``; default the authors' eight) and the server's set. Clients left at
    the organ default become ``site-1 .. site-N``.

    Raises:
        SimulationError: a missing site folder, as many masks as clients not given, or synthetic data made with
            other settings (without ``replace``).
    """
    from dataclasses import replace as replaced

    from fedoap.config import DEFAULT_CLIENTS
    from fedoap.data.brats import AUTHORS_MASKS, FULL_MASK, generate_brats_site

    masks = list(federation.modality_masks) or ["".join("1" if b else "0" for b in m) for m in AUTHORS_MASKS]
    clients = federation.clients
    if clients == DEFAULT_CLIENTS:
        clients = tuple(f"site-{i}" for i in range(1, len(masks) + 1))
    federation = replaced(federation, clients=clients, unseen=None)
    if federation.data:
        root = Path(federation.data).resolve()
        for site in clients:
            if not (root / site).is_dir():
                raise SimulationError(f"{root / site}: no such site folder")
        return federation, root
    if len(masks) != len(clients):
        raise SimulationError(f"--modality-masks gives {len(masks)} mask(s) for {len(clients)} client(s)")
    root = out / "brats_data"
    want = {"seed": seed, "size": size, "server_cases": federation.server_cases,
            "sites": {c: [m, int(federation.cases.get(c, BRATS_DEFAULT_CASES))] for c, m in zip(clients, masks)}}
    marker = root / SYNTHETIC_MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == want:
            return federation, root
        if not replace:
            raise SimulationError(f"{root} holds synthetic data generated with other settings; choose another --out "
                                  "or pass --overwrite")
    plan = [(c, m, n) for c, (m, n) in want["sites"].items()]
    if federation.server_cases:
        plan.append((BRATS_SERVER_DIR, "".join("1" for _ in FULL_MASK), federation.server_cases))
    for name, mask, n in plan:
        site_seed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])
        generate_brats_site(root / name, mask, n, seed=site_seed, size=size, depth=size,
                            case_prefix=f"BraTS_{name.replace('-', '')}", overwrite=True)
    write_json(marker, want)
    return federation, root


def _brats_method_args(run: RunConfig, data_root: Path) -> dict[str, Any]:
    """FedMEPD's server-side arguments for a simulation: the server's set next to the sites' (when there is one
    and the run names none) at the sites' volume size."""
    args = dict(run.method.args)
    method = run.method.instance
    if getattr(method, "baseline", "") or run.method.name != "fedmepd":
        return args
    if not args.get("server_data") and (data_root / BRATS_SERVER_DIR).is_dir():
        args["server_data"] = str(data_root / BRATS_SERVER_DIR)
    args.setdefault("server_size", run.training.volume_size)
    return args


def _region_rule() -> str:
    from fedoap.eval.regions import REGION_RULE

    return REGION_RULE


def _brats_client(m: Mapping[str, Any]) -> dict[str, Any]:
    """A brain-tumour site's line of results.json: the means and every region's Dice and HD95."""
    from fedoap.eval.regions import REGION_NAMES

    return {"organ": m.get("organ", "brain"), "dice": m["test_dice"],
            "hd95": m["test_hd95"], "n_test": m["n_test"],
            "best_finetune_epoch": m["best_finetune_epoch"], "best_val_dice": m["best_val_dice"],
            "personal_filters": m.get("personal_filters"),
            "regions": {r: {"dice": m.get(f"test_dice_{r}"), "hd95": m.get(f"test_hd95_{r}")} for r in REGION_NAMES}}


@contextlib.contextmanager
def _interrupt_seen():
    """Whether Ctrl-C arrived meanwhile (NVFlare's simulator turns it into a failed run, return code -9): yields a
    function that says so. Ctrl-C still raises ``KeyboardInterrupt`` as usual."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield seen.is_set
        return

    def handler(signum, frame):
        seen.set()
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield seen.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


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
    with _environment(HE_CONTEXT_DIR_ENV, str(folder.resolve())):
        yield


@contextlib.contextmanager
def _secagg_key_dir(folder: Optional[Path], sites: Sequence[str]):
    """For a simulated federation under secure aggregation: fresh identity keys of every site and their roster in
    ``folder``, announced to every simulator process through ``FEDOAP_SECAGG_DIR`` (deployed sites make their own
    key and hold the roster in their ``local/`` folder instead: ``fedoap secagg-keys``)."""
    if folder is None:
        yield
        return
    from fedoap.privacy.secagg_keys import SECAGG_DIR_ENV, simulation_keys

    if folder.exists():
        shutil.rmtree(folder)
    simulation_keys(folder, list(sites))
    with _environment(SECAGG_DIR_ENV, str(folder.resolve())):
        yield


@contextlib.contextmanager
def _environment(name: str, value: str):
    """``os.environ[name] = value`` while the block runs (the simulator's processes inherit it)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _privacy_summary(run: RunConfig, clients: Sequence[str], history: dict[str, Any]) -> dict[str, Any]:
    """What protected the shared updates, and the epsilon each site's accountant reported after every round."""
    dp = run.privacy.enabled()
    summary: dict[str, Any] = {"he": run.privacy.he, "secagg": run.privacy.secagg, "dp": dp}
    for key in ("dp_update_epsilon", "dp_update_epsilon_coalition", "dp_sgd_epsilon", "dp_sgd_epsilon_per_case"):
        per_site = {
            site: [r["sites"][site].get(key) for r in history["rounds"] if site in r["sites"]] for site in clients
        }
        if any(v is not None for values in per_site.values() for v in values):
            summary[f"{key}_per_round"] = per_site
            # the federation's guarantee is the weakest site's (None: no finite bound, e.g. a per-case epsilon of
            # slice-level DP-SGD over cases with many slices)
            last = [values[-1] for values in per_site.values() if values]
            summary[f"{key}_federation"] = None if None in last else max(last)
    if dp:
        summary["delta"] = run.privacy.dp_delta
    return summary


def _read_overlays(ws: Path, site: str, pooled: bool = False) -> dict[str, np.ndarray]:
    """The overlay examples a site kept in its own workspace (patient images never reach the server: only a
    simulation, where every site's workspace is on this machine, can draw them)."""
    process = POOLED_SITE if pooled else site
    folder = ws / process / SIM_JOB_ID / SITE_RESULTS_DIR
    if pooled:
        folder = folder / site
    try:
        paths = find_site_outputs(folder)
    except FileNotFoundError as err:
        raise SimulationError(f"{err}: site {site!r} failed; see {ws / process / 'log.txt'}") from err
    return load_overlays(paths.overlays)


def _set_aside_for_resume(ws: Path, participants: Sequence[str], out: Path) -> Path:
    """Move the run folder each participant of an interrupted simulation left in ``ws`` into ``out/resume_state``
    (NVFlare's simulator replaces its workspace at every start), one sub-folder per participant; the folder a
    resumed job's ``resume_from`` names.

    Raises:
        SimulationError: the server left no state (no round completed): nothing to resume.
    """
    from fedoap.resume import SERVER_STATE_FILE

    target = out / "resume_state"
    server_run = ws / "server" / SIM_JOB_ID
    if not (server_run / SERVER_STATE_FILE).is_file():
        if (target / "server" / SERVER_STATE_FILE).is_file():  # set aside by an earlier --resume that was interrupted
            return target
        raise SimulationError(f"--resume: {server_run / SERVER_STATE_FILE} does not exist: no round of an earlier "
                              f"run in {out} completed; start it again without --resume")
    previous = out / "resume_state.previous"
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    target.mkdir(mode=0o700)
    for participant in ("server", *participants):
        if (ws / participant / SIM_JOB_ID).is_dir():
            shutil.move(str(ws / participant / SIM_JOB_ID), str(target / participant))
    if previous.exists():
        shutil.rmtree(previous)
    return target


def _server_history(ws: Path) -> dict[str, Any]:
    """The server's history of the run in ``ws``.

    Raises:
        SimulationError: the server wrote none (names its log).
    """
    history_path = ws / "server" / SIM_JOB_ID / HISTORY_FILE
    if not history_path.is_file():
        raise SimulationError(f"{history_path} was not written: the server failed; see {ws / 'server' / 'log.txt'}")
    return json.loads(history_path.read_text())


def _history_status(ws: Path) -> str:
    """The status the server's history records ("" when it wrote none or it is unreadable)."""
    try:
        return str(_server_history(ws).get("status", ""))
    except (SimulationError, ValueError, OSError):
        return ""


def run_simulation(run: RunConfig, federation: FederationOptions, out: str | os.PathLike, *,
                   overwrite: bool = False, verbose: bool = True, resume: bool = False,
                   prompt_exit: bool = True) -> dict[str, Any]:
    """Run the federation and return the content of ``results.json``.

    Args:
        run: what every site runs with (its data folders are set here).
        federation: which sites, whose data.
        out: the run's folder (results, figures, the simulator's workspace, synthetic data).
        overwrite: replace results (and synthetic data made with other settings) already in ``out``.
        resume: continue the interrupted run in ``out`` (same options) from its last completed round: the server's
            global model, history and rule state, and every site's local state.
        prompt_exit: end the simulator as soon as the server's history says the job is complete
            (:class:`fedoap.deploy.sim_env.PromptSimEnv`) instead of waiting out NVFlare's own ending (about 5 s of
            fixed waits; ``fedoap bench overhead`` measures both).

    Raises:
        SimulationError: the output folder already holds results (without ``overwrite``), a site folder is missing,
            nothing to resume, too few sites answered a round (the job stopped), or the server did not write its
            results.
        fedoap.data.DataValidationError: a data file is missing or invalid (the message names it).
        ValueError: the device is not available on this machine.
        KeyboardInterrupt: Ctrl-C (the simulator's processes are ended).
    """
    from nvflare.recipe import SimEnv

    from fedoap.deploy.recipe import FedOAPRecipe
    from fedoap.deploy.sim_env import PromptSimEnv, history_completed

    begin = time.time()
    say = print if verbose else (lambda *a, **k: None)
    run.training.require_device()
    out = Path(out).resolve()
    if resume and overwrite:
        raise SimulationError("--resume continues the run in --out; it cannot be combined with --overwrite")
    if (out / "results.json").exists() and not overwrite:
        what = "the run is complete, nothing to resume" if resume else "pass --overwrite or choose another --out"
        raise SimulationError(f"{out / 'results.json'} exists; {what}")
    n_sites = 1 if run.method.instance.pooled else len(federation.clients)
    if run.robustness.min_responses > n_sites:
        raise SimulationError(f"--min-responses {run.robustness.min_responses}: the federation has only {n_sites} "
                              "site(s)")
    out.mkdir(parents=True, exist_ok=True)
    t = run.training

    volumetric = run.training.volumetric
    site_modalities: dict[str, str] = {}
    if volumetric:
        from fedoap.data.brats import load_brats_splits

        federation, data_root = brats_federation(federation, t.seed, run.training.volume_size, out, replace=overwrite)
        unseen_dir = None
        say(f"[fedoap] data: {data_root}")
        for site in federation.clients:  # fail fast, naming the file, before any NVFlare process starts
            b = load_brats_splits(data_root / site, size=run.training.volume_size, seed=t.seed, name=site)
            site_modalities[site] = "+".join(b.modalities)
            say(f"[fedoap]   {site}: brain ({'+'.join(b.modalities)}), volumes train/val/test "
                f"{len(b.train)}/{len(b.val)}/{len(b.test)}")
        run = run.override(method_args=_brats_method_args(run, data_root))
    else:
        data_root, unseen_dir = _prepare_data(federation, t.seed, out, replace=overwrite)
        say(f"[fedoap] data: {data_root}")
    for site in federation.clients if not volumetric else ():  # fail fast, naming the file, before NVFlare starts
        d = load_site(data_root / site, image_size=t.image_size, seed=t.seed, name=site)
        say(f"[fedoap]   {site}: {d.organ} ({d.modality}), slices train/val/test {len(d.train)}/{len(d.val)}/{len(d.test)}")
    if unseen_dir is not None:
        say(f"[fedoap]   {federation.unseen} (unseen): {len(load_unseen(unseen_dir, image_size=t.image_size))} slices")

    # the centralized reference runs as one simulated site that reads every site's data (see methods/centralized.py)
    pooled = run.method.instance.pooled
    sim_sites = [POOLED_SITE] if pooled else list(federation.clients)
    processes = min(federation.processes, len(sim_sites)) if federation.processes > 0 else len(sim_sites)
    overrides: dict[str, Any] = {}
    if resume:
        overrides["resume_from"] = str(_set_aside_for_resume(out / "workspace" / run.method.name, sim_sites, out))
    job = run.override(threads=t.threads or max(1, (os.cpu_count() or 1) // processes),
                       data_root=str(data_root), unseen_dir=str(unseen_dir) if unseen_dir else "",
                       pool_sites=tuple(federation.clients) if pooled else (), **overrides)
    initial_ckpt = out / "initial_model.pt"
    recipe = FedOAPRecipe(config=job, name=run.method.name, min_clients=len(sim_sites), initial_ckpt=str(initial_ckpt),
                          task_request_interval=0.2)  # one machine: no reason to idle 2 s between a site's tasks
    torch.save(recipe.network.state_dict(), initial_ckpt)
    state = recipe.network.state_dict()
    n_params = sum(p.numel() for p in recipe.network.parameters())
    n_shared = sum(state[k].numel() for k in recipe.shared_keys)
    say(f"[fedoap] {run.method.name}: {n_params:,} parameters, {n_shared:,} shared; {len(federation.clients)} sites, "
        f"{t.rounds} rounds x {t.local_epochs} local epoch(s), then {t.finetune_epochs} fine-tuning epochs")

    workspace = out / "workspace"
    ws = workspace / recipe.name
    env_args = dict(clients=sim_sites, num_clients=len(sim_sites), num_threads=processes,
                    workspace_root=str(workspace), log_config=str(_log_config(out / "log_config.json")))
    env = PromptSimEnv(finished=history_completed(ws / "server" / SIM_JOB_ID / HISTORY_FILE), **env_args) \
        if prompt_exit else SimEnv(**env_args)
    start = time.time()
    with _he_context_dir(out / "he_keys" if run.privacy.he else None), \
            _secagg_key_dir(out / "secagg_keys" if run.privacy.secagg else None, sim_sites), \
            _interrupt_seen() as interrupted:
        try:
            recipe.run(env)
        except RuntimeError as err:  # SimEnv raises on a non-zero simulator status
            if interrupted():
                raise KeyboardInterrupt from None
            status = _history_status(ws)
            if status.startswith("stopped"):
                raise SimulationError(f"the federation {status}; history: {ws / 'server' / SIM_JOB_ID / HISTORY_FILE}"
                                      ) from None
            raise SimulationError(f"the NVFlare simulator failed ({err}); site logs: {ws}/<site>/log.txt") from err
    wall = time.time() - start

    history = _server_history(ws)
    if str(history.get("status", "")).startswith("stopped"):
        raise SimulationError(f"the federation {history['status']}; history: {ws / 'server' / SIM_JOB_ID / HISTORY_FILE}")
    if len(history["rounds"]) != t.rounds:
        raise SimulationError(f"the server finished {len(history['rounds'])} of {t.rounds} rounds; see "
                              f"{ws / 'server' / 'log.txt'}")
    if pooled:  # one record per round for the pooled site: its scores on each site's splits
        history = unpool_history(history, federation.clients)

    clients, unseen, overlays, bytes_per_round, missing = {}, {}, {}, {}, {}
    for site in federation.clients:  # what each site reported to the server; its overlays from its own workspace
        m = history.get("personalized", {}).get(site)
        if not m:  # the site dropped out: the others' results stand, this one says why it has none
            missing[site] = history.get("not_personalized", {}).get(site, "no personalized result")
            say(f"[fedoap] WARNING {site}: no personalized result ({missing[site]}); see {ws / site / 'log.txt'}")
            continue
        overlays[site] = _read_overlays(ws, site, pooled=pooled)
        if volumetric:
            clients[site] = {**_brats_client(m), "modalities": site_modalities.get(site)}
            uploads = [r["sites"][site]["bytes_uploaded"] for r in history["rounds"] if site in r["sites"]]
            bytes_per_round[site] = int(max(uploads)) if uploads else 0
            continue
        clients[site] = {"organ": m["organ"], "dice": m["test_dice"], "hd95": m["test_hd95"], "n_test": m["n_test"],
                         "n_test_empty": m["n_test_empty"], "best_finetune_epoch": m["best_finetune_epoch"],
                         "best_val_dice": m["best_val_dice"]}
        if m.get("test_volume_dice") is not None:  # a 3D site: per-case Dice over its stacked test slices
            n_volumes = m.get("n_test_volumes")  # a float under DP (public metrics are rounded numbers)
            clients[site].update(volume_dice=m["test_volume_dice"],
                                 n_test_volumes=int(n_volumes) if isinstance(n_volumes, (int, float)) else None)
        if "test_lesion_dice" in m:  # LESION_FP_RULE on the test split
            clients[site].update(lesion_dice=m.get("test_lesion_dice"), empty_fp_rate=m.get("test_empty_fp_rate"))
        if unseen_dir is not None:
            unseen[site] = _unseen_scores(federation.unseen, m)
        uploads = [r["sites"][site]["bytes_uploaded"] for r in history["rounds"] if site in r["sites"]]
        bytes_per_round[site] = int(max(uploads)) if uploads else 0

    if not clients:
        raise SimulationError(f"no site sent personalized results; see {ws}/<site>/log.txt")
    results = {
        "method": run.method.name,
        "rounds": t.rounds,
        "clients": clients,
        "not_personalized": missing,
        "dropouts": {r["round"]: r["dropped"] for r in history["rounds"] if r.get("dropped")},
        "resumed": history.get("resumed", []),
        "unseen": unseen,
        "bytes_uploaded_per_round": bytes_per_round,
        "wall_time_s": wall,
        "parameters": {"total": n_params, "shared": n_shared},
        "task": run.training.task,
        **({"region_rule": _region_rule()} if volumetric else {}),
        "empty_mask_rule": _region_rule() if volumetric else EMPTY_MASK_RULE,
        "lesion_fp_rule": LESION_FP_RULE,  # lesion_dice, empty_fp_rate, empty_fp_area, pooled_dice of every split
        "privacy": _privacy_summary(run, federation.clients, history),
        "val_dice_per_round": {
            site: [r["sites"][site].get("val_dice") for r in history["rounds"] if site in r["sites"]]
            for site in federation.clients
        },
        "test_dice_per_round": {  # the round's model (before fine-tuning) on the test split: the protocol score
            site: [r["sites"][site].get("test_dice") for r in history["rounds"] if site in r["sites"]]
            for site in federation.clients
        },
        "config": config_record(run, federation),
        "workspace": str(ws),
    }
    # where the run's wall time went (``fedoap bench overhead`` splits the simulator's part with NVFlare's logs)
    results["timing"] = {"prepare_s": start - begin, "simulator_started_at": start, "simulator_s": wall,
                         "simulator_ended_early": bool(getattr(env, "ended_early", False)), "report_s": None}
    write_json(out / "results.json", results)
    plot_dice_per_round(history, results, out / "dice_per_round.png")
    plot_overlays(overlays, out / "overlays.png")
    say(results_table(results))
    if volumetric:
        for site, row in sorted(clients.items()):
            say(f"[fedoap]   {site} ({row['modalities']}): " + "; ".join(
                f"{r.upper()} Dice {v['dice']:.3f} HD95 {v['hd95']:.1f}" for r, v in row["regions"].items()))
    results["timing"]["report_s"] = time.time() - start - wall
    write_json(out / "results.json", results)
    say(f"[fedoap] wrote {out / 'results.json'}, {out / 'dice_per_round.png'}, {out / 'overlays.png'}")
    return results
