"""FedOAP as an NVFlare recipe: the PyTorch FedAvg recipe's job (persistor, script runner, per-site config) with the
shared-parameters controller in place of FedAvg.

Usage::

    recipe = FedOAPRecipe(min_clients=3, num_rounds=10, data_root="/data/sites")
    run = recipe.execute(SimEnv(clients=["brain", "liver", "breast"]))   # or PocEnv / ProdEnv

Every constructor argument is JSON-serializable and stored unchanged, so ``recipe.export(dir)`` writes a job whose
server and client configs rebuild exactly these components.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.app_common.executors.client_api_executor import ExecutionMode
from nvflare.client.config import ExchangeFormat
from nvflare.job_config.script_runner import ScriptRunner

from fedoap.site import client as client_script
from fedoap.server.aggregation import PLAINTEXT_RULES, SERVER_RULES
from fedoap.server.controller import SharedParamsFedAvg
from fedoap.site.executor import CLIENT_SCRIPT, FedOAPExecutor
from fedoap.methods import get_method

__all__ = ["FedOAPRecipe", "FedOAPScriptRunner", "client_args_string", "HE_RULES", "DP_OPTIONS"]

#: server rules that are sums of client contributions, so the server can compute them on ciphertexts (FedGS runs under
#: "weighted_mean" with step-count weights; "fednova", "fedawa", "fedlws" need the global model in clear)
HE_RULES = frozenset(SERVER_RULES) - PLAINTEXT_RULES
#: privacy options passed to every site's client script
DP_OPTIONS = frozenset({"dp_update_clip", "dp_update_noise", "dp_delta", "dp_sgd_noise", "dp_sgd_epsilon",
                        "dp_sgd_clip", "dp_sgd_unit", "dp_sgd_noise_source"})


def client_args_string(args: dict[str, Any]) -> str:
    """Client script arguments as NVFlare passes them (split on whitespace, so values must not contain spaces)."""
    parts = []
    for key, value in args.items():
        if isinstance(value, bool):  # a switch: present when true
            if value:
                parts.append(f"--{key.replace('_', '-')}")
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value, separators=(",", ":"), sort_keys=True)
        text = str(value)
        if not text or any(c.isspace() for c in text):
            raise ValueError(f"client argument {key!r} must be non-empty and contain no whitespace, got {text!r}")
        parts.append(f"--{key.replace('_', '-')} {text}")
    return " ".join(parts)


class FedOAPScriptRunner(ScriptRunner):
    """``ScriptRunner`` that adds a :class:`FedOAPExecutor` and copies no script into the job."""

    def add_to_fed_job(self, job, ctx, **kwargs):
        job.check_kwargs(args_to_check=kwargs, args_expected={"tasks": False})
        if self._execution_mode != ExecutionMode.IN_PROCESS:
            raise ValueError("FedOAPScriptRunner runs the client script in-process only")
        if self._script != CLIENT_SCRIPT:
            raise ValueError(f"FedOAPScriptRunner runs {CLIENT_SCRIPT} only, got {self._script!r}")
        executor = FedOAPExecutor(
            task_script_args=self._script_args,
            params_exchange_format=self._params_exchange_format,
            server_expected_format=self._server_expected_format,
            params_transfer_type=self._params_transfer_type,
            memory_gc_rounds=self._memory_gc_rounds,
            cuda_empty_cache=self._cuda_empty_cache,
        )
        job.add_executor(executor, tasks=kwargs.get("tasks", ["*"]), ctx=ctx)
        return {}


class FedOAPRecipe(FedAvgRecipe):
    """Personalized FL job: only the method's shared parameters travel; sites personalize at the end.

    Args:
        name: job name.
        min_clients: sites per round (all of them: full participation).
        num_rounds: federated rounds T.
        data_root: folder with one MSD-layout sub-folder per site name (as the site sees its file system); "" (a
            deployed job): each site reads its data folder from its own configuration (``fedoap.site.site_config``).
        unseen_dir: MSD-layout folder of the unseen organ, evaluated by every personalized model ("" for none, or
            the site configuration's).
        method: federated method name; method_args: its constructor arguments.
        model_args: the backbone's constructor arguments (``FedOAPNet``).
        train_config: client training options (``image_size``, ``batch_size``, ``lr``, ``local_epochs``,
            ``finetune_epochs``, ``seed``, ``device``, ``threads``), passed to the client script.
        initial_ckpt: absolute path of the initial global checkpoint (a state dict); None: the server initializes.
        personalize: run the final fine-tuning and evaluation.
        he: sites encrypt their shared update (TenSEAL CKKS) and the server only adds ciphertexts; each site's
            context file is its own configuration (``local/``, from the sites' key ceremony ``fedoap he-keys``, or
            ``$FEDOAP_HE_CONTEXT_DIR`` in simulation).
        dp: differential privacy options for every site: ``dp_update_clip``/``dp_update_noise`` (client-level DP
            of the shared update), ``dp_sgd_noise`` or ``dp_sgd_epsilon`` with ``dp_sgd_clip``, ``dp_sgd_unit`` (``"slice"``
            or ``"case"``) and ``dp_sgd_noise_source`` (sample-level
            DP-SGD), ``dp_delta``.
        task_request_interval: seconds a site waits before asking the server for its next task (NVFlare's default
            2 s; a simulation on one machine gains seconds per round with 0.2).
        installed_code: the job carries no code: every site runs the fedoap package installed on it (the client
            script is found through Python's import system by ``fedoap.site.executor.FedOAPExecutor``, which runs
            nothing else), so the job is not bring-your-own-code and the sites' class allow-lists must list fedoap's
            classes (``poc_workspace/local/resources.json``). False (the simulator):
            NVFlare copies the modules the job's components come from into the job.

    Raises:
        ValueError: HE with a method whose server rule needs plaintext (``"fednova"``, or shares nothing: rule
            ``"none"``), an unknown dp option, client-level DP of the update with a method that shares nothing, or
            DP-SGD with a method that names a ``dp_sgd_conflict`` (a regularizer in its local loss, FedProx; a step
            scale from the raw labels, FedGS), refused here, before any site starts (``LocalTrainer`` refuses it
            too).
    """

    def __init__(
        self,
        *,
        name: str = "fedoap",
        min_clients: int,
        num_rounds: int = 10,
        data_root: str = "",
        unseen_dir: str = "",
        method: str = "fedoap",
        method_args: Optional[dict[str, Any]] = None,
        model_args: Optional[dict[str, Any]] = None,
        train_config: Optional[dict[str, Any]] = None,
        initial_ckpt: Optional[str] = None,
        personalize: bool = True,
        he: bool = False,
        dp: Optional[dict[str, Any]] = None,
        task_request_interval: float = 2.0,
        installed_code: bool = False,
    ) -> None:
        self.data_root = data_root
        self.unseen_dir = unseen_dir
        self.method = method
        self.method_args = method_args or {}
        self.model_args = model_args or {}
        self.train_config = train_config or {}
        self.personalize = personalize
        self.he = he
        self.dp = dp or {}
        self.task_request_interval = task_request_interval
        self.installed_code = installed_code

        fl_method = get_method(method, **self.method_args)
        if he and fl_method.server_rule not in HE_RULES:
            raise ValueError(
                f"method {method!r} combines updates by {fl_method.server_rule!r}, which needs plaintext on the "
                f"server; homomorphic encryption supports only {sorted(HE_RULES)}"
            )
        unknown = set(self.dp) - DP_OPTIONS
        if unknown:
            raise ValueError(f"unknown dp option(s) {sorted(unknown)}; choose from {sorted(DP_OPTIONS)}")
        conflict = fl_method.dp_sgd_conflict
        if conflict and (self.dp.get("dp_sgd_noise", 0) > 0 or self.dp.get("dp_sgd_epsilon", 0) > 0):
            raise ValueError(f"method {method!r} {conflict}; use client-level DP of the update (dp_update_clip) "
                             "instead")
        network = fl_method.build_model(self.model_args)
        self.shared_keys = fl_method.shared_keys(network)
        self.server_rule = fl_method.server_rule
        if not self.shared_keys and self.dp.get("dp_update_clip", 0) > 0:
            raise ValueError(f"method {method!r} shares nothing: there is no update to clip and noise")
        if fl_method.shares_statistics and self.dp.get("dp_update_clip", 0) > 0:
            raise ValueError(f"method {method!r} sends site statistics in clear next to its update (its "
                             "site_statistics), which client-level DP of the update would not cover")
        if fl_method.shares_statistics and he:
            raise ValueError(f"method {method!r} sends site statistics in clear next to its update (its "
                             "site_statistics), which homomorphic encryption of the update would not hide")
        self.rule_args = fl_method.server_rule_args()
        args = {"method": method, "method_args": self.method_args,
                "model_args": self.model_args, "rounds": num_rounds, **self.train_config, **self.dp, "he": he}
        if data_root:
            args = {"data_root": data_root, **args}
        if unseen_dir:
            args["unseen_dir"] = unseen_dir
        super().__init__(
            name=name,
            model=fl_method.model_spec(self.model_args),
            initial_ckpt=initial_ckpt,
            min_clients=min_clients,
            num_rounds=num_rounds,
            train_script=client_script.__file__,
            train_args=client_args_string(args),
            key_metric="val_dice",
            # Tensors travel as they are: no NumPy round trip, and NVFlare's converter (which reshapes a received
            # array to the shape the site last sent under the same key) never touches ciphertext arrays.
            server_expected_format=ExchangeFormat.PYTORCH,
        )
        if task_request_interval != 2.0:  # NVFlare's default; how long a site waits before asking for its next task
            self.add_server_config({"server": {"task_request_interval": task_request_interval}})
        if installed_code:  # the components' modules come from the sites' installed package, not from the job
            self._job.set_app_packages(["fedoap"])

    def _create_client_runner(self, site_config: dict):
        if not self.installed_code:
            return super()._create_client_runner(site_config)
        return FedOAPScriptRunner(script=CLIENT_SCRIPT, script_args=self.train_args,
                                   framework=self._client_runner_framework,
                                   server_expected_format=self.server_expected_format,
                                   params_transfer_type=self.params_transfer_type)

    def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> SharedParamsFedAvg:
        return SharedParamsFedAvg(
            num_rounds=self.num_rounds,
            min_clients=self.min_clients,
            shared_keys=self.shared_keys,
            method=self.method,
            server_rule=self.server_rule,
            personalize=self.personalize,
            he=self.he,
            persistor_id=persistor_id,
            rule_args=self.rule_args or None,
        )
