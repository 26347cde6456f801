"""``fedoap bench train``: how fast a site trains inside the federation, against a plain loop, in one run.

Part 1 (the ``rows``, one per site), the federation end to end: a real NVFlare simulator run against a plain MONAI
loop. Both sides use the same network (built with the same seed), the same site data, the same batch size, optimizer
and loss, and the same number of torch threads. The federated side's training rate is measured by the site around
its local epochs (``images_per_s``) and, end to end, over whole rounds as the server sees them (training plus
transfer, aggregation and validation). The plain side is a textbook loop over a MONAI ``DataLoader``. The first round
and the first plain epoch are warm-up and are not counted.

Part 2 (``speed_rows``, on the first site's data), the speed options side by side: for every configuration (fp32,
bf16 autocast, channels-last, ``torch.compile``, all three) the one trainer the sites run
(:class:`~fedoap.training.LocalTrainer`, built as a site builds it from ``TrainingOptions.train_config()``, its
``train_round`` timed directly, the sites' random flips included: the simulator adds nothing to a local epoch,
part 1 measures what it adds to a round)
against the best plain PyTorch loop of the same network, data, batch and optimizer with the same setting (tensors in
memory, a random permutation per epoch, no ``DataLoader``, no flips; ``torch.compile(model)``, autocast around the
forward, the loss in fp32). Then DP-SGD (:func:`dp_rows`): the trainer's DP-SGD (Opacus hooks in place, Poisson
sampling, per-image loss; fp32 and channels-last, the options Opacus allows; its default ChaCha20 noise drawn ahead,
the same noise drawn inside the step, the ``os_seeded`` torch noise, Opacus's kind, once with Opacus's own
per-sample rules only, without :mod:`fedoap.privacy.grad_samplers`, and once computing the weights' batch gradients
with ``loss.backward()``) against a textbook Opacus loop
(``PrivacyEngine.make_private``) and Opacus's ghost clipping (``grad_sample_mode="ghost"``), both Opacus as shipped,
same network, batch and noise; the DP-SGD configurations are timed round-robin, one epoch each in turn, so that a
shared machine's slow spells fall on all of them alike. The first epoch of every configuration is warm-up
(compilation happens there) and is not counted; the median of the other epochs is reported, with the device (a
CPU-only machine measures what the CPU gains).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from monai.data import DataLoader

from fedoap.config import FederationOptions, RunConfig
from fedoap.data import SliceSet, load_site
from fedoap.jsonio import write_json
from fedoap.simulation import config_record, run_simulation

__all__ = ["bench_train", "plain_monai_loop", "speed_rows", "dp_rows", "plain_loop_rate", "SPEED_CONFIGS"]

#: the speed configurations of part 2: name -> ``TrainConfig`` overrides (``TrainingOptions`` flags)
SPEED_CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "channels-last": {"channels_last": True},
    "compile": {"compile": True},
    "bf16+channels-last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
}


def plain_monai_loop(run: RunConfig, site: str, data_root: Path, epochs: int) -> dict[str, float]:
    """Images/s of a plain training loop (no federation, no flips) on one site's training split, with the same
    network (built with the same seed) as the federation's sites."""
    t = run.training
    data = load_site(data_root / site, image_size=t.image_size, seed=t.seed, name=site)
    device = torch.device(t.device)
    model = run.build_model().to(device)
    loss_fn = run.method.instance.train_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=1e-5)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(data.train.images), torch.from_numpy(data.train.labels))
    loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, num_workers=0)
    rates = []
    for _ in range(epochs + 1):  # the first epoch is warm-up
        model.train()
        start = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(len(dataset) / (time.perf_counter() - start))
    return {"images_per_s": float(np.median(rates[1:])), "n_images": len(dataset), "epochs": epochs}



def _error_line(err: Exception) -> str:
    """What a configuration this machine cannot run records instead of its rate: the error on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _fresh(run: RunConfig) -> tuple[torch.nn.Module, Any]:
    """A new network (seeded, as the sites build it) and a new method object of the same run configuration."""
    run = RunConfig.from_json(run.to_json())
    return run.build_model(), run.method.instance


def _median_rate(epoch: Callable[[], int], epochs: int, device: torch.device) -> float:
    """Images/s of ``epoch`` (which returns the images it trained on): one warm-up call, then the median of ``epochs``."""
    rates = []
    for i in range(epochs + 1):
        start = time.perf_counter()
        n = epoch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def plain_loop_rate(model: torch.nn.Module, loss_fn: torch.nn.Module, train: SliceSet, batch_size: int, lr: float,
                    weight_decay: float, device: str, epochs: int, precision: str = "fp32",
                    channels_last: bool = False, compile: bool = False, compile_backend: str = "inductor",
                    seed: int = 0) -> float:
    """Images/s of the best plain PyTorch loop (after one warm-up epoch): the data as tensors on the device, a random
    permutation per epoch, AdamW, ``zero_grad(set_to_none=True)``; with the same speed setting as the trainer
    (``torch.compile(model)``, bf16 autocast around the forward with the loss in fp32, channels-last)."""
    dev = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    forward = torch.compile(model, backend=compile_backend) if compile else model
    images = torch.from_numpy(train.images).to(dev).contiguous(memory_format=memory_format)
    labels = torch.from_numpy(train.labels).to(dev).contiguous(memory_format=memory_format)
    generator = torch.Generator().manual_seed(seed)
    n = len(images)

    def epoch() -> int:
        model.train()
        for idx in torch.randperm(n, generator=generator).to(dev).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = forward(images[idx])
            loss = loss_fn(out.float(), labels[idx])
            loss.backward()
            optimizer.step()
        return n

    return _median_rate(epoch, epochs, dev)


def speed_rows(run: RunConfig, train: SliceSet, val: SliceSet, epochs: int = 2,
               configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
               compile_backend: str = "inductor") -> list[dict[str, Any]]:
    """Part 2: for every speed configuration, the sites' trainer (``train_round`` timed by itself) against the plain
    loop with the same setting, images/s and their ratio (a configuration that fails records its one-line error)."""
    from fedoap.training import LocalTrainer

    t = run.training
    base = replace(run.training.train_config(), local_epochs=1, finetune_epochs=0, precision="fp32",
                   channels_last=False, compile=False, compile_backend=compile_backend)
    rows = []
    for name, overrides in (configs if configs is not None else SPEED_CONFIGS).items():
        config = replace(base, **overrides)
        row: dict[str, Any] = {"config": name, **{k: getattr(config, k) for k in ("precision", "channels_last",
                                                                                   "compile")}}
        try:
            model, method = _fresh(run)
            trainer = LocalTrainer(model, method, train, val, config)
            dev = torch.device(config.device)
            row["trainer_images_per_s"] = _median_rate(lambda site=trainer: _round_images(site), epochs, dev)
            row["final_train_loss"] = trainer.train_round()["train_loss"]
            model, method = _fresh(run)
            row["plain_images_per_s"] = plain_loop_rate(
                model, method.train_loss(), train, t.batch_size, t.lr, config.weight_decay, config.device, epochs,
                precision=config.precision, channels_last=config.channels_last, compile=config.compile,
                compile_backend=compile_backend, seed=t.seed)
            row["ratio_trainer_over_plain"] = row["trainer_images_per_s"] / row["plain_images_per_s"]
        except Exception as err:  # noqa: BLE001 - a configuration this machine cannot run is reported, not fatal
            row["error"] = _error_line(err)
        rows.append(row)
    return rows


def _round_images(trainer: Any) -> int:
    stats = trainer.train_round()
    return round(stats["images_per_s"] * stats["train_seconds"])


def _interleaved_rates(epochs: Mapping[str, Callable[[], int]], repeats: int,
                       device: torch.device) -> dict[str, Any]:
    """Images/s of every configuration's epoch (which returns the images it trained on), measured round-robin: one
    warm-up epoch each, then ``repeats`` rounds in which each configuration runs one epoch in turn; per configuration
    the median and every counted epoch's rate (``{"median", "epochs"}``). A machine's slow spells (a shared VM's
    neighbours) then fall on every configuration alike instead of on whichever ran during them, so the ratios hold
    better when the absolute rates drift. A configuration that raises is reported by its one-line error and leaves the
    rotation."""
    rates: dict[str, list[float]] = {name: [] for name in epochs}
    errors: dict[str, str] = {}
    for i in range(repeats + 1):
        for name, epoch in epochs.items():
            if name in errors:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    n = epoch()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
            except Exception as err:  # noqa: BLE001
                errors[name] = _error_line(err)
                continue
            if i:
                rates[name].append(n / (time.perf_counter() - start))
    return {name: errors.get(name) or {"median": float(np.median(rates[name])), "epochs": rates[name]}
            for name in epochs}


def dp_rows(run: RunConfig, train: SliceSet, val: SliceSet, epochs: int = 2, noise_multiplier: float = 1.0,
            max_grad_norm: float = 1.0) -> list[dict[str, Any]]:
    """DP-SGD images/s (images Poisson sampling drew): the sites' trainer (fp32, channels-last, os_seeded noise, the
    noise drawn inside the step, without our per-sample rules, and computing the weights' batch gradients too)
    against a textbook Opacus loop (``PrivacyEngine.make_private``, hooks) and Opacus's ghost clipping, both Opacus as
    shipped, same network, batch, optimizer and noise; every configuration built first, then timed round-robin
    (:func:`_interleaved_rates`, ``epochs`` rounds). A loop Opacus refuses records its one-line error."""
    from opacus import PrivacyEngine

    from fedoap.privacy.dp import DPSGDConfig, per_sample_loss
    from fedoap.privacy.grad_samplers import stock_opacus
    from fedoap.training import LocalTrainer

    t = run.training
    base = replace(run.training.train_config(), local_epochs=1, finetune_epochs=0, precision="fp32", compile=False)
    dev = torch.device(base.device)
    built: dict[str, Any] = {}

    def build(name: str, make: Callable[[], Callable[[], int]]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[name] = make()
        except Exception as err:  # noqa: BLE001
            built[name] = _error_line(err)

    def stock(epoch: Callable[[], int]) -> Callable[[], int]:
        """Opacus as shipped while ``epoch`` runs (models made private inside the block train inside it)."""
        def run_stock() -> int:
            with stock_opacus():
                return epoch()
        return run_stock

    def ours(channels_last: bool, noise_source: str = "chacha20", rules: bool = True, prefetch: bool = True,
             to_images: bool = True) -> Callable[[], int]:
        with contextlib.nullcontext() if rules else stock_opacus():
            model, method = _fresh(run)
            trainer = LocalTrainer(model, method, train, val, replace(base, channels_last=channels_last),
                                   dp=DPSGDConfig(max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                                                  noise_source=noise_source, noise_prefetch=prefetch))
        trainer.dp_backward_to_images = to_images
        epoch = lambda: _round_images(trainer)  # noqa: E731
        return epoch if rules else stock(epoch)

    def opacus(mode: str) -> Callable[[], int]:
        with stock_opacus():  # Opacus as shipped: the reference has none of our per-sample rules
            model, method = _fresh(run)
            model = model.to(dev)
            optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=base.weight_decay)
            dataset = torch.utils.data.TensorDataset(torch.from_numpy(train.images), torch.from_numpy(train.labels))
            loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size)
            common = {"module": model, "optimizer": optimizer, "data_loader": loader,
                      "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "grad_sample_mode": mode}
            if mode == "ghost":  # the loss wrapper runs the two backward passes of fast gradient clipping
                model, optimizer, criterion, loader = PrivacyEngine().make_private(criterion=method.train_loss(),
                                                                                   **common)
            else:
                model, optimizer, loader = PrivacyEngine().make_private(**common)
                criterion = per_sample_loss(method.train_loss())

        def epoch() -> int:
            model.train()
            seen = 0
            for images, labels in loader:
                if len(images) == 0:
                    continue
                images, labels = images.to(dev), labels.to(dev)
                optimizer.zero_grad(set_to_none=True)
                criterion(model(images), labels).backward()
                optimizer.step()
                seen += len(images)
            return seen

        return stock(epoch)

    build("dp-sgd trainer fp32", lambda: ours(False))
    build("dp-sgd trainer channels-last", lambda: ours(True))
    build("dp-sgd trainer os_seeded noise", lambda: ours(False, "os_seeded"))  # Opacus's kind of noise
    build("dp-sgd trainer, noise drawn in the step", lambda: ours(False, prefetch=False))  # no draw ahead
    build("dp-sgd trainer, stock Opacus rules", lambda: ours(False, rules=False))  # Opacus's own per-sample rules
    # loss.backward(): autograd also computes the weights' batch gradients, which DP-SGD's optimizer throws away
    build("dp-sgd trainer, weights' batch gradients too", lambda: ours(False, to_images=False))
    build("opacus loop (hooks)", lambda: opacus("hooks"))
    build("opacus loop (ghost clipping)", lambda: opacus("ghost"))
    rates = _interleaved_rates({k: v for k, v in built.items() if callable(v)}, epochs, dev)
    rows: list[dict[str, Any]] = []
    for name, made in built.items():
        result = rates.get(name, made)
        rows.append({"config": name, "error": result} if isinstance(result, str) else
                    {"config": name, "images_per_s": result["median"], "images_per_s_epochs": result["epochs"]})
    reference = next((r["images_per_s"] for r in rows if r["config"] == "opacus loop (hooks)" and "images_per_s" in r),
                     None)
    for r in rows:
        if reference and "images_per_s" in r:
            r["ratio_over_opacus_loop"] = r["images_per_s"] / reference
    return rows


def device_name(device: str) -> str:
    return device if device == "cpu" else torch.cuda.get_device_name(torch.device(device))


def print_speed_tables(speed: list[dict[str, Any]], dp: list[dict[str, Any]]) -> None:
    header = f"{'configuration':<28} {'trainer img/s':>14} {'plain img/s':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in speed:
        if "error" in r:
            print(f"{r['config']:<28} {r['error']}")
            continue
        print(f"{r['config']:<28} {r['trainer_images_per_s']:>14.1f} {r['plain_images_per_s']:>12.1f} "
              f"{r['ratio_trainer_over_plain']:>7.2f}")
    if dp:
        width = max(len(r["config"]) for r in dp)
        header = f"{'DP-SGD':<{width}} {'img/s':>10} {'vs Opacus loop':>15}"
        print(header)
        print("-" * len(header))
        for r in dp:
            if "error" in r:
                print(f"{r['config']:<{width}} {r['error']}")
                continue
            ratio = r.get("ratio_over_opacus_loop")
            print(f"{r['config']:<{width}} {r['images_per_s']:>10.1f} {'' if ratio is None else f'{ratio:.2f}':>15}")


def bench_train(run: RunConfig, federation: FederationOptions, out: str | os.PathLike) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``<out>/bench_train.json``; return the record."""
    if run.training.rounds < 2:
        raise ValueError("--rounds: bench train needs at least 2 rounds (the first one is warm-up)")
    threads = run.training.threads or max(1, (os.cpu_count() or 1) // len(federation.clients))
    run = run.override(threads=threads, finetune_epochs=0)
    t = run.training
    out = Path(out).resolve()
    sim = run_simulation(run, federation, out / "federated", overwrite=True, verbose=False)
    history = json.loads((Path(sim["workspace"]) / "server" / "simulate_job" / "fedoap_history.json").read_text())
    data_root = Path(sim["config"]["data"] or out / "federated" / "data")

    torch.set_num_threads(threads)
    rows = []
    for site in federation.clients:
        counted = history["rounds"][1:]
        fed_train = float(np.median([r["sites"][site]["images_per_s"] for r in counted]))
        round_rates = [r["sites"][site]["n_samples"] * t.local_epochs / r["round_seconds"] for r in counted]
        plain = plain_monai_loop(run, site, data_root, epochs=max(2, (t.rounds - 1) * t.local_epochs))
        rows.append({
            "site": site,
            "federated_train_images_per_s": fed_train,
            "federated_round_images_per_s": float(np.median(round_rates)) if round_rates else None,
            "plain_monai_images_per_s": plain["images_per_s"],
            "ratio_federated_over_plain": fed_train / plain["images_per_s"],
            "n_train_images": plain["n_images"],
        })
    site = federation.clients[0]
    data = load_site(data_root / site, image_size=t.image_size, seed=t.seed, name=site)
    epochs = max(2, (t.rounds - 1) * t.local_epochs)
    # inductor compiles for minutes on a CPU (MONAI's UpCat breaks the graph at every up-block): the compile rows are
    # for a GPU, where they pay; on a CPU the table says they were skipped
    configs = SPEED_CONFIGS if t.device.startswith("cuda") else \
        {k: v for k, v in SPEED_CONFIGS.items() if not v.get("compile")}
    speed = speed_rows(run, data.train, data.val, epochs=epochs, configs=configs)
    dp = dp_rows(run, data.train, data.val, epochs=epochs)
    record = {
        "benchmark": "train",
        "speed_configs_skipped": sorted(set(SPEED_CONFIGS) - set(configs)),
        "device": device_name(t.device),
        "gpu_available": torch.cuda.is_available(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads_per_site": threads,
        "config": config_record(run, federation),
        "rows": rows,
        "speed_site": site,
        "speed_epochs": epochs,
        "speed_rows": speed,
        "dp_sgd_rows": dp,
    }
    write_json(out / "bench_train.json", record)
    header = f"{'site':<10} {'fed train img/s':>16} {'fed round img/s':>16} {'plain MONAI img/s':>18} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        rr = r["federated_round_images_per_s"]
        print(f"{r['site']:<10} {r['federated_train_images_per_s']:>16.1f} {rr if rr is None else round(rr, 1)!s:>16} "
              f"{r['plain_monai_images_per_s']:>18.1f} {r['ratio_federated_over_plain']:>7.2f}")
    print(f"\nspeed options on {site}'s data ({record['device']}; CUDA available: {record['gpu_available']}): "
          f"the sites' trainer (train_round) vs the best plain PyTorch loop, same setting")
    print_speed_tables(speed, dp)
    print(f"[fedoap] wrote {out / 'bench_train.json'}")
    return record
