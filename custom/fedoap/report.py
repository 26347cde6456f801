"""What a user reads after a run: the results table and the figures (Dice per round per site; qualitative overlays
of image, ground truth and prediction, like FedOAP's Figure 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from fedoap.eval.metrics import EMPTY_MASK_RULE, LESION_FP_RULE
from fedoap.eval.volume import VOLUME_DICE_RULE

__all__ = ["results_table", "plot_dice_per_round", "plot_overlays"]


def _fmt(value: Any, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def _mean_of(values: list[Any]) -> Optional[float]:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def results_table(results: Mapping[str, Any]) -> str:
    """Plain-text table of the personalized models: one row per site, then the mean. Next to each Dice of
    EMPTY_MASK_RULE, the lesion Dice and empty-slice FP rate of LESION_FP_RULE (on the unseen organ the plain Dice is
    ~0 for every method as soon as it marks a few of the many empty slices)."""
    unseen = results.get("unseen", {})
    header = (f"{'site':<12} {'organ':<8} {'n_test':>6} {'Dice':>7} {'HD95 px':>8} {'3D Dice':>7} {'lesion':>7} "
              f"{'FP rate':>7} {'unseen organ':>13} {'unseen Dice':>11} {'lesion':>7} {'FP rate':>7}")
    lines = [f"{results['method']} after {results['rounds']} rounds (personalized models, test split)", header,
             "-" * len(header)]
    rows = [(site, row, unseen.get(site, {})) for site, row in sorted(results["clients"].items())]
    for site, row, u in rows:
        lines.append(
            f"{site:<12} {row['organ']:<8} {row['n_test']:>6} {_fmt(row['dice'], 3):>7} {_fmt(row['hd95'], 1):>8} "
            f"{_fmt(row['volume_dice'], 3) if 'volume_dice' in row else '-':>7} "
            f"{_fmt(row.get('lesion_dice'), 3):>7} {_fmt(row.get('empty_fp_rate'), 2):>7} "
            f"{u.get('organ', '-'):>13} {_fmt(u.get('dice'), 3):>11} {_fmt(u.get('lesion_dice'), 3):>7} "
            f"{_fmt(u.get('empty_fp_rate'), 2):>7}"
        )
    lines.append("-" * len(header))
    volume = [r["volume_dice"] for _, r, _ in rows if r.get("volume_dice") is not None]

    def mean(key: str, digits: int, of_unseen: bool = False) -> str:
        return _fmt(_mean_of([(u if of_unseen else r).get(key) for _, r, u in rows]), digits)

    lines.append(
        f"{'mean':<12} {'':<8} {'':>6} {mean('dice', 3):>7} {mean('hd95', 1):>8} "
        f"{_fmt(float(np.mean(volume)), 3) if volume else '':>7} {mean('lesion_dice', 3):>7} "
        f"{mean('empty_fp_rate', 2):>7} {'':>13} {mean('dice', 3, True):>11} {mean('lesion_dice', 3, True):>7} "
        f"{mean('empty_fp_rate', 2, True):>7}"
    )
    lines.append(EMPTY_MASK_RULE)
    lines.append("lesion = lesion Dice, FP rate = empty-image false-positive rate. " + LESION_FP_RULE)
    counts = {(u.get("n_lesion"), u.get("n_empty")) for u in unseen.values()}
    if len(counts) == 1 and None not in next(iter(counts)):
        n_lesion, n_empty = next(iter(counts))
        lines.append(f"Unseen organ: {n_lesion} slices with tumour, {n_empty} empty slices.")
    if volume:
        lines.append("3D Dice (3D sites): per test case over its stacked slices at the training size. "
                     + VOLUME_DICE_RULE)
    return "\n".join(lines)


def plot_dice_per_round(history: Mapping[str, Any], results: Mapping[str, Any], path: Path) -> Path:
    """Validation Dice of each site's model after every round, and the personalized test Dice at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    sites = sorted({s for r in history["rounds"] for s in r["sites"]})
    for i, site in enumerate(sites):
        rounds = [r["round"] + 1 for r in history["rounds"] if site in r["sites"]]
        dice = [r["sites"][site].get("val_dice") for r in history["rounds"] if site in r["sites"]]
        dice = [np.nan if d is None else d for d in dice]
        (line,) = ax.plot(rounds, dice, marker="o", ms=3, label=f"{site} (val)")
        final = results["clients"].get(site, {}).get("dice")
        if final is not None:
            ax.scatter([len(history["rounds"]) + 1], [final], color=line.get_color(), marker="*", s=90, zorder=3)
    ax.set_xlabel("round (star: personalized model, test split)")
    ax.set_ylabel("Dice per image (mean)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{history.get('method', '')}: Dice per round per site")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_overlays(overlays: Mapping[str, Mapping[str, np.ndarray]], path: Path, per_site: int = 2) -> Path:
    """Rows: examples of each site's test split; columns: image, ground truth, prediction, overlay
    (green: ground truth only, red: prediction only, yellow: both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(site, i) for site in sorted(overlays) for i in range(min(per_site, len(overlays[site]["image"])))]
    if not rows:
        raise ValueError("no overlay examples to plot")
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for r, (site, i) in enumerate(rows):
        image, label, pred = (overlays[site][k][i] for k in ("image", "label", "pred"))
        span = np.ptp(image)
        gray = (image - image.min()) / (span if span > 0 else 1.0)
        rgb = np.stack([gray] * 3, axis=-1) * 0.7
        rgb[(label > 0) & (pred <= 0)] = (0.1, 0.9, 0.1)
        rgb[(label <= 0) & (pred > 0)] = (0.95, 0.1, 0.1)
        rgb[(label > 0) & (pred > 0)] = (0.95, 0.9, 0.1)
        for c, (img, title) in enumerate(((gray, "image"), (label, "ground truth"), (pred, "prediction"), (rgb, "overlay"))):
            ax = axes[r, c]
            ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(site, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
