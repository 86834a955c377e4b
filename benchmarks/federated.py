"""What federation costs and buys, measured in one run on this machine (PneumoniaMNIST at 28 px,
configs/federated_quick.yaml).

--mode strategies (default): on ``--sites`` Dirichlet(``--alpha``) sites, the pooled (centralised)
model, each site's model alone (local-only), FedAvg, FedProx and FedAdam, each for rounds x
local_epochs epochs: global test AUC (the official test split), worst-site AUC (the lowest of the
sites' own test splits: for local-only, a site's own model at its own site), wall time, and the
ratio of each wall time to the pooled one.

--mode scale: how the simulation scales here: rounds per minute with 3, 10 and 30 simulated sites
(fraction_fit 0.3 at 30) and the resident memory the simulation added per site.

    python benchmarks/federated.py [--data-root ../shared/data/medmnist] [--rounds 3] [--mode scale]
"""
from __future__ import annotations

import argparse
import logging
import math
import tempfile
import threading
import time
from pathlib import Path

import psutil

from medmamba.config import load_config
from medmamba.federated.simulation import run_federated
from medmamba.federated.task import centralized_baseline, local_baselines

ROOT = Path(__file__).resolve().parents[1]


def _memory_mb() -> float:
    """Resident memory of this process and everything it started (Ray's actors included)."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def _worst(aucs) -> tuple[float, int]:
    """The lowest AUC and how many sites had one (a site whose test split has one class has none)."""
    defined = [a for a in aucs if math.isfinite(a)]
    return min(defined, default=float("nan")), len(defined)


def strategies(args, cfg, tmp: Path) -> None:
    rows = []
    start = time.perf_counter()
    pooled = centralized_baseline(cfg(), tmp / "pooled")
    rows.append(("pooled (centralised)", time.perf_counter() - start, pooled["auc"], pooled["accuracy"],
                 (float("nan"), 0)))
    start = time.perf_counter()
    local = local_baselines(cfg(), tmp / "local")
    own = _worst(row[name]["auc"] for name, row in local.items())  # each site's model at its own site
    rows.append(("local-only (each site alone)", time.perf_counter() - start, float("nan"), float("nan"), own))
    for strategy in ("fedavg", "fedprox", "fedadam"):
        extra = ["federated.server_lr=0.01"] if strategy == "fedadam" else []
        start = time.perf_counter()
        report = run_federated(cfg(f"federated.strategy={strategy}", *extra), tmp / strategy)
        final = report["rounds"][-1]
        rows.append((strategy, time.perf_counter() - start, final["global"]["auc"], final["global"]["accuracy"],
                     _worst(s.get("test_auc", math.nan) for s in final["sites"].values())))
    print(f"PneumoniaMNIST 28 px, {args.sites} Dirichlet({args.alpha}) sites, {args.rounds} rounds x 1 local epoch "
          f"(pooled and local-only: {args.rounds} epochs); global test set: 624 images")
    print(f"{'run':30s} {'wall s':>8s} {'x pooled':>9s} {'global AUC':>11s} {'global acc':>11s} "
          f"{'worst-site AUC (sites with one)':>32s}")
    for name, wall, auc, acc, (worst, n) in rows:
        print(f"{name:30s} {wall:8.1f} {wall / rows[0][1]:9.2f} {auc:11.5f} {acc:11.5f} {worst:27.4f} ({n})")


def scale(args, cfg, tmp: Path) -> None:
    print(f"PneumoniaMNIST 28 px, Dirichlet({args.alpha}) sites, {args.rounds} rounds x 1 local epoch, "
          "MedMamba-T, client_cpus 0.66")
    print(f"{'sites':>6s} {'fraction_fit':>13s} {'rounds/min':>11s} {'MB per site':>12s}")
    for sites, fraction in ((3, 1.0), (10, 1.0), (30, 0.3)):
        before = _memory_mb()
        peak = [before]
        start = time.perf_counter()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                peak[0] = max(peak[0], _memory_mb())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        run_federated(cfg(f"federated.num_sites={sites}", f"federated.fraction_fit={fraction}",
                          f"federated.min_clients={max(2, int(sites * fraction))}"), tmp / f"scale{sites}")
        done.set()
        minutes = (time.perf_counter() - start) / 60
        print(f"{sites:6d} {fraction:13.1f} {args.rounds / minutes:11.2f} {(peak[0] - before) / sites:12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/medmnist"))
    parser.add_argument("--mode", choices=["strategies", "scale"], default="strategies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.3)
    args = parser.parse_args()
    logging.disable(logging.INFO)

    def cfg(*extra: str):
        return load_config(ROOT / "configs/federated_quick.yaml", [
            f"data.root={args.data_root}", "federated.partition=dirichlet", f"federated.alpha={args.alpha}",
            f"federated.rounds={args.rounds}", "federated.local_epochs=1", f"federated.num_sites={args.sites}",
            "federated.client_cpus=0.66", "federated.centralized_baseline=false", "sched.milestones=[]",
            "mlflow.enabled=false", *extra])

    with tempfile.TemporaryDirectory() as tmp:
        (strategies if args.mode == "strategies" else scale)(args, cfg, Path(tmp))


if __name__ == "__main__":
    main()
