"""A site's check of every job it is asked to deploy, before anything of the job runs.

NVFlare lets a site add an ``app_validator`` to its ``local/resources.json``; the site's parent process calls it when
the server deploys a job, and a refusal fails the deployment with the validator's message in ``nvflare job meta``
(``job_deploy_detail``). :class:`FedOAPAppValidator` refuses a job whose client configuration

* is not plain JSON (``config_fed_client.conf``/``.yml`` would escape this check),
* configures :class:`fedoap.site.executor.FedOAPExecutor` with anything but the arguments a job may set (a script path
  or script arguments, a command, another execution mode, attach or launch settings), or
* carries a run configuration (``app/config/fedoap_run.json``) that is missing or invalid, references the site's
  secrets (``${...}``) or names data folders: a deployed site's data folders come only from its own configuration, or
* cannot meet the site's privacy budget with a useful noise level under any of the site's privacy scopes
  (``fedoap.site.policy.SiteDPPolicy`` with ``epsilon``; ``fedoap.privacy.budget.plan_mechanism``), e.g. a budget
  that protects the whole site, for a job that averages 2 sites: the job's own process checks it again, under the
  job's scope and with the site's data size, when it starts,

so that a job submitted without bring-your-own-code rights runs nothing but fedoap's own client script on the site's
own data. The executor repeats the same checks when the job starts (defence in depth, and the simulator, which deploys
no job, still gets them).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

from nvflare.apis.app_validation import AppValidator

from fedoap.config import RUN_CONFIG_FILE, PrivacyOptions, RobustnessOptions, TrainingOptions
from fedoap.site.executor import FedOAPExecutor, refused_args, run_config_refusal

__all__ = ["FedOAPAppValidator", "EXECUTOR_PATH"]

EXECUTOR_PATH = f"{FedOAPExecutor.__module__}.{FedOAPExecutor.__name__}"
_CLIENT_CONFIG = "config_fed_client"


def _components(node: Any) -> Iterator[dict]:
    """Every ``{"path": ..., "args": ...}`` component in a configuration tree (executors, filters, nested args)."""
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for item in node:
            yield from _components(item)


def refusal(app_folder: str) -> str:
    """Why the app in ``app_folder`` must not run on this site ("" if it may)."""
    config_dir = os.path.join(app_folder, "config")
    if not os.path.isdir(config_dir):
        return ""
    names = [n for n in os.listdir(config_dir) if n.startswith(_CLIENT_CONFIG + ".")]
    if not names:
        return ""
    if names != [_CLIENT_CONFIG + ".json"]:
        return f"fedoap site policy: the job's client configuration must be one JSON file, got {sorted(names)}"
    try:
        with open(os.path.join(config_dir, names[0])) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        return f"fedoap site policy: cannot read the job's {names[0]}: {err}"
    executors = [c for c in _components(config) if c["path"] == EXECUTOR_PATH]
    for component in executors:
        args = component.get("args", {})
        if not isinstance(args, dict):
            return f"fedoap site policy: {EXECUTOR_PATH} args must be an object"
        reason = refused_args(args)
        if reason:
            return f"fedoap site policy: {reason}"
    if executors:
        # without building the method: the site's parent process must answer within NVFlare's deployment timeout
        # (10 s); the executor checks the method's arguments when the job starts
        reason = run_config_refusal(os.path.join(config_dir, RUN_CONFIG_FILE), simulate=False, build_method=False)
        if reason:
            return f"fedoap site policy: {reason}"
        reason = budget_refusal(os.path.join(config_dir, RUN_CONFIG_FILE))
        if reason:
            return f"fedoap site policy: {reason}"
    return ""


def _scope_budgets(scope: Any) -> list:
    """The per-job budgets of the SiteDPPolicy filters of an NVFlare privacy scope."""
    from fedoap.site.policy import SiteDPPolicy

    filters = [f for chains in (scope.task_data_filters, scope.task_result_filters) for chain in chains.values()
               for f in chain]
    return [f.budget for f in filters if isinstance(f, SiteDPPolicy) and f.budget is not None]


def budget_refusal(run_config_path: str, scopes: Optional[dict] = None) -> str:
    """Why no privacy scope of this site can run the job at ``run_config_path`` within its per-job budget ("" if one
    can, or the site defines no privacy policy). ``scopes``: name -> NVFlare ``Scope`` (default: the site's, from
    NVFlare's privacy service in this process). The site's data size is not read here (a deployment must be answered
    within seconds): DP-SGD's noise is checked when the job starts."""
    if scopes is None:
        from nvflare.private.privacy_manager import PrivacyService

        manager = PrivacyService.manager
        if manager is None or not manager.is_policy_defined():
            return ""
        scopes = manager.name_to_scopes
    # only now: the fedoap.privacy package imports torch, which a site whose policy names SiteDPPolicy has loaded
    from fedoap.privacy.budget import BudgetRefusal, JobShape, plan_mechanism
    with open(run_config_path) as f:
        document = json.load(f)
    training = TrainingOptions(**document.get("training", {}))
    privacy = PrivacyOptions(**document.get("privacy", {}))
    robustness = RobustnessOptions(**document.get("robustness", {}))
    shape = JobShape(rounds=training.rounds, local_epochs=training.local_epochs,
                     batch_size=privacy.dp_sgd_batch_size or training.batch_size, sites=robustness.min_responses or 1)
    reasons = []
    for name, scope in scopes.items():
        try:
            for budget in _scope_budgets(scope):
                plan_mechanism(budget, shape)
        except BudgetRefusal as err:
            reasons.append(f"scope {name!r}: {err}")
        else:
            return ""  # the job can run under this scope
    return "no privacy scope of this site can run the job within its budget: " + "; ".join(reasons)


class FedOAPAppValidator(AppValidator):
    """NVFlare app validator of a fedoap site (see the module docstring); list it in ``local/resources.json`` as
    ``"app_validator": {"path": "fedoap.site.app_validator.FedOAPAppValidator"}``."""

    def validate(self, app_folder: str) -> tuple[str, dict]:
        return refusal(app_folder), {}
