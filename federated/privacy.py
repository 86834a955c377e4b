"""The privacy budget a federated study spends, from Opacus's RDP accountant.

Both modes give site-level differential privacy: the unit protected is one hospital's whole
contribution (its clipped model update) in each round.

- central: each site clips its update, the server adds Gaussian noise of
  ``dp_noise_multiplier x dp_clipping_norm`` to the sum (DP-FedAvg, McMahan et al. 2018). Each
  round is a subsampled Gaussian mechanism with that multiplier and the share of sites sampled.
- local: each site clips and adds noise itself (Flower's LocalDpMod: the Gaussian mechanism
  calibrated to ``(dp_epsilon, dp_delta)`` for one release). Its multiplier is
  ``sqrt(2 ln(1.25 / delta)) / epsilon``, one release in every round the site trains.
"""
from __future__ import annotations

import math

from medmamba.config import Config

PROTECTS = {
    "central": "each hospital's contribution against everyone who sees the global models (the other "
               "hospitals, anyone the models are shared with); not against the coordinator's server, which "
               "receives every clipped update before it adds the noise",
    "local": "each hospital's contribution against everyone outside it, the coordinator's server and the "
             "network included: the noise is added before the update leaves the hospital",
}


def noise_multiplier(cfg: Config) -> float:
    """The Gaussian noise's standard deviation over the clipping norm, per round."""
    fed = cfg.federated
    if fed.dp_mode == "local":
        return math.sqrt(2 * math.log(1.25 / fed.dp_delta)) / fed.dp_epsilon
    return fed.dp_noise_multiplier


def privacy_budget(cfg: Config, rounds: int, sample_rate: float) -> dict | None:
    """``{"mode", "epsilon", "delta", "rounds", "noise_multiplier", "sample_rate", "protects"}`` after
    ``rounds`` rounds in which a share ``sample_rate`` of the sites trained (the local mode counts
    every round for every site), or None without differential privacy. Epsilon is infinite without
    noise."""
    from opacus.accountants import RDPAccountant

    fed = cfg.federated
    if fed.dp_clipping_norm is None:
        return None
    sigma = noise_multiplier(cfg)
    rate = 1.0 if fed.dp_mode == "local" else sample_rate
    epsilon = math.inf
    if sigma > 0:
        accountant = RDPAccountant()
        for _ in range(rounds):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
        epsilon = accountant.get_epsilon(fed.dp_delta)
    return {"mode": fed.dp_mode, "epsilon": epsilon, "delta": fed.dp_delta, "rounds": rounds,
            "noise_multiplier": sigma, "sample_rate": rate, "clipping_norm": fed.dp_clipping_norm,
            "accountant": "opacus RDP", "protects": PROTECTS[fed.dp_mode]}
