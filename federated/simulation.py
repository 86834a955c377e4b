"""`medmamba federate`: the Flower simulation of a federation of hospitals, then the report.

The ServerApp and the ClientApp (``client_app.app``, the one SuperNodes run) are run by
``flwr.simulation.run_simulation`` on Flower's Ray backend, one virtual node per site with
``federated.client_cpus``/``client_gpus`` each. A ClientApp actor that dies (killed, out of memory)
is restarted by Ray (up to once per round) and the site's message it was running, or was sent
while it restarted, is run again once; a site whose retry fails too is named in the round's
failures. (Flower alone returns a dead actor to its pool as if it were alive, so the sites sent
to it failed every later round.)
With ``federated.centralized_baseline`` the same model is also trained on the pooled sites for
rounds x local_epochs epochs and tested on the same global test set.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.simulation import run_simulation
from medmamba.config import Config, FederatedConfig, absolute_paths
from medmamba.errors import ConfigError
from medmamba.runtime import init_ray
from medmamba.tracking import open_tracker

from . import client_app
from .server_app import FederatedRun, Outcome, make_server_app

log = logging.getLogger(__name__)
STOP_WAIT_S = 30  # after Ctrl-C or SIGTERM, for the ServerApp to end its MLflow run


def check_site_resources(fed: FederatedConfig) -> None:
    """ConfigError unless one site (``federated.client_cpus``, ``client_gpus``) fits on this machine,
    where the simulation starts its Ray cluster (unless $RAY_ADDRESS names another): Flower would
    log 'ActorPool is empty' and the ServerApp wait for sites that never start."""
    if os.environ.get("RAY_ADDRESS"):
        return
    cpus, gpus = len(os.sched_getaffinity(0)), torch.cuda.device_count()
    if fed.client_cpus > cpus or fed.client_gpus > gpus:
        raise ConfigError(f"one site (federated.client_cpus, federated.client_gpus) asks for {fed.client_cpus:g} "
                          f"CPUs and {fed.client_gpus:g} GPUs but this machine has {cpus} CPUs and {gpus} GPUs")


def run_federated(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict:
    """Run (or with ``resume``, continue) the federated study of ``cfg`` into ``output_dir``;
    returns the report (also in output_dir/federated_report.json). MLflow: ``cfg.mlflow``."""
    absolute_paths(cfg)
    check_site_resources(cfg.federated)
    run = FederatedRun(cfg, Path(output_dir).resolve(), open_tracker(cfg.mlflow), resume)
    outcome = Outcome()
    fed = cfg.federated
    init_ray(include_dashboard=False)  # here, as Flower would start it (it uses a running one, and shuts it down)
    try:
        run_simulation(server_app=make_server_app(run, outcome), client_app=client_app.app,
                       num_supernodes=len(run.names),
                       backend_config={"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus,
                                                            "max_restarts": fed.rounds, "max_task_retries": 1}})
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, in this (the simulation engine's) thread
        outcome.stop.set()  # the ServerApp's thread ends too, at its next wait for the sites or epoch end
        if not outcome.ended.wait(STOP_WAIT_S):
            log.warning("the ServerApp did not end within %d s of the interrupt (a long baseline epoch?); "
                        "its MLflow run is ended KILLED from here", STOP_WAIT_S)
            if run.tracker:
                run.tracker.end("KILLED")
        raise
    if outcome.errors:
        raise outcome.errors[0]
    if not outcome.reports:
        raise RuntimeError(f"the simulation ended after {len(run.rounds)} of {fed.rounds} rounds; "
                           "see the Flower log above")
    return outcome.reports[0]
