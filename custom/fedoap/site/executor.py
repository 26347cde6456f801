"""The only executor a fedoap job uses at a site: fedoap's own client script, in-process, with the job's run
configuration, and nothing else.

NVFlare's ``ClientAPIExecutor`` runs whatever a job names: any ``task_script_path`` it can import, or an external
``command`` (NVFlare's own default class allow-list leaves it out for that reason). A site that allow-listed it, or a
prefix admitting a subclass that passes its arguments through, would run arbitrary code for anyone allowed to submit
a job without bring-your-own-code rights. :class:`FedOAPExecutor` therefore takes no script path, command, execution
mode or script arguments at all: it always runs ``fedoap/site/client.py`` in-process (from the job's ``custom/``
folder in a bring-your-own-code job, else from the package installed on the site), and gives it one argument, the
path of the job's run configuration (``--run-config app/config/fedoap_run.json``, ``fedoap.config.RunConfig``), which
it checks first. A job that sets any other executor argument is refused with a ``ValueError`` naming it. In a deployed
site (not the simulator) it also refuses a run configuration that names data folders: there the data folders come
only from the site's own configuration (``local/fedoap_site.json``). The same checks run earlier, when the job is
deployed, through the site's app validator (``fedoap.site.app_validator``), so a refused job never starts and
``nvflare job meta`` says why.

:class:`fedoap.deploy.recipe.FedOAPScriptRunner` puts the executor and the run configuration into a job.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.client.config import ExchangeFormat, TransferType

from fedoap.config import RUN_CONFIG_FILE, RunConfig, check_document

__all__ = ["FedOAPExecutor", "CLIENT_SCRIPT", "ALLOWED_ARGS", "resolve_client_script", "refused_args",
           "run_config_refusal"]

#: the one script the executor runs, relative to the Python import roots (and to a BYOC job's custom folder)
CLIENT_SCRIPT = "fedoap/site/client.py"
#: the executor arguments a job may set; everything else (script path and arguments, command, execution mode, launch
#: and attach settings) is fixed here
ALLOWED_ARGS = frozenset({"params_exchange_format", "server_expected_format", "params_transfer_type",
                          "memory_gc_rounds", "cuda_empty_cache"})


def refused_args(args: dict[str, Any]) -> Optional[str]:
    """Why a job's executor arguments are refused, or None if they are acceptable."""
    extra = sorted(set(args) - ALLOWED_ARGS)
    if extra:
        return (f"FedOAPExecutor runs only fedoap's own client script in-process, with the job's run configuration "
                f"({RUN_CONFIG_FILE}); the job sets {extra}, which a job may not set (allowed: {sorted(ALLOWED_ARGS)})")
    return None


def run_config_refusal(path: str, simulate: bool = False, build_method: bool = True) -> Optional[str]:
    """Why the run configuration at ``path`` (a job's ``app/config/fedoap_run.json``) must not run here, or None.

    Args:
        simulate: the job runs in NVFlare's simulator, where the data folders come from the job.
        build_method: check the method's arguments too, by building it (imports torch and every method: not in a
            site's parent process, which must answer a deployment within NVFlare's timeout).
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        return f"the job carries no readable run configuration {RUN_CONFIG_FILE} ({err.strerror})"
    if "${" in text:
        return "the run configuration may not reference the site's secrets or environment (${...})"
    try:
        data = RunConfig.from_json(text).data if build_method else check_document(text)
    except ValueError as err:
        return f"invalid run configuration {RUN_CONFIG_FILE}: {err}"
    folders = data.set_fields()
    if folders and not simulate:
        return (f"the job's run configuration sets {folders}: in a deployed site the data folders come only from the "
                "site's own configuration (local/fedoap_site.json), never from a job")
    return None


def resolve_client_script(custom_dir: Optional[str] = None) -> str:
    """Where :data:`CLIENT_SCRIPT` lives on this site: under the job's ``custom/`` folder in a bring-your-own-code
    job (NVFlare finds it there by this relative path), else the file of the installed ``fedoap.site.client``.

    Raises:
        ValueError: fedoap is not installed here and the job carries no copy.
    """
    if custom_dir and os.path.isfile(os.path.join(custom_dir, CLIENT_SCRIPT)):
        return CLIENT_SCRIPT
    spec = importlib.util.find_spec("fedoap.site.client")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise ValueError("fedoap.site.client is not importable on this site: install the package (pip install fedoap)")
    return spec.origin


class FedOAPExecutor(ClientAPIExecutor):
    """Runs fedoap's client script in-process with the job's run configuration (see the module docstring); a job may
    set only :data:`ALLOWED_ARGS`.

    Raises:
        ValueError: the job sets any other argument (a script path or arguments, a command, an execution mode, ...).
    """

    def __init__(
        self,
        params_exchange_format: str = ExchangeFormat.PYTORCH,
        server_expected_format: str = ExchangeFormat.PYTORCH,
        params_transfer_type: str = TransferType.FULL,
        memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        **refused: Any,
    ) -> None:
        reason = refused_args(refused)
        if reason:
            raise ValueError(reason)
        super().__init__(
            execution_mode=ExecutionMode.IN_PROCESS,
            task_script_path=CLIENT_SCRIPT,
            params_exchange_format=params_exchange_format,
            server_expected_format=server_expected_format,
            params_transfer_type=params_transfer_type,
            memory_gc_rounds=memory_gc_rounds,
            cuda_empty_cache=cuda_empty_cache,
        )
        # stored under the constructor's names, so that NVFlare's job export writes them back
        self.params_exchange_format = params_exchange_format
        self.server_expected_format = server_expected_format
        self.params_transfer_type = params_transfer_type
        self.memory_gc_rounds = memory_gc_rounds
        self.cuda_empty_cache = cuda_empty_cache

    def script_arguments(self, fl_ctx: FLContext) -> str:
        """The client script's one argument, ``--run-config PATH``, once the job's run configuration passed
        :func:`run_config_refusal`; also points the executor at the script on this site.

        Raises:
            ValueError: why the job must not run here.
        """
        simulate = bool(fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False))
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)
        if workspace is None or not job_id:
            raise ValueError("FedOAPExecutor needs the site's workspace and the job id to find the run configuration")
        path = os.path.join(workspace.get_app_config_dir(job_id), RUN_CONFIG_FILE)
        reason = run_config_refusal(path, simulate=simulate)
        if reason:
            raise ValueError(reason)
        self._task_script_path = resolve_client_script(workspace.get_app_custom_dir(job_id))
        if any(c.isspace() for c in path):  # NVFlare splits script arguments on whitespace, without quoting
            path = os.path.relpath(path)  # from this process's working folder: the job id and app folder have none
        if any(c.isspace() for c in path):
            raise ValueError(f"the run configuration's path {path!r} contains whitespace, which NVFlare's script "
                             "arguments cannot carry")
        return f"--run-config {path}"

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            try:
                self._task_script_args = self.script_arguments(fl_ctx)
            except ValueError as err:
                self.system_panic(str(err), fl_ctx)
                return
        super().handle_event(event_type, fl_ctx)
