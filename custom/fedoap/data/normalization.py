"""How a site's intensities become [0, 1], as a plain description and as the MONAI transform it names.

Training (:mod:`fedoap.data.loader`), ``fedoap predict`` and the exported MONAI bundle must normalize a scan the same
way, so the rule is written down once here: a JSON-able description that a model file records
(:func:`normalization_for`) and the one MONAI transform it stands for (:func:`normalizer`).
"""

from __future__ import annotations

from typing import Any, Mapping

from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles, Transform

__all__ = ["CT_WINDOWS", "MRI_PERCENTILES", "MODALITY_FAMILIES", "modality_family", "normalization_for",
           "normalizer", "normalizer_args"]

CT_WINDOWS: dict[str, tuple[float, float]] = {"default": (-200.0, 250.0), "lung": (-1000.0, 400.0)}
"""
HU window ``(low, high)`` mapped to [0, 1] for CT sites, keyed by organ. Soft-tissue organs use
``"default"``; lung needs the wide window, otherwise the aerated parenchyma and the nodules inside it
are clipped to the same value.
"""

MRI_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Per-volume intensity percentiles mapped to [0, 1] for MRI sites (MR intensities have no physical unit)."""

MODALITY_FAMILIES: dict[str, str] = {
    "CT": "CT",
    "MRI": "MRI",
    "MR": "MRI",
    "FLAIR": "MRI",
    "T1": "MRI",
    "T1W": "MRI",
    "T1GD": "MRI",
    "T2": "MRI",
    "T2W": "MRI",
    "ADC": "MRI",
    "DWI": "MRI",
    "US": "US",
    "ULTRASOUND": "US",
}
"""MSD modality names (``dataset.json``'s ``modality["0"]``) by the family that picks the normalization."""


def modality_family(raw: str) -> str:
    """The family ("CT", "MRI", "US") of an MSD modality name, or the name itself when unknown."""
    return MODALITY_FAMILIES.get(str(raw).upper(), str(raw))


def normalization_for(modality: str, organ: str) -> dict[str, Any]:
    """The per-volume normalization of a site: an HU window for CT, percentiles for MRI, the 8-bit range otherwise.

    Returns:
        ``{"kind": "window", "a_min": .., "a_max": ..}`` or ``{"kind": "percentiles", "lower": .., "upper": ..}``
        (both map to [0, 1] and clip).
    """
    if modality == "CT":
        low, high = CT_WINDOWS.get(organ, CT_WINDOWS["default"])
        return {"kind": "window", "a_min": low, "a_max": high}
    if modality == "MRI":
        return {"kind": "percentiles", "lower": MRI_PERCENTILES[0], "upper": MRI_PERCENTILES[1]}
    return {"kind": "window", "a_min": 0.0, "a_max": 255.0}


def normalizer_args(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The MONAI transform's name and keyword arguments for a description of :func:`normalization_for` (what a
    MONAI bundle's config writes).

    Raises:
        ValueError: an unknown kind, or a missing or non-numeric bound.
    """
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    names = {"window": ("ScaleIntensityRange", ("a_min", "a_max")),
             "percentiles": ("ScaleIntensityRangePercentiles", ("lower", "upper"))}
    if kind not in names:
        raise ValueError(f"normalization kind must be one of {sorted(names)}, got {kind!r}")
    name, keys = names[kind]
    bounds = [spec.get(k) for k in keys]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds) or bounds[0] >= bounds[1]:
        raise ValueError(f"normalization {kind!r} needs numbers {keys[0]} < {keys[1]}, got {bounds}")
    return name, {keys[0]: float(bounds[0]), keys[1]: float(bounds[1]), "b_min": 0.0, "b_max": 1.0, "clip": True}


def normalizer(spec: Mapping[str, Any]) -> Transform:
    """The MONAI transform of a description of :func:`normalization_for` (applied to a whole volume at once)."""
    name, kwargs = normalizer_args(spec)
    return {"ScaleIntensityRange": ScaleIntensityRange,
            "ScaleIntensityRangePercentiles": ScaleIntensityRangePercentiles}[name](**kwargs)
