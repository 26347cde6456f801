"""``fedoap bench privacy``: what privacy costs, measured side by side in one run.

Part 1, one round's upload per site for FedOAP (authors' partition) and FedAvg (whole model shared): plaintext
float32, our packed CKKS encryption of the shared part (additions-only server), and NVFlare-style HE (one CKKS
vector per tensor of the whole model, the context NVFlare's HEBuilder provisions: coefficient moduli 60-40-40,
scale 2^40): bytes, client encryption time, server time to combine ``n_sites`` updates, client decryption time.

Part 2, local training images/s on one site's real (synthetic) data: the plain trainer, our DP-SGD trainer (Opacus
hooks, Poisson sampling, per-image loss) with each of its two noise sources, and a textbook Opacus loop
(``PrivacyEngine.make_private`` with a ``DataLoader``) on the same network, data, batch size, optimizer and noise.
The two noise sources price the randomness nobody can regenerate: ``chacha20`` (the default: every step's noise from
a ChaCha20 stream keyed by the OS, on the CPU) against ``os_seeded`` (``torch.normal`` from a torch generator the OS
seeds at every epoch: the cost of the seeded generators of the first version, plus Opacus's four-normal sum).

Part 3, the noise of one client-level release at FedOAP sizes (the CPU default's shared part, and
``noise_values_large`` for the authors' full-size network): ``torch.randn`` from a seeded generator (the first
version, which the server could regenerate) against :func:`~fedoap.privacy.secure_random.secure_normal`, and the
whole ``clip_and_noise``.
"""

from __future__ import annotations

import io
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fedoap.config import MethodOptions, PrivacyOptions, RunConfig, TrainingOptions
from fedoap.data import DEFAULT_SITES, load_site
from fedoap.jsonio import to_jsonable, write_json
from fedoap.privacy.dp import DPSGDConfig, clip_and_noise, per_sample_loss
from fedoap.privacy.he import (
    HEConfig,
    add_encrypted,
    create_contexts,
    decrypt_average,
    encrypt_per_layer,
    encrypt_update,
    to_params,
)
from fedoap.privacy.secure_random import secure_normal
from fedoap.training import LocalTrainer, TrainConfig

__all__ = ["PrivacyBench", "bench_privacy"]

#: the CKKS parameters NVFlare's HEBuilder provisions by default (its HE recipe encrypts each tensor separately)
NVFLARE_HE = HEConfig(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40), global_scale_bits=40)


@dataclass(frozen=True)
class PrivacyBench:
    """What the privacy benchmark measures with: the run configuration's training and DP-SGD options (one source of
    truth with every other command), and the benchmark's own counts."""

    training: TrainingOptions
    privacy: PrivacyOptions
    n_sites: int = 3
    site: str = "brain"
    epochs: int = 2
    noise_values_large: int = 34_000_000  # about the authors' full-size FedOAP network

    def __post_init__(self) -> None:
        for name in ("n_sites", "epochs"):
            if getattr(self, name) < 1:
                flag = "--sites" if name == "n_sites" else "--epochs"
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")

    def model(self, method: str):
        """``method``'s network at the benchmark's width, seeded, with the method object."""
        run = RunConfig(training=self.training, method=MethodOptions(name=method))
        return run.build_model(), run.method.instance


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _he_rows(cfg: PrivacyBench) -> list[dict[str, Any]]:
    ours_server, ours_client = create_contexts(HEConfig())
    _, stock_client = create_contexts(NVFLARE_HE)
    rows = []
    for method_name in ("fedoap", "fedavg"):
        model, method = cfg.model(method_name)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        shared = {k: state[k] for k in method.shared_keys(model)}
        weights = [100 + 10 * i for i in range(cfg.n_sites)]
        updates = [{k: v + 1e-3 * i for k, v in shared.items()} for i in range(cfg.n_sites)]

        def serialize():
            buffer = io.BytesIO()
            torch.save(shared, buffer)
            return buffer.getbuffer().nbytes

        plain_bytes, plain_s = _timed(serialize)
        encrypted, enc_s = _timed(lambda: [encrypt_update(u, w, ours_client) for u, w in zip(updates, weights)])
        aggregate, add_s = _timed(lambda: add_encrypted(encrypted, ours_server))
        _, dec_s = _timed(lambda: decrypt_average(aggregate, ours_client))
        packed_bytes = int(sum(a.nbytes for a in to_params(encrypted[0]).values()))
        per_layer, per_layer_s = _timed(lambda: encrypt_per_layer(state, stock_client))
        per_layer_bytes = sum(len(c) for c in per_layer)
        n_shared = sum(v.numel() for v in shared.values())
        rows.append({
            "method": method_name,
            "shared_values": n_shared,
            "model_values": sum(v.numel() for v in state.values()),
            "plaintext_bytes": plain_bytes,
            "plaintext_serialize_s": plain_s,
            "packed_he_bytes": packed_bytes,
            "packed_he_ratio_to_fp32": packed_bytes / (4 * n_shared),
            "packed_he_encrypt_s": enc_s / cfg.n_sites,
            "packed_he_server_add_s": add_s,
            "packed_he_decrypt_s": dec_s,
            "nvflare_per_layer_he_bytes": per_layer_bytes,
            "nvflare_per_layer_he_encrypt_s": per_layer_s,
            "nvflare_per_layer_over_packed_bytes": per_layer_bytes / packed_bytes,
        })
    return rows


def _images_per_s(epoch: Callable[[], Any], n_images: int, epochs: int) -> float:
    epoch()  # warm-up
    _, seconds = _timed(lambda: [epoch() for _ in range(epochs)])
    return n_images * epochs / seconds


def _dp_rows(cfg: PrivacyBench, data_root: Path) -> dict[str, Any]:
    from opacus import PrivacyEngine

    t, p = cfg.training, cfg.privacy
    data = load_site(data_root / cfg.site, image_size=t.image_size, seed=t.seed, name=cfg.site)
    train_cfg = TrainConfig(batch_size=t.batch_size, lr=t.lr, seed=t.seed, augment=False)
    n = len(data.train)

    def trainer(dp: DPSGDConfig | None) -> LocalTrainer:
        model, method = cfg.model("fedoap")
        return LocalTrainer(model, method, data.train, data.val, train_cfg, dp=dp)

    def dp_rate(noise_source: str) -> tuple[float, LocalTrainer]:
        """Images trained on per second (what Poisson sampling drew), timed as the trainer reports them."""
        dp_cfg = DPSGDConfig(max_grad_norm=p.dp_sgd_clip, noise_multiplier=p.dp_sgd_noise, noise_source=noise_source)
        site = trainer(dp_cfg)
        site.train_round()  # warm-up
        rounds = [site.train_round() for _ in range(cfg.epochs)]
        images = sum(r["images_per_s"] * r["train_seconds"] for r in rounds)
        return images / sum(r["train_seconds"] for r in rounds), site

    plain = trainer(None)
    plain_rate = _images_per_s(plain.train_round, n, cfg.epochs)
    ours_rate, ours = dp_rate("chacha20")
    os_seeded_rate, _ = dp_rate("os_seeded")

    model, method = cfg.model("fedoap")
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(data.train.images), torch.from_numpy(data.train.labels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=p.dp_sgd_noise,
        max_grad_norm=p.dp_sgd_clip,
    )
    loss_fn = per_sample_loss(method.train_loss())

    def opacus_epoch() -> None:
        model.train()
        for images, labels in loader:
            if len(images) == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
            optimizer.step()

    opacus_rate = _images_per_s(opacus_epoch, n, cfg.epochs)
    return {
        "site": cfg.site,
        "n_train_images": n,
        "plain_images_per_s": plain_rate,
        "n_parameters": sum(p.numel() for p in ours.model.parameters()),
        "dp_sgd_ours_images_per_s": ours_rate,
        "dp_sgd_os_seeded_noise_images_per_s": os_seeded_rate,
        "dp_sgd_opacus_loop_images_per_s": opacus_rate,
        "ours_over_plain": ours_rate / plain_rate,
        "ours_over_opacus_loop": ours_rate / opacus_rate,
        "secure_noise_over_os_seeded": ours_rate / os_seeded_rate,
        "epsilon_after_bench_ours": ours.dp.epsilon(),
    }


def _noise_rows(cfg: PrivacyBench) -> list[dict[str, Any]]:
    """Seconds to noise one client-level release: a seeded ``torch.randn`` against ``secure_normal``, side by side."""
    model, method = cfg.model("fedoap")
    shared = sum(v.numel() for k, v in model.state_dict().items() if k in set(method.shared_keys(model)))
    secure_normal((1000,), 1.0)  # warm-up of the cipher's backend
    rows = []
    for n in (shared, cfg.noise_values_large):
        generator = torch.Generator().manual_seed(cfg.training.seed)
        _, randn_s = _timed(lambda: torch.randn(n, generator=generator))
        _, secure_s = _timed(lambda: secure_normal((n,), 1.0))
        update = {"shared": torch.full((n,), 1e-3)}
        _, clip_s = _timed(lambda: clip_and_noise(update, clip_norm=1.0, noise_multiplier=1.0))
        rows.append({"values": n, "seeded_torch_randn_s": randn_s, "secure_normal_s": secure_s,
                     "secure_over_randn": secure_s / randn_s, "clip_and_noise_s": clip_s,
                     "secure_normal_ns_per_value": 1e9 * secure_s / n})
    return rows


def bench_privacy(training: TrainingOptions, privacy: PrivacyOptions, n_sites: int = 3, epochs: int = 2,
                  out: str | os.PathLike = "runs/bench_privacy") -> dict[str, Any]:
    """Run the three parts, print the tables, write ``<out>/bench_privacy.json``; return the record.

    Args:
        training: network width, image size, batch size, seed and threads of the measurements.
        privacy: DP-SGD's noise multiplier (``dp_sgd_noise``, > 0) and clip norm.
        n_sites: sites whose updates the server combines. epochs: timed training epochs (after one warm-up).
    """
    from fedoap.simulation import synthetic_federation

    if privacy.dp_sgd_noise <= 0:
        raise ValueError(f"--dp-sgd-noise must be > 0 to measure DP-SGD, got {privacy.dp_sgd_noise}")
    cfg = PrivacyBench(training=training, privacy=privacy, n_sites=n_sites, epochs=epochs)
    threads = training.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus's hooks on an input without grad
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # the textbook Opacus loop's, as expected
    out = Path(out).resolve()
    data_root = synthetic_federation(out / "data", {cfg.site: DEFAULT_SITES[cfg.site]}, training.seed, 128,
                                     replace=True)

    he = _he_rows(cfg)
    dp = _dp_rows(cfg, data_root)
    noise = _noise_rows(cfg)
    record = {"benchmark": "privacy", "cpu": platform.processor() or platform.machine(), "torch_threads": threads,
              "config": to_jsonable(asdict(cfg)), "he_one_round_per_site": he, "dp_sgd_training": dp,
              "update_noise_seconds": noise}
    write_json(out / "bench_privacy.json", record)

    mb = 1e6
    print(f"One round, per site ({cfg.n_sites} sites; server time combines all of them)")
    header = (f"{'method':<8} {'shared':>10} {'plain MB':>9} {'packed HE MB':>13} {'x fp32':>7} {'enc s':>6} "
              f"{'server s':>9} {'dec s':>6} {'NVFlare HE MB':>14} {'enc s':>6} {'NVF/ours':>9}")
    print(header)
    print("-" * len(header))
    for r in he:
        print(f"{r['method']:<8} {r['shared_values']:>10,} {r['plaintext_bytes'] / mb:>9.2f} "
              f"{r['packed_he_bytes'] / mb:>13.2f} {r['packed_he_ratio_to_fp32']:>7.2f} {r['packed_he_encrypt_s']:>6.2f} "
              f"{r['packed_he_server_add_s']:>9.2f} {r['packed_he_decrypt_s']:>6.2f} "
              f"{r['nvflare_per_layer_he_bytes'] / mb:>14.2f} {r['nvflare_per_layer_he_encrypt_s']:>6.2f} "
              f"{r['nvflare_per_layer_over_packed_bytes']:>9.2f}")
    print(f"\nDP-SGD training on {dp['site']} ({dp['n_train_images']} images, batch {training.batch_size}, "
          f"sigma {privacy.dp_sgd_noise}, clip {privacy.dp_sgd_clip}), images/s")
    print(f"plain {dp['plain_images_per_s']:.1f} | ours (DP-SGD) {dp['dp_sgd_ours_images_per_s']:.1f} | "
          f"plain Opacus loop {dp['dp_sgd_opacus_loop_images_per_s']:.1f} | ours/plain {dp['ours_over_plain']:.2f} "
          f"| ours/Opacus {dp['ours_over_opacus_loop']:.2f}")
    print(f"noise source ({dp['n_parameters']:,} parameters): chacha20 (default) "
          f"{dp['dp_sgd_ours_images_per_s']:.1f} | os_seeded torch generator "
          f"{dp['dp_sgd_os_seeded_noise_images_per_s']:.1f} | "
          f"chacha20/os_seeded {dp['secure_noise_over_os_seeded']:.2f}")
    print("\nNoise of one client-level release (seconds)")
    header = f"{'values':>12} {'seeded randn':>13} {'secure_normal':>14} {'x slower':>9} {'clip_and_noise':>15}"
    print(header)
    print("-" * len(header))
    for r in noise:
        print(f"{r['values']:>12,} {r['seeded_torch_randn_s']:>13.3f} {r['secure_normal_s']:>14.3f} "
              f"{r['secure_over_randn']:>9.1f} {r['clip_and_noise_s']:>15.3f}")
    print(f"[fedoap] wrote {out / 'bench_privacy.json'}")
    return record
