"""FedOAP as an NVFlare recipe: the PyTorch FedAvg recipe's job (persistor, per-site config) with the
shared-parameters controller in place of FedAvg, fedoap's own executor at every site, and the run configuration as
one file of the job.

Usage::

    config = RunConfig.from_options(method="fedoap", rounds=10)
    recipe = FedOAPRecipe(config=config, min_clients=3)
    run = recipe.execute(PocEnv(...))   # or SimEnv / ProdEnv; recipe.export(dir) writes the job folder

A thin, validated assembly in the manner of NVFlare's ``app_opt/pt/recipes``: the :class:`~fedoap.config.RunConfig`
is checked when it is built; the recipe builds the method's network once (seeded, as every site does) for the
shared keys and the server's model, stores its constructor arguments unchanged, and writes the run configuration
into the job's client app (``app/config/fedoap_run.json``), which :class:`~fedoap.site.executor.FedOAPExecutor`
hands to the client script (the same executor in the simulator and in a deployment).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Optional

from nvflare.app_common.executors.client_api_executor import ExecutionMode
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat
from nvflare.job_config.script_runner import ScriptRunner

from fedoap.config import RUN_CONFIG_FILE, RunConfig
from fedoap.server.controller import SharedParamsFedAvg
from fedoap.site.executor import CLIENT_SCRIPT, FedOAPExecutor, resolve_client_script
from fedoap.tracking import add_tracking

__all__ = ["FedOAPRecipe", "FedOAPScriptRunner", "round_timeouts"]

#: seconds a round's timeout allows for everything but training (evaluation, transfer, a slow start)
_TIMEOUT_BASE_S = 600.0
#: seconds per epoch of the reference work (64 x 64 slices, width 16, no DP-SGD): generous for a site of a few
#: thousand slices on a few CPU cores
_TIMEOUT_PER_EPOCH_S = 600.0


def round_timeouts(config: RunConfig) -> tuple[float, float]:
    """How long a round, and the final personalization, wait for their sites: ``robustness.round_timeout`` for
    both when set, else scaled to the work asked of a site (epochs x pixels x width^2, times 5 under DP-SGD, whose
    per-sample gradients are that much slower)."""
    if config.robustness.round_timeout > 0:
        return config.robustness.round_timeout, config.robustness.round_timeout
    t = config.training
    scale = (t.image_size / 64) ** 2 * (t.width / 16) ** 2 * (5.0 if config.privacy.dp_sgd_on else 1.0)
    per_epoch = _TIMEOUT_PER_EPOCH_S * scale
    return _TIMEOUT_BASE_S + t.local_epochs * per_epoch, _TIMEOUT_BASE_S + (t.finetune_epochs + 1) * per_epoch


class FedOAPScriptRunner(ScriptRunner):
    """``ScriptRunner`` that adds a :class:`FedOAPExecutor` and the run configuration file to the app it goes to,
    and copies no script into the job."""

    def __init__(self, run_config_file: str, **kwargs) -> None:
        super().__init__(script=CLIENT_SCRIPT, **kwargs)
        self.run_config_file = run_config_file

    def add_to_fed_job(self, job, ctx, **kwargs):
        job.check_kwargs(args_to_check=kwargs, args_expected={"tasks": False})
        if self._execution_mode != ExecutionMode.IN_PROCESS:
            raise ValueError("FedOAPScriptRunner runs the client script in-process only")
        executor = FedOAPExecutor(
            params_exchange_format=self._params_exchange_format,
            server_expected_format=self._server_expected_format,
            params_transfer_type=self._params_transfer_type,
            memory_gc_rounds=self._memory_gc_rounds,
            cuda_empty_cache=self._cuda_empty_cache,
        )
        job.add_executor(executor, tasks=kwargs.get("tasks", ["*"]), ctx=ctx)
        job.add_file_source(self.run_config_file, dest_dir=None, app_folder_type="config", ctx=ctx)
        return {}


class FedOAPRecipe(FedAvgRecipe):
    """Personalized FL job: only the method's shared parameters travel; sites personalize at the end.

    Args:
        config: the run configuration every site runs with (training, method and its arguments, privacy, and, in
            simulation only, the data folders; a deployed site reads its data folders from its own configuration,
            ``fedoap.site.site_config``, and refuses a job that names any).
        min_clients: sites per round (all of them: full participation). The job itself needs only
            ``config.robustness.min_responses`` of them alive (0: a majority), NVFlare's ``min_clients`` of the job:
            a site that dies is a dropout, not the end of the job.
        name: job name.
        initial_ckpt: absolute path of the initial global checkpoint (a state dict, e.g. of :attr:`network`); None:
            the server initializes. With a checkpoint the server's persistor (NVFlare's) is given no network: the
            server needs the checkpoint's tensors, never the network, so its process skips the network's imports
            (MONAI), which every site's start waits for in the simulator.
        personalize: run the final fine-tuning and evaluation.
        task_request_interval: seconds a site waits before asking the server for its next task (NVFlare's default
            2 s; a simulation on one machine gains seconds per round with 0.2).
        installed_code: the job carries no code: every site runs the fedoap package installed on it, so the job is
            not bring-your-own-code and the sites' class allow-lists must list fedoap's classes
            (``poc_workspace/local/resources.json``). False (the simulator, whose default allow-list lists only
            NVFlare's classes): NVFlare copies the modules the job's components come from into the job. Either way
            :class:`~fedoap.site.executor.FedOAPExecutor` runs the client script.

    With ``config.privacy.he`` each site's context file is its own configuration (``local/``, from the sites' key
    ceremony ``fedoap he-keys``, or ``$FEDOAP_HE_CONTEXT_DIR`` in simulation); with ``config.privacy.secagg`` so are
    each site's identity key and every participant's roster of identity keys (``fedoap secagg-keys``, or
    ``$FEDOAP_SECAGG_DIR`` in simulation).

    With ``config.training.tracking`` ("tensorboard", the default, or "mlflow") the server gets NVFlare's receiver of
    the sites' tracked metrics (``fedoap.tracking``): TensorBoard event files in ``tb_events/<site>/`` of the server's
    run folder, or an MLflow run; "none" adds nothing.

    Attributes:
        network: the initial network (seeded with ``config.training.seed``), built once.
        shared_keys: the state-dict keys that travel, computed once from :attr:`network`.

    Raises:
        ValueError: the controller refuses the method's server rule for these shared keys (the combinations of the
            method and privacy were refused already, by :class:`~fedoap.config.RunConfig`), or the tracking backend's
            package is not installed here (NVFlare builds its receiver with the job).
    """

    def __init__(
        self,
        *,
        config: RunConfig,
        min_clients: int,
        name: str = "fedoap",
        initial_ckpt: Optional[str] = None,
        personalize: bool = True,
        task_request_interval: float = 2.0,
        installed_code: bool = False,
    ) -> None:
        if not isinstance(config, RunConfig):
            raise ValueError(f"config must be a fedoap.config.RunConfig, got {type(config).__name__}")
        self.config = config
        self.personalize = personalize
        self.task_request_interval = task_request_interval
        self.installed_code = installed_code
        self.network = config.build_model()
        self.shared_keys = config.method.instance.shared_keys(self.network)
        # the run configuration as a file NVFlare copies into the job's client app (removed with this recipe)
        self._run_config_dir = tempfile.TemporaryDirectory(prefix="fedoap_run_")
        self._run_config_file = str(config.save(Path(self._run_config_dir.name) / RUN_CONFIG_FILE))
        super().__init__(
            name=name,
            model=config.method.instance.model_spec(config.training.model_args()),
            initial_ckpt=initial_ckpt,
            min_clients=min_clients,
            num_rounds=config.training.rounds,
            train_script=resolve_client_script(),
            key_metric="val_dice",
            # Tensors travel as they are: no NumPy round trip, and NVFlare's converter (which reshapes a received
            # array to the shape the site last sent under the same key) never touches ciphertext arrays.
            server_expected_format=ExchangeFormat.PYTORCH,
            model_persistor=PTFileModelPersistor(source_ckpt_file_full_name=initial_ckpt, allow_numpy_conversion=False)
            if initial_ckpt else None,
        )
        # NVFlare's client-failure tolerance: the job goes on while this many sites are alive (the job's
        # min_clients); the controller still sends every round to all min_clients sites and waits for each
        self._job.job.min_clients = config.robustness.responses_needed(min_clients)
        if task_request_interval != 2.0:  # NVFlare's default; how long a site waits before asking for its next task
            self.add_server_config({"server": {"task_request_interval": task_request_interval}})
        if installed_code:  # the components' modules come from the sites' installed package, not from the job
            self._job.set_app_packages(["fedoap"])
        # live curves: the server's receiver of the sites' tracked metrics (config.training.tracking; "none": none)
        add_tracking(self, config.training.tracking)

    def _create_client_runner(self, site_config: dict) -> FedOAPScriptRunner:
        return FedOAPScriptRunner(run_config_file=self._run_config_file, framework=self._client_runner_framework,
                                  server_expected_format=self.server_expected_format,
                                  params_transfer_type=self.params_transfer_type)

    def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> SharedParamsFedAvg:
        train_timeout, personalize_timeout = round_timeouts(self.config)
        return SharedParamsFedAvg(
            num_rounds=self.num_rounds,
            min_clients=self.min_clients,
            shared_keys=self.shared_keys,
            method=self.config.method.name,
            method_args=dict(self.config.method.args) or None,
            personalize=self.personalize,
            he=self.config.privacy.he,
            secagg=self.config.privacy.secagg_config().to_dict() if self.config.privacy.secagg else None,
            persistor_id=persistor_id,
            task_timeout=train_timeout,
            personalize_timeout=personalize_timeout,
            robustness=dataclasses.asdict(self.config.robustness),
        )
