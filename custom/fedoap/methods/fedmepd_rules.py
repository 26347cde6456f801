"""FedMEPD's aggregation, personalization and anchor rules as pure functions (torch only, no NVIDIA FLARE).

From Liu et al., "Federated Modality-specific Encoders and Partially Personalized Fusion Decoder for Multimodal Brain
Tumor Segmentation" (FedMEPD), arXiv:2603.04887 (rules and constants read from the authors' code,
github.com/ccarliu/FedMEPD; not copied):

- :func:`owner_mean`: the server averages each modality's encoder only over the sites that have that modality; the
  fusion decoder over every site. (The authors additionally give a site's personal decoder filters weight 0 in the
  decoder average and keep 30% of the server's own decoder; those are left to the method.)
- :func:`filter_cosines` and :class:`FilterPersonalization`: per decoder filter (output channel), the cosine between
  the server's update of the round and the site's own update; a filter whose cosine stays negative for ``patience``
  consecutive rounds (authors: 10, after 30 warm-up rounds that the caller skips) becomes personal to the site.
- :func:`class_prototypes`, :func:`kmeans`, :func:`kmeans_anchors`, :func:`assign_to_anchors`,
  :func:`cluster_means`, :func:`ema`: the server's multi-scale class anchors, k-means clusters (authors: k=4, 30
  iterations, faiss) of per-image class prototypes of its full-modal fused features, then updated every round by an
  exponential moving average (authors: momentum 0.999).

Where the cosine is computed (and why it works under homomorphic encryption): on the SITE. After round ``r`` the site
holds, in clear, (a) its own update of the round, ``u_site = local_after_training - local_before_training``, which
it computed itself and never sends in clear, and (b) the new global model, which it decrypts (under HE the sites
hold the secret key) or receives in clear; the server's update is ``u_server = global_r - global_{r-1}``, both of
which the site has received. So the site evaluates ``filter_cosines(u_server, u_site, groups)`` locally, updates its
:class:`FilterPersonalization` and merges (:meth:`FilterPersonalization.merge`) the new global model into its own,
keeping its personal filters. The server needs no site's clear update, no cosine and not even the personal mask; it
only aggregates ciphertexts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FilterPersonalization",
    "assign_to_anchors",
    "class_prototypes",
    "cluster_means",
    "ema",
    "filter_cosines",
    "kmeans",
    "kmeans_anchors",
    "owner_mean",
    "state_delta",
]


# ---------------------------------------------------------------------------------------------------- aggregation
def _check_weight(weight: object, index: int) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"update {index}: the weight must be a finite number > 0, got {weight!r}.")
    return float(weight)


def _weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Sum of ``w_i t_i`` over ``sum w_i``, accumulated in float64, returned in the first tensor's dtype."""
    first = tensors[0]
    if not first.is_floating_point():  # e.g. an integer buffer: taken from the first contributor
        return first.clone()
    total = sum(weights)
    acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for t, w in zip(tensors, weights):
        if t.shape != first.shape:
            raise ValueError(f"tensors of one key differ in shape: {tuple(first.shape)} and {tuple(t.shape)}.")
        acc += t.detach().to(device=first.device, dtype=torch.float64) * (w / total)
    return acc.to(first.dtype)


def owner_mean(
    updates: Sequence[tuple[Mapping[str, Tensor], float, Iterable[str]]],
    modality_keys: Mapping[str, Sequence[str]],
) -> dict[str, Tensor]:
    """
    FedMEPD's server aggregation: every modality's encoder averaged (weighted) over its owners only.

    Args:
        updates: one ``(state, weight, modalities)`` per site: its shared parameters (or their updates), its
            aggregation weight (> 0) and the set of modalities it has.
        modality_keys: for each modality, the keys of its encoder (``FedMEPDNet.modality_keys()``).

    Returns:
        ``{key: mean}``. A modality's keys: ``sum w_i x_i / sum w_i`` over the sites that own the modality (what a
        non-owner sends under those keys is ignored); the keys of a modality nobody has are absent. Every other key
        (the decoder): the weighted mean over all sites.

    Raises:
        ValueError: no updates; a bad weight; an unknown modality; a key listed under two modalities; an owner that
            lacks one of its modality's keys; sites that disagree on the other keys or on a shape.
    """
    if not updates:
        raise ValueError("owner_mean needs at least one update.")
    owner_of: dict[str, str] = {}
    for modality, keys in modality_keys.items():
        for key in keys:
            if key in owner_of:
                raise ValueError(f"key {key!r} is listed under modalities {owner_of[key]!r} and {modality!r}.")
            owner_of[key] = modality
    parsed = []
    for i, (state, weight, modalities) in enumerate(updates):
        mods = set(modalities)
        unknown = mods - set(modality_keys)
        if unknown:
            raise ValueError(f"update {i}: unknown modalities {sorted(unknown)}; known: {sorted(modality_keys)}.")
        parsed.append((state, _check_weight(weight, i), mods))

    result: dict[str, Tensor] = {}
    for modality, keys in modality_keys.items():
        owners = [(state, w) for state, w, mods in parsed if modality in mods]
        if not owners:
            continue
        for key in keys:
            missing = [i for i, (state, _) in enumerate(owners) if key not in state]
            if missing:
                raise ValueError(f"an owner of {modality!r} lacks key {key!r}.")
            result[key] = _weighted_mean([state[key] for state, _ in owners], [w for _, w in owners])

    common = [k for k in parsed[0][0] if k not in owner_of]
    for i, (state, _, _) in enumerate(parsed):
        others = {k for k in state if k not in owner_of}
        if others != set(common):
            raise ValueError(
                f"update {i} disagrees with update 0 on the non-encoder keys: "
                f"extra {sorted(others - set(common))}, missing {sorted(set(common) - others)}."
            )
    weights = [w for _, w, _ in parsed]
    for key in common:
        result[key] = _weighted_mean([state[key] for state, _, _ in parsed], weights)
    return result


def state_delta(after: Mapping[str, Tensor], before: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``after - before`` for every key of ``after`` (an update: e.g. ``global_r - global_{r-1}`` on the site).

    Raises:
        ValueError: a key of ``after`` missing from ``before`` or a shape mismatch.
    """
    out = {}
    for key, value in after.items():
        if key not in before:
            raise ValueError(f"key {key!r} is missing from the earlier state.")
        if before[key].shape != value.shape:
            raise ValueError(f"key {key!r}: shapes {tuple(value.shape)} and {tuple(before[key].shape)} differ.")
        out[key] = value.detach() - before[key].detach().to(value.device)
    return out


# ---------------------------------------------------------------------------------------------------- personalization
def _group_parts(group: Any) -> tuple[str, tuple[tuple[str, int], ...]]:
    """``(name, ((key, dim), ...))`` of a ``FilterGroup`` (or of any ``(name, members, ...)`` tuple)."""
    if hasattr(group, "name") and hasattr(group, "members"):
        return str(group.name), tuple((str(k), int(d)) for k, d in group.members)
    name, members = group[0], group[1]
    return str(name), tuple((str(k), int(d)) for k, d in members)


def _filter_matrix(state: Mapping[str, Tensor], members: Sequence[tuple[str, int]], name: str) -> Tensor:
    """The group's tensors of ``state`` as a ``(filters, values per filter)`` float64 matrix."""
    rows = []
    for key, dim in members:
        if key not in state:
            raise ValueError(f"filter group {name!r}: key {key!r} is missing.")
        t = state[key].detach().to(torch.float64)
        rows.append(t.movedim(dim, 0).reshape(t.shape[dim], -1))
    n = rows[0].shape[0]
    if any(r.shape[0] != n for r in rows):
        raise ValueError(f"filter group {name!r}: members disagree on the number of filters.")
    return torch.cat(rows, dim=1)


def filter_cosines(
    server_update: Mapping[str, Tensor], site_update: Mapping[str, Tensor], groups: Iterable[Any]
) -> dict[str, Tensor]:
    """
    Per decoder filter, the cosine between the server's update and the site's update of that filter.

    Filter ``i`` of a group is the slice ``i`` along each member's filter dimension (weight, bias, affine norm),
    flattened and concatenated. The cosine of a filter whose update is zero on either side is 0 (so it counts as
    non-negative). Computed on the site (see the module docstring: it needs no clear site update at the server).

    Args:
        server_update: the server's update of the round, ``global_r - global_{r-1}`` (the site has both).
        site_update: the site's own update of the round, ``after_training - before_training``.
        groups: ``FedMEPDNet.decoder_filter_groups()`` (``FilterGroup``s or ``(name, ((key, dim), ...))`` tuples).

    Returns:
        ``{group name: float64 tensor (filters,)}`` with values in ``[-1, 1]``.

    Raises:
        ValueError: a missing key or inconsistent shapes.
    """
    out = {}
    for group in groups:
        name, members = _group_parts(group)
        a = _filter_matrix(server_update, members, name)
        b = _filter_matrix(site_update, members, name)
        if a.shape != b.shape:
            raise ValueError(f"filter group {name!r}: server and site updates differ in shape.")
        norms = a.norm(dim=1) * b.norm(dim=1)
        dots = (a * b).sum(dim=1)
        cos = torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))
        out[name] = cos.clamp(-1.0, 1.0)
    return out


class FilterPersonalization:
    """
    A site's per-filter personalization state of FedMEPD's fusion decoder.

    For every decoder filter a counter of consecutive rounds whose cosine (:func:`filter_cosines`) was negative:
    ``cos < 0`` adds 1, ``cos >= 0`` resets it to 0. When the counter reaches ``patience`` the filter becomes
    personal to the site, for good: from then on the site keeps its own values of that filter and ignores the
    server's (:meth:`merge`); its counter no longer changes. (The authors count down from ``patience`` and reset on
    ``cos > 0``; a cosine of exactly 0 left their counter unchanged; here it resets.)

    Args:
        patience: consecutive negative rounds that make a filter personal (authors: 10).

    Raises:
        ValueError: ``patience`` not a positive integer.

    Example::

        >>> rule = FilterPersonalization(patience=10)
        >>> rule.update(filter_cosines(server_update, site_update, net.decoder_filter_groups()))
        >>> net.load_state_dict(rule.merge(new_global, net.state_dict(), net.decoder_filter_groups()), strict=False)
    """

    def __init__(self, patience: int = 10) -> None:
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience <= 0:
            raise ValueError(f"patience must be a positive integer, got {patience!r}.")
        self.patience = int(patience)
        self.counters: dict[str, Tensor] = {}
        self.personal: dict[str, Tensor] = {}

    def update(self, cosines: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """
        Count one round.

        Args:
            cosines: ``{group name: (filters,)}`` from :func:`filter_cosines`. A group seen for the first time starts
                with zero counters; a group missing from ``cosines`` is left as it is.

        Returns:
            ``{group name: bool (filters,)}``: the personal filters after this round (copies).

        Raises:
            ValueError: a group whose number of filters changed, or a non-finite cosine.
        """
        for name, cos in cosines.items():
            cos = cos.detach().flatten().cpu()
            if not torch.isfinite(cos).all():
                raise ValueError(f"filter group {name!r}: non-finite cosine.")
            if name not in self.counters:
                self.counters[name] = torch.zeros(cos.numel(), dtype=torch.int64)
                self.personal[name] = torch.zeros(cos.numel(), dtype=torch.bool)
            counter, personal = self.counters[name], self.personal[name]
            if counter.numel() != cos.numel():
                raise ValueError(f"filter group {name!r}: {cos.numel()} cosines for {counter.numel()} filters.")
            active = ~personal
            counter[active & (cos < 0)] += 1
            counter[active & (cos >= 0)] = 0
            personal |= counter >= self.patience
        return self.personal_masks()

    def personal_masks(self) -> dict[str, Tensor]:
        """``{group name: bool (filters,)}``: which filters are personal (copies)."""
        return {name: mask.clone() for name, mask in self.personal.items()}

    def merge(
        self, server_state: Mapping[str, Tensor], local_state: Mapping[str, Tensor], groups: Iterable[Any]
    ) -> dict[str, Tensor]:
        """
        The decoder state the site loads: the server's values, except the personal filters, which keep the site's.

        Args:
            server_state: the received (aggregated) decoder parameters.
            local_state: the site's current parameters (at least the groups' keys).
            groups: ``FedMEPDNet.decoder_filter_groups()``.

        Returns:
            ``{key: tensor}`` for every key of ``server_state``; a key of a group with personal filters has those
            filters (slices along its filter dimension) from ``local_state``.

        Raises:
            ValueError: a group key missing from ``local_state`` while the group has personal filters.
        """
        out = {k: v.detach().clone() for k, v in server_state.items()}
        for group in groups:
            name, members = _group_parts(group)
            mask = self.personal.get(name)
            if mask is None or not bool(mask.any()):
                continue
            for key, dim in members:
                if key not in out:
                    continue
                if key not in local_state:
                    raise ValueError(f"filter group {name!r}: the local state lacks {key!r}.")
                target = out[key]
                shape = [1] * target.ndim
                shape[dim] = target.shape[dim]
                keep = mask.to(target.device).reshape(shape)
                out[key] = torch.where(keep, local_state[key].detach().to(target.device, target.dtype), target)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"patience": int, "counters": {name: int64}, "personal": {name: bool}}`` (copies; JSON + tensors)."""
        return {
            "patience": self.patience,
            "counters": {k: v.clone() for k, v in self.counters.items()},
            "personal": {k: v.clone() for k, v in self.personal.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: a malformed state (missing entries, different groups in the two maps, shape mismatch).
        """
        try:
            patience, counters, personal = state["patience"], state["counters"], state["personal"]
        except (KeyError, TypeError):
            raise ValueError("a FilterPersonalization state needs 'patience', 'counters' and 'personal'.") from None
        if set(counters) != set(personal):
            raise ValueError("counters and personal masks name different filter groups.")
        for name in counters:
            if torch.as_tensor(counters[name]).numel() != torch.as_tensor(personal[name]).numel():
                raise ValueError(f"filter group {name!r}: counter and mask sizes differ.")
        self.__init__(int(patience))  # validates patience
        self.counters = {k: torch.as_tensor(v).flatten().to(torch.int64).clone() for k, v in counters.items()}
        self.personal = {k: torch.as_tensor(v).flatten().to(torch.bool).clone() for k, v in personal.items()}


# ---------------------------------------------------------------------------------------------------- anchors
def class_prototypes(
    features: Tensor, regions: Tensor, include_background: bool = True
) -> tuple[Tensor, Tensor]:
    """
    Per image and class, the masked average of a feature map (the authors' ``getClsPrototypes``).

    The label masks are average-pooled to the feature resolution, which gives exactly the authors' masked average
    over nearest-upsampled features when the sizes divide. Classes: background (``1 - any(regions)``, when
    ``include_background``) then every region channel (WT, TC, ET).

    Args:
        features: ``(B, C, h, w, d)``.
        regions: ``(B, R, H, W, D)`` binary region masks, ``H, W, D`` multiples of ``h, w, d``.
        include_background: prepend the background class.

    Returns:
        ``(prototypes (B, K, C), present (B, K) bool)`` with ``K = R (+1)``; a class absent from an image has a zero
        prototype and ``present`` False (exclude it from the clustering; the authors kept such zero vectors).
    """
    if features.ndim != 5 or regions.ndim != 5 or features.shape[0] != regions.shape[0]:
        raise ValueError(f"expected (B, C, h, w, d) and (B, R, H, W, D), got {tuple(features.shape)}, "
                         f"{tuple(regions.shape)}.")
    if any(int(big) % int(small) for big, small in zip(regions.shape[2:], features.shape[2:])):
        raise ValueError("the label size must be a multiple of the feature size.")
    masks = (regions > 0.5).to(features.dtype)
    if include_background:
        masks = torch.cat([1.0 - masks.amax(dim=1, keepdim=True), masks], dim=1)
    present = masks.flatten(2).sum(dim=2) > 0
    weights = F.adaptive_avg_pool3d(masks, features.shape[2:])  # (B, K, h, w, d)
    sums = torch.einsum("bkn,bcn->bkc", weights.flatten(2), features.flatten(2))
    mass = weights.flatten(2).sum(dim=2, keepdim=True)
    protos = torch.where(mass > 0, sums / mass.clamp_min(1e-12), torch.zeros_like(sums))
    return protos.detach(), present


def _sq_dist(points: Tensor, centroids: Tensor) -> Tensor:
    """``(N, k)`` squared Euclidean distances, computed exactly (no matmul shortcut, so ties are reproducible)."""
    return ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(dim=-1)


def kmeans(points: Tensor, k: int, iters: int = 30, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """
    Lloyd's k-means with k-means++ seeding, deterministic given ``generator`` (a CPU ``torch.Generator``).

    Seeding draws the first centre uniformly and each next one with probability proportional to the squared distance
    to the nearest chosen centre (uniformly if all points coincide), all from ``generator``. Then at most ``iters``
    rounds of: assign every point to its nearest centre (ties: the lowest index), move every centre to the mean of
    its points; an empty cluster takes the point farthest from its centre. Stops early when the assignment no longer
    changes. Runs in float64 on the CPU. With fewer points than ``k``, the centres are the points repeated in order.

    Args:
        points: ``(N, C)``, ``N >= 1``.
        k: number of clusters, >= 1.
        iters: maximum Lloyd iterations, >= 0 (authors: 30).
        generator: source of randomness; None: a generator seeded with 0.

    Returns:
        ``(centroids (k, C) in points' dtype, labels (N,) int64)``.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (N, C) tensor, got shape {tuple(points.shape)}.")
    for label, value, low in (("k", k, 1), ("iters", iters, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}.")
    if not torch.isfinite(points).all():
        raise ValueError("points must be finite.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = points.detach().to("cpu", torch.float64)
    n = x.shape[0]
    if n <= k:
        idx = torch.arange(k) % n
        return x[idx].to(points.dtype), torch.arange(n, dtype=torch.int64)

    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = _sq_dist(x, x[chosen]).min(dim=1).values
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        else:
            nxt = int(torch.randint(n, (1,), generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(x, x[nxt : nxt + 1]).squeeze(1))
    centroids = x[chosen].clone()

    labels = torch.argmin(_sq_dist(x, centroids), dim=1)
    for _ in range(int(iters)):
        centroids = cluster_means(x, labels, k, fallback=centroids)
        dist = _sq_dist(x, centroids)
        counts = torch.bincount(labels, minlength=k)
        for c in torch.nonzero(counts == 0).flatten().tolist():  # an empty cluster takes the farthest point
            far = int(torch.argmax(dist.gather(1, labels[:, None]).squeeze(1)))
            centroids[c] = x[far]
            labels[far] = c
            dist = _sq_dist(x, centroids)
        new_labels = torch.argmin(dist, dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    centroids = cluster_means(x, labels, k, fallback=centroids)
    return centroids.to(points.dtype), labels


def kmeans_anchors(
    features_per_class: Mapping[int, Tensor],
    k: int = 4,
    iters: int = 30,
    seed: int = 0,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
    """
    The server's anchors of one scale: k-means (:func:`kmeans`) of the full-modal class prototypes, per class.

    One ``torch.Generator`` seeded with ``seed`` serves the classes in ascending order, so the result is a function
    of (inputs, k, iters, seed) only.

    Args:
        features_per_class: ``{class index: (N_c, C)}`` per-image prototypes of that class (:func:`class_prototypes`,
            absent classes removed); the classes must be ``0 .. K-1``.
        k: clusters per class (authors: 4; ``FedMEPDNet.anchors_per_class``).
        iters: Lloyd iterations (authors: 30).
        seed: the generator's seed.
        return_labels: also return each class's cluster labels (to keep the assignment for :func:`cluster_means`
            in later rounds, as the authors keep each server image's cluster).

    Returns:
        anchors ``(K, k, C)`` (``FedMEPDNet.set_anchors`` takes one per scale), and with ``return_labels`` the
        labels ``{class: (N_c,)}``.

    Raises:
        ValueError: classes not ``0 .. K-1``, empty classes, differing widths.
    """
    classes = sorted(features_per_class)
    if not classes or classes != list(range(len(classes))):
        raise ValueError(f"features_per_class must have the classes 0 .. K-1, got {classes}.")
    widths = {int(features_per_class[c].shape[-1]) for c in classes}
    if len(widths) != 1:
        raise ValueError(f"all classes must have the same feature width, got {sorted(widths)}.")
    gen = torch.Generator().manual_seed(int(seed))
    anchors, labels = [], {}
    for c in classes:
        centroids, lab = kmeans(features_per_class[c], k, iters, gen)
        anchors.append(centroids)
        labels[c] = lab
    stacked = torch.stack(anchors, dim=0)
    return (stacked, labels) if return_labels else stacked


def assign_to_anchors(points: Tensor, anchors: Tensor) -> Tensor:
    """Index of the nearest anchor (squared Euclidean; ties: the lowest index) of every point: ``(N, C), (k, C) ->
    (N,)``."""
    return torch.argmin(_sq_dist(points.to(torch.float64), anchors.to(torch.float64)), dim=1)


def cluster_means(points: Tensor, labels: Tensor, k: int, fallback: Tensor | None = None) -> Tensor:
    """
    The mean of each cluster's points, ``(k, C)``; a cluster without points takes ``fallback[c]`` (e.g. its current
    anchor, so that the EMA leaves it unchanged) or zeros.
    """
    x = points.to(torch.float64)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add(0, labels.to(torch.int64), x)
    counts = torch.bincount(labels.to(torch.int64), minlength=k).to(torch.float64)[:, None]
    means = sums / counts.clamp_min(1.0)
    if fallback is not None:
        means = torch.where(counts > 0, means, fallback.to(torch.float64))
    return means.to(points.dtype)


def ema(old: Tensor, new: Tensor, momentum: float = 0.999) -> Tensor:
    """
    Exponential moving average of the anchors: ``momentum * old + (1 - momentum) * new``.

    The authors use ``momentum = 0.999`` from the second federated round on (their first round replaces the k-means
    anchors by the cluster means of the fixed assignment, i.e. ``momentum = 0``).

    Raises:
        ValueError: ``momentum`` outside ``[0, 1]`` or shapes that differ.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}.")
    if old.shape != new.shape:
        raise ValueError(f"old and new must have the same shape, got {tuple(old.shape)} and {tuple(new.shape)}.")
    m = float(momentum)
    return old * m + new.to(old.dtype) * (1.0 - m)
