"""The ``fedoap`` command.

    fedoap simulate [--method NAME] [--clients a,b,c] ... [--out DIR]           a method on the NVFlare simulator
    fedoap generate-data DIR [--seed S] [--size S]                             write the synthetic federation
    fedoap benchmark [--methods a,b] [--seeds 0,1,2] [--preset fast|full] [--out DIR]  methods side by side, over seeds
    fedoap bench train [--out DIR]                                              images/s in the federation vs a plain loop
    fedoap bench privacy [--out DIR]                                            HE/secagg bytes, time; DP-SGD images/s
    fedoap bench scale [--sites 30] [--out DIR]                                 30 sites: s/round, peak memory
    fedoap bench dp [--settings plain,client] [--epsilons 1,4,8] [--seeds 0,1,2] [--out DIR]  Dice vs epsilon, FedOAP
    fedoap he-keys init SITE_KIT --bundle B --public P [--passphrase-file F]     HE key ceremony: one site makes the key
    fedoap he-keys join SITE_KIT --bundle B [--passphrase-file F]                ... every other site imports it
    fedoap he-keys install-public SERVER_KIT --public P                         ... the server gets the public context
    fedoap he-keys simulation DIR  (or: fedoap he-keys DIR)                     TenSEAL contexts for a simulation
    fedoap secagg-keys init SITE_KIT --site NAME                                secure aggregation: a site's identity
    fedoap secagg-keys roster KIT --entry SITE=HEX ...                          ... every participant's roster
    fedoap secagg-keys simulation DIR --sites a,b,c                             ... keys for a simulation
    fedoap export-jobs [--out jobs] [--byoc]                                    regenerate the NVFlare jobs in jobs/
    fedoap poc-configure [WORKSPACE] --data DIR [--unseen lung]                 site policies, data, HE keys into a POC
    fedoap site-configure SITE_KIT --data DIR [--unseen DIR]                    one provisioned site's policies and keys
    fedoap predict --model MODEL --input PATH --out DIR [--overlay]             segment new scans with a personalized model
    fedoap evaluate --model MODEL --data DIR [--out DIR]                        per-case 3D Dice/HD95 on labelled cases
    fedoap export-bundle --model MODEL --out DIR                                the model as a MONAI bundle
    fedoap bench predict [--out DIR]                                            predict's volumes/s vs a plain MONAI loop
    fedoap bench overhead [--preset fast] [--repeats 2] [--out DIR]             a run's wall time by phase vs its training
    fedoap bench fedmepd [--variants ...] [--seeds 0,1,2] [--out DIR]           FedMEPD vs baselines/ablations per region, site

The run options (training, method, privacy, the simulated federation) are generated from ``fedoap.config``, where
each is declared once; presets (export-jobs, bench) only change defaults. Every bad option is one line and exit
status 2, before anything starts; Ctrl-C is "interrupted" and exit status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from fedoap.config import (FederationOptions, PrivacyOptions, RobustnessOptions, TrainingOptions, add_method_flags,
                           add_options, from_namespace, run_config_from_namespace)

__all__ = ["main", "build_parser"]


_HE_KEYS_ACTIONS = ("init", "join", "install-public", "simulation")
#: the training of ``fedoap bench train`` and ``bench privacy`` (partial overrides of the defaults)
BENCH_TRAIN = {"rounds": 3, "local_epochs": 1, "finetune_epochs": 0}
BENCH_PRIVACY = {"width": 16, "image_size": 64, "batch_size": 16}


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _csv(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


# -- each command's options --------------------------------------------------------------------------------------------
def _simulate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/simulate", help="the run's folder (default runs/simulate)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (same options) from "
                   "its last completed round")
    add_options(p, FederationOptions)
    add_options(p, TrainingOptions)
    add_method_flags(p)
    add_options(p, PrivacyOptions)
    add_options(p, RobustnessOptions)


def _export_jobs_options(p: argparse.ArgumentParser) -> None:
    from fedoap.deploy.jobs import JOB_TRAINING, MIN_CLIENTS

    p.add_argument("--out", default="jobs", help="parent folder of the job folders (default jobs)")
    p.add_argument("--byoc", action="store_true",
                   help="put the fedoap package into each job's app/custom (bring-your-own-code; not for jobs/)")
    p.add_argument("--jobs", type=_csv, default=None, help="comma-separated job names (default: all)")
    p.add_argument("--min-clients", type=int, default=MIN_CLIENTS,
                   help=f"sites per round (default {MIN_CLIENTS}, the POC's)")
    add_options(p, TrainingOptions, defaults=vars(JOB_TRAINING))
    add_options(p, RobustnessOptions)
    p.add_argument("--resume-from", default="", metavar="JOB_ID",
                   help="continue the interrupted job JOB_ID from its last completed round (every participant reads "
                        "that job's state from its own workspace)")


def _benchmark_options(p: argparse.ArgumentParser) -> None:
    from fedoap.benchmark import ABLATIONS, PRESETS

    p.add_argument("--methods", type=_csv, default=None,
                   help=f"comma-separated method names (default: every registered method); FedOAP's ablations too: "
                        f"{','.join(ABLATIONS)}")
    p.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                   help="fast: tiny CPU setting; medium: three organ sites at 64 x 64, width 16, 30 epochs on a CPU; "
                        "full: 256 x 256, 50 epochs, meant for a GPU")
    p.add_argument("--out", default="runs/benchmark", help="benchmark folder (finished runs in it are reused)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs at the same time, each its own NVFlare simulator process (default: the preset's, "
                        "fast 2, full 1)")
    p.add_argument("--total-epochs", type=int, default=None,
                   help="rounds = total epochs / local epochs (the preset's way; not with --rounds)")
    add_options(p, TrainingOptions, exclude=("seed",), preset=True, title="Training (overrides of the preset)")
    add_options(p, FederationOptions, preset=True, title="The simulated federation (overrides of the preset)")


def _bench_options(p: argparse.ArgumentParser) -> None:
    from fedoap.bench_scale import SCALE_TRAINING

    bench_sub = p.add_subparsers(dest="bench", required=True)
    train = bench_sub.add_parser("train", help="local training images/s inside the federation vs a plain MONAI loop")
    train.add_argument("--out", default="runs/bench_train")
    add_options(train, FederationOptions)
    add_options(train, TrainingOptions, defaults=BENCH_TRAIN)
    scale = bench_sub.add_parser("scale", help="a large federation (30 sites, several per organ, unequal sizes): "
                                              "time per round and peak memory, FedOAP and FedAvg side by side")
    scale.add_argument("--out", default="runs/bench_scale")
    scale.add_argument("--sites", type=int, default=30)
    scale.add_argument("--methods", type=_csv, default=("fedoap", "fedavg"))
    add_options(scale, FederationOptions, only=("processes",))
    add_options(scale, TrainingOptions, defaults=SCALE_TRAINING)
    priv = bench_sub.add_parser("privacy", help="HE and secure aggregation bytes/time per round and DP-SGD images/s, "
                                                "side by side")
    priv.add_argument("--out", default="runs/bench_privacy")
    priv.add_argument("--sites", type=int, default=3, help="sites whose updates the server combines")
    priv.add_argument("--epochs", type=int, default=2, help="timed training epochs (after one warm-up)")
    add_options(priv, TrainingOptions, only=("width", "image_size", "batch_size", "seed", "threads"),
                defaults=BENCH_PRIVACY)
    add_options(priv, PrivacyOptions, only=("dp_sgd_noise", "dp_sgd_clip"), defaults={"dp_sgd_noise": 1.0})
    priv.add_argument("--secagg-sites", type=_seeds, default=(3, 10, 30),
                      help="federation sizes of the secure aggregation part (default 3,10,30)")
    priv.add_argument("--secagg-values", type=int, default=0,
                      help="values per masked vector (default 0: FedOAP's shared vector)")
    dp = bench_sub.add_parser("dp", help="FedOAP's personalized Dice against epsilon (no DP, DP-SGD, client-level, "
                                         "distributed DP under secagg or HE), over seeds")
    dp.add_argument("--settings", type=_csv, default=None,
                    help="comma-separated subset of plain,dp_sgd,client,distributed (default: all)")
    dp.add_argument("--epsilons", type=_csv, default=("1", "4", "8"),
                    help="target epsilons of every DP setting (default 1,4,8)")
    dp.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    dp.add_argument("--client-clip", type=float, default=1.0,
                    help="L2 bound of a site's update under client-level and distributed DP (default 1.0)")
    dp.add_argument("--distributed-via", default="secagg",
                    help="what hides each update under distributed DP: secagg or he (default secagg)")
    dp.add_argument("--out", default="runs/bench_dp", help="benchmark folder (finished runs in it are reused)")
    dp.add_argument("--workers", type=int, default=None, help="runs at the same time, each its own NVFlare "
                                                              "simulator process (default 1)")
    dp.add_argument("--total-epochs", type=int, default=None,
                    help="rounds = total epochs / local epochs (not with --rounds)")
    pred = bench_sub.add_parser("predict", help="fedoap predict's volumes/s and slices/s against a plain MONAI "
                                                "SliceInferer loop over the same network and scans, side by side")
    from fedoap.bench_predict import add_options as add_predict_options  # light: imports no torch

    add_predict_options(pred)
    over = bench_sub.add_parser("overhead", help="where a benchmark run's wall time goes (start-up, training and "
                                                 "evaluation, hand-offs, teardown), the simulator ended promptly and "
                                                 "by NVFlare side by side")
    over.add_argument("--out", default="runs/bench_overhead")
    over.add_argument("--preset", default="fast", help="the benchmark preset of the run (default fast)")
    over.add_argument("--method", default="fedavg", help="the method of the run (default fedavg)")
    over.add_argument("--seed", type=int, default=0)
    over.add_argument("--repeats", type=int, default=2, help="runs per ending, interleaved (default 2)")
    over.add_argument("--endings", type=_csv, default=("prompt", "nvflare"),
                      help="comma-separated subset of prompt,nvflare (default both)")
    mepd = bench_sub.add_parser("fedmepd", help="FedMEPD against FedAvg, the shared/local split, local training and "
                                                "its ablations on brain tumours with missing modalities: Dice and "
                                                "HD95 per region per site, time per round, over seeds")
    from fedoap.bench_fedmepd import VARIANTS as MEPD_VARIANTS  # light: the runs import the rest

    mepd.add_argument("--variants", type=_csv, default=None,
                      help=f"comma-separated subset of {','.join(MEPD_VARIANTS)} (default: all)")
    mepd.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    mepd.add_argument("--out", default="runs/bench_fedmepd", help="benchmark folder (finished runs in it are reused)")
    mepd.add_argument("--workers", type=int, default=None, help="runs at the same time, each its own NVFlare "
                                                                "simulator process (default 1)")
    mepd.add_argument("--total-epochs", type=int, default=None,
                      help="rounds = total epochs / local epochs (not with --rounds)")
    mepd.add_argument("--method-args", default=None, help="JSON object of fedmepd's arguments for every variant, on "
                                                          "top of the setting's (default {\"patience\": 1})")
    add_options(mepd, TrainingOptions, exclude=("seed",), preset=True,
                title="Training (overrides of the CPU-sized setting, fedoap.bench_fedmepd.DEFAULT)")
    add_options(mepd, FederationOptions, preset=True, title="The simulated federation (overrides of the setting)")
    add_options(dp, PrivacyOptions, only=("dp_delta",), preset=True)
    add_options(dp, TrainingOptions, exclude=("seed",), preset=True,
                title="Training (overrides of fedoap simulate's defaults)")
    add_options(dp, FederationOptions, preset=True, title="The simulated federation (overrides of the defaults)")


def _poc_configure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("workspace", nargs="?", default=None, help="POC workspace (default: $NVFLARE_POC_WORKSPACE)")
    p.add_argument("--data", required=True, help="folder with one MSD-layout sub-folder per client site name")
    p.add_argument("--unseen", default=None, help="sub-folder of --data with the unseen organ (e.g. lung)")
    p.add_argument("--policies", default=None,
                   help="folder with privacy.json, resources.json and authorization.json (default: the project's "
                        "poc_workspace/local)")

def _site_configure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("kit", help="the site's startup kit (the folder holding startup/ and local/)")
    p.add_argument("--data", required=True, help="the site's MSD-layout data folder")
    p.add_argument("--unseen", default=None, help="MSD-layout folder of the unseen organ (optional)")
    p.add_argument("--policies", default=None, help="folder with privacy.json, resources.json and "
                                                    "authorization.json (default: the project's poc_workspace/local)")


def _he_keys_options(p: argparse.ArgumentParser) -> None:
    from fedoap.privacy.he_keys import MIN_PASSPHRASE_CHARS, PASSPHRASE_ENV

    key_sub = p.add_subparsers(dest="he_keys", required=True, metavar="{" + ",".join(_HE_KEYS_ACTIONS) + "}")
    k_init = key_sub.add_parser("init", help="one client site: make the CKKS key, keep the secret context in "
                                             "SITE_KIT/local/ (0600), write the public context for the server and "
                                             "the bundle for the other sites, sealed under the shared passphrase")
    k_init.add_argument("site_kit", help="this site's startup kit (the folder holding startup/ and local/)")
    k_init.add_argument("--bundle", required=True, help="where to write the sealed secret context (send it to the "
                                                        "other sites; useless without the passphrase)")
    k_init.add_argument("--public", required=True, help="where to write the public context (no secret key; send it "
                                                        "to the server admin)")
    k_join = key_sub.add_parser("join", help="every other client site: import the secret context from the bundle "
                                             "into SITE_KIT/local/ (0600)")
    k_join.add_argument("site_kit", help="this site's startup kit (the folder holding startup/ and local/)")
    k_join.add_argument("--bundle", required=True, help="the bundle 'fedoap he-keys init' wrote")
    for k in (k_init, k_join):
        k.add_argument("--passphrase-file", default=None,
                       help=f"file holding the passphrase the site admins shared out of band, at least "
                            f"{MIN_PASSPHRASE_CHARS} characters, mode 0600 (default: ${PASSPHRASE_ENV})")
        k.add_argument("--passphrase", nargs="?", const="", default=None, dest="passphrase_argument",
                       help=argparse.SUPPRESS)  # only to refuse it with a reason
    k_pub = key_sub.add_parser("install-public", help="the server admin: install the public context into "
                                                      "SERVER_KIT/local/ (refused if it holds a secret key)")
    k_pub.add_argument("server_kit", help="the server's startup kit (the folder holding startup/ and local/)")
    k_pub.add_argument("--public", required=True, help="the public context 'fedoap he-keys init' wrote")
    k_sim = key_sub.add_parser("simulation", help="both contexts into DIR for a simulated federation "
                                                  "(FEDOAP_HE_CONTEXT_DIR=DIR); never for a deployment")
    k_sim.add_argument("out")
    for k in (k_init, k_join, k_pub, k_sim):
        k.add_argument("--overwrite", action="store_true", help="replace existing key files (a new key: every site "
                                                                "and the server must get it again)")


def _secagg_keys_options(p: argparse.ArgumentParser) -> None:
    key_sub = p.add_subparsers(dest="secagg_keys", required=True)
    k_init = key_sub.add_parser("init", help="a client site: make its identity key in SITE_KIT/local (0600) and "
                                             "print its roster line")
    k_init.add_argument("site_kit", metavar="SITE_KIT", help="the site's workspace root (its startup kit's parent)")
    k_init.add_argument("--site", required=True, help="the site's name in the federation (its NVFlare name)")
    k_init.add_argument("--overwrite", action="store_true", help="replace an existing identity key")
    k_roster = key_sub.add_parser("roster", help="every participant, the server too: install the roster of the "
                                                 "sites' public identity keys into KIT/local")
    k_roster.add_argument("kit", metavar="KIT", help="the participant's workspace root")
    k_roster.add_argument("--entry", action="append", default=[], metavar="SITE=HEX",
                          help="one site's line as 'fedoap secagg-keys init' printed it (repeat per site)")
    k_roster.add_argument("--entries-file", default=None, metavar="FILE", help="a file of such lines, one per site")
    k_sim = key_sub.add_parser("simulation", help="identity keys and roster for a simulated federation in DIR")
    k_sim.add_argument("out", metavar="DIR")
    k_sim.add_argument("--sites", type=_csv, required=True, help="comma-separated site names")


def _secagg_keys(args: argparse.Namespace) -> None:
    """The ``secagg-keys`` sub-commands; what each printed line says is what its admin does next."""
    from fedoap.privacy import secagg_keys

    if args.secagg_keys == "init":
        path, line = secagg_keys.init_identity(args.site_kit, args.site, overwrite=args.overwrite)
        public = bytes.fromhex(line.split("=", 1)[1])
        print(f"identity key (stays at this site, 0600): {path}\nroster line: {line}\nfingerprint: "
              f"{secagg_keys.fingerprint(public)} (the other admins compare it out of band)\nevery participant runs: "
              f"fedoap secagg-keys roster KIT --entry LINE (one per site)")
    elif args.secagg_keys == "roster":
        if args.entries_file:
            entries = secagg_keys.parse_entries(Path(args.entries_file).read_text().splitlines(),
                                                source=args.entries_file)
        else:
            entries = {}
        if args.entry:
            entries.update(secagg_keys.parse_entries(args.entry, source="--entry"))
        if not entries:
            raise ValueError("secagg-keys roster: give the sites' lines with --entry SITE=HEX or --entries-file FILE")
        path = secagg_keys.write_roster(args.kit, entries)
        print(f"roster of {len(entries)} site(s): {path}")
        for site, key in sorted(entries.items()):
            print(f"  {site}: {secagg_keys.fingerprint(bytes.fromhex(key))}")
    else:
        folder = secagg_keys.simulation_keys(args.out, list(args.sites))
        print(f"identity keys and roster of {len(args.sites)} site(s): {folder}\nfor a simulated federation: "
              f"export {secagg_keys.SECAGG_DIR_ENV}={folder}")


def _generate_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--overwrite", action="store_true")


def _writable(folder: str, flag: str = "--out") -> Path:
    """``folder`` resolved, or a one-line ValueError when this user could not write there (checked in the folder, or
    in the nearest folder above it that exists, where it would be created; nothing is created)."""
    path = Path(folder).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {folder}: cannot write there ({existing}: {err.strerror})") from None
    return path


def _he_keys_compat(argv: list[str]) -> list[str]:
    """``fedoap he-keys DIR`` (the simulation command before the key ceremony) means ``he-keys simulation DIR``."""
    rest = argv[1:]
    if argv[:1] == ["he-keys"] and rest and not set(rest) & {*_HE_KEYS_ACTIONS, "-h", "--help"}:
        return ["he-keys", "simulation", *rest]
    return argv


def _he_keys(args: argparse.Namespace) -> None:
    """The ``he-keys`` sub-commands; what each printed line says is what its admin does next."""
    from fedoap.privacy import he_keys

    action = args.he_keys
    if action == "simulation":
        from fedoap.privacy.he import write_contexts

        server, client = write_contexts(args.out, overwrite=args.overwrite)
        print(f"server context (no secret key): {server}\nclient context (secret key): {client}\n"
              f"for a simulated federation: export FEDOAP_HE_CONTEXT_DIR={args.out}")
        return
    if action == "install-public":
        path = he_keys.install_public(args.server_kit, args.public, overwrite=args.overwrite)
        print(f"public context (no secret key) installed: {path}")
        return
    if args.passphrase_argument is not None:
        raise ValueError("--passphrase: a passphrase on the command line is visible to every user of this machine "
                         f"(ps, /proc) and stays in the shell history; put it in a file only you can read "
                         f"(--passphrase-file FILE) or in ${he_keys.PASSPHRASE_ENV}")
    passphrase = he_keys.read_passphrase(args.passphrase_file)
    if action == "init":
        made = he_keys.init_site(args.site_kit, args.bundle, args.public, passphrase, overwrite=args.overwrite)
        print(f"secret context (stays at this site, 0600): {made.secret_context}\n"
              f"key id: {made.key_id} (every joining site prints it: compare out of band)\n"
              f"bundle for the other sites: {made.bundle}; each runs: fedoap he-keys join SITE_KIT --bundle "
              f"{made.bundle.name} --passphrase-file FILE\n"
              f"public context for the server: {made.public_context}; the server admin runs: fedoap he-keys "
              f"install-public SERVER_KIT --public {made.public_context.name}")
    else:
        path, key = he_keys.join_site(args.site_kit, args.bundle, passphrase, overwrite=args.overwrite)
        print(f"secret context (0600): {path}\nkey id: {key} (must equal the one the initiating site printed)")


def _simulate(args: argparse.Namespace) -> None:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out; it cannot be combined with --overwrite")
    federation = from_namespace(FederationOptions, args)
    out = _writable(args.out)
    run = run_config_from_namespace(args)
    from fedoap.simulation import run_simulation  # NVFlare, MONAI, torch: after every option was checked

    run_simulation(run, federation, out, overwrite=args.overwrite, resume=args.resume)


def _export_jobs(args: argparse.Namespace) -> None:
    from fedoap.deploy.jobs import export_jobs

    if args.min_clients < 1:
        raise ValueError(f"--min-clients must be >= 1, got {args.min_clients}")
    training = from_namespace(TrainingOptions, args)
    robustness = dataclasses.replace(from_namespace(RobustnessOptions, args), resume_from=args.resume_from)
    for path in export_jobs(_writable(args.out), args.jobs, training, args.min_clients, byoc=args.byoc,
                            robustness=robustness):
        print(path)


def _benchmark(args: argparse.Namespace) -> None:
    from fedoap.benchmark import OVERRIDABLE, resolve_settings, run_benchmark  # light: runs import the rest

    overrides = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k, None) is not None}
    settings = resolve_settings(args.preset, overrides)  # every option checked before anything starts
    out = _writable(args.out)
    checked = TrainingOptions(device=settings["device"], tracking=settings.get("tracking", "tensorboard"))
    checked.require_device()
    checked.require_tracking()
    run_benchmark(args.methods, args.seeds, args.preset, out, overrides, workers=args.workers)


def _bench(args: argparse.Namespace) -> None:
    if args.bench == "train":
        federation = from_namespace(FederationOptions, args)
        out = _writable(args.out)
        run = run_config_from_namespace(args)
        from fedoap.bench import bench_train

        bench_train(run, federation, out)
    elif args.bench == "scale":
        from fedoap.bench_scale import bench_scale  # light: runs import the rest

        training = from_namespace(TrainingOptions, args)
        out = _writable(args.out)
        training.require_device()
        bench_scale(training, n_sites=args.sites, methods=args.methods, processes=args.processes, out=out)
    elif args.bench == "dp":
        from fedoap import bench_dp  # light: the runs import the rest

        overrides = {k: getattr(args, k) for k in bench_dp.OVERRIDABLE if getattr(args, k, None) is not None}
        bench_dp.parse_settings(args.settings)  # every option checked before anything starts
        bench_dp.parse_epsilons(args.epsilons)
        bench_dp.resolve_dp_settings(overrides)
        bench_dp.run_bench_dp(args.settings, args.epsilons, args.seeds, _writable(args.out), overrides,
                              client_clip=args.client_clip, distributed_via=args.distributed_via,
                              delta=args.dp_delta)
    elif args.bench == "fedmepd":
        from fedoap import bench_fedmepd  # light: the runs import the rest

        overrides = {k: getattr(args, k) for k in bench_fedmepd.OVERRIDABLE if getattr(args, k, None) is not None}
        bench_fedmepd.parse_variants(args.variants)  # every option checked before anything starts
        settings = bench_fedmepd.resolve_settings(overrides)
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be a positive integer, got {args.workers}")
        checked = TrainingOptions(device=settings["device"], tracking=settings.get("tracking", "none"))
        checked.require_device()
        checked.require_tracking()
        bench_fedmepd.run_bench_fedmepd(args.variants, args.seeds, _writable(args.out), overrides,
                                        workers=args.workers)
    elif args.bench == "predict":
        from fedoap.bench_predict import run as bench_predict

        bench_predict(args)
    elif args.bench == "overhead":
        from fedoap.bench_overhead import ENDINGS, bench_overhead
        from fedoap.benchmark import _parse_methods, resolve_settings

        resolve_settings(args.preset)  # every option checked before anything starts
        _parse_methods([args.method])
        if args.repeats < 1 or not args.endings or set(args.endings) - set(ENDINGS):
            raise ValueError(f"--repeats must be >= 1 and --endings a subset of {','.join(ENDINGS)}")
        bench_overhead(_writable(args.out), preset=args.preset, method=args.method, seed=args.seed,
                       repeats=args.repeats, endings=args.endings)
    else:
        training, privacy = from_namespace(TrainingOptions, args), from_namespace(PrivacyOptions, args)
        out = _writable(args.out)
        from fedoap.bench_privacy import bench_privacy

        bench_privacy(training, privacy, n_sites=args.sites, epochs=args.epochs, out=out,
                      secagg_sites=args.secagg_sites, secagg_values=args.secagg_values)


def _generate_data(args: argparse.Namespace) -> None:
    from fedoap.data import generate_federation

    paths = generate_federation(_writable(args.out, "DIR"), seed=args.seed, size=args.size, overwrite=args.overwrite)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def _poc_configure(args: argparse.Namespace) -> None:
    from fedoap.deploy.poc import POLICY_DIR, configure_poc

    workspace = args.workspace or os.environ.get("NVFLARE_POC_WORKSPACE")
    if not workspace:
        raise ValueError("give the POC workspace, or set NVFLARE_POC_WORKSPACE as for 'nvflare poc prepare'")
    written = configure_poc(workspace, args.data, args.unseen, args.policies or POLICY_DIR)
    print(json.dumps(written, indent=2))
    print("sites read these files when they start: run 'nvflare poc start' now (or restart the POC)")


def _site_configure(args: argparse.Namespace) -> None:
    from fedoap.deploy.poc import POLICY_DIR, configure_site

    print(json.dumps(configure_site(args.kit, args.data, args.unseen, args.policies or POLICY_DIR), indent=2))


def _from(module: str, name: str) -> Callable:
    """``module.name``, imported when called: a command loads only what it uses."""
    def call(arg):
        import importlib

        return getattr(importlib.import_module(module), name)(arg)
    return call


#: every command: its help, the function that adds its options, the function that runs it
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "simulate": ("run a federation on the NVFlare simulator and report per-site results",
                 _simulate_options, _simulate),
    "generate-data": ("write the synthetic multi-organ federation (MSD layout)", _generate_data_options,
                      _generate_data),
    "benchmark": ("several methods on identical data, splits and seeds: Dice, HD95, fairness, unseen organ, bytes, "
                  "time (mean and std over seeds)", _benchmark_options, _benchmark),
    "bench": ("benchmarks (print a table, write JSON)", _bench_options, _bench),
    "he-keys": ("HE key ceremony run by the sites (init, join, install-public), so no coordinator holds the secret "
                "key; or contexts for a simulation", _he_keys_options, _he_keys),
    "secagg-keys": ("secure aggregation's identity keys, made by each site, and the roster of their public keys "
                    "every participant holds; or keys for a simulation", _secagg_keys_options, _secagg_keys),
    "export-jobs": ("export the project's NVFlare jobs (FedOAP plain/DP/HE, FedAvg, FedBN, Ditto) from the recipes; "
                    "code pre-installed on sites, data from site configuration", _export_jobs_options, _export_jobs),
    "poc-configure": ("install site privacy policies, class allow-lists and data locations into a prepared NVFlare "
                      "POC workspace (before 'nvflare poc start')", _poc_configure_options, _poc_configure),
    "predict": ("segment new scans (NIfTI volumes, PNG/JPEG images, or a folder of them) with a site's personalized "
                "model file", _from("fedoap.inference.predict", "add_options"), _from("fedoap.inference.predict", "run")),
    "evaluate": ("score a personalized model on a labelled MSD-layout folder: per-case 3D Dice and HD95 (mm) and "
                 "per-slice scores; a CSV per case and a summary", _from("fedoap.inference.evaluate", "add_options"),
                 _from("fedoap.inference.evaluate", "run")),
    "export-bundle": ("write a personalized model file as a MONAI bundle (configs/metadata.json, "
                      "configs/inference.json, models/) that MONAI's bundle runner applies to a folder of NIfTI files",
                      _from("fedoap.inference.bundle", "add_options"), _from("fedoap.inference.bundle", "run")),
    "site-configure": ("a provisioned client site: install the project's privacy policies, class allow-list, "
                       "authorization, its data location and an at-rest key into its startup kit's local/ (before "
                       "starting the site)", _site_configure_options, _site_configure),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``fedoap`` parser. With ``command``, only that command's options are built (every command is still
    listed), so a command starts without importing what the others need."""
    parser = argparse.ArgumentParser(prog="fedoap", description="Personalized federated tumor segmentation on NVFlare")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options_of, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if command in (None, name):
            add_options_of(p)
    return parser


def _user_error(err: BaseException) -> bool:
    """An error that is the user's to fix (bad option, missing file, failed run): one line, no traceback."""
    simulation = sys.modules.get("fedoap.simulation")  # loaded whenever its error can have been raised
    return isinstance(err, (ValueError, FileExistsError, FileNotFoundError)) or (
        simulation is not None and isinstance(err, simulation.SimulationError))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; every bad option is one line on stderr and exit status 2, Ctrl-C exits 130."""
    try:
        argv = _he_keys_compat(list(sys.argv[1:] if argv is None else argv))
        args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
        try:
            COMMANDS[args.command][2](args)
        except Exception as err:
            if not _user_error(err):
                raise
            print(f"fedoap: error: {err}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("fedoap: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
