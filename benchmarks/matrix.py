"""Matrix scheduling overhead: an 8-cell matrix on Ray against its cells run one by one.

Each cell is a short training run (MedMamba-T, BreastMNIST, 28 px, 1 epoch, seeds 0-7). The
cells are first run one after another in this process with one thread each (what a 1-CPU Ray
cell gets), then as one `run_matrix` on a local Ray cluster of ``--cpus`` CPUs (one cell per
CPU at a time). Target: the matrix's wall time within 10% of the sum of the cells divided by
the concurrency. Both measured in this run.

    python benchmarks/matrix.py --data-root ../shared/data/medmnist
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from medmamba.config import load_config
from medmamba.data import build_datasets
from medmamba.orchestrator.matrix import cell_config, cells, run_matrix
from medmamba.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/medmnist"))
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(ROOT / "configs/matrix_quick.yaml", [
        f"data.root={args.data_root}", "train.epochs=1", "mlflow.enabled=false",
        "matrix.model.name=[medmamba_t]", f"matrix.train.seed={list(range(args.cells))}"])
    grid = cells(cfg)
    data = build_datasets(cfg.data)
    torch.set_num_threads(1)
    one_by_one = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, params in enumerate(grid):
            start = time.perf_counter()
            Trainer(cell_config(cfg, params), data, Path(tmp) / str(i), progress=False).fit()
            one_by_one.append(time.perf_counter() - start)
        ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False)
        start = time.perf_counter()
        result = run_matrix(cfg, Path(tmp) / "matrix")
        wall = time.perf_counter() - start
    assert all(row["status"] == "done" for row in result["cells"])
    ideal = sum(one_by_one) / args.cpus
    print(f"\n{len(grid)} cells, {args.cpus} CPUs, torch {torch.__version__}")
    print(f"  cells one by one (1 thread each): {sum(one_by_one):7.1f} s  (per cell: "
          f"{', '.join(f'{t:.1f}' for t in one_by_one)})")
    print(f"  sum / concurrency ({args.cpus}):            {ideal:7.1f} s")
    print(f"  the same cells inside the matrix:  {sum(r['seconds'] for r in result['cells']):7.1f} s  (per cell: "
          f"{', '.join(str(r['seconds']) for r in result['cells'])})")
    print(f"  matrix on Ray, wall time:         {wall:7.1f} s  = {wall / ideal:.2f}x the ideal "
          f"(target <= 1.10x: {'met' if wall <= 1.1 * ideal else 'NOT met'})")


if __name__ == "__main__":
    main()
