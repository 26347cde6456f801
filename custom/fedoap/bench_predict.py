"""``fedoap bench predict``: how fast ``fedoap predict`` segments new scans, against a plain MONAI loop, in one run.

Both sides read the same NIfTI volumes from disk, apply the same network (one personalized model file) and write a
NIfTI mask per volume: ``fedoap predict``'s :func:`fedoap.inference.predict.predict_paths` on one side; on the other
a textbook MONAI pipeline (``LoadImage``, the card's intensity transform, ``Resize`` to the training size,
``SliceInferer`` over the slices, sigmoid, ``Resize`` back, threshold, ``SaveImage``). The scans are synthetic brain
MRI volumes (:func:`fedoap.data.synthetic.generate_site`); the weights are the seeded initial FedOAP network (speed
does not depend on training). Each side runs once as warm-up, then ``--repeats`` times in alternation; the table
reports the median volumes/s and slices/s and the ratio fedoap / plain.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fedoap.argtypes import int_at_least

__all__ = ["add_options", "run", "bench_predict"]


_POSITIVE = int_at_least(1)


def add_options(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (imports nothing heavy)."""
    p.add_argument("--out", default="runs/bench_predict", help="folder of bench_predict.json and .md")
    p.add_argument("--cases", type=_POSITIVE, default=8, help="synthetic brain MRI volumes (default 8)")
    p.add_argument("--scan-size", type=_POSITIVE, default=160, help="in-plane size of the volumes (default 160)")
    p.add_argument("--depth", type=_POSITIVE, default=40, help="slices per volume (default 40)")
    p.add_argument("--image-size", type=_POSITIVE, default=64, help="the model's training slice size (default 64)")
    p.add_argument("--width", type=_POSITIVE, default=16, help="the FedOAP network's base width (default 16)")
    p.add_argument("--batch-size", type=_POSITIVE, default=32, help="slices per forward pass, both sides (default 32)")
    p.add_argument("--repeats", type=_POSITIVE, default=3, help="timed passes of each side after a warm-up (default 3)")
    p.add_argument("--devices", default="auto",
                   help="comma-separated torch devices, or auto: cpu, and cuda when available (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``fedoap bench predict`` command: options checked, then :func:`bench_predict`."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else \
        [d.strip() for d in args.devices.split(",") if d.strip()]
    from fedoap.inference.model_file import resolve_device

    for device in devices:
        try:
            resolve_device(device)
        except ValueError as err:
            raise ValueError(f"--devices: {err}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    return bench_predict(out, devices=devices, cases=args.cases, scan_size=args.scan_size, depth=args.depth,
                         image_size=args.image_size, width=args.width, batch_size=args.batch_size,
                         repeats=args.repeats, threads=args.threads)


def _model_file(folder: Path, image_size: int, width: int) -> Path:
    """A FedOAP model file (seeded initial weights) with a card for brain MRI at ``image_size``."""
    from fedoap.config import RunConfig
    from fedoap.data.normalization import normalization_for
    from fedoap.inference.model_file import ModelCard, Preprocessing, save_model

    config = RunConfig.from_options(method="fedoap", image_size=image_size, width=width)
    network, method = config.build_model(), config.method.instance
    card = ModelCard(network=method.model_spec(config.training.model_args()),
                     preprocessing=Preprocessing(modality="MRI", organ="brain",
                                                 normalization=normalization_for("MRI", "brain"),
                                                 image_size=image_size),
                     method={"name": "fedoap", "args": {}}, shared_keys=tuple(method.shared_keys(network)),
                     provenance={"note": "fedoap bench predict: seeded initial weights"})
    return save_model(folder / "model.safetensors", network.state_dict(), card)


def _plain_monai(model: Any, inputs: list[Path], out_dir: Path, batch_size: int, device: str) -> None:
    """The plain MONAI loop over the same network and files."""
    import torch
    from monai.inferers import SliceInferer
    from monai.transforms import LoadImage, Resize, SaveImage

    from fedoap.data.normalization import normalizer

    prep = model.card.preprocessing
    load = LoadImage(image_only=True, ensure_channel_first=True)
    normalize = normalizer(prep.normalization)
    inferer = SliceInferer(roi_size=(prep.image_size, prep.image_size), sw_batch_size=batch_size, spatial_dim=2,
                           progress=False)
    save = SaveImage(output_dir=str(out_dir), output_postfix="plain", output_dtype="uint8", separate_folder=False,
                     print_log=False)
    network = model.network
    with torch.no_grad():
        for path in inputs:
            image = load(str(path))  # (1, H, W, D) MetaTensor with the affine
            size = image.shape[1:3]
            x = Resize((prep.image_size, prep.image_size, -1), mode="trilinear")(normalize(image))
            probs = torch.sigmoid(inferer(x[None].to(device), network))[0].cpu()
            back = Resize((*size, -1), mode="trilinear")(probs)
            mask = (back > prep.threshold).to(torch.uint8)
            mask.meta = image.meta
            save(mask)


def bench_predict(out: Path, *, devices: list[str], cases: int = 8, scan_size: int = 160, depth: int = 40,
                  image_size: int = 64, width: int = 16, batch_size: int = 32, repeats: int = 3,
                  threads: int = 0) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``<out>/bench_predict.{json,md}``; return the record."""
    import numpy as np
    import torch

    from fedoap.data.synthetic import generate_site
    from fedoap.inference.model_file import load_model
    from fedoap.inference.predict import predict_paths
    from fedoap.jsonio import write_json

    if threads > 0:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedoap_bench_predict_") as tmp:
        tmp = Path(tmp)
        site = generate_site(tmp / "brain", "brain", cases, seed=0, size=scan_size, depth=depth)
        inputs = sorted((site / "imagesTr").glob("*.nii.gz"))
        model_path = _model_file(tmp, image_size, width)
        slices = cases * depth
        for device in devices:
            model = load_model(model_path, device=device)
            sides = {
                "fedoap predict": lambda d: predict_paths(model, inputs, d, batch_size=batch_size, device=device,
                                                          progress=False),
                "plain MONAI SliceInferer loop": lambda d: _plain_monai(model, inputs, d, batch_size, device),
            }
            seconds: dict[str, list[float]] = {name: [] for name in sides}
            for attempt in range(repeats + 1):  # attempt 0 is warm-up; the order flips each attempt (A B, B A, ...)
                order = list(sides.items())         # so that a drifting machine load hits both sides alike
                for name, side in (order if attempt % 2 == 0 else order[::-1]):
                    folder = tmp / f"out_{attempt}_{len(seconds[name])}_{name.split()[0]}"
                    folder.mkdir()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    side(folder)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if attempt:
                        seconds[name].append(time.perf_counter() - start)
                    shutil.rmtree(folder)
            plain = float(np.median(seconds["plain MONAI SliceInferer loop"]))
            for name, values in seconds.items():
                median = float(np.median(values))
                rows.append({"device": device, "side": name, "seconds": median, "seconds_all": values,
                             "volumes_per_s": cases / median, "slices_per_s": slices / median,
                             "ratio_vs_plain": plain / median})
    record = {
        "benchmark": "fedoap bench predict",
        "command": f"fedoap bench predict --cases {cases} --scan-size {scan_size} --depth {depth} --image-size "
                   f"{image_size} --width {width} --batch-size {batch_size} --repeats {repeats} --devices "
                   f"{','.join(devices)}" + (f" --threads {threads}" if threads else ""),
        "data": {"volumes": cases, "shape": [scan_size, scan_size, depth], "slices": slices, "modality": "MRI"},
        "model": {"network": "FedOAPNet", "width": width, "image_size": image_size},
        "batch_size": batch_size, "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "rows": rows,
        "note": "ratio_vs_plain = plain seconds / this side's seconds (above 1: faster than the plain loop); both "
                "sides read the NIfTI files and write a NIfTI mask per volume",
    }
    table = _table(record)
    print(table)
    write_json(out / "bench_predict.json", record)
    (out / "bench_predict.md").write_text(table + "\n")
    print(f"[fedoap] wrote {out / 'bench_predict.json'} and {out / 'bench_predict.md'}")
    return record


def _table(record: dict[str, Any]) -> str:
    data = record["data"]
    lines = [f"fedoap bench predict: {data['volumes']} volumes of {' x '.join(map(str, data['shape']))} "
             f"({data['slices']} slices), {record['model']['network']} width {record['model']['width']} at "
             f"{record['model']['image_size']} px, batch {record['batch_size']}, median of {record['repeats']}",
             "",
             "| device | side | s | volumes/s | slices/s | ratio vs plain |",
             "|---|---|---:|---:|---:|---:|"]
    for r in record["rows"]:
        lines.append(f"| {r['device']} | {r['side']} | {r['seconds']:.2f} | {r['volumes_per_s']:.2f} | "
                     f"{r['slices_per_s']:.1f} | {r['ratio_vs_plain']:.2f} |")
    lines += ["", f"command: {record['command']}"]
    return "\n".join(lines)

