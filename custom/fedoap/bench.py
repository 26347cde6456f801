"""``fedoap bench train``: how fast a site trains inside the federation, against a plain MONAI loop, in one run.

Both sides use the same network (built with the same seed), the same site data, the same batch size, optimizer and
loss, and the same number of torch threads. The federated side is a real NVFlare simulator run; its training rate is
measured by the site around its local epochs (``images_per_s``) and, end to end, over whole rounds as the server sees
them (training plus transfer, aggregation and validation). The plain side is a textbook loop over a MONAI
``DataLoader``. The first round and the first plain epoch are warm-up and are not counted.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader

from fedoap.config import FederationOptions, RunConfig
from fedoap.data import load_site
from fedoap.jsonio import write_json
from fedoap.simulation import config_record, run_simulation

__all__ = ["bench_train", "plain_monai_loop"]


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
    record = {
        "benchmark": "train",
        "device": t.device if t.device == "cpu" else torch.cuda.get_device_name(torch.device(t.device)),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads_per_site": threads,
        "config": config_record(run, federation),
        "rows": rows,
    }
    write_json(out / "bench_train.json", record)
    header = f"{'site':<10} {'fed train img/s':>16} {'fed round img/s':>16} {'plain MONAI img/s':>18} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        rr = r["federated_round_images_per_s"]
        print(f"{r['site']:<10} {r['federated_train_images_per_s']:>16.1f} {rr if rr is None else round(rr, 1)!s:>16} "
              f"{r['plain_monai_images_per_s']:>18.1f} {r['ratio_federated_over_plain']:>7.2f}")
    print(f"[fedoap] wrote {out / 'bench_train.json'}")
    return record
