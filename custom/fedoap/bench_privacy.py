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

Part 4, secure aggregation by pairwise masks (:mod:`fedoap.privacy.secagg`) on the same payload as part 1 (FedOAP's
shared vector, times each site's weight), one whole round with real keys for every count of ``secagg_sites``: the
complete graph (Bonawitz et al.) and the neighbour graph (SecAgg+, ``k = 2 * ceil(log2 n)`` neighbours per site, the
complete graph when that reaches ``n - 1``), with 0, 1 and 2 sites that mask and then drop (their vector never
arrives, they answer no unmask request: the server rebuilds their mask keys, its costly case). Per site and round:
bytes sent (advertisement, encrypted shares, the uint64 masked vector, the reveal) against plaintext and packed HE,
bytes received, and seconds (advertise + share_keys + masked_input + unmask, also as a fraction of one local training
round of part 2's plain trainer); the server's seconds (receive_keys + route_shares + add_masked + finish).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
from fedoap.privacy.secagg import SecAggConfig, SecAggError, ServerSecAgg, SiteSecAgg, dequantize
from fedoap.privacy.secure_random import secure_normal
from fedoap.training import LocalTrainer, TrainConfig

__all__ = ["PrivacyBench", "bench_privacy", "secagg_rows", "secagg_neighbours"]

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
    secagg_sites: tuple[int, ...] = (3, 10, 30)  # federation sizes of the secure aggregation part
    secagg_values: int = 0  # values per masked vector; 0: FedOAP's shared vector (part 1's payload)

    def __post_init__(self) -> None:
        for name in ("n_sites", "epochs"):
            if getattr(self, name) < 1:
                flag = "--sites" if name == "n_sites" else "--epochs"
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "secagg_sites", tuple(int(n) for n in self.secagg_sites))
        if any(n < 2 for n in self.secagg_sites):
            raise ValueError(f"secagg_sites must be counts >= 2, got {self.secagg_sites}")
        if self.secagg_values < 0:
            raise ValueError(f"secagg_values must be >= 0 (0: FedOAP's shared vector), got {self.secagg_values}")

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


def _fedoap_shared_vector(cfg: PrivacyBench) -> np.ndarray:
    """FedOAP's shared parameters as one float64 vector (sorted keys, as the masked payload lays them out)."""
    model, method = cfg.model("fedoap")
    state = model.state_dict()
    keys = sorted(method.shared_keys(model))
    return np.concatenate([state[k].detach().cpu().double().numpy().ravel() for k in keys])


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


def secagg_neighbours(n_sites: int) -> int:
    """The neighbour graph's degree for ``n`` sites: ``2 * ceil(log2 n)`` (SecAgg+ takes ``k = O(log n)``), or 0
    (the complete graph) when that reaches ``n - 1``."""
    k = 2 * math.ceil(math.log2(n_sites))
    return 0 if k >= n_sites - 1 else k


def _json_bytes(message: Any) -> int:
    return len(json.dumps(message, separators=(",", ":")).encode("utf-8"))


def _secagg_round(shared: np.ndarray, n_sites: int, neighbours: int, n_dropped: int, rnd: int,
                  identities: dict[str, Ed25519PrivateKey], ring_bits: int = 32) -> dict[str, Any]:
    """One round with real keys; the last ``n_dropped`` sites mask, then their vectors never arrive."""
    names = sorted(identities)[:n_sites]
    roster = {s: identities[s].public_key().public_bytes_raw() for s in names}
    config = SecAggConfig(neighbours=neighbours, ring_bits=ring_bits)
    job, n = "bench-privacy", shared.size
    weights = {s: 100.0 + 10 * i for i, s in enumerate(names)}
    scale = sum(weights.values())  # the round's common scale: the announced weights' total, as a job computes it
    dropped_sites = set(names[n_sites - n_dropped:])
    site_s = {s: 0.0 for s in names}
    up = {s: 0 for s in names}
    down = {s: 0 for s in names}
    server = ServerSecAgg(job, rnd, roster, n, config)
    sites, advertised = {}, {}
    for s in names:
        (sites[s], advertised[s]), seconds = _timed(lambda s=s: _advertise(s, identities[s], roster, job, rnd, config))
        site_s[s] += seconds
        up[s] += _json_bytes(advertised[s])
    relayed, server_s = _timed(lambda: server.receive_keys(advertised))
    shares = {}
    for s in names:
        down[s] += _json_bytes(relayed)
        shares[s], seconds = _timed(lambda s=s: sites[s].share_keys(relayed))
        site_s[s] += seconds
        up[s] += _json_bytes(shares[s])
    routed, seconds = _timed(lambda: server.route_shares(shares))
    server_s += seconds
    survivors = server.survivors
    expected = np.zeros(n)
    for i, s in enumerate(names):
        # an update the size of part 1's payload, times the site's share of the scale (what a job's site sends)
        values = (1e-2 * shared + 1e-3 * i) * (weights[s] / scale)
        down[s] += _json_bytes({"shares": routed[s], "survivors": survivors, "scale": scale})
        masked, seconds = _timed(lambda: sites[s].masked_input(values, routed[s], survivors,
                                                               summands=scale / weights[s]))
        site_s[s] += seconds
        up[s] += masked.nbytes
        if s in dropped_sites:
            continue
        expected += values
        _, seconds = _timed(lambda: server.add_masked(s, masked))
        server_s += seconds
    (sent, dropped), seconds = _timed(server.unmask_request)
    server_s += seconds
    reveals, refused = {}, []
    for s in sent:
        down[s] += _json_bytes({"sent": sent, "dropped": dropped})
        try:
            reveals[s], seconds = _timed(lambda s=s: sites[s].unmask(sent, dropped))
        except SecAggError:
            refused.append(s)
            continue
        site_s[s] += seconds
        up[s] += _json_bytes(reveals[s])
    error, max_abs_error = None, None
    try:
        total, seconds = _timed(lambda: server.finish(reveals))
        server_s += seconds
        max_abs_error = float(np.max(np.abs(dequantize(total, config.frac_bits) - expected)))
    except SecAggError as err:
        error = str(err)
    completed = [s for s in sent if s not in refused]  # the sites that went through every step
    mean = (lambda d: sum(d[s] for s in completed) / len(completed)) if completed else (lambda d: None)
    return {"ok": error is None, "error": error, "refused_unmask": len(refused), "max_abs_error": max_abs_error,
            "threshold_min": min(len(server.holders(s)) // 2 + 1 for s in names),
            "neighbours": len(server.holders(names[0])) - 1,
            "site_upload_bytes": mean(up), "site_download_bytes": mean(down), "site_s": mean(site_s),
            "site_s_max": max((site_s[s] for s in completed), default=None), "server_s": server_s}


def _advertise(site: str, identity: Ed25519PrivateKey, roster: dict[str, bytes], job: str, rnd: int,
               config: SecAggConfig) -> tuple[SiteSecAgg, dict[str, str]]:
    state = SiteSecAgg(site, identity, roster, job, rnd, config)
    return state, state.advertise()


def secagg_rows(shared: np.ndarray, sites: Sequence[int] = (3, 10, 30), dropouts: Sequence[int] = (0, 1, 2),
                plaintext_bytes: Optional[int] = None, he_bytes: Optional[int] = None,
                training_round_s: Optional[float] = None, ring_bits: int = 32) -> list[dict[str, Any]]:
    """One secure-aggregation round per federation size, graph (complete, ``k = 2 * ceil(log2 n)``) and count of
    sites that drop after masking; bytes and seconds per site and for the server (see the module's part 4).

    Args:
        shared: the flat vector every site sends (site ``i`` sends the update ``1e-2 * shared + 1e-3 * i`` times its
            share ``w_i / S`` of the round's scale, ``w_i = 100 + 10 i``, as a job's site does).
        ring_bits: the ring of the masked values (32, the jobs' default: the bytes of float32; or 64).
        plaintext_bytes, he_bytes: one site's upload in clear and under packed HE, to compare with (optional).
        training_round_s: seconds of one local training round, to give the site's time as a fraction of it.
    """
    shared = np.ascontiguousarray(shared, dtype=np.float64).ravel()
    identities = {f"site-{i:03d}": Ed25519PrivateKey.generate() for i in range(max(2, *sites))}
    _secagg_round(shared, 2, 0, 0, 0, identities, ring_bits)  # warm-up: the first round pays first calls
    rows, rnd = [], 0
    for n_sites in sites:
        k = secagg_neighbours(n_sites)
        for graph, neighbours in (("complete", 0), ("k=2ceil(log2 n)", k)):
            for n_dropped in dropouts:
                rnd += 1
                row = {"sites": n_sites, "graph": graph, "k": 2 * math.ceil(math.log2(n_sites)),
                       "dropped": n_dropped, "values": shared.size, "ring_bits": ring_bits}
                row.update(_secagg_round(shared, n_sites, neighbours, n_dropped, rnd, identities, ring_bits))
                up = row["site_upload_bytes"]
                row["site_upload_over_plaintext"] = up / plaintext_bytes if up and plaintext_bytes else None
                row["site_upload_over_packed_he"] = up / he_bytes if up and he_bytes else None
                row["site_s_over_training_round"] = (row["site_s"] / training_round_s
                                                     if row["site_s"] is not None and training_round_s else None)
                rows.append(row)
    return rows


def _print_secagg(rows: list[dict[str, Any]], training_round_s: Optional[float]) -> None:
    mb = 1e6
    values = rows[0]["values"] if rows else 0
    print(f"\nSecure aggregation, one round ({values:,} values per site; k = 2*ceil(log2 n) neighbours, the complete "
          "graph when k >= n-1; 'drop' sites mask, then never deliver nor answer unmask)")
    train = f"{'x train':>8} " if training_round_s else ""
    header = (f"{'sites':>5} {'graph':<16} {'nbrs':>4} {'drop':>4} {'up MB':>7} {'x plain':>7} {'x HE':>5} "
              f"{'down MB':>8} {'site s':>7} {train}{'server s':>9}  note")
    print(header)
    print("-" * len(header))
    for r in rows:
        def num(value, fmt):
            return format(value, fmt) if value is not None else format("-", ">" + fmt.split(".")[0].lstrip(">"))

        note = "" if r["ok"] else f"fails closed (t={r['threshold_min']})"
        share = f"{num(r['site_s_over_training_round'], '>8.3f')} " if training_round_s else ""
        up = r["site_upload_bytes"] / mb if r["site_upload_bytes"] is not None else None
        down = r["site_download_bytes"] / mb if r["site_download_bytes"] is not None else None
        print(f"{r['sites']:>5} {r['graph']:<16} {r['neighbours']:>4} {r['dropped']:>4} {num(up, '>7.2f')} "
              f"{num(r['site_upload_over_plaintext'], '>7.2f')} {num(r['site_upload_over_packed_he'], '>5.2f')} "
              f"{num(down, '>8.3f')} {num(r['site_s'], '>7.3f')} {share}{r['server_s']:>9.3f}  {note}")


def bench_privacy(training: TrainingOptions, privacy: PrivacyOptions, n_sites: int = 3, epochs: int = 2,
                  out: str | os.PathLike = "runs/bench_privacy", secagg_sites: Sequence[int] = (3, 10, 30),
                  secagg_values: int = 0) -> dict[str, Any]:
    """Run the four parts, print the tables, write ``<out>/bench_privacy.json``; return the record.

    Args:
        training: network width, image size, batch size, seed and threads of the measurements.
        privacy: DP-SGD's noise multiplier (``dp_sgd_noise``, > 0) and clip norm.
        n_sites: sites whose updates the server combines. epochs: timed training epochs (after one warm-up).
        secagg_sites: federation sizes of the secure aggregation part. secagg_values: values per masked vector
            (0: FedOAP's shared vector, part 1's payload; fewer: its first values).
    """
    from fedoap.simulation import synthetic_federation

    if privacy.dp_sgd_noise <= 0:
        raise ValueError(f"--dp-sgd-noise must be > 0 to measure DP-SGD, got {privacy.dp_sgd_noise}")
    cfg = PrivacyBench(training=training, privacy=privacy, n_sites=n_sites, epochs=epochs,
                       secagg_sites=tuple(secagg_sites), secagg_values=secagg_values)
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
    fedoap_he = next(r for r in he if r["method"] == "fedoap")
    shared = _fedoap_shared_vector(cfg)
    if cfg.secagg_values:
        shared = np.resize(shared, cfg.secagg_values)
    training_round_s = training.local_epochs * dp["n_train_images"] / dp["plain_images_per_s"]
    secagg = secagg_rows(shared, cfg.secagg_sites, (0, 1, 2), plaintext_bytes=4 * shared.size,
                         he_bytes=fedoap_he["packed_he_bytes"] * shared.size / fedoap_he["shared_values"],
                         training_round_s=training_round_s)
    record = {"benchmark": "privacy", "cpu": platform.processor() or platform.machine(), "torch_threads": threads,
              "config": to_jsonable(asdict(cfg)), "he_one_round_per_site": he, "dp_sgd_training": dp,
              "update_noise_seconds": noise,
              "secagg_one_round": {"values": shared.size, "frac_bits": SecAggConfig().frac_bits, "ring_bits": 32,
                                   "plaintext_fp32_bytes": 4 * shared.size,
                                   "training_round_s": training_round_s, "local_epochs": training.local_epochs,
                                   "rows": to_jsonable(secagg)}}
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
    _print_secagg(secagg, training_round_s)
    print(f"[fedoap] wrote {out / 'bench_privacy.json'}")
    return record
