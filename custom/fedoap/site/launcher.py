"""The site's job launcher: NVFlare's process launcher, except that a job process killed by a signal is a dropout of
this site, not a failure of the whole job.

NVFlare 2.9's client reports every job process that ends with a non-zero status to the server, and the server fails
the job for every site on that report (``FedServer.process_job_failure``), so one hospital's process killed by the
out-of-memory killer, a reboot or an operator's ``kill -9`` stops the federation for all. With this launcher (the
``process_launcher`` of the site's ``local/resources.json``, which ``fedoap poc-configure`` and ``fedoap
site-configure`` install) a job process that died of a signal is reported as ended without an outcome (NVFlare's
``UNKNOWN``), which the server does not act on: the workflow sees the site stop answering, records it as dropped out
of the round (``SharedParamsFedAvg``: task timeout, NVFlare's dead-client detection) and goes on with the others while
at least ``min_responses`` answer. A job process that exits with an error of its own (a configuration error, an
exception) is still reported as the failure it is; an abort asked for by the server stays an abort.
"""

from __future__ import annotations

from nvflare.apis.job_launcher_spec import JobHandleSpec, JobReturnCode
from nvflare.app_common.job_launcher.client_process_launcher import ClientProcessJobLauncher
from nvflare.app_common.job_launcher.process_launcher import ProcessHandle

__all__ = ["DropoutTolerantJobLauncher", "DropoutTolerantHandle"]


class DropoutTolerantHandle(ProcessHandle):
    """A job process handle whose status maps death by a signal (negative return code) to ``UNKNOWN``."""

    def __init__(self, handle: ProcessHandle) -> None:
        super().__init__(process_adapter=handle.adapter)

    def poll(self):
        code = self.adapter.poll()
        if code is not None and code < 0:  # killed by a signal: the site dropped out; not a failure of the job
            return JobReturnCode.UNKNOWN
        return super().poll()


class DropoutTolerantJobLauncher(ClientProcessJobLauncher):
    """NVFlare's client process launcher whose handles are :class:`DropoutTolerantHandle`."""

    def launch_job(self, job_meta: dict, fl_ctx) -> JobHandleSpec:
        handle = super().launch_job(job_meta, fl_ctx)
        return DropoutTolerantHandle(handle) if isinstance(handle, ProcessHandle) else handle
