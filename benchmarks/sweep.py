"""What ASHA saves: a 16-trial sweep vs 16 full trainings of the same configs vs one training.

All in one run on this machine, BreastMNIST at 28 px (configs/sweep_quick.yaml with more epochs):
1. one full training of the base recipe (single process, all cores) -> T_one;
2. the sweep (Ray Tune + Optuna + ASHA, tune.max_concurrent trials at a time) -> T_sweep;
3. 16 full trainings, estimated from each trial's measured seconds per epoch x train.epochs,
   run tune.max_concurrent at a time as in the sweep.
Target: T_sweep <= 5 x T_one. Prints the best configuration found.

    python benchmarks/sweep.py [--data-root ../shared/data/medmnist] [--epochs 24] [--trials 16]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from medmamba.config import load_config
from medmamba.data import build_datasets
from medmamba.orchestrator.sweep import run_sweep
from medmamba.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/medmnist"))
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    cfg = load_config(ROOT / "configs/sweep_quick.yaml", [f"data.root={args.data_root}",
                                                          f"train.epochs={args.epochs}",
                                                          f"tune.num_samples={args.trials}"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        Trainer(cfg, build_datasets(cfg.data), Path(tmp) / "one", progress=False).fit()
        t_one = time.perf_counter() - start

        ray.init(num_cpus=2, include_dashboard=False)
        start = time.perf_counter()
        cfg.mlflow.tracking_uri = f"sqlite:///{tmp}/mlruns.db"
        summary = run_sweep(cfg, Path(tmp) / "sweep")
        t_sweep = time.perf_counter() - start
        results = Path(tmp) / "sweep/ray/sweep"
        per_epoch = []
        for result_json in results.glob("*/result.json"):
            rows = [line for line in result_json.read_text().splitlines() if line.strip()]
            times = [json.loads(r)["time_this_iter_s"] for r in rows]
            per_epoch.append(sum(times) / len(times))
    est_full = sum(per_epoch) * cfg.train.epochs / cfg.tune.max_concurrent
    epochs_run = sum(row["epochs"] for row in summary["leaderboard"])
    print(f"BreastMNIST 28 px, {args.trials} trials x up to {cfg.train.epochs} epochs, "
          f"{cfg.tune.max_concurrent} trials at a time, ASHA grace {cfg.tune.grace_period} rf {cfg.tune.reduction_factor}")
    print(f"{'one full training (T_one)':44s} {t_one:8.1f} s")
    print(f"{'ASHA sweep (T_sweep)':44s} {t_sweep:8.1f} s   epochs run {epochs_run} of {args.trials * cfg.train.epochs}")
    print(f"{'16 full trainings (estimated)':44s} {est_full:8.1f} s")
    print(f"sweep cost in full trainings  T_sweep / T_one = {t_sweep / t_one:.2f}   (target <= 5)")
    print(f"speedup from ASHA             estimate / T_sweep = {est_full / t_sweep:.2f}")
    print(f"best val_auc {summary['best_value']:.4f}  test auc {summary['test_metrics']['auc']:.4f}  "
          f"params {summary['best_params']}")


if __name__ == "__main__":
    main()
