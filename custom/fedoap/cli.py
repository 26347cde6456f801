"""The ``fedoap`` command.

    fedoap simulate [--method NAME] [--clients a,b,c] ... [--out DIR]           a method on the NVFlare simulator
    fedoap generate-data DIR [--seed S] [--size S]                             write the synthetic federation
    fedoap benchmark [--methods a,b] [--seeds 0,1,2] [--preset fast|full] [--out DIR]  methods side by side, over seeds
    fedoap bench train [--out DIR]                                              images/s in the federation vs a plain loop
    fedoap bench privacy [--out DIR]                                            HE bytes/time and DP-SGD images/s
    fedoap bench scale [--sites 30] [--out DIR]                                 30 sites: s/round, peak memory
    fedoap he-keys init SITE_KIT --bundle B --public P [--passphrase-file F]     HE key ceremony: one site makes the key
    fedoap he-keys join SITE_KIT --bundle B [--passphrase-file F]                ... every other site imports it
    fedoap he-keys install-public SERVER_KIT --public P                         ... the server gets the public context
    fedoap he-keys simulation DIR  (or: fedoap he-keys DIR)                     TenSEAL contexts for a simulation
    fedoap export-jobs [--out jobs] [--byoc]                                    regenerate the NVFlare jobs in jobs/
    fedoap poc-configure [WORKSPACE] --data DIR [--unseen lung]                 site policies, data, HE keys into a POC
    fedoap site-configure SITE_KIT --data DIR [--unseen DIR]                    one provisioned site's policies and keys
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from fedoap.benchmark import ABLATIONS, PRESETS
from fedoap.methods import METHODS
from fedoap.privacy.he_keys import MIN_PASSPHRASE_CHARS, PASSPHRASE_ENV
from fedoap.simulation import DEFAULT_CLIENTS, DEFAULT_UNSEEN, SimulationConfig

__all__ = ["main", "build_parser"]


_HE_KEYS_ACTIONS = ("init", "join", "install-public", "simulation")


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


def _add_run_options(p: argparse.ArgumentParser, defaults: SimulationConfig) -> None:
    p.add_argument("--clients", type=_csv, default=defaults.clients,
                   help=f"site names (folders under --data, or synthetic organs); default {','.join(DEFAULT_CLIENTS)}")
    p.add_argument("--unseen", default=defaults.unseen,
                   help=f"site never trained on, evaluated by every personalized model; default {DEFAULT_UNSEEN}; "
                        "'none' to skip")
    p.add_argument("--data", default=None, help="folder of real data: one MSD-layout sub-folder per site")
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    p.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    p.add_argument("--image-size", type=int, default=defaults.image_size, help="slices are resized to SIZE x SIZE")
    p.add_argument("--width", type=int, default=defaults.width,
                   help="UNet width w: channels w,2w,4w,8w and 16w at the bottleneck (authors: 64)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per site (0: auto)")


def build_parser() -> argparse.ArgumentParser:
    defaults = SimulationConfig()
    parser = argparse.ArgumentParser(prog="fedoap", description="Personalized federated tumor segmentation on NVFlare")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federation on the NVFlare simulator and report per-site results")
    _add_run_options(sim, defaults)
    sim.add_argument("--method", default=defaults.method,
                     help=f"one of {', '.join(METHODS)} (local: each site trains alone, the reference)")
    sim.add_argument("--partition", default="authors", choices=["authors", "kv_only"],
                     help="FedOAP's shared set: the authors' partition or the key/value branch only")
    sim.add_argument("--no-pbl", action="store_true", help="fine-tune with the plain loss instead of PBL (ablation)")
    sim.add_argument("--no-dca", action="store_true",
                     help="FedOAP without the decoupled cross-attention: a plain shared bottleneck (ablation)")
    sim.add_argument("--no-adapter", action="store_true", help="FedOAP without the local spatial adapter (ablation)")
    sim.add_argument("--mu", type=float, default=None, help="FedProx's proximal weight mu (default 1e-3)")
    sim.add_argument("--out", default=defaults.out)
    sim.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    privacy = sim.add_argument_group("privacy (any combination)")
    privacy.add_argument("--he", action="store_true",
                         help="encrypt shared updates with TenSEAL CKKS; the server only adds ciphertexts")
    privacy.add_argument("--dp-update-clip", type=float, default=0.0,
                         help="client-level DP: clip each site's shared update to this L2 norm (0: off)")
    privacy.add_argument("--dp-update-noise", type=float, default=0.0,
                         help="client-level DP: Gaussian noise multiplier sigma (std sigma * clip)")
    privacy.add_argument("--dp-sgd-noise", type=float, default=0.0,
                         help="sample-level DP-SGD (Opacus) with this noise multiplier (0: off)")
    privacy.add_argument("--dp-sgd-epsilon", type=float, default=0.0,
                         help="sample-level DP-SGD calibrated to this target epsilon over the whole run (0: off)")
    privacy.add_argument("--dp-sgd-clip", type=float, default=1.0, help="DP-SGD per-sample gradient norm bound")
    privacy.add_argument("--dp-sgd-unit", choices=("slice", "case"), default="slice",
                         help="what DP-SGD protects: one slice (per-slice sampling and clipping; the per-case epsilon "
                              "is reported by group privacy) or one case, i.e. patient (cases sampled, one slice each)")
    privacy.add_argument("--dp-sgd-noise-source", choices=("chacha20", "os_seeded"), default="chacha20",
                         help="DP-SGD gradient noise: a ChaCha20 stream keyed by the OS (default) or torch's "
                              "generator seeded from the OS every epoch (faster, e.g. on a GPU)")
    privacy.add_argument("--dp-delta", type=float, default=1e-5, help="delta at which epsilon is reported")

    jobs = sub.add_parser("export-jobs", help="export the project's NVFlare jobs (FedOAP plain/DP/HE, FedAvg, FedBN, "
                                              "Ditto) from the recipes; code pre-installed on sites, data from site "
                                              "configuration")
    jobs.add_argument("--out", default="jobs", help="parent folder of the job folders (default jobs)")
    jobs.add_argument("--byoc", action="store_true",
                      help="put the fedoap package into each job's app/custom (bring-your-own-code; not for jobs/)")
    jobs.add_argument("--jobs", type=_csv, default=None, help="comma-separated job names (default: all)")
    jobs.add_argument("--min-clients", type=int, default=None, help="sites per round (default 2, the POC's)")
    jobs.add_argument("--rounds", type=int, default=None)
    jobs.add_argument("--local-epochs", type=int, default=None)
    jobs.add_argument("--finetune-epochs", type=int, default=None)
    jobs.add_argument("--image-size", type=int, default=None)
    jobs.add_argument("--width", type=int, default=None)
    jobs.add_argument("--batch-size", type=int, default=None)

    poc = sub.add_parser("poc-configure", help="install site privacy policies, class allow-lists and data locations "
                                               "into a prepared NVFlare POC workspace (before 'nvflare poc start')")
    poc.add_argument("workspace", nargs="?", default=None,
                     help="POC workspace (default: $NVFLARE_POC_WORKSPACE)")
    poc.add_argument("--data", required=True, help="folder with one MSD-layout sub-folder per client site name")
    poc.add_argument("--unseen", default=None, help="sub-folder of --data with the unseen organ (e.g. lung)")
    poc.add_argument("--policies", default=None,
                     help="folder with privacy.json, resources.json and authorization.json (default: the project's "
                          "poc_workspace/local)")

    site = sub.add_parser("site-configure", help="a provisioned client site: install the project's privacy policies, "
                                                 "class allow-list, authorization, its data location and an at-rest "
                                                 "key into its startup kit's local/ (before starting the site)")
    site.add_argument("kit", help="the site's startup kit (the folder holding startup/ and local/)")
    site.add_argument("--data", required=True, help="the site's MSD-layout data folder")
    site.add_argument("--unseen", default=None, help="MSD-layout folder of the unseen organ (optional)")
    site.add_argument("--policies", default=None, help="folder with privacy.json, resources.json and "
                                                       "authorization.json (default: the project's poc_workspace/local)")

    keys = sub.add_parser("he-keys", help="HE key ceremony run by the sites (init, join, install-public), so no "
                                          "coordinator holds the secret key; or contexts for a simulation")
    key_sub = keys.add_subparsers(dest="he_keys", required=True, metavar="{" + ",".join(_HE_KEYS_ACTIONS) + "}")
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

    gen = sub.add_parser("generate-data", help="write the synthetic multi-organ federation (MSD layout)")
    gen.add_argument("out")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=128)
    gen.add_argument("--overwrite", action="store_true")

    bm = sub.add_parser("benchmark", help="several methods on identical data, splits and seeds: Dice, HD95, fairness, "
                                          "unseen organ, bytes, time (mean and std over seeds)")
    bm.add_argument("--methods", type=_csv, default=None,
                    help=f"comma-separated method names (default: all registered: {','.join(METHODS)}); FedOAP's "
                         f"ablations too: {','.join(ABLATIONS)}")
    bm.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    bm.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                    help="fast: tiny CPU setting; full: 256 x 256, 50 epochs, meant for a GPU")
    bm.add_argument("--out", default="runs/benchmark", help="benchmark folder (finished runs in it are reused)")
    bm.add_argument("--workers", type=int, default=None,
                    help="runs at the same time, each its own NVFlare simulator process (default: the preset's, "
                         "fast 2, full 1)")
    bm_over = bm.add_argument_group("overrides of the preset")
    bm_over.add_argument("--rounds", type=int, default=None)
    bm_over.add_argument("--total-epochs", type=int, default=None,
                         help="rounds = total epochs / local epochs (the preset's way; not with --rounds)")
    bm_over.add_argument("--local-epochs", type=int, default=None)
    bm_over.add_argument("--finetune-epochs", type=int, default=None)
    bm_over.add_argument("--image-size", type=int, default=None)
    bm_over.add_argument("--width", type=int, default=None)
    bm_over.add_argument("--batch-size", type=int, default=None)
    bm_over.add_argument("--lr", type=float, default=None)
    bm_over.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    bm_over.add_argument("--threads", type=int, default=None, help="torch threads per site (0: auto)")
    bm_over.add_argument("--clients", type=_csv, default=None, help="site names")
    bm_over.add_argument("--unseen", default=None, help="unseen site ('none' to skip)")
    bm_over.add_argument("--data", default=None,
                         help="real data (one MSD-layout folder per site) instead of the synthetic federation")

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    train = bench_sub.add_parser("train", help="local training images/s inside the federation vs a plain MONAI loop")
    _add_run_options(train, SimulationConfig(rounds=3, local_epochs=1, finetune_epochs=0))
    train.add_argument("--out", default="runs/bench_train")
    scale = bench_sub.add_parser("scale", help="a large federation (30 sites, several per organ, unequal sizes): "
                                              "time per round and peak memory, FedOAP and FedAvg side by side")
    scale.add_argument("--out", default="runs/bench_scale")
    scale.add_argument("--sites", type=int, default=30)
    scale.add_argument("--methods", type=_csv, default=("fedoap", "fedavg"))
    scale.add_argument("--rounds", type=int, default=3)
    scale.add_argument("--image-size", type=int, default=32)
    scale.add_argument("--width", type=int, default=8)
    scale.add_argument("--processes", type=int, default=0,
                       help="simulator client processes (NVFlare's num_threads; 0: one per site)")
    scale.add_argument("--seed", type=int, default=0)
    priv = bench_sub.add_parser("privacy", help="HE bytes/time per round and DP-SGD images/s, side by side")
    priv.add_argument("--out", default="runs/bench_privacy")
    priv.add_argument("--width", type=int, default=16)
    priv.add_argument("--image-size", type=int, default=64)
    priv.add_argument("--sites", type=int, default=3, help="sites whose updates the server combines")
    priv.add_argument("--epochs", type=int, default=2, help="timed training epochs (after one warm-up)")
    priv.add_argument("--threads", type=int, default=0)
    return parser


def _config(args: argparse.Namespace, **extra) -> SimulationConfig:
    return SimulationConfig(
        out=args.out, clients=args.clients, unseen=None if str(args.unseen).lower() == "none" else args.unseen,
        data=args.data, rounds=args.rounds, local_epochs=args.local_epochs, finetune_epochs=args.finetune_epochs,
        image_size=args.image_size, width=args.width, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, threads=args.threads, **extra,
    )


def _dp_options(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's dp options that the command line switched on."""
    options: dict[str, Any] = {}
    if args.dp_update_clip > 0:
        options.update(dp_update_clip=args.dp_update_clip, dp_update_noise=args.dp_update_noise)
    if args.dp_sgd_noise > 0 and args.dp_sgd_epsilon > 0:
        raise ValueError("give --dp-sgd-noise or --dp-sgd-epsilon, not both")
    if args.dp_sgd_noise > 0:
        options.update(dp_sgd_noise=args.dp_sgd_noise, dp_sgd_clip=args.dp_sgd_clip)
    if args.dp_sgd_epsilon > 0:
        options.update(dp_sgd_epsilon=args.dp_sgd_epsilon, dp_sgd_clip=args.dp_sgd_clip)
    if "dp_sgd_clip" in options:
        options.update(dp_sgd_unit=args.dp_sgd_unit, dp_sgd_noise_source=args.dp_sgd_noise_source)
    if options:
        options["dp_delta"] = args.dp_delta
    return options


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _he_keys_compat(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    from fedoap.data import DataValidationError
    from fedoap.simulation import SimulationError

    try:
        if args.command == "simulate":
            from fedoap.simulation import run_simulation

            method_args = {}
            if args.method == "fedoap":
                method_args = {"partition": args.partition, "use_pbl": not args.no_pbl,
                               "cross_attention": not args.no_dca, "adapter": not args.no_adapter}
            elif args.no_pbl or args.no_dca or args.no_adapter or args.partition != "authors":
                raise ValueError(f"--partition, --no-pbl, --no-dca and --no-adapter are FedOAP's options; --method is "
                                 f"{args.method!r}")
            if args.mu is not None:
                if args.method != "fedprox":
                    raise ValueError(f"--mu is FedProx's option; --method is {args.method!r}")
                method_args = {"mu": args.mu}
            run_simulation(_config(args, method=args.method, method_args=method_args, overwrite=args.overwrite,
                                   he=args.he, dp=_dp_options(args)))
        elif args.command == "export-jobs":
            from dataclasses import replace

            from fedoap.deploy.jobs import JobSettings, export_jobs

            overrides = {k: getattr(args, k) for k in ("min_clients", "rounds", "local_epochs", "finetune_epochs",
                                                       "image_size", "width", "batch_size")
                         if getattr(args, k) is not None}
            for path in export_jobs(args.out, args.jobs, replace(JobSettings(), **overrides), byoc=args.byoc):
                print(path)
        elif args.command == "poc-configure":
            import os

            from fedoap.deploy.poc import POLICY_DIR, configure_poc

            workspace = args.workspace or os.environ.get("NVFLARE_POC_WORKSPACE")
            if not workspace:
                raise ValueError("give the POC workspace, or set NVFLARE_POC_WORKSPACE as for 'nvflare poc prepare'")
            written = configure_poc(workspace, args.data, args.unseen, args.policies or POLICY_DIR)
            print(json.dumps(written, indent=2))
            print("sites read these files when they start: run 'nvflare poc start' now (or restart the POC)")
        elif args.command == "site-configure":
            from fedoap.deploy.poc import POLICY_DIR, configure_site

            print(json.dumps(configure_site(args.kit, args.data, args.unseen, args.policies or POLICY_DIR), indent=2))
        elif args.command == "he-keys":
            _he_keys(args)
        elif args.command == "generate-data":
            from fedoap.data import generate_federation

            paths = generate_federation(args.out, seed=args.seed, size=args.size, overwrite=args.overwrite)
            print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        elif args.command == "benchmark":
            from fedoap.benchmark import OVERRIDABLE, run_benchmark

            overrides = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k, None) is not None}
            run_benchmark(args.methods, args.seeds, args.preset, args.out, overrides, workers=args.workers)
        elif args.command == "bench" and args.bench == "train":
            from fedoap.bench import bench_train

            bench_train(_config(args, overwrite=True))
        elif args.command == "bench" and args.bench == "scale":
            from fedoap.bench_scale import ScaleConfig, bench_scale

            bench_scale(ScaleConfig(out=args.out, n_sites=args.sites, methods=args.methods, rounds=args.rounds,
                                    image_size=args.image_size, width=args.width, processes=args.processes,
                                    seed=args.seed))
        elif args.command == "bench" and args.bench == "privacy":
            from fedoap.bench_privacy import PrivacyBenchConfig, bench_privacy

            bench_privacy(PrivacyBenchConfig(out=args.out, width=args.width, image_size=args.image_size,
                                             n_sites=args.sites, epochs=args.epochs, threads=args.threads))
    except (SimulationError, DataValidationError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"fedoap: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
