"""A site's privacy budget for one job, turned into a mechanism and its noise (or a refusal).

A site's policy says what it protects and how much: epsilon at delta per job, for one unit (``"site"``: the
hospital's whole data set; ``"case"``: one patient; ``"slice"``: one image). How much noise that takes depends on the
job (rounds, local epochs, batch size, how many sites are averaged), so the site derives it here instead of
guessing a noise multiplier in advance:

* **client-level DP** of the update (McMahan et al., ICLR 2018): one Gaussian release per round, sigma calibrated so
  that ``rounds`` releases spend epsilon; it protects the whole site, hence every case and slice too;
* **DP-SGD** (Abadi et al., CCS 2016) at the budget's unit (``case`` or ``slice``): sigma calibrated over every step
  of the job at the Poisson rate ``q = 1 / ceil(units / batch)``.

A mechanism is useful only if the noise on the *mean* it perturbs stays small: the noise multiplier divided by the
number of clipped contributions averaged (McMahan et al.'s effective noise, sigma / (qN)): ``sigma / sites`` for
client-level DP (every site clipped to C, the server averages), ``sigma / expected batch`` for DP-SGD. A budget whose
mechanism would put more than ``max_mean_noise`` on that mean is refused with both numbers, before anything trains:
client-level DP at epsilon 8 over 12 rounds needs sigma 1.6, which on the mean of 2 sites is 0.8, noise as large as
the signal. Client-level DP is chosen when it is useful (it protects more), else DP-SGD at the budget's unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fedoap.checks import is_finite_number

__all__ = ["DPBudget", "JobShape", "Mechanism", "BudgetRefusal", "plan_mechanism", "gaussian_epsilon",
           "gaussian_noise_for", "BUDGET_UNITS"]

#: what a budget protects: the site's whole data set, one patient, one slice
BUDGET_UNITS = ("site", "case", "slice")


class BudgetRefusal(ValueError):
    """The job cannot meet the site's budget with a useful signal-to-noise ratio (the message says why)."""


@dataclass(frozen=True)
class DPBudget:
    """A site's per-job privacy budget.

    Args:
        epsilon: the most epsilon one job may spend on the unit, at ``delta``.
        delta: the delta of that epsilon, in (0, 1).
        unit: ``"site"`` (client-level DP only), ``"case"`` or ``"slice"`` (client-level DP if useful, else DP-SGD
            at that unit).
        clip_norm: the client-level clip norm ``C`` when the job sets none.
        max_mean_noise: the largest noise multiplier on the averaged quantity (see the module docstring) a
            mechanism may have to be useful.

    Raises:
        ValueError: a value out of range (names it).
    """

    epsilon: float
    delta: float = 1e-5
    unit: str = "slice"
    clip_norm: float = 1.0
    max_mean_noise: float = 0.1

    def __post_init__(self) -> None:
        for name in ("epsilon", "clip_norm", "max_mean_noise"):
            value = getattr(self, name)
            if not is_finite_number(value) or float(value) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not is_finite_number(self.delta) or not 0 < float(self.delta) < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.unit not in BUDGET_UNITS:
            raise ValueError(f"unit must be one of {list(BUDGET_UNITS)}, got {self.unit!r}")


@dataclass(frozen=True)
class JobShape:
    """What the noise of a job depends on.

    Args:
        rounds: federated rounds (client-level releases). local_epochs: DP-SGD epochs per round.
        batch_size: the DP-SGD (expected) batch. sites: the fewest sites whose updates the server averages each round
            (the job's ``--min-responses``; 1 when the job promises none).
        units: the site's training units (slices, or cases for a case budget); None when unknown (at deployment,
            before the site reads its data): DP-SGD is then only checked for being possible.
        dp_sgd_conflict: why the job's method or network cannot run DP-SGD ("" if it can).
    """

    rounds: int
    local_epochs: int
    batch_size: int
    sites: int = 1
    units: Optional[int] = None
    dp_sgd_conflict: str = ""


@dataclass(frozen=True)
class Mechanism:
    """The mechanism a budget chose for a job: ``kind`` ``"client"`` (client-level DP, ``unit`` ``"site"``) or
    ``"dp_sgd"`` (at ``unit``), its noise multiplier and its noise on the mean; for DP-SGD the Poisson rate and the
    job's steps (None when the site's data size is not known yet)."""

    kind: str
    unit: str
    noise_multiplier: Optional[float]
    mean_noise: Optional[float]
    sample_rate: Optional[float] = None
    steps: Optional[int] = None

    def describe(self) -> str:
        if self.kind == "client":
            return (f"client-level DP, sigma {self.noise_multiplier:.3g} (noise {self.mean_noise:.3g} x C on the "
                    "mean update)")
        if self.noise_multiplier is None:
            return f"DP-SGD per {self.unit} (sigma set when the site's data size is known)"
        return (f"DP-SGD per {self.unit}, sigma {self.noise_multiplier:.3g} at rate {self.sample_rate:.3g} over "
                f"{self.steps} steps (noise {self.mean_noise:.3g} x C on the mean gradient)")


def _calibrated(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from fedoap.privacy.dp import _calibrate

    return _calibrate(target_epsilon=float(epsilon), target_delta=float(delta), sample_rate=float(sample_rate),
                      steps=int(steps), accountant="rdp")


#: the Renyi orders of Opacus's RDP accountant (``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS``)
_ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=np.float64)


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` Gaussian mechanisms without subsampling (client-level DP, one release per
    round), by Renyi DP: ``releases * alpha / (2 sigma^2)`` at each order, converted as Opacus's RDP accountant does
    (Balle et al. 2020), so it equals ``fedoap.privacy.dp.update_dp_epsilon``; numpy only, for a site's parent
    process, which must vet a job without importing torch."""
    if noise_multiplier <= 0:
        return math.inf
    rdp = releases * _ORDERS / (2.0 * noise_multiplier ** 2)
    eps = rdp - (math.log(delta) + np.log(_ORDERS)) / (_ORDERS - 1) + np.log((_ORDERS - 1) / _ORDERS)
    return float(np.nanmin(eps))


def gaussian_noise_for(epsilon: float, releases: int, delta: float, tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon, Opacus's) whose ``releases`` Gaussian releases
    spend at most ``epsilon`` (bisection on :func:`gaussian_epsilon`)."""
    low, high = 0.0, 1.0
    while gaussian_epsilon(high, releases, delta) > epsilon:
        low, high = high, 2 * high
    while epsilon - gaussian_epsilon(high, releases, delta) > tolerance:
        middle = (low + high) / 2
        if gaussian_epsilon(middle, releases, delta) > epsilon:
            low = middle
        else:
            high = middle
    return high


def client_level(budget: DPBudget, shape: JobShape) -> Mechanism:
    """Client-level DP over the job's rounds: sigma for ``rounds`` releases at epsilon, its noise on the mean of
    ``sites`` clipped updates."""
    sigma = gaussian_noise_for(budget.epsilon, shape.rounds, budget.delta)
    return Mechanism("client", "site", sigma, sigma / max(1, shape.sites))


def dp_sgd(budget: DPBudget, shape: JobShape) -> Mechanism:
    """DP-SGD at the budget's unit over every step of the job (Opacus's rate convention, as ``fedoap.privacy.dp
    .DPSGD``); sigma None while the site's number of units is unknown."""
    unit = "slice" if budget.unit == "site" else budget.unit
    if shape.units is None:
        return Mechanism("dp_sgd", unit, None, None)
    steps_per_epoch = math.ceil(shape.units / shape.batch_size)
    rate = 1.0 / steps_per_epoch
    steps = shape.rounds * shape.local_epochs * steps_per_epoch
    sigma = _calibrated(budget.epsilon, budget.delta, rate, steps)
    return Mechanism("dp_sgd", unit, sigma, sigma / max(1, int(shape.units * rate)), rate, steps)


def plan_mechanism(budget: DPBudget, shape: JobShape) -> Mechanism:
    """The mechanism that meets ``budget`` in a job of ``shape`` with a useful noise level: client-level DP if its
    noise on the mean is at most ``max_mean_noise``, else (for a case or slice budget) DP-SGD at that unit.

    Raises:
        BudgetRefusal: neither is useful (the message gives each one's noise on the mean, or why DP-SGD is
            impossible), so the job must not run on this site.
    """
    client = client_level(budget, shape)
    if client.mean_noise <= budget.max_mean_noise:
        return client
    why_client = (f"client-level DP at epsilon {budget.epsilon:g} over {shape.rounds} rounds needs sigma "
                  f"{client.noise_multiplier:.3g}, i.e. {client.mean_noise:.3g} x C of noise on the mean of "
                  f"{shape.sites} site(s), above the site's limit {budget.max_mean_noise:g}")
    if budget.unit == "site":
        raise BudgetRefusal(f"{why_client} (the site's budget protects the whole site, which only client-level DP "
                            "does); more sites per round (--min-responses) or fewer rounds would lower it")
    if shape.dp_sgd_conflict:
        raise BudgetRefusal(f"{why_client}; and DP-SGD per {budget.unit} is impossible: {shape.dp_sgd_conflict}")
    sgd = dp_sgd(budget, shape)
    if sgd.mean_noise is not None and sgd.mean_noise > budget.max_mean_noise:
        raise BudgetRefusal(f"{why_client}; and {sgd.describe()} is above the limit too: a larger batch "
                            "(--dp-sgd-batch-size) or fewer epochs would lower it")
    return sgd
