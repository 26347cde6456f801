"""The project's ready NVFlare jobs (``jobs/``), generated from ``FedOAPRecipe``: ``fedoap export-jobs``.

Every job is exported with ``installed_code=True``: it carries no code (no ``app/custom/``), every site runs the
fedoap package installed on it, so a submitter needs no bring-your-own-code right and each site's class allow-list
(``poc_workspace/local/resources.json``) decides what may run. No job names a data path: each site reads its own
from ``local/fedoap_site.json`` (``fedoap.site.site_config``). ``byoc=True`` writes the same jobs with the whole
package in ``app/custom/`` (bring-your-own-code); those are not committed. Measured in POC: on a site with fedoap
installed (which its privacy filter needs), a BYOC job's client script runs from the job, but the modules it imports
come from the installed package (already imported for the filter, and ahead of the job's folder on ``sys.path``).

Exports are byte-deterministic: NVFlare's exporter writes keys in a fixed order, and nothing in the files depends on
the machine (no absolute path, no timestamp), so ``jobs/`` can be compared with a fresh export (``tests/test_jobs.py``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["JobSettings", "JOBS", "build_recipe", "export_jobs", "job_names"]


@dataclass(frozen=True)
class JobSettings:
    """Settings shared by every exported job: small, so that a POC on a CPU laptop finishes in minutes."""

    min_clients: int = 2
    rounds: int = 3
    local_epochs: int = 1
    finetune_epochs: int = 2
    image_size: int = 32
    width: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    threads: int = 1
    personalize: bool = True


@dataclass(frozen=True)
class _Job:
    method: str
    description: str
    he: bool = False
    dp: dict[str, Any] = field(default_factory=dict)
    method_args: dict[str, Any] = field(default_factory=dict)


#: the exported jobs by folder name
JOBS: dict[str, _Job] = {
    "fedoap": _Job("fedoap", "FedOAP (DCA + adapter + PBL fine-tuning), no privacy option of its own"),
    "fedoap_dp": _Job("fedoap", "FedOAP with sample-level DP-SGD (Opacus, sigma 1.0, clip 1.0) and client-level DP "
                                "of the shared update (clip 1.0, sigma 1.0)",
                      dp={"dp_sgd_noise": 1.0, "dp_sgd_clip": 1.0, "dp_update_clip": 1.0, "dp_update_noise": 1.0,
                          "dp_delta": 1e-5}),
    "fedoap_he": _Job("fedoap", "FedOAP with homomorphic encryption of the shared update (TenSEAL CKKS; each "
                                "site's context from its own local/ folder: fedoap he-keys)", he=True),
    "fedavg": _Job("fedavg", "FedAvg baseline (every parameter shared), personalized by the same fine-tuning"),
    "fedbn": _Job("fedbn", "FedBN baseline (normalization layers stay local)"),
    "ditto": _Job("ditto", "Ditto baseline (personal model with a proximal term to the global one)"),
}


def job_names() -> list[str]:
    return list(JOBS)


def build_recipe(name: str, settings: JobSettings = JobSettings()):
    """The ``FedOAPRecipe`` of job ``name`` (code pre-installed on the sites, data from site configuration).

    Raises:
        ValueError: an unknown job name, or a method the registry does not have.
    """
    from fedoap.deploy.recipe import FedOAPRecipe
    from fedoap.simulation import unet_model_args

    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; choose from {job_names()}")
    job = JOBS[name]
    s = settings
    return FedOAPRecipe(
        name=name,
        min_clients=s.min_clients,
        num_rounds=s.rounds,
        method=job.method,
        method_args=dict(job.method_args),
        model_args=unet_model_args(s.width),
        train_config={"image_size": s.image_size, "batch_size": s.batch_size, "lr": s.lr,
                      "local_epochs": s.local_epochs, "finetune_epochs": s.finetune_epochs, "seed": s.seed,
                      "threads": s.threads},
        personalize=s.personalize,
        he=job.he,
        dp=dict(job.dp),
        installed_code=True,
    )


def _normalize_json(folder: Path) -> None:
    """Rewrite every JSON file with 2-space indentation and a final newline, keys in NVFlare's order.

    Keys are deliberately not sorted: ``nvflare job submit`` (2.9.0) rewrites a job's config files on the way and
    mangles a file whose first key holds an object or a list (a sorted ``meta.json`` starting with ``deploy_map`` was
    submitted as ``{"app": ["@ALL"]}`` and refused: "deploy_map is empty"). NVFlare's exporter writes a scalar first
    (``name``, ``format_version``) and its order is deterministic.
    """
    for path in sorted(folder.rglob("*.json")):
        path.write_text(json.dumps(json.loads(path.read_text()), indent=2) + "\n")


def _copy_package(custom: Path) -> None:
    """The whole fedoap package (sources only) into a job's ``app/custom/`` (bring-your-own-code)."""
    import fedoap

    source = Path(fedoap.__file__).resolve().parent
    shutil.copytree(source, custom / "fedoap", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def export_jobs(out: str | Path = "jobs", names: Optional[Sequence[str]] = None,
                settings: JobSettings = JobSettings(), byoc: bool = False) -> list[Path]:
    """Export the jobs into ``out/<name>/`` (replacing those folders; other files in ``out`` are kept).

    Args:
        out: parent folder of the job folders.
        names: jobs to export (default: all of :data:`JOBS`).
        settings: settings shared by every job.
        byoc: put the fedoap package into each job's ``app/custom/`` (bring-your-own-code).

    Returns:
        the job folders written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or job_names():
        recipe = build_recipe(name, settings)
        with tempfile.TemporaryDirectory() as tmp:
            recipe.export(tmp)
            job_dir = Path(tmp) / name
            if byoc:
                _copy_package(job_dir / "app" / "custom")
            _normalize_json(job_dir)
            target = out / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(job_dir, target)
        written.append(target)
    return written

