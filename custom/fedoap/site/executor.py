"""The only executor a fedoap job uses at a site: fedoap's own client script, in-process, and nothing else.

NVFlare's ``ClientAPIExecutor`` runs whatever a job names: any ``task_script_path`` it can import, or an external
``command`` (NVFlare's own default class allow-list leaves it out for that reason). A site that allow-listed it, or a
prefix admitting a subclass that passes its arguments through, would run arbitrary code for anyone allowed to submit
a job without bring-your-own-code rights. :class:`FedOAPExecutor` therefore takes no script path, command or execution
mode at all: it always runs ``fedoap/site/client.py`` in-process (from the job's ``custom/`` folder in a
bring-your-own-code job, else from the package installed on the site), and refuses with a ``ValueError`` naming the
argument any job that tries to set one of them. In a deployed site (not the simulator) it also refuses the client
script's data-folder options: there the data folders come only from the site's own configuration
(``local/fedoap_site.json``). The same checks run earlier, when the job is deployed, through the site's app validator
(``fedoap.site.app_validator``), so a refused job never starts and ``nvflare job meta`` says why.

:class:`fedoap.deploy.recipe.FedOAPScriptRunner` puts the executor into a job.
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

__all__ = ["FedOAPExecutor", "CLIENT_SCRIPT", "DATA_OPTIONS", "ALLOWED_ARGS",
           "resolve_client_script", "job_data_options", "refused_args"]

#: the one script the executor runs, relative to the Python import roots (and to a BYOC job's custom folder)
CLIENT_SCRIPT = "fedoap/site/client.py"
#: client-script options that point at data folders: accepted only in the simulator
DATA_OPTIONS = ("--data-root", "--unseen-dir", "--pool-sites")
#: the executor arguments a job may set; everything else (script path, command, execution mode, launch and attach
#: settings) is fixed here
ALLOWED_ARGS = frozenset({"task_script_args", "params_exchange_format", "server_expected_format",
                          "params_transfer_type", "memory_gc_rounds", "cuda_empty_cache"})


def _split_args(task_script_args: str) -> list[str]:
    """The client script's argv as NVFlare's in-process runner builds it (whitespace split, quotes kept)."""
    from nvflare.fuel.utils.secret_utils import split_command_preserving_secret_refs

    return split_command_preserving_secret_refs(task_script_args, posix=False, group_secret_ref_quotes=False)


def job_data_options(task_script_args: str) -> list[str]:
    """The data-folder options (:data:`DATA_OPTIONS`) that ``task_script_args`` sets (exact names or ``--opt=value``;
    the client script's parser admits no abbreviations)."""
    found = []
    for token in _split_args(task_script_args or ""):
        for option in DATA_OPTIONS:
            if token == option or token.startswith(option + "="):
                found.append(option)
    return sorted(set(found))


def refused_args(args: dict[str, Any], simulate: bool = False) -> Optional[str]:
    """Why a job's executor arguments are refused, or None if they are acceptable.

    Args:
        args: the executor's arguments as the job configures them.
        simulate: the job runs in NVFlare's simulator (data folders may then come from the job).
    """
    extra = sorted(set(args) - ALLOWED_ARGS)
    if extra:
        return (f"FedOAPExecutor runs only fedoap's own client script in-process; the job sets {extra}, which a job "
                f"may not set (allowed: {sorted(ALLOWED_ARGS)})")
    script_args = args.get("task_script_args", "")
    if not isinstance(script_args, str):
        return f"task_script_args must be a string, got {type(script_args).__name__}"
    if "${" in script_args:
        return "task_script_args may not reference the site's secrets or environment (${...})"
    if not simulate:
        data = job_data_options(script_args)
        if data:
            return (f"the job sets {data}: in a deployed site the data folders come only from the site's own "
                    "configuration (local/fedoap_site.json), never from a job")
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
    """Runs fedoap's client script in-process (see the module docstring); a job may set only :data:`ALLOWED_ARGS`.

    Raises:
        ValueError: the job sets any other argument (a script path, a command, an execution mode, ...) or passes
            secrets references in ``task_script_args``.
    """

    def __init__(
        self,
        task_script_args: str = "",
        params_exchange_format: str = ExchangeFormat.PYTORCH,
        server_expected_format: str = ExchangeFormat.PYTORCH,
        params_transfer_type: str = TransferType.FULL,
        memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        **refused: Any,
    ) -> None:
        reason = refused_args({"task_script_args": task_script_args, **refused}, simulate=True)
        if reason:
            raise ValueError(reason)
        super().__init__(
            execution_mode=ExecutionMode.IN_PROCESS,
            task_script_path=CLIENT_SCRIPT,
            task_script_args=task_script_args,
            params_exchange_format=params_exchange_format,
            server_expected_format=server_expected_format,
            params_transfer_type=params_transfer_type,
            memory_gc_rounds=memory_gc_rounds,
            cuda_empty_cache=cuda_empty_cache,
        )
        # stored under the constructor's names, so that NVFlare's job export writes them back
        self.task_script_args = task_script_args
        self.params_exchange_format = params_exchange_format
        self.server_expected_format = server_expected_format
        self.params_transfer_type = params_transfer_type
        self.memory_gc_rounds = memory_gc_rounds
        self.cuda_empty_cache = cuda_empty_cache

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            simulate = bool(fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False))
            reason = refused_args({"task_script_args": self.task_script_args}, simulate=simulate)
            workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
            job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)
            custom_dir = workspace.get_app_custom_dir(job_id) if workspace is not None and job_id else None
            if reason is None:
                try:
                    self._task_script_path = resolve_client_script(custom_dir)
                except ValueError as err:
                    reason = str(err)
            if reason:
                self.system_panic(reason, fl_ctx)
                return
        super().handle_event(event_type, fl_ctx)
