"""The ``fedoap`` command.

    fedoap simulate [--method NAME] [--clients a,b,c] ... [--out DIR]           a method on the NVFlare simulator
    fedoap generate-data DIR [--seed S] [--size S]                             write the synthetic federation
    fedoap benchmark [--methods a,b] [--seeds 0,1,2] [--preset fast|full] [--out DIR]  methods side by side, over seeds
    fedoap bench train [--out DIR]                                              images/s in the federation vs a plain loop
    fedoap bench privacy [--out DIR]                                            HE bytes/time and DP-SGD images/s
    fedoap bench scale [--sites 30] [--out DIR]                                 30 sites: s/round, peak memory
    fedoap he-keys DIR                                                          TenSEAL contexts for a simulation
    fedoap export-jobs [--out jobs] [--byoc]                                    regenerate the NVFlare jobs in jobs/
    fedoap poc-configure [WORKSPACE] --data DIR [--unseen lung]                 site policies + data into a POC
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from fedoap.benchmark import ABLATIONS, PRESETS
from fedoap.methods import METHODS
from fedoap.simulation import DEFAULT_CLIENTS, DEFAULT_UNSEEN, SimulationConfig

__all__ = ["main", "build_parser"]


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
                     help="folder with privacy.json and resources.json (default: the project's poc_workspace/local)")

    keys = sub.add_parser("he-keys", help="write TenSEAL contexts for a simulated federation (server: no secret key)")
    keys.add_argument("out")
    keys.add_argument("--overwrite", action="store_true")

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


def _dp_options(args: argparse.Namespace) -> dict[str, float]:
    """The recipe's dp options that the command line switched on."""
    options: dict[str, float] = {}
    if args.dp_update_clip > 0:
        options.update(dp_update_clip=args.dp_update_clip, dp_update_noise=args.dp_update_noise)
    if args.dp_sgd_noise > 0 and args.dp_sgd_epsilon > 0:
        raise ValueError("give --dp-sgd-noise or --dp-sgd-epsilon, not both")
    if args.dp_sgd_noise > 0:
        options.update(dp_sgd_noise=args.dp_sgd_noise, dp_sgd_clip=args.dp_sgd_clip)
    if args.dp_sgd_epsilon > 0:
        options.update(dp_sgd_epsilon=args.dp_sgd_epsilon, dp_sgd_clip=args.dp_sgd_clip)
    if options:
        options["dp_delta"] = args.dp_delta
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
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

            from fedoap.fl.jobs import JobSettings, export_jobs

            overrides = {k: getattr(args, k) for k in ("min_clients", "rounds", "local_epochs", "finetune_epochs",
                                                       "image_size", "width", "batch_size")
                         if getattr(args, k) is not None}
            for path in export_jobs(args.out, args.jobs, replace(JobSettings(), **overrides), byoc=args.byoc):
                print(path)
        elif args.command == "poc-configure":
            import os

            from fedoap.fl.poc_setup import POLICY_DIR, configure_poc

            workspace = args.workspace or os.environ.get("NVFLARE_POC_WORKSPACE")
            if not workspace:
                raise ValueError("give the POC workspace, or set NVFLARE_POC_WORKSPACE as for 'nvflare poc prepare'")
            written = configure_poc(workspace, args.data, args.unseen, args.policies or POLICY_DIR)
            print(json.dumps(written, indent=2))
            print("sites read these files when they start: run 'nvflare poc start' now (or restart the POC)")
        elif args.command == "he-keys":
            from fedoap.privacy.he import write_contexts

            server, client = write_contexts(args.out, overwrite=args.overwrite)
            print(f"server context (no secret key): {server}\nclient context (secret key): {client}\n"
                  f"for a simulated federation: export FEDOAP_HE_CONTEXT_DIR={args.out}")
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
