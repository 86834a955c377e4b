"""The Flower ServerApp: rounds of a strategy, the global model tested after every round, per-site
metrics, a checkpoint and a report after every round, everything logged to MLflow.

``app`` is configured by Flower's run config (pyproject's ``[tool.flwr.app.config]``, overridden
with ``flwr run --run-config``): ``recipe`` (a YAML config, e.g. configs/federated_deploy.yaml),
``set`` (space-separated ``key=value`` overrides of it), ``output-dir`` and ``resume``. It sends the
study's config to the sites in every message; ``medmamba federate`` runs the same ``FederatedRun``.

Before round 1 the server asks every node for its site's name and its image counts per split and
class (a query message; counts only leave the sites): names attribute every later reply and
failure by node id, the counts go in the report, and a deployed federation's class list is their
union. The global model is tested on the server's test set when it has one (simulation) and
otherwise by the sites on their test splits (their example-weighted mean; a deployed server holds
no data).

The strategy comes from ``federated.strategy``: FedAvg, FedProx (``federated.mu``), FedBN (FedAvg on
the server; each site keeps its BatchNorm layers, see client_app), FedAdam, FedYogi, FedAdagrad
(``server_lr``, ``beta_1``, ``beta_2``, ``tau``) or FedAvgM (``server_lr``, ``server_momentum``).
Central differential privacy wraps it in Flower's client-side fixed clipping. Failed sites are
dropped from a round (their error, naming the site, is logged and kept in the report) as long as
``federated.min_clients`` sites train.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shlex
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping, FedAdagrad, FedAdam, FedAvg, FedAvgM,
                                     FedProx, FedYogi)

from medmamba.comparison import SITE_MATRIX
from medmamba.config import Config, absolute_paths, check_new_output, check_resumable, load_config
from medmamba.data import make_loader
from medmamba.errors import ConfigError, FederationError, Terminated
from medmamba.evaluation import evaluate_checkpoint, load_checkpoint, predict_metrics
from medmamba.metrics import METRIC_KEYS, is_better
from medmamba.registry import build_model, read_checkpoint
from medmamba.reports import plot_federated_curves, write_csv
from medmamba.tracking import Tracker, git_commit, mlflow_run, open_tracker
from medmamba.train import StopWhenSet

from .client_app import CLASSES_KEY, CONFIG_KEY, STATE_DIR_KEY, STUDY_KEY
from .privacy import privacy_budget
from .task import (centralized_baseline, device_for, local_baselines, pooled_datasets, site_names, test_on_sites,
                   trained_model)

log = logging.getLogger(__name__)

STATE_FILE = "federated_state.pt"  # the global model and the report after the last completed round
REPORT_FILE = "federated_report.json"
SITE_KEYS = ("train_loss",) + tuple(f"{s}_{k}" for s in ("val", "test") for k in METRIC_KEYS)


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every metric over the sites that have it (NaN, e.g. an AUC on a
    site with one class, is left out rather than spreading to the mean)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])
        for key, value in metrics.items():
            if key in (weight_key, "site") or not math.isfinite(float(value)):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


class RoundRecorder:
    """Which site each Flower node is, what the strategy heard from each site in each round, and
    which sites failed (round 0: the query before round 1)."""

    def __init__(self):
        self.node_sites: dict[int, str] = {}  # Flower node id -> site name, from the sites' query replies
        self.sites: dict[int, dict[str, dict[str, float]]] = {}
        self.failures: dict[int, list[str]] = {}
        self.validation: dict[int, dict[str, float]] = {}  # the sites' example-weighted mean metrics
        self.sent: list[Message] = []  # this round's messages (the grid sets their ids as it sends them)

    def expect(self, messages: Iterable[Message]) -> list[Message]:
        self.sent = list(messages)
        return self.sent

    def site_of(self, msg: Message) -> str:
        """The site a reply is from: its node, or for an error the SuperLink wrote (a node that went
        away) the node the answered message was sent to."""
        node = msg.metadata.src_node_id
        if node not in self.node_sites:
            node = next((m.metadata.dst_node_id for m in self.sent
                         if m.metadata.message_id == msg.metadata.reply_to_message_id), node)
        return self.node_sites.get(node, f"node {node} (site unknown)")

    def fail(self, server_round: int, msg: Message) -> None:
        """Keep and log a failed reply, named by the site its node is."""
        name = self.site_of(msg)
        lines = [line.strip() for line in msg.error.reason.strip().splitlines() if line.strip()]
        marker = f"site {name} failed "  # a SiteError raised at the site; else e.g. a node that went away
        said = next((line for line in reversed(lines) if marker in line), None)
        text = marker + said.split(marker, 1)[1] if said else f"site {name} failed: {lines[-1] if lines else 'no reason'}"
        self.failures.setdefault(server_round, []).append(text)
        log.warning("round %d: %s", server_round, self.failures[server_round][-1])

    def record(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self.fail(server_round, msg)
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            row = self.sites.setdefault(server_round, {}).setdefault(self.site_of(msg), {})
            row.update({k: float(v) for k, v in metrics.items() if k in SITE_KEYS})
        return replies

    def check_quorum(self, server_round: int, replies: list[Message], needed: int) -> None:
        """FederationError unless ``needed`` sites trained in this round (federated.min_clients)."""
        trained = sum(not msg.has_error() for msg in replies)
        if trained < needed:
            failures = "; ".join(self.failures.get(server_round, [])) or "no other reply"
            raise FederationError(f"round {server_round}: {trained} of {len(replies)} sites trained, fewer than "
                                  f"federated.min_clients={needed}; {failures}")


def _valid_batchnorm(arrays: ArrayRecord) -> ArrayRecord:
    """BatchNorm running variances clamped at 0: noise (local differential privacy) can make a
    variance negative, and the model NaN. Post-processing: the privacy guarantee is unchanged."""
    state = arrays.to_torch_state_dict()
    if not any(k.endswith("running_var") for k in state):
        return arrays
    return ArrayRecord({k: v.clamp(min=0) if k.endswith("running_var") else v for k, v in state.items()})


def _clamping(base: type) -> type:
    """``base`` whose aggregated BatchNorm running variances are clamped at 0 (``_valid_batchnorm``)."""
    class Clamping(base):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            return (arrays and _valid_batchnorm(arrays)), metrics

    Clamping.__name__ = base.__name__
    return Clamping


def _recording(base: type) -> type:
    class Recording(_clamping(base)):
        recorder: RoundRecorder

        def configure_train(self, server_round, arrays, config, grid):
            return self.recorder.expect(super().configure_train(server_round, arrays, config, grid))

        def configure_evaluate(self, server_round, arrays, config, grid):
            return self.recorder.expect(super().configure_evaluate(server_round, arrays, config, grid))

        def aggregate_train(self, server_round, replies):
            replies = self.recorder.record(server_round, replies)
            self.recorder.check_quorum(server_round, replies, self.min_train_nodes)
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):
            aggregated = super().aggregate_evaluate(server_round, self.recorder.record(server_round, replies))
            self.recorder.validation[server_round] = dict(aggregated or {})
            return aggregated

    Recording.__name__ = base.__name__
    return Recording


def sampled_sites(cfg: Config, num_sites: int) -> int:
    """How many sites train in a round."""
    return max(cfg.federated.min_clients, int(num_sites * cfg.federated.fraction_fit))


def make_strategy(cfg: Config, recorder: RoundRecorder, num_sites: int):
    fed = cfg.federated
    common = dict(fraction_train=fed.fraction_fit, fraction_evaluate=1.0, min_train_nodes=fed.min_clients,
                  min_evaluate_nodes=fed.min_clients, min_available_nodes=fed.min_clients,
                  train_metrics_aggr_fn=weighted_mean, evaluate_metrics_aggr_fn=weighted_mean)
    server_lr = {} if fed.server_lr is None else {"eta": fed.server_lr}
    adaptive = dict(tau=fed.tau, **server_lr)
    if fed.strategy == "fedprox":
        strategy = _recording(FedProx)(proximal_mu=fed.mu, **common)
    elif fed.strategy in ("fedadam", "fedyogi"):
        base = FedAdam if fed.strategy == "fedadam" else FedYogi
        strategy = _recording(base)(beta_1=fed.beta_1, beta_2=fed.beta_2, **adaptive, **common)
    elif fed.strategy == "fedadagrad":
        strategy = _recording(FedAdagrad)(**adaptive, **common)
    elif fed.strategy == "fedavgm":
        lr = {} if fed.server_lr is None else {"server_learning_rate": fed.server_lr}
        strategy = _recording(FedAvgM)(server_momentum=fed.server_momentum, **lr, **common)
    else:  # fedavg; fedbn aggregates like FedAvg, its difference is on the clients
        strategy = _recording(FedAvg)(**common)
    strategy.recorder = recorder
    if fed.dp_clipping_norm is not None and fed.dp_mode == "central":
        return _clamping(DifferentialPrivacyClientSideFixedClipping)(strategy, noise_multiplier=fed.dp_noise_multiplier,
                                                          clipping_norm=fed.dp_clipping_norm,
                                                          num_sampled_clients=sampled_sites(cfg, num_sites))
    return strategy


class FederatedRun:
    """The server side of one study: the sites, evaluation, checkpoints, report and MLflow.

    After every round the global model is tested (on the server's test set, or by the sites) and
    saved as ``final.pt``; the round whose global model has the best federated validation metric
    (the sites' example-weighted mean of ``val_<train.monitor>``, measured on their own validation
    splits: no test data chooses it) is kept as ``best.pt``.
    """

    def __init__(self, cfg: Config, output_dir: Path, tracker: Tracker | None, resume: bool):
        self.cfg, self.out, self.tracker, self.resume = cfg, Path(output_dir), tracker, resume
        self.out.mkdir(parents=True, exist_ok=True)
        check_new_output(self.out, "federated study", (STATE_FILE, REPORT_FILE), resume)
        self.deployed = cfg.federated.partition == "deployed"
        self.recorder = RoundRecorder()
        self.data = None if self.deployed else pooled_datasets(cfg)  # the server's own test set, if any
        self.test_loader = None if self.data is None else make_loader(self.data.test, cfg.train.batch_size, shuffle=False)
        self.names = [] if self.deployed else site_names(cfg)
        self.class_names = None if self.deployed else self.data.class_names
        self.statistics: dict[str, dict[str, int]] = {}  # site -> {"<split>/<class>": images}
        self.site_matrix: dict[str, dict[str, dict[str, float]]] | None = None  # model -> site -> its test metrics
        self.device = device_for(cfg)
        self.model = None
        self.rounds: list[dict] = []
        self.best: dict | None = None  # {"round", "metric", "value"} of best.pt
        self.run_id = None
        self.study_id = uuid.uuid4().hex  # names the sites' files for this study (FedBN's BatchNorm layers)
        state_path = self.out / STATE_FILE
        self.saved = read_checkpoint(state_path) if resume and state_path.is_file() else None
        if self.saved:
            if "config" in self.saved:  # (state files before this check have none)
                check_resumable(self.saved["config"], cfg, state_path)
            self.rounds, self.run_id, self.best = self.saved["rounds"], self.saved["run_id"], self.saved["best"]
            self.study_id = self.saved.get("study_id", self.study_id)
            self.class_names = self.saved.get("class_names", self.class_names)
            self.statistics = self.saved.get("statistics", {})
            log.info("resuming after round %d", len(self.rounds))
        if self.class_names:
            self._build_model()
        self.done = len(self.rounds)

    def _build_model(self) -> None:
        """The round-1 global model (or the saved one after a resume)."""
        self.model = build_model(self.cfg.model, len(self.class_names), self.cfg.data.size,
                                 pretrained=self.saved is None).to(self.device)
        if self.saved:
            self.model.load_state_dict(self.saved["model"])

    @property
    def monitor(self) -> str:
        return f"val_{self.cfg.train.monitor}"

    def tracking(self):
        """The federation's MLflow run (``mlflow_run``), continued after a resume."""
        fed = self.cfg.federated
        tags = {"kind": "federated", "git_commit": git_commit(), "strategy": fed.strategy, "partition": fed.partition}
        if self.names:
            tags["sites"] = ",".join(self.names)
        if fed.holdout_site:
            tags["holdout_site"] = fed.holdout_site
        params = {**self.cfg.flat(), "federated.differential_privacy": fed.dp_clipping_norm is not None}
        return mlflow_run(self.tracker, self.cfg.mlflow.run_name, params, tags, run_id=self.run_id)

    def message_config(self, **extra) -> ConfigRecord:
        """What every message tells the sites: the study's config, class list and id."""
        config = {CONFIG_KEY: json.dumps(self.cfg.to_dict()), CLASSES_KEY: json.dumps(self.class_names or []),
                  STUDY_KEY: self.study_id, **extra}
        if not self.deployed:  # simulated sites live on this machine: they keep their state beside the report
            config[STATE_DIR_KEY] = str(self.out / "sites")
        return ConfigRecord(config)

    def discover(self, grid: Grid) -> None:
        """Wait for the sites' nodes (``federated.num_sites`` when deployed), ask each for its name
        and image counts; a deployed federation's class list is the union of the sites' classes."""
        fed = self.cfg.federated
        expected = fed.num_sites if self.deployed else len(self.names)
        deadline = time.monotonic() + fed.round_timeout
        nodes = list(grid.get_node_ids())
        while len(nodes) < expected and time.monotonic() < deadline:
            time.sleep(1)
            nodes = list(grid.get_node_ids())
        if len(nodes) < expected:
            log.warning("%d of %d sites connected within federated.round_timeout; going on", len(nodes), expected)
        messages = [Message(RecordDict({"config": self.message_config()}), dst_node_id=node,
                            message_type=MessageType.QUERY) for node in nodes]
        answered = []
        for reply in grid.send_and_receive(self.recorder.expect(messages), timeout=fed.round_timeout):
            if reply.has_error():
                self.recorder.fail(0, reply)
                continue
            site = reply.content["site"]
            name = str(site["name"])
            if name in self.recorder.node_sites.values():
                raise FederationError(f"two nodes say they are site {name}: give each SuperNode its own site-name")
            self.recorder.node_sites[reply.metadata.src_node_id] = name
            if "error" in site:  # it can be named, but not read: it fails every round it is sampled
                self.recorder.failures.setdefault(0, []).append(str(site["error"]))
                log.warning("before round 1: %s", site["error"])
                continue
            answered.append(name)
            self.statistics[name] = {k: int(v) for k, v in reply.content["counts"].items()}
        if len(answered) < fed.min_clients:
            failures = "; ".join(self.recorder.failures.get(0, [])) or "no other reply"
            raise FederationError(f"before round 1: {len(answered)} of {len(nodes)} sites can take part, fewer than "
                                  f"federated.min_clients={fed.min_clients}; {failures}")
        if self.deployed:
            self.names = sorted(self.recorder.node_sites.values())
            found = sorted({key.split("/", 1)[1] for counts in self.statistics.values() for key in counts})
            if self.class_names and found != self.class_names:
                raise FederationError(f"the sites' classes {found} are not the study's {self.class_names} "
                                      "(a resumed study must keep its classes)")
            self.class_names = found
            if self.tracker:
                self.tracker.set_tags({"sites": ",".join(self.names)})
        if self.model is None:
            self._build_model()

    def global_metrics(self, arrays: ArrayRecord) -> dict | None:
        """The global model on the server's test set (None: the server has none)."""
        # FedBN: the sites send no BatchNorm layers, the global model keeps its initial ones
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=self.cfg.federated.strategy != "fedbn")
        if self.data is None:
            return None
        return predict_metrics(self.model, self.test_loader, self.device, self.data.class_names, self.data.positive_class)[0]

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's server-side evaluation hook, called before round 1 and after every round
        (after the sites' own evaluation of that round)."""
        metrics = self.global_metrics(arrays)
        validation = self.recorder.validation.get(server_round, {})
        if metrics is None:  # deployed: the sites' example-weighted mean on their test splits
            metrics = {k: validation.get(f"test_{k}", math.nan) for k in METRIC_KEYS}
        scalars = {k: float(metrics[k]) for k in METRIC_KEYS}
        if server_round == 0:
            if self.done == 0 and self.tracker and self.data is not None:
                self.tracker.log_metrics({f"global/{k}": v for k, v in scalars.items()}, step=0)
            return MetricRecord(scalars)
        number = self.done + server_round
        row = {"round": number, "global": scalars, "sites": self.recorder.sites.get(server_round, {}),
               "failures": self.recorder.failures.get(server_round, []),
               "validation": {k: v for k, v in validation.items() if k.startswith("val_")}}
        if number == 1 and self.recorder.failures.get(0):
            row["failures"] = self.recorder.failures[0] + row["failures"]  # (the sites that never answered)
        self.rounds.append(row)
        value = validation.get(self.monitor, math.nan)
        improved = is_better(self.cfg.train.monitor, value, self.best["value"] if self.best else None)
        if improved:
            self.best = {"round": number, "metric": f"federated {self.monitor}", "value": value}
        self._save(number, scalars, improved)
        self._log_round(row)
        return MetricRecord(scalars)

    def _log_round(self, row: dict) -> None:
        if not self.tracker:
            return
        number = row["round"]
        self.tracker.log_metrics({f"global/{k}": v for k, v in row["global"].items()}, step=number)
        self.tracker.log_metrics({f"federated/{k}": v for k, v in row["validation"].items()}, step=number)
        for name, site in row["sites"].items():
            self.tracker.log_metrics({f"site/{name}/{k}": v for k, v in site.items()}, step=number)
        budget = privacy_budget(self.cfg, number, self._sample_rate())
        if budget is not None:
            self.tracker.log_metrics({"privacy/epsilon": budget["epsilon"]}, step=number)

    def catch_up(self) -> None:
        """After a resume: log to MLflow the saved rounds it lacks (a kill between saving a round and
        logging it)."""
        if not self.tracker or not self.rounds:
            return
        logged = {m.step for m in self.tracker.client.get_metric_history(self.run_id, "global/auc")}
        for row in self.rounds:
            if row["round"] not in logged:
                log.info("logging round %d to MLflow (saved before the interruption, not logged)", row["round"])
                self._log_round(row)

    def _sample_rate(self) -> float:
        sites = max(len(self.names), 1)
        return min(sampled_sites(self.cfg, sites) / sites, 1.0)

    def privacy(self) -> dict | None:
        """The privacy budget spent so far (None without differential privacy)."""
        return privacy_budget(self.cfg, len(self.rounds), self._sample_rate())

    def _save(self, number: int, test: dict, improved: bool) -> None:
        """final.pt (this round's global model, loadable by `medmamba evaluate`), best.pt when it
        improved, the resumable state and the report; each file replaced atomically."""
        model = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        checkpoint = {"model": model, "config": self.cfg.to_dict(), "class_names": self.class_names,
                      "round": number, "test": test, "run_id": self.run_id, "experiment": self.cfg.mlflow.experiment}
        _atomic(torch.save, checkpoint, self.out / "final.pt")
        if improved:
            _atomic(torch.save, {**checkpoint, "val": self.best}, self.out / "best.pt")
        _atomic(torch.save, {"model": model, "rounds": self.rounds, "run_id": self.run_id, "best": self.best,
                             "config": self.cfg.to_dict(), "study_id": self.study_id, "class_names": self.class_names,
                             "statistics": self.statistics}, self.out / STATE_FILE)
        self.write_report()

    def write_report(self, centralized: dict | None = None) -> dict:
        holdout = self.cfg.federated.holdout_site
        tested_on = ("the sites' test splits (example-weighted mean of their metrics)" if self.data is None else
                     f"every image of the held-out site {holdout}" if holdout else "the server's test set")
        report = {"sites": self.names, "class_names": self.class_names, "config": self.cfg.to_dict(),
                  "global_test": tested_on,
                  "site_statistics": self.statistics, "rounds": self.rounds}
        if self.rounds:
            last = self.rounds[-1]
            report["final"] = {"file": "final.pt", "round": last["round"], "test": last["global"]}
        if self.best:
            best = self.rounds[self.best["round"] - 1]
            report["best"] = {"file": "best.pt", **self.best, "test": best["global"]}
            if holdout:  # leave-one-site-out: the best round's global model at the hospital that never trained
                report["holdout"] = {holdout: best["global"]}
        if (budget := self.privacy()) is not None:
            report["privacy"] = budget
        if centralized is not None:
            report["centralized"] = centralized
        if self.site_matrix is not None:
            report["site_matrix"] = self.site_matrix
        _atomic(lambda obj, path: Path(path).write_text(json.dumps(obj, indent=2, default=float)), report,
                self.out / REPORT_FILE)
        return report

    def _site_matrix(self, local: dict, pooled: bool) -> Path:
        """Every model at every site's test split (each site alone, the pooled model, the best
        round's federated model as each site tested it): the report's ``site_matrix`` and a CSV."""
        matrix = {f"local:{name}": row for name, row in local.items()}
        if pooled:
            pooled_model = trained_model(self.out / "centralized", self.cfg)
            matrix["pooled"] = test_on_sites(pooled_model, self.cfg)
        sites = self.rounds[self.best["round"] - 1]["sites"]
        matrix["federated"] = {name: {k: site[f"test_{k}"] for k in METRIC_KEYS if f"test_{k}" in site}
                               for name, site in sites.items()}
        self.site_matrix = matrix
        return write_csv(_site_matrix_rows(matrix), self.out / "federated_site_matrix.csv")

    def run(self, grid: Grid) -> None:
        """The remaining rounds on ``grid`` (after asking the sites who they are)."""
        remaining = self.cfg.federated.rounds - self.done
        if remaining <= 0:
            return
        self.discover(grid)
        strategy = make_strategy(self.cfg, self.recorder, len(self.names))
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=remaining,
                       train_config=self.message_config(**{"round-offset": self.done}),
                       evaluate_config=self.message_config(), evaluate_fn=self.evaluate_fn,
                       timeout=self.cfg.federated.round_timeout)
        if len(self.rounds) < self.cfg.federated.rounds:
            raise RuntimeError("the federation stopped before its last round")

    def finish(self, centralized: dict | None = None, local: dict | None = None) -> dict:
        """The final report files and MLflow artifacts: the best round's global model tested (on the
        server's test set, metrics.json and figures as a training run writes them; or the sites'
        mean), per-site x round table, curves, comparison with the centralised baseline, and with
        ``local`` (``local_baselines``) the site x site table of every model."""
        if self.best is None:  # no site ever reported validation metrics: the final round stands in
            shutil.copy2(self.out / "final.pt", self.out / "best.pt")
            last = self.rounds[-1]["round"]
            self.best = {"round": last, "metric": "none (no federated validation): the final round", "value": None}
        files = []
        if local is not None:
            files.append(self._site_matrix(local, centralized is not None))
        if self.data is not None:
            best = load_checkpoint(self.out / "best.pt", device=self.cfg.train.device, data=self.data)
            evaluation = evaluate_checkpoint(best, "test", self.out, self.cfg.train.batch_size)
            tested = evaluation.metrics
            files += evaluation.files
        else:
            tested = self.rounds[self.best["round"] - 1]["global"]
        report = self.write_report(centralized)
        table = self.out / "federated_rounds.csv"
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["round", "site", *SITE_KEYS])
            writer.writeheader()
            for row in self.rounds:
                writer.writerow({"round": row["round"], "site": "global",
                                 **{f"test_{k}": v for k, v in row["global"].items()}})
                writer.writerows({"round": row["round"], "site": name, **site} for name, site in row["sites"].items())
        curves = plot_federated_curves(self.rounds, self.names, centralized, self.out / "federated_curves.png")
        if self.tracker:
            self.tracker.set_tags({"best_round": self.best["round"]})
            self.tracker.log_evaluation("test", tested, files)
            if centralized:
                self.tracker.log_metrics({f"centralized/{k}": v for k, v in centralized.items()
                                          if k in METRIC_KEYS})
            if self.site_matrix:  # "local:hospital_a" is logged as site_matrix/local/hospital_a/<site>/<metric>
                self.tracker.log_metrics({f"{SITE_MATRIX}{row['model'].replace(':', '/')}/{row['tested_at']}/{k}": v
                                          for row in _site_matrix_rows(self.site_matrix)
                                          for k, v in row.items() if k in METRIC_KEYS})
            for path in (self.out / REPORT_FILE, table, curves):
                self.tracker.log_artifact(path)
        return report


def _site_matrix_rows(matrix: dict) -> list[dict]:
    return [{"model": model, "tested_at": site, **metrics} for model, row in matrix.items()
            for site, metrics in row.items()]


def _atomic(write, obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(obj, tmp)
    os.replace(tmp, path)


class StoppableGrid:
    """``grid`` whose waits for the sites' replies end when ``stop`` is set, raising ``Terminated``:
    a simulation stopped by Ctrl-C or SIGTERM stops its sites, but would leave the ServerApp's
    thread waiting for their replies (up to federated.round_timeout a round), and the process
    with it."""

    def __init__(self, grid: Grid, stop: threading.Event):
        self._grid, self._stop = grid, stop

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            if self._stop.is_set():
                raise Terminated()
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting -= {msg.metadata.reply_to_message_id for msg in got}
            if waiting:
                self._stop.wait(0.1)
        return replies


def run_study(run: FederatedRun, grid: Grid, stop: threading.Event | None = None) -> dict:
    """One study, start to end, on ``grid``: the rounds, the centralised baseline if asked (the
    server needs the sites' data for it: simulation only) and the report. Once ``stop`` is set, a
    baseline ends at its next epoch end (``Terminated``); a resumed study continues it from there."""
    with run.tracking() as run.run_id:
        run.catch_up()
        run.run(grid)
        fed = run.cfg.federated  # (baselines need the sites' data here: simulation only, checked by the config)
        halt = [StopWhenSet(stop)] if stop else []
        centralized = (centralized_baseline(run.cfg, run.out / "centralized", halt, run.resume)
                       if fed.centralized_baseline else None)
        local = local_baselines(run.cfg, run.out / "local", halt, run.resume) if fed.local_baselines else None
        return run.finish(centralized, local)


def _recipe(name: str) -> Path:
    """The recipe file ``name``: absolute, or relative to the working directory or to the app (Flower
    puts the installed app's folder, whose configs/ the FAB carries, on sys.path)."""
    candidates = [Path(name).expanduser()] + [Path(p) / name for p in sys.path if p]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"run config recipe={name!r}: no such file here or in the app")
    return found


def study_from_run_config(run_config: dict) -> tuple[Config, Path, bool]:
    """(config, output folder, resume) from Flower's run config: ``recipe``, ``set``, ``output-dir``, ``resume``."""
    recipe = str(run_config.get("recipe", ""))
    cfg = load_config(_recipe(recipe) if recipe else None, shlex.split(str(run_config.get("set", ""))))
    out = Path(str(run_config.get("output-dir", "outputs/federated"))).expanduser().resolve()
    return absolute_paths(cfg), out, bool(run_config.get("resume", False))


@dataclass
class Outcome:
    """What the simulation's ServerApp thread hands the thread that started it."""
    reports: list[dict] = field(default_factory=list)  # the study's report, once it ends
    errors: list[BaseException] = field(default_factory=list)  # (the simulation engine would only log them)
    stop: threading.Event = field(default_factory=threading.Event)  # set: end at the next wait for the sites
    ended: threading.Event = field(default_factory=threading.Event)  # set by the thread as it ends


def make_server_app(run: FederatedRun, outcome: Outcome) -> ServerApp:
    """A ServerApp whose main runs the study ``run`` for ``medmamba federate``; an ``outcome.stop``
    ends it (the MLflow run KILLED)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.reports.append(run_study(run, StoppableGrid(grid, outcome.stop), outcome.stop))
        except BaseException as exc:
            outcome.errors.append(exc)
            if not outcome.stop.is_set():
                raise
        finally:
            outcome.ended.set()

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run`: the study that the run config describes."""
    cfg, out, resume = study_from_run_config(dict(context.run_config))
    report = run_study(FederatedRun(cfg, out, open_tracker(cfg.mlflow), resume), grid)
    log.info("study finished: best round %s, test %s; report in %s", report["best"]["round"],
             report["best"]["test"], out / REPORT_FILE)
