"""The server workflow of personalized FL: broadcast and aggregate only the shared parameters, then ask every site to
personalize and report.

Each round the controller sends the global shared parameters, receives each site's shared parameters with its
aggregation weight, drops (and logs) any key outside the shared set, rejects (and logs) an update with a missing key,
a wrong shape or a non-finite value, combines the rest by the method's server rule (FedAvg's weighted mean, McMahan
et al., AISTATS 2017, restricted to the shared set as in FedOAP, arXiv 2511.18847, unless the method names another)
and saves the aggregate. After the last
round it sends the task ``personalize``: sites fine-tune locally and return their evaluation metrics (no
parameters). The round history and the final metrics are written to ``fedoap_history.json`` in the server's run
folder after every round, so an interrupted run still leaves its history behind.

The aggregation weight of a site is what it reports under the meta key ``aggregation_weight`` (its sample count, or
its step count for a method that weighs by steps, FedGS), or else its sample count ``n_samples``.

How the shared parameters are combined is not the workflow's business: the method names a rule class
(``fedoap.server.rules``: weighted mean, FedNova, FedAWA, FedLWS, or the null rule of a method that shares nothing),
:func:`fedoap.server.rules.rule_for_job` builds the one rule object that serves the job (under HE the encrypted sum,
under secure aggregation the masked sum, whose key exchange this workflow relays before every round; for a linear
rule only), and every round goes through the same protocol: ``reset`` with the broadcast, ``add`` per
site, ``result`` when something was accepted, ``summary`` into the history. With the null rule the rounds still pace
the sites' training and collect their metrics, but the server broadcasts an empty parameter set and saves no
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
from typing import Any, Mapping, Optional

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from fedoap.checks import is_finite_number
from fedoap.jsonio import write_json
from fedoap.methods import get_method
from fedoap.protocol import (AGGREGATION_WEIGHT_KEY, HISTORY_FILE, PERSONALIZE_TASK, SECAGG_ADVERTISE_TASK, SECAGG_KEY,
                             SECAGG_REFUSED_KEY, SECAGG_SHARE_TASK, SECAGG_UNMASK_TASK, TRAIN_TASK)
from fedoap.config import RobustnessOptions
from fedoap.privacy.secagg import SecAggConfig, SecAggError, ServerSecAgg, check_message
from fedoap.resume import SERVER_STATE_FILE, previous_run_dir
from fedoap.server.intake import RoundIntake
from fedoap.server.rules import ServerRule, check_rule, rule_for_job

__all__ = ["SharedParamsFedAvg", "ENCRYPTED_CHECKPOINT", "encrypted_checkpoint_bytes", "load_encrypted_checkpoint",
           "SERVER_STATE_FORMAT"]

#: the server's checkpoint under HE (ciphertext only), in its app folder: safetensors, no pickle
ENCRYPTED_CHECKPOINT = "FL_global_model_encrypted.safetensors"
#: recorded in the encrypted checkpoint's safetensors metadata, with the round
ENCRYPTED_CHECKPOINT_FORMAT = "fedoap-he-checkpoint/1"
#: recorded in the server state's safetensors metadata (``fedoap.resume.SERVER_STATE_FILE``)
SERVER_STATE_FORMAT = "fedoap-server-state/1"


def _safetensors_bytes(arrays: Mapping[str, Any], metadata: dict[str, str]) -> bytes:
    """``arrays`` (tensors or arrays) as safetensors with ``metadata``: what the server keeps never needs pickle."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                 for k, v in arrays.items()}, metadata=metadata)


def _read_safetensors(path: str | os.PathLike, fmt: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and arrays of a safetensors file the server wrote in format ``fmt``.

    Raises:
        ValueError: not a readable safetensors file, or of another format (names the file).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a safetensors checkpoint (format {fmt!r}): {err}") from None
    if meta.get("format") != fmt or not str(meta.get("round", "")).isdigit():
        raise ValueError(f"{path} is not a file of format {fmt!r} (metadata {meta})")
    return meta, arrays


def encrypted_checkpoint_bytes(aggregate: dict[str, Any], rnd: int) -> bytes:
    """The HE aggregate (the uint8/float64 transport arrays of ``fedoap.privacy.he.to_params``) as safetensors, with
    the format and the round in its metadata: loading it never unpickles anything."""
    return _safetensors_bytes(aggregate, {"format": ENCRYPTED_CHECKPOINT_FORMAT, "round": str(int(rnd))})


def load_encrypted_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read :data:`ENCRYPTED_CHECKPOINT`: ``{"round": int, "encrypted_shared": {key: numpy array}}``, the arrays as
    ``fedoap.privacy.he.from_params`` takes them.

    Raises:
        ValueError: the file is not a safetensors file of this format (names the file).
    """
    meta, arrays = _read_safetensors(path, ENCRYPTED_CHECKPOINT_FORMAT)
    return {"round": int(meta["round"]), "encrypted_shared": arrays}


#: the longest one key-exchange step of secure aggregation waits for the sites (seconds)
SECAGG_STEP_TIMEOUT = 120.0


def _secagg_config(secagg: Optional[Mapping[str, Any]]) -> Any:
    """The controller's ``secagg`` argument as ``fedoap.privacy.secagg.SecAggConfig`` (None: off).

    Raises:
        ValueError: not a dict of its fields, or a value it refuses.
    """
    if secagg is None:
        return None
    if not isinstance(secagg, Mapping):
        raise ValueError(f"secagg must be a dict of SecAggConfig fields or None, got {type(secagg).__name__}")
    return SecAggConfig.from_dict(secagg)


class SharedParamsFedAvg(ModelController):
    """Rounds of broadcast, local training and aggregation over an explicit list of shared parameters, then
    personalization; how the updates combine is the method's server rule (``fedoap.server.rules``).

    Args:
        num_rounds: federated rounds before personalization.
        min_clients: sites that must answer each round.
        shared_keys: state-dict keys that are broadcast and aggregated (a list of names, stored unchanged so that the
            job exports faithfully); every other key stays on the sites. Empty exactly for a method that shares
            nothing (its rule is the null rule: the server broadcasts ``{}`` and saves no checkpoint).
        method: name of the federated method (``fedoap.methods``; recorded in the history); method_args: its
            constructor arguments. The method names the server rule and its arguments.
        personalize: after the last round, send ``personalize`` and collect each site's final metrics.
        he: sites send CKKS ciphertexts of their weighted shared parameters (by samples, or steps for FedGS; a linear
            rule only); the server only adds them with its TenSEAL context (no secret key, found in its ``local/``
            folder, from the sites' key ceremony, or ``$FEDOAP_HE_CONTEXT_DIR``), broadcasts the encrypted sum and
            saves only ciphertext for the shared part (``ENCRYPTED_CHECKPOINT``).
        secagg: secure aggregation (the fields of ``fedoap.privacy.secagg.SecAggConfig``, e.g. ``{"frac_bits": 24,
            "neighbours": 0}``; None: off): before every round the sites exchange fresh keys signed by their identity
            keys (tasks ``secagg_advertise`` and ``secagg_share``, relayed here; the roster of identity keys from the
            server's ``local/`` folder or ``$FEDOAP_SECAGG_DIR``), train and send masked updates, and after it the
            sites still there reveal the shares that remove the masks (``secagg_unmask``); the server learns the sum
            only (:class:`fedoap.server.rules.MaskedSum`, a linear rule only).
        persistor_id: id of the persistor component that holds the global checkpoint.
        task_timeout: seconds a round waits for its sites (0: no limit); a site that has not answered by then, or
            that NVFlare finds dead or failed, has dropped out of the round. personalize_timeout: the same for the
            final personalization.
        robustness: the fields of :class:`fedoap.config.RobustnessOptions` (stored as given, so the job exports
            faithfully): ``min_responses``, the fewest sites a round may go on with (0: a majority; below it the job
            stops, its history saying which rounds completed); the bounds on what a site claims
            (:class:`fedoap.server.intake.RoundIntake`); a robust rule or norm bound; ``resume_from``, an interrupted
            run of this job to continue from its last completed round (an earlier job's id, or in simulation an
            absolute folder with one sub-folder per participant, ``fedoap.resume``).

    Raises:
        ValueError: an unknown method or invalid method arguments, a shared set that does not fit the method's rule
            (see :func:`fedoap.server.rules.check_rule`), HE with a rule that is not linear or shares nothing, or a
            non-positive number of rounds or clients.
    """

    def __init__(
        self,
        *,
        num_rounds: int,
        min_clients: int,
        shared_keys: list[str],
        method: str,
        method_args: Optional[dict[str, Any]] = None,
        personalize: bool = True,
        he: bool = False,
        secagg: Optional[dict[str, Any]] = None,
        persistor_id: str = "persistor",
        task_timeout: float = 0,
        personalize_timeout: float = 0,
        robustness: Optional[dict[str, Any]] = None,
    ) -> None:
        # a site's failed task is a dropout (our minimum decides whether the round goes on), never a panic
        super().__init__(persistor_id=persistor_id, ignore_result_error=True)
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if (robustness or {}).get("min_responses", 0) > min_clients:
            raise ValueError(f"robustness.min_responses must be at most min_clients={min_clients}, got "
                             f"{robustness['min_responses']}")
        for name, value in (("task_timeout", task_timeout), ("personalize_timeout", personalize_timeout)):
            if not (is_finite_number(value) and value >= 0):
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        fl_method = get_method(method, **(method_args or {}))
        self._rule: type[ServerRule] = fl_method.server_rule
        self._rule_args = fl_method.server_rule_args()
        self._robustness = RobustnessOptions(**(robustness or {}))
        if he and secagg is not None:
            raise ValueError("he and secagg both hide the updates: choose one")
        self._secagg_config = _secagg_config(secagg)
        check_rule(self._rule, self._rule_args, shared_keys, he or secagg is not None,
                   **self._robustness.rule_options())
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.shared_keys = shared_keys
        self.method = method
        self.method_args = method_args
        self.personalize = personalize
        self.he = he
        self.secagg = secagg
        self.persistor_id = persistor_id
        self.task_timeout = task_timeout
        self.personalize_timeout = personalize_timeout
        self.robustness = robustness
        self._history: dict[str, Any] = {}
        self._secagg_started = False  # this run's first key exchange waits for the sites' start-up
        self._intake = RoundIntake(self._robustness, shares_statistics=fl_method.shares_statistics,
                                   num_rounds=num_rounds, progress=self._progress, warn=self._warn)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _write_history(self) -> None:
        write_json(os.path.join(self.get_run_dir(), HISTORY_FILE), self._history)

    @staticmethod
    def _progress(line: str) -> None:
        print(f"[fedoap] {line}", flush=True)

    def _warn(self, line: str) -> None:
        """A rule was applied to a client's update: log it and show it in the progress output."""
        self.warning(line)
        self._progress(f"WARNING {line}")

    # -- workflow ----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        model = self.load_model()
        if model is None or not model.params:
            self.panic("the persistor returned no initial model")
            return
        missing = [k for k in self.shared_keys if k not in model.params]
        if missing:
            self.panic(f"{len(missing)} shared key(s) are not in the global model, e.g. {missing[0]!r}")
            return
        initial_shared = {k: model.params[k] for k in self.shared_keys}
        try:
            rule = self._job_rule(initial_shared)
            self._roster = self._secagg_roster() if self._secagg_config is not None else {}
            resumed = self._resume_state(initial_shared)
        except (FileNotFoundError, ValueError) as err:
            self.panic(str(err))
            return
        # Round 0 broadcasts the public initialization in clear; with HE every later broadcast is the encrypted sum.
        broadcast, first_round = initial_shared, 0
        self._history = {"method": self.method, "server_rule": rule.name, "he": self.he,
                         "secagg": self.secagg is not None, "rounds": [],
                         "personalized": {}, "n_shared_keys": len(self.shared_keys), "status": "running",
                         "completed_rounds": 0, "min_responses": None}
        if resumed is not None:
            broadcast, first_round = resumed["broadcast"], resumed["round"] + 1
            self._history = resumed["history"]
            self._intake.site_statistics = resumed["site_statistics"]
            rule.load_state(resumed["rule_state"])
            self._history.setdefault("resumed", []).append({"from_round": resumed["round"], "at": time.time()})
            if not rule.encrypted and broadcast:
                model.params.update({k: torch.as_tensor(v) for k, v in broadcast.items()})
            self._progress(f"resumed after round {first_round}/{self.num_rounds} from {resumed['path']}")
        start, base_wall = time.time(), float(self._history.get("wall_time_s", 0.0))
        clients = self.sample_clients(self.min_clients)
        targets = [c.name if hasattr(c, "name") else c for c in clients]
        needed = self._robustness.responses_needed(len(targets))
        self._history["min_responses"] = needed
        unknown = sorted(set(targets) - set(self._roster)) if self._secagg_config is not None else []
        if unknown:
            self.panic(f"secure aggregation: the server's roster of identity keys has no key for {unknown}")
            return
        for rnd in range(first_round, self.num_rounds):
            round_start = time.time()
            meta, round_targets, dropped = self._task_meta(), targets, {}
            if self._secagg_config is not None:  # the round's key exchange, before anyone trains
                exchange = self._secagg_exchange(rnd, targets, rule)
                round_targets, dropped = exchange["survivors"], exchange["dropped"]
                meta[SECAGG_KEY] = exchange["message"]
                if len(round_targets) < needed:
                    self._history["wall_time_s"] = base_wall + time.time() - start
                    self._stop(rnd, len(round_targets), needed, dropped)
                    return
            task = FLModel(params=broadcast, params_type=ParamsType.FULL, current_round=rnd, total_rounds=self.num_rounds,
                           meta=meta)
            results = self._send(TRAIN_TASK, task, round_targets, self.task_timeout)
            dropped.update(self._dropped(round_targets, results, self.task_timeout))
            for site, why in dropped.items():
                self._warn(f"round {rnd + 1}: {site} dropped out of the round: {why}")
            if len(results) < needed:
                self._history["wall_time_s"] = base_wall + time.time() - start
                self._stop(rnd, len(results), needed, dropped)
                return
            outcome = self._intake.collect(rnd, rule, broadcast, results)  # never raises for what a site sent
            record = outcome.record
            if dropped:
                record["dropped"] = dropped
            if outcome.aggregate is not None:  # checked finite (in clear); None: the global model is unchanged
                broadcast = outcome.aggregate
                self._save(model, broadcast, rnd, ciphertext=rule.encrypted)
            record["round_seconds"] = time.time() - round_start
            self._history["rounds"].append(record)
            self._history["completed_rounds"] = rnd + 1
            self._history["wall_time_s"] = base_wall + time.time() - start
            self._save_state(rnd, broadcast, rule)
            self._write_history()

        if self.personalize:
            self._progress(f"personalizing: local fine-tuning and evaluation on {len(targets)} site(s)")
            final = FLModel(params=broadcast, params_type=ParamsType.FULL, current_round=self.num_rounds,
                            total_rounds=self.num_rounds, meta=self._task_meta())
            results = self._send(PERSONALIZE_TASK, final, targets, self.personalize_timeout)
            missing_sites = self._dropped(targets, results, self.personalize_timeout)
            for site, metrics in self._intake.collect_personalized(results).items():
                if "rejected" in metrics:
                    missing_sites[site] = metrics["rejected"]
                else:
                    self._history["personalized"][site] = metrics
            if missing_sites:
                self._history["not_personalized"] = missing_sites
                self._warn(f"no personalized result from {sorted(missing_sites)}")
        self._history["status"] = "completed"
        self._history["wall_time_s"] = base_wall + time.time() - start
        self._write_history()
        self._progress(f"done in {time.time() - start:.0f} s")

    def _send(self, task_name: str, task: FLModel, targets: list[str], timeout: float) -> list[FLModel]:
        """Send ``task`` to every target and wait for all of them, at most ``timeout`` seconds (NVFlare also ends the
        wait for a site it finds dead); what came back in time, without error (a failed site is a dropout here,
        never a failure of the job)."""
        return self.send_model_and_wait(task_name=task_name, data=task, targets=targets,
                                        timeout=int(math.ceil(timeout)) if timeout > 0 else 0)

    @staticmethod
    def _dropped(targets: list[str], results: list[FLModel], timeout: float) -> dict[str, str]:
        """The targets that sent nothing usable, with why (as far as the server can tell)."""
        answered = {(r.meta or {}).get("client_name") for r in results}
        reason = (f"no result within {timeout:.0f} s (timed out, failed or disconnected)" if timeout > 0
                  else "no result (failed or disconnected)")
        return {site: reason for site in targets if site not in answered}

    def _stop(self, rnd: int, answered: int, needed: int, dropped: dict[str, str]) -> None:
        """Fewer sites answered round ``rnd`` than the job needs: end the job, saying which rounds completed."""
        status = (f"stopped in round {rnd + 1}: {answered} site(s) answered, fewer than the {needed} required "
                  f"(min_responses); {self._history['completed_rounds']} round(s) completed")
        self._history.update(status=status, stopped_round={"round": rnd, "answered": answered, "dropped": dropped})
        self._write_history()
        self._warn(status)
        self.panic(status)

    # -- state for resuming --------------------------------------------------------------------------------------------
    def _state_identity(self) -> dict[str, Any]:
        """What a saved state must match to be resumed by this job."""
        return {"method": self.method, "method_args": self.method_args or {}, "num_rounds": self.num_rounds,
                "he": self.he, "shared_keys": list(self.shared_keys),
                **({"secagg": dict(self.secagg)} if self.secagg is not None else {})}

    def _save_state(self, rnd: int, broadcast: Mapping[str, Any], rule: ServerRule) -> None:
        """The workflow's state after round ``rnd`` (the global shared parameters, or under HE the ciphertext only;
        the history; what the rule carries; the sites' statistics), as one safetensors file written atomically and
        owner-only, so a restarted server continues from the last completed round."""
        from fedoap.privacy.at_rest import write_private

        meta = {"format": SERVER_STATE_FORMAT, "round": str(int(rnd)), "encrypted": "1" if rule.encrypted else "0",
                "identity": json.dumps(self._state_identity()), "history": json.dumps(self._history),
                "rule_state": json.dumps(rule.state()), "site_statistics": json.dumps(self._intake.site_statistics)}
        write_private(os.path.join(self.get_run_dir(), SERVER_STATE_FILE), _safetensors_bytes(broadcast, meta))

    def _resume_state(self, initial_shared: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """The state an interrupted run of this job left (``resume_from``), or None when not resuming.

        Raises:
            FileNotFoundError: resuming without a state file (names it).
            ValueError: a state of another job (method, rounds, HE or shared keys differ) or not of this format.
        """
        if not self._robustness.resume_from:
            return None
        root = self.fl_ctx.get_engine().get_workspace().get_root_dir()
        path = previous_run_dir(self._robustness.resume_from, "server", root) / SERVER_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"resume_from={self._robustness.resume_from!r}: {path} does not exist (no round of that run "
                                    "completed, or another workspace)")
        meta, arrays = _read_safetensors(path, SERVER_STATE_FORMAT)
        try:
            identity = json.loads(meta.get("identity", "null"))
            state = {"round": int(meta["round"]), "history": json.loads(meta["history"]),
                     "rule_state": json.loads(meta["rule_state"]),
                     "site_statistics": json.loads(meta["site_statistics"]), "encrypted": meta["encrypted"] == "1"}
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path} is not a server state of format {SERVER_STATE_FORMAT!r}: {err}") from None
        if identity != self._state_identity():
            raise ValueError(f"{path} is the state of another job (method, its arguments, rounds, HE or shared keys "
                             "differ): it cannot be resumed by this one")
        if not 0 <= state["round"] < self.num_rounds:
            raise ValueError(f"{path}: round {state['round']} is outside this job's {self.num_rounds} rounds")
        if state["encrypted"]:
            broadcast = dict(arrays)
        else:
            broadcast = {}
            for key, value in initial_shared.items():
                if key not in arrays or tuple(arrays[key].shape) != tuple(np.shape(value)):
                    raise ValueError(f"{path}: {key!r} is missing or has another shape")
                if not np.isfinite(arrays[key]).all():
                    raise ValueError(f"{path}: {key!r} contains NaN or Inf")
                broadcast[key] = torch.as_tensor(arrays[key]).to(torch.as_tensor(value).dtype)
        return {**state, "broadcast": broadcast, "path": str(path)}

    # -- secure aggregation ----------------------------------------------------------------------------------------------
    def _secagg_exchange(self, rnd: int, targets: list[str], rule: ServerRule) -> dict[str, Any]:
        """Round ``rnd``'s key exchange (``fedoap.privacy.secagg``): the sites' signed round keys in, checked against
        the roster and relayed; their key shares, encrypted to each holder, in and relayed. Binds the round to the
        masked sum (:meth:`fedoap.server.rules.MaskedSum.begin`).

        Returns:
            ``{"survivors": the sites that completed it (they train), "dropped": {site: why} for the others,
            "message": what the training task carries (survivors, the shares by recipient)}``.
        """
        timeout = self._secagg_step_timeout(first=not self._secagg_started)
        self._secagg_started = True
        exchange = ServerSecAgg(str(self.fl_ctx.get_job_id()), rnd, self._roster, rule.n_values,
                                self._secagg_config)
        dropped: dict[str, str] = {}
        answers = self._secagg_messages(rnd, SECAGG_ADVERTISE_TASK, "advertise", {}, targets, timeout, dropped)
        announced = {}  # the weight each site expects to claim: their total is the round's common scale
        for site, meta in answers.items():
            weight = meta.get(AGGREGATION_WEIGHT_KEY)
            if is_finite_number(weight) and 0 < weight <= self._robustness.max_site_weight:
                announced[site] = float(weight)
            else:
                dropped[site] = f"announced aggregation weight {weight!r} is not a number in (0, max_site_weight]"
        try:
            verified = exchange.receive_keys({site: answers[site][SECAGG_KEY] for site in announced})
            for site, why in exchange.rejected.items():
                dropped[site] = f"its round keys were refused: {why}"
            shares = self._secagg_messages(rnd, SECAGG_SHARE_TASK, "shares", {"advertised": dict(verified)},
                                           sorted(verified), timeout, dropped)
            routed = exchange.route_shares({site: meta[SECAGG_KEY] for site, meta in shares.items()})
            survivors = sorted(exchange.survivors)
        except SecAggError as err:  # fewer than two sites left: no round can be masked
            self._warn(f"round {rnd + 1}: secure aggregation: {err}")
            shares, routed, survivors = {}, {}, []
            for site in targets:
                dropped.setdefault(site, f"secure aggregation: {err}")
        for site in shares:
            if site not in survivors:
                dropped.setdefault(site, "its key shares were incomplete or malformed")
        self._progress(f"round {rnd + 1}/{self.num_rounds}: secure aggregation keys exchanged, {len(survivors)} "
                       f"site(s) train")

        def unmask(sent: Any, gone: Any) -> dict[str, Any]:
            reveals = self._secagg_messages(rnd, SECAGG_UNMASK_TASK, "reveal",
                                            {"sent": list(sent), "dropped": list(gone)}, list(sent), timeout, {})
            return {site: meta[SECAGG_KEY] for site, meta in reveals.items()}

        scale = math.fsum(announced[site] for site in survivors) if survivors else 1.0
        rule.begin(exchange, unmask, scale)
        return {"survivors": survivors, "dropped": dropped,
                "message": {"survivors": survivors, "scale": scale,
                            "shares": {site: dict(v) for site, v in routed.items()}}}

    def _secagg_messages(self, rnd: int, task_name: str, kind: str, message: dict[str, Any], targets: list[str],
                         timeout: float, dropped: dict[str, str]) -> dict[str, Any]:
        """Send one protocol step to ``targets``; the meta of the answers whose message is well formed, by site (the
        others are recorded in ``dropped`` with why)."""
        if not targets:
            return {}
        task = FLModel(params={}, params_type=ParamsType.FULL, current_round=rnd, total_rounds=self.num_rounds,
                       meta={SECAGG_KEY: message})
        results = self._send(task_name, task, targets, timeout)
        got: dict[str, Any] = {}
        for result in results:
            meta = result.meta or {}
            site = meta.get("client_name")
            if site not in targets or site in got:
                continue
            refused = meta.get(SECAGG_REFUSED_KEY)
            if refused is not None:
                dropped[site] = f"{task_name}: refused: {str(refused)[:500]}"
                self._warn(f"round {rnd + 1}: {site} refused {task_name}: {str(refused)[:500]}")
                continue
            msg = meta.get(SECAGG_KEY)
            problem = check_message(kind, msg)
            if problem:
                dropped[site] = f"{task_name}: malformed message: {problem}"
                self._warn(f"round {rnd + 1}: {site}: {task_name}: malformed message: {problem}")
                continue
            got[site] = meta
        for site in targets:
            if site not in got and site not in dropped:
                dropped[site] = f"no answer to {task_name} (timed out, failed or disconnected)"
        return got

    def _secagg_step_timeout(self, first: bool = False) -> float:
        """Seconds one key-exchange step waits. The steps of this run's first round wait as long as a round (0: no
        limit): the first task a site answers includes its start-up (its data, its network), which can take minutes
        at a hospital. Later steps wait the round timeout when shorter than two minutes, else two minutes (a step is
        milliseconds of work; the rest is NVFlare's task polling)."""
        if first:
            return self.task_timeout
        return min(self.task_timeout, SECAGG_STEP_TIMEOUT) if self.task_timeout > 0 else SECAGG_STEP_TIMEOUT

    def _secagg_roster(self) -> dict[str, bytes]:
        """Every site's public identity key, from the server's ``local/`` folder (or ``$FEDOAP_SECAGG_DIR``)."""
        from fedoap.privacy.secagg_keys import load_roster

        return load_roster(self.fl_ctx.get_engine().get_workspace().get_root_dir())

    def _task_meta(self) -> dict[str, Any]:
        """What every task carries besides the parameters: the latest statistics of the sites, for a method that
        uses them (``RoundIntake.task_meta``)."""
        return self._intake.task_meta()

    def _job_rule(self, initial_shared: dict[str, Any]) -> ServerRule:
        """The rule object that serves this job (:func:`fedoap.server.rules.rule_for_job`), built once; under HE with
        the server's TenSEAL context.

        Raises:
            FileNotFoundError: HE without the server's context file.
            ValueError: a context that holds a secret key, or a reference the rule cannot take.
        """
        return rule_for_job(self._rule, self._rule_args, initial_shared, self._he_context() if self.he else None,
                            secagg=self._secagg_config, **self._robustness.rule_options())

    def _he_context(self) -> Any:
        """The server's TenSEAL context (no secret key: the server only adds ciphertexts)."""
        from fedoap.privacy.contexts import find_context_file
        from fedoap.privacy.he import load_context

        workspace_root = self.fl_ctx.get_engine().get_workspace().get_root_dir()
        context = load_context(find_context_file("server", workspace_root))
        if context.has_secret_key():
            raise ValueError("the server's TenSEAL context holds a secret key: refusing to run HE with it")
        return context

    def _save(self, model: FLModel, aggregate: dict[str, Any], rnd: int, ciphertext: bool) -> None:
        """Persist the round's aggregate: through the persistor in clear, or (ciphertext, HE) as ciphertext only."""
        model.current_round = rnd
        if ciphertext:  # owner-only, atomic, no pickle
            from fedoap.privacy.at_rest import write_private

            write_private(os.path.join(self.get_app_dir(), ENCRYPTED_CHECKPOINT),
                          encrypted_checkpoint_bytes(aggregate, rnd))
            return
        model.params.update({k: torch.as_tensor(v) for k, v in aggregate.items()})
        self.save_model(model)
