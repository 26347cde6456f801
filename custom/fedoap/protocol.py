"""The vocabulary the server and the sites share: task names, the meta keys of what travels with a task or a result,
and the server's history file. No logic: both sides import it, it imports nothing of theirs."""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLMetaKey

__all__ = ["TRAIN_TASK", "PERSONALIZE_TASK", "NUM_SAMPLES_KEY", "AGGREGATION_WEIGHT_KEY", "NUM_STEPS_KEY",
           "SITE_STATISTICS_KEY", "DP_STAMP_KEY", "SITE_DP_POLICY_KEY", "SITE_DP_BUDGET_KEY", "HISTORY_FILE"]

#: task of every federated round: train on the broadcast shared parameters, send the shared update
TRAIN_TASK = "train"
#: last task: fine-tune on the final shared parameters, evaluate, keep the model on the site, send metrics only
PERSONALIZE_TASK = "personalize"

#: result meta: the site's number of training samples (the aggregation weight unless it reports one)
NUM_SAMPLES_KEY = "n_samples"
#: result meta: the site's aggregation weight (samples, or steps for FedGS); n_samples if absent
AGGREGATION_WEIGHT_KEY = "aggregation_weight"
#: result meta (NVFlare's Client API): the number of local steps of the round (FedNova's tau_k)
NUM_STEPS_KEY = FLMetaKey.NUM_STEPS_CURRENT_ROUND
#: result meta: the statistics a site's method shares in clear (FedRDN, FedDP); task meta: every site's latest ones
SITE_STATISTICS_KEY = "site_statistics"
#: result meta: the client-level DP the released update went through ({"clip_norm", "noise_multiplier", "delta",
#: "releases"[, "dp_sgd"]}), checked and charged by the site's policy filter before it leaves
DP_STAMP_KEY = "fedoap_update_dp"
#: task meta, written by the site's own policy filter: its mandatory client-level DP
SITE_DP_POLICY_KEY = "fedoap_site_dp_policy"
#: task meta, written by the site's own policy filter: its privacy budgets and what is left of them
SITE_DP_BUDGET_KEY = "fedoap_site_dp_budget"

#: the server's record of a job (rounds, per-site metrics, personalized results), in its run folder
HISTORY_FILE = "fedoap_history.json"
