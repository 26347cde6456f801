"""The project's ready NVFlare jobs (``jobs/``), generated from ``FedOAPRecipe``: ``fedoap export-jobs``.

Every job carries no code (no ``app/custom/``): every site runs the fedoap package installed on it, so a submitter
needs no bring-your-own-code right and each site's class allow-list (``poc_workspace/local/resources.json``) decides
what may run. Its options are one file, ``app/config/fedoap_run.json`` (``fedoap.config.RunConfig``). No job names
a data path: each site reads its own from ``local/fedoap_site.json`` (``fedoap.site.site_config``). The server
tracks each site's per-round metrics (``fedoap.tracking``) as TensorBoard event files in ``tb_events/<site>/`` of the
job's server workspace (``--tracking none``: no receiver). ``byoc=True``
writes the same jobs with the whole package in ``app/custom/`` (bring-your-own-code); those are not committed.
Measured in POC: on a site with fedoap installed (which its privacy filter needs), a BYOC job's client script runs
from the job, but the modules it imports come from the installed package (already imported for the filter, and ahead
of the job's folder on ``sys.path``).

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

from fedoap.config import RobustnessOptions, RunConfig, TrainingOptions

__all__ = ["JOB_TRAINING", "MIN_CLIENTS", "JOBS", "build_recipe", "export_jobs", "job_names"]

#: the training every exported job runs with (a partial override of the defaults): 64 x 64 slices and a narrow
#: network, so that a 2-site POC on a CPU laptop learns a useful model in a few minutes under the sites' default
#: privacy budget (DP-SGD at epsilon 8 per slice, poc_workspace/local/privacy.json); live curves in TensorBoard event
#: files on the server (tensorboard is a dependency of fedoap; the receiver is on the shipped allow-list)
JOB_TRAINING = TrainingOptions(rounds=8, local_epochs=2, finetune_epochs=15, image_size=64, width=8, batch_size=16,
                               threads=1, tracking="tensorboard")
#: sites per round of every exported job (the POC's two)
MIN_CLIENTS = 2


@dataclass(frozen=True)
class _Job:
    description: str
    options: dict[str, Any] = field(default_factory=dict)  # the job's own options (flat names of RunConfig)


#: the exported jobs by folder name
JOBS: dict[str, _Job] = {
    "fedoap": _Job("FedOAP (DCA + adapter + PBL fine-tuning), no privacy option of its own", {"method": "fedoap"}),
    "fedoap_dp": _Job("FedOAP with sample-level DP-SGD (Opacus) calibrated to epsilon 8 per slice over the job, "
                      "delta 1e-5 (a site's budget may ask for less)",
                      {"method": "fedoap", "dp_sgd_epsilon": 8.0, "dp_delta": 1e-5}),
    "fedoap_he": _Job("FedOAP with homomorphic encryption of the shared update (TenSEAL CKKS; each site's context "
                      "from its own local/ folder: fedoap he-keys)", {"method": "fedoap", "he": True}),
    "fedoap_secagg": _Job("FedOAP with secure aggregation of the shared update (pairwise masks with dropout "
                          "recovery; each site's identity key and the roster from its own local/ folder: fedoap "
                          "secagg-keys)", {"method": "fedoap", "secagg": True}),
    "fedavg": _Job("FedAvg baseline (every parameter shared), personalized by the same fine-tuning",
                   {"method": "fedavg"}),
    "fedbn": _Job("FedBN baseline (normalization layers stay local)", {"method": "fedbn"}),
    "ditto": _Job("Ditto baseline (personal model with a proximal term to the global one)", {"method": "ditto"}),
    "fedmepd": _Job("FedMEPD on multi-modal brain MRI with missing modalities (3D volumes of 32^3, regions "
                    "WT/TC/ET): modality encoders averaged over their owners, partially personalized decoder; the "
                    "server's training step and anchors need method_args.server_data, the server's own full-modal "
                    "folder (empty here: without it the job runs without anchors); no HE or secure aggregation",
                    {"method": "fedmepd", "task": "brats-missing-modality", "volume_size": 32}),
}


def job_names() -> list[str]:
    return list(JOBS)


def build_recipe(name: str, training: TrainingOptions = JOB_TRAINING, min_clients: int = MIN_CLIENTS,
                 robustness: Optional[RobustnessOptions] = None):
    """The ``FedOAPRecipe`` of job ``name`` (code pre-installed on the sites, data from site configuration), with the
    fault and robustness options ``robustness`` (default: the defaults; ``resume_from`` an interrupted job's id).

    Raises:
        ValueError: an unknown job name, or options the run configuration refuses.
    """
    from fedoap.deploy.recipe import FedOAPRecipe

    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; choose from {job_names()}")
    config = RunConfig(training=training, robustness=robustness or RobustnessOptions()).override(**JOBS[name].options)
    return FedOAPRecipe(config=config, name=name, min_clients=min_clients, installed_code=True)


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
                training: TrainingOptions = JOB_TRAINING, min_clients: int = MIN_CLIENTS,
                byoc: bool = False, robustness: Optional[RobustnessOptions] = None) -> list[Path]:
    """Export the jobs into ``out/<name>/`` (replacing those folders; other files in ``out`` are kept).

    Args:
        out: parent folder of the job folders.
        names: jobs to export (default: all of :data:`JOBS`).
        training: the training of every job; min_clients: sites per round.
        byoc: put the fedoap package into each job's ``app/custom/`` (bring-your-own-code).

    Returns:
        the job folders written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or job_names():
        recipe = build_recipe(name, training, min_clients, robustness)
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

