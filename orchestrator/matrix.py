"""Experiment matrices: every combination of the config's ``matrix:`` axes, each a full training run.

``matrix: {model.name: [medmamba_t, resnet18], train.seed: [0, 1, 2]}`` on top of a recipe gives
six cells. Each cell is a normal ``Trainer`` run (its own output folder under ``OUTPUT_DIR/cells``
with best.pt, metrics.json, ...; its own MLflow run, nested under the matrix's parent run and
tagged with every axis value), scheduled as a Ray Tune grid without early stopping, so as many
cells run at once as the cluster has room for (``tune.cpus_per_trial`` / ``gpus_per_trial`` each).
A cell that fails is reported and the others go on. ``--resume`` skips finished cells and
continues unfinished ones from their last checkpoint. The parent run and ``summary.csv`` hold the
mean ± std of each cell group's test metrics over its replicates (seeds and folds): a matrix over
``data.fold`` is k-fold cross-validation with the folds in parallel.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ray import tune

from medmamba.config import (Config, absolute_paths, check_new_output, check_resumable, config_from_dict,
                             with_values)
from medmamba.data import build_datasets
from medmamba.errors import ConfigError
from medmamba.registry import check_model_name
from medmamba.reports import print_table, write_csv
from medmamba.runtime import init_ray, release_freed_memory
from medmamba.tracking import Tracker, mlflow_run, open_tracker
from medmamba.train import Trainer, tracking_callbacks

from .cluster import check_data, check_resources, error_line

STATE_FILE = "matrix.json"  # the parent MLflow run of an output directory
DONE_FILE = "cell.json"  # in a cell's folder once its run (test pass and MLflow record) is complete
REPLICATES = ("train.seed", "data.seed", "data.fold")  # axes averaged over in the summary
SUMMARY_METRICS = ("auc", "accuracy", "f1", "sensitivity", "specificity", "precision")


def cell_name(params: dict[str, Any]) -> str:
    """A cell's folder name: its axis values, e.g. ``model.name=resnet18,train.seed=0`` (a list
    value such as ``sched.milestones: [50, 75]`` as ``50-75``)."""
    return ",".join(f"{k}={re.sub(r'[^A-Za-z0-9_.-]', '_', _text(v))}" for k, v in params.items())


def _text(value: Any) -> str:
    return "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def cells(cfg: Config) -> list[dict[str, Any]]:
    """Every combination of ``cfg.matrix``'s axes, each checked against the config schema first."""
    if not cfg.matrix:
        raise ConfigError("the config has no matrix section: give lists of values by config key, e.g. "
                          "matrix: {model.name: [medmamba_t, resnet18], train.seed: [0, 1]}")
    grid = [dict(zip(cfg.matrix, values)) for values in itertools.product(*cfg.matrix.values())]
    for params in grid:
        try:
            with_values(cfg, params)
        except ConfigError as exc:
            raise ConfigError(f"matrix cell {cell_name(params)}: {exc}") from exc
    for name in cfg.matrix.get("model.name", []):
        check_model_name(name)
    return grid


def cell_config(base: Config, params: dict[str, Any]) -> Config:
    """The training config of one cell: the base recipe with the cell's values and no matrix."""
    cfg = with_values(base, params)
    cfg.matrix = {}
    cfg.mlflow.run_name = cfg.mlflow.run_name or cell_name(params)
    return cfg


def run_cell(config: dict, base: dict, root: str, parent_run_id: str | None) -> None:
    """Tune trainable: train one cell (or report the finished one) and report its test metrics."""
    params = config["cell"]
    cfg = cell_config(config_from_dict(base), params)
    out = Path(root) / cell_name(params)
    done = out / DONE_FILE
    if not done.is_file():
        release_freed_memory()  # what the worker's previous cell left
        start = time.perf_counter()
        tags = {"mlflow.parentRunId": parent_run_id, "matrix_cell": cell_name(params),
                **{k: str(v) for k, v in params.items()}} if parent_run_id else None
        trainer = Trainer(cfg, build_datasets(cfg.data), out, callbacks=tracking_callbacks(cfg, tags), progress=False)
        metrics = trainer.fit(resume=True)  # whatever a killed driver left here: a checkpoint, or only its MLflow run
        done.write_text(json.dumps({"params": params, "run_id": trainer.run_id, "seconds": time.perf_counter() - start,
                                    "ended": time.time(),
                                    "test": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}))
    tune.report({f"test_{k}": v for k, v in json.loads(done.read_text())["test"].items()})


def _groups(rows: list[dict], axes: list[str]) -> list[tuple[dict, list[dict]]]:
    """(the non-replicate axis values, the rows that have them) for each group of rows."""
    keys = [k for k in axes if k not in REPLICATES]
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for row in rows:
        values = {k: row[k] for k in keys}
        groups.setdefault(json.dumps(values), (values, []))[1].append(row)  # a key even for list values
    return list(groups.values())


def summarise(rows: list[dict], axes: list[str]) -> list[dict]:
    """Per group of cells that differ only in replicate axes (seeds, folds): the mean, standard
    deviation (n - 1; NaN for one run, and then not logged) and count of each test metric over its finished cells."""
    summary = []
    for group, members in _groups(rows, axes):
        done = [r for r in members if r["status"] == "done"]
        row = {**group, "cells": len(members), "finished": len(done)}
        for metric in SUMMARY_METRICS:
            values = [r[f"test_{metric}"] for r in done if not math.isnan(r.get(f"test_{metric}", math.nan))]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        summary.append(row)
    return summary


def _metric_prefix(group: dict) -> str:
    label = "/".join(_text(v) for v in group.values())
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", label) + "/" if label else ""


def run_matrix(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict:
    """Run (or with ``resume``, continue) the matrix of ``cfg`` into ``output_dir``; returns
    ``{"cells": [one row per cell], "summary": [one row per group]}``. A cell's row has its axis
    values, ``status`` (done, failed, or unfinished when the matrix was stopped first), ``error``,
    its MLflow ``run_id`` and ``test_*`` metrics."""
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    grid, axes = cells(cfg), list(cfg.matrix)
    absolute_paths(cfg)
    check_new_output(out, "matrix", (STATE_FILE,), resume)
    state_file = out / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if state:  # the recipe must be the one the finished cells ran (axes may grow)
        check_resumable(state["config"], cfg, state_file)
    state = state or {"parent_run_id": None, "name": f"matrix-{time.strftime('%Y%m%d-%H%M%S')}"}
    state["config"] = cfg.to_dict()
    parent = open_tracker(cfg.mlflow)
    init_ray(cfg.ray.address)
    check_resources(cfg.tune.cpus_per_trial, cfg.tune.gpus_per_trial,
                    "one cell (tune.cpus_per_trial, tune.gpus_per_trial)", cfg.ray.autoscaling)
    check_data(*(cell_config(cfg, cell).data for cell in grid))
    with mlflow_run(parent, state["name"], cfg.flat(), {"kind": "matrix", "output_dir": out},
                    run_id=state["parent_run_id"]) as parent_run_id:
        state["parent_run_id"] = parent_run_id
        state_file.write_text(json.dumps(state))
        try:
            results = _fit(cfg, grid, out, parent_run_id)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Ray ends the running cells, which cannot end their runs
            if parent:
                parent.end_running_children()
            raise
        rows = [_cell_row(out, cell, results) for cell in grid]
        summary = summarise(rows, axes)
        files = [write_csv(rows, out / "matrix.csv"), write_csv(summary, out / "summary.csv")]
        print_table(rows, f"matrix: {len(rows)} cells, {sum(r['status'] == 'done' for r in rows)} finished",
                    [*axes, "status", "test_auc", "test_accuracy"])
        if parent:
            _log_summary(parent, summary, axes, files, Counter(r["status"] for r in rows))
    return {"cells": rows, "summary": summary}


def _fit(cfg: Config, grid: list[dict], out: Path, parent_run_id: str | None) -> dict[str, str]:
    """Run every cell on Ray Tune; the first line of each failed cell's error by cell name."""
    trainable = tune.with_resources(
        tune.with_parameters(run_cell, base=cfg.to_dict(), root=str(out / "cells"), parent_run_id=parent_run_id),
        {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial})
    results = tune.Tuner(
        trainable, param_space={"cell": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(reuse_actors=True),  # no process start and imports per cell (about 6 s)
        run_config=tune.RunConfig(name="matrix", storage_path=cfg.ray.storage_path or str(out / "ray"),
                                  failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures))).fit()
    return {cell_name(r.config["cell"]): error_line(r.error) for r in results if r.error}


def _cell_row(out: Path, params: dict, errors: dict[str, str]) -> dict:
    done = out / "cells" / cell_name(params) / DONE_FILE
    if done.is_file():
        saved = json.loads(done.read_text())
        test = {f"test_{k}": saved["test"].get(k, math.nan) for k in SUMMARY_METRICS}
        return {**params, "status": "done", "error": "", "run_id": saved["run_id"] or "",
                "seconds": round(saved["seconds"], 1), **test}
    error = errors.get(cell_name(params))  # none: Tune stopped before the cell ended (Ctrl-C, a killed driver)
    return {**params, "status": "failed" if error else "unfinished", "error": error or "did not finish",
            "run_id": "", "seconds": math.nan, **{f"test_{k}": math.nan for k in SUMMARY_METRICS}}


def _log_summary(parent: Tracker, summary: list[dict], axes: list[str], files: list[Path],
                 statuses: Counter) -> None:
    metrics = {}
    for row in summary:
        prefix = _metric_prefix({k: row[k] for k in axes if k not in REPLICATES})
        for metric in SUMMARY_METRICS:
            for stat in ("mean", "std"):
                value = row[f"{metric}_{stat}"]
                if not math.isnan(value):
                    metrics[f"{prefix}test_{metric}_{stat}"] = value
    parent.log_metrics(metrics)
    parent.set_tags({"cells_failed": statuses["failed"], "cells_unfinished": statuses["unfinished"]})
    for file in files:
        parent.log_artifact(file)
