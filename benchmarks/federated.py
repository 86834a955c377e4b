"""What federation costs: a Flower simulation vs centralised training on the pooled data.

In one run on this machine, PneumoniaMNIST at 28 px (configs/federated_quick.yaml):
1. centralised: the model trained on the pooled sites for rounds x local_epochs epochs -> T_central;
2. FedAvg on IID sites for rounds x local_epochs -> T_iid (same total epochs, simulation start-up,
   per-round site and global evaluation included);
3. FedAvg on Dirichlet(alpha) sites -> the accuracy cost of label skew.
Targets: T_iid <= 1.10 x T_central, and |AUC_iid - AUC_central| <= 0.02 on the global test set.

    python benchmarks/federated.py [--data-root ../shared/data/medmnist] [--rounds 8] [--sites 3]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from medmamba.config import load_config
from medmamba.federated.simulation import centralized_baseline, run_federated

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/medmnist"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--client-cpus", type=float, default=0.66, help="3 sites x 0.66: all train at once on 2 cores")
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()
    logging.disable(logging.INFO)

    def cfg(partition: str):
        return load_config(ROOT / "configs/federated_quick.yaml", [
            f"data.root={args.data_root}", f"federated.partition={partition}", f"federated.alpha={args.alpha}",
            f"federated.rounds={args.rounds}", f"federated.local_epochs={args.local_epochs}",
            f"federated.num_sites={args.sites}", f"federated.client_cpus={args.client_cpus}",
            "federated.centralized_baseline=false", "sched.milestones=[]", "mlflow.enabled=false"])

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        central = centralized_baseline(cfg("iid"), Path(tmp) / "central")
        results["central"] = (time.perf_counter() - start, central["auc"], central["accuracy"])
        for partition in ("iid", "dirichlet"):
            start = time.perf_counter()
            report = run_federated(cfg(partition), Path(tmp) / partition)
            final = report["rounds"][-1]["global"]
            results[partition] = (time.perf_counter() - start, final["auc"], final["accuracy"])
    epochs = args.rounds * args.local_epochs
    print(f"PneumoniaMNIST 28 px, {args.sites} sites x {args.client_cpus} CPU, FedAvg {args.rounds} rounds x "
          f"{args.local_epochs} local epochs vs {epochs} pooled epochs; global test set (624 images)")
    print(f"{'run':28s} {'wall s':>8s} {'test AUC':>9s} {'test acc':>9s}")
    for name, label in (("central", "centralised (pooled)"), ("iid", "FedAvg, IID sites"),
                        ("dirichlet", f"FedAvg, Dirichlet {args.alpha}")):
        wall, auc, acc = results[name]
        print(f"{label:28s} {wall:8.1f} {auc:9.4f} {acc:9.4f}")
    t_central, auc_central = results["central"][0], results["central"][1]
    print(f"federated overhead (IID)     T_iid / T_central - 1 = {results['iid'][0] / t_central - 1:+.1%}  (target <= +10%)")
    print(f"AUC gap, IID                 {results['iid'][1] - auc_central:+.4f}  (target within 0.02)")
    print(f"AUC gap, Dirichlet {args.alpha:<9} {results['dirichlet'][1] - auc_central:+.4f}")


if __name__ == "__main__":
    main()
