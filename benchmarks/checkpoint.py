"""Checkpoint cost on the training path: MedMamba-T's last.pt (weights + AdamW state) written
synchronously (torch.save, then os.replace: the training loop waits) against a background
CheckpointWriter (the loop only waits for the CPU snapshot; the file is written on a thread),
then the same comparison for whole BreastMNIST training runs at 28 px on this machine's
``train.device``. The Trainer writes in the background on a GPU and synchronously on the CPU.

Run: python benchmarks/checkpoint.py [--epochs 3]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from medmamba.config import load_config
from medmamba.data import build_datasets
from medmamba.train import CheckpointWriter, Trainer, _atomic_save

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared/data/medmnist"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    cfg = load_config(ROOT / "configs/quick.yaml", [f"data.root={args.data_root}", "data.name=breastmnist",
                                                    f"train.epochs={args.epochs}", "mlflow.enabled=false"])
    data = build_datasets(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        trainer = Trainer(cfg, data, out / "probe", progress=False)
        trainer.fit(test=False)  # optimizer state exists
        state = trainer._resume_state()
        size = None
        sync, blocked, background = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _atomic_save(state, out / "sync.pt")
            sync.append(time.perf_counter() - start)
            writer = CheckpointWriter()
            start = time.perf_counter()
            writer.submit(1, [(state, out / "async.pt")])
            blocked.append(time.perf_counter() - start)
            writer.wait()
            background.append(time.perf_counter() - start)
            size = (out / "async.pt").stat().st_size
        runs = {}
        for name, in_background in (("synchronous", False), ("background", True)):
            trainer = Trainer(cfg, data, out / name, progress=False)
            trainer.checkpoints = CheckpointWriter(in_background)
            start = time.perf_counter()
            trainer.fit(test=False)
            runs[name] = time.perf_counter() - start

    best = min
    print(f"MedMamba-T last.pt: {size / 2**20:.0f} MiB (weights + AdamW state), best of {args.repeats}")
    print(f"{'':34s}{'seconds':>10s}")
    print(f"{'synchronous save (loop waits)':34s}{best(sync):10.3f}")
    print(f"{'CheckpointWriter: loop waits':34s}{best(blocked):10.3f}")
    print(f"{'CheckpointWriter: file on disk':34s}{best(background):10.3f}")
    print(f"time taken off the training path per save: {best(sync) / best(blocked):.1f}x less")
    print(f"BreastMNIST 28 px, {args.epochs} epochs: synchronous {runs['synchronous']:.1f} s, "
          f"background {runs['background']:.1f} s ({runs['synchronous'] / runs['background']:.2f}x)")


if __name__ == "__main__":
    main()
