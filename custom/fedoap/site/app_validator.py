"""A site's check of every job it is asked to deploy, before anything of the job runs.

NVFlare lets a site add an ``app_validator`` to its ``local/resources.json``; the site's parent process calls it when
the server deploys a job, and a refusal fails the deployment with the validator's message in ``nvflare job meta``
(``job_deploy_detail``). :class:`FedOAPAppValidator` refuses a job whose client configuration

* is not plain JSON (``config_fed_client.conf``/``.yml`` would escape this check),
* configures :class:`fedoap.site.executor.FedOAPExecutor` with anything but the arguments a job may set (a script path
  or script arguments, a command, another execution mode, attach or launch settings), or
* carries a run configuration (``app/config/fedoap_run.json``) that is missing or invalid, references the site's
  secrets (``${...}``) or names data folders: a deployed site's data folders come only from its own configuration,

so that a job submitted without bring-your-own-code rights runs nothing but fedoap's own client script on the site's
own data. The executor repeats the same checks when the job starts (defence in depth, and the simulator, which deploys
no job, still gets them).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from nvflare.apis.app_validation import AppValidator

from fedoap.config import RUN_CONFIG_FILE
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
    return ""


class FedOAPAppValidator(AppValidator):
    """NVFlare app validator of a fedoap site (see the module docstring); list it in ``local/resources.json`` as
    ``"app_validator": {"path": "fedoap.site.app_validator.FedOAPAppValidator"}``."""

    def validate(self, app_folder: str) -> tuple[str, dict]:
        return refusal(app_folder), {}
