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
from typing import Any, Iterator

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
        # NVFlare deploys an app to <workspace>/<job id>/app_<site>: the site's policy is in <workspace>/local/
        privacy_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(app_folder))), "local",
                                    "privacy.json")
        try:
            reason = budget_refusal(os.path.join(config_dir, RUN_CONFIG_FILE), site_budgets(privacy_file))
        except ValueError as err:
            reason = str(err)
        if reason:
            return f"fedoap site policy: {reason}"
    return ""


_POLICY_PATH = "fedoap.site.policy.SiteDPPolicy"
_BUDGET_ARGS = ("epsilon", "delta", "unit", "clip_norm", "max_mean_noise")


def site_budgets(privacy_file: str) -> dict[str, list]:
    """Each privacy scope of the site's ``privacy.json`` with the per-job budgets of its SiteDPPolicy filters
    (``fedoap.privacy.budget.DPBudget``; [] for a scope without one), read as JSON: the site's parent process knows
    only the scopes' names (NVFlare builds their filters in each job's process) and must not import torch to vet a
    job. {} when the site has no privacy policy.

    Raises:
        ValueError: the file is not a readable policy, or a budget's arguments are invalid (named).
    """
    from fedoap.privacy.budget import DPBudget  # numpy only (the package's other modules load lazily)

    if not os.path.isfile(privacy_file):
        return {}
    try:
        with open(privacy_file) as f:
            policy = json.load(f)
        scopes = {scope["name"]: scope for scope in policy["scopes"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the site's privacy policy {privacy_file}: {err}") from None
    budgets: dict[str, list] = {}
    for name, scope in scopes.items():
        budgets[name] = []
        for component in _components([scope.get("task_data_filters", []), scope.get("task_result_filters", [])]):
            args = component.get("args") or {}
            if component["path"] == _POLICY_PATH and isinstance(args, dict) and "epsilon" in args:
                try:
                    budgets[name].append(DPBudget(**{k: args[k] for k in _BUDGET_ARGS if k in args}))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{privacy_file}: scope {name!r}: {err}") from None
    return budgets


def budget_refusal(run_config_path: str, budgets: dict[str, list]) -> str:
    """Why no privacy scope of this site can run the job at ``run_config_path`` within its per-job budget ("" if one
    can, or the site sets no budget); ``budgets``: :func:`site_budgets`. The site's data size is not read here (a
    deployment must be answered within seconds): DP-SGD's noise is checked when the job starts."""
    from fedoap.privacy.budget import BudgetRefusal, JobShape, plan_mechanism

    if not budgets:
        return ""
    with open(run_config_path) as f:
        document = json.load(f)
    training = TrainingOptions(**document.get("training", {}))
    privacy = PrivacyOptions(**document.get("privacy", {}))
    robustness = RobustnessOptions(**document.get("robustness", {}))
    shape = JobShape(rounds=training.rounds, local_epochs=training.local_epochs,
                     batch_size=privacy.dp_sgd_batch_size or training.batch_size, sites=robustness.min_responses or 1)
    reasons = []
    for name, scope_budgets in budgets.items():
        try:
            for budget in scope_budgets:
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
