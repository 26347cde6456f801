"""Run the client script of the fedoap package installed on a site, so that a job carries no code.

NVFlare's ``ClientAPIExecutor`` (in-process) takes the training script as an absolute path, or as a path it looks
for under the job's ``custom/`` folder; a job with a ``custom/`` folder is bring-your-own-code (BYOC), which needs the
submitter's ``byoc`` right and skips the site's class allow-list. A job that names a script of a package installed
on every site (``pip install fedoap``) needs neither, but no absolute path is the same on every machine.

:class:`PackageScriptExecutor` keeps the script as a path relative to the Python import roots
(``"fedoap/fl/client.py"``) and resolves it when the job starts on the site: under the job's ``custom/`` folder if it
is there (a BYOC job), else through Python's import system (``fedoap.fl.client`` of the installed package).
:class:`PackageScriptRunner` puts it into a job (``FedOAPRecipe(installed_code=True)``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.job_config.script_runner import ScriptRunner

__all__ = ["PackageScriptExecutor", "PackageScriptRunner", "resolve_package_script"]


def resolve_package_script(script: str, custom_dir: Optional[str] = None) -> str:
    """Where a script named relative to the import roots lives on this site.

    Args:
        script: ``"fedoap/fl/client.py"``-style path (an absolute path is returned unchanged).
        custom_dir: the job's ``custom/`` folder on this site, if any.

    Returns:
        ``script`` unchanged when it is absolute or lies under ``custom_dir`` (NVFlare finds it there), else the file
        of the module Python imports for it.

    Raises:
        ValueError: not a ``.py`` path, or no such module is importable here.
    """
    if os.path.isabs(script):
        return script
    if custom_dir and os.path.isfile(os.path.join(custom_dir, script)):
        return script
    if not script.endswith(".py"):
        raise ValueError(f"script must be a .py path like 'fedoap/fl/client.py', got {script!r}")
    module = script[: -len(".py")].replace("/", ".").replace(os.sep, ".")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise ValueError(f"script {script!r} is neither in the job's custom folder nor an importable module "
                         f"({module}): install the package on this site (pip install fedoap), or submit the job "
                         "with its code (bring-your-own-code)")
    return spec.origin


class PackageScriptExecutor(ClientAPIExecutor):
    """``ClientAPIExecutor`` whose ``task_script_path`` may name a script of an installed package (see the module
    docstring). Same arguments as ``ClientAPIExecutor``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN and self._task_script_path:
            workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
            job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)
            custom_dir = workspace.get_app_custom_dir(job_id) if workspace is not None and job_id else None
            try:
                self._task_script_path = resolve_package_script(self._task_script_path, custom_dir)
            except ValueError as err:
                self.system_panic(str(err), fl_ctx)
                return
        super().handle_event(event_type, fl_ctx)


class PackageScriptRunner(ScriptRunner):
    """``ScriptRunner`` (in-process) that adds a :class:`PackageScriptExecutor` and copies no script into the job."""

    def add_to_fed_job(self, job, ctx, **kwargs):
        job.check_kwargs(args_to_check=kwargs, args_expected={"tasks": False})
        if self._execution_mode != ExecutionMode.IN_PROCESS:
            raise ValueError("PackageScriptRunner runs the script in-process only")
        executor = PackageScriptExecutor(
            execution_mode=self._execution_mode,
            task_script_path=self._script,
            task_script_args=self._script_args,
            params_exchange_format=self._params_exchange_format,
            server_expected_format=self._server_expected_format,
            params_transfer_type=self._params_transfer_type,
            memory_gc_rounds=self._memory_gc_rounds,
            cuda_empty_cache=self._cuda_empty_cache,
        )
        job.add_executor(executor, tasks=kwargs.get("tasks", ["*"]), ctx=ctx)
        return {}
