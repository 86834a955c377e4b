"""Training and inference throughput: MedMamba-T vs timm's ResNet-18/50, ConvNeXt-T, Swin-T, ViT-S.

Images per second at 28, 64 and 224 px with the same batch size, threads and optimizer (the
AdamW that ``medmamba train`` builds, fused), cross-entropy, 2 classes. Every model is built as
``medmamba train`` builds it for that size (``create_model(..., img_size=size)``: ResNets get
MedMNIST v2's stride-1 stem at 28 px, ViT-S pads 28 px to 32); one that cannot run at a size
is listed as such. Training = forward +
backward + optimizer step; inference = forward under no_grad in eval mode. Medians over several
steps after warm-up, all measured in this run. Also measured: the time MedMamba-T's selective scans
alone take per training step (forward + backward of every SS2D scan at its shape), next to the
rival ResNet's whole training step: a floor that no change outside the scan can get under.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --sizes 224 --steps 5
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --sizes 28 --batch 128 --models resnet50
    python benchmarks/train_throughput.py --sizes 64 --models medmamba_t,resnet18 --compile
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from medmamba import create_model
from medmamba.config import OptimConfig, TrainConfig
from medmamba.errors import ConfigError
from medmamba.kernels import cross_selective_scan
from medmamba.model import SS2D
from medmamba.train import for_training, make_optimizer
from timing import median_seconds  # benchmarks/, the script's folder

MODELS = ["medmamba_t", "resnet18", "resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224",
          "vit_small_patch16_224"]
# (size, the model MedMamba-T must at least match in training throughput)
TARGETS = {28: "resnet18", 64: "resnet18", 224: "resnet50"}


def models_at(size: int, names: list[str]) -> tuple[dict[str, torch.nn.Module], list[str]]:
    """The models among ``names`` that run at ``size`` px, and the names of those that cannot."""
    built, skipped = {}, []
    for name in names:
        try:
            built[name] = create_model(name, num_classes=2, img_size=size)
        except ConfigError:
            skipped.append(name)
    return built, skipped


def images_per_second(models: dict[str, torch.nn.Module], size: int, batch: int, steps: int,
                      train: bool) -> dict[str, float]:
    """Images/s of every model, measured in interleaved rounds (one step of each model per round)
    so that the machine's speed drifting during the run affects all models alike."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    steppers = {}
    for name, model in models.items():
        model.train(train)
        optimizer = make_optimizer(model.parameters(), OptimConfig(name="adamw", lr=1e-3))

        def step(model=model, optimizer=optimizer) -> None:
            if train:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            else:
                with torch.no_grad():
                    model(x)

        steppers[name] = step
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + 2):  # two warm-up rounds
        for name, step in steppers.items():
            start = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def scan_seconds(size: int, batch: int, steps: int) -> float:
    """Seconds per MedMamba-T training step spent in the selective scan alone: forward and backward
    of ``cross_selective_scan`` at every SS2D's shape, on random inputs with the model's A."""
    model, shapes = create_model("medmamba_t", num_classes=2), []
    for m in model.modules():
        if isinstance(m, SS2D):
            m.register_forward_hook(lambda mod, args, _out: shapes.append((*args[0].shape[1:], mod.d_state)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    total = 0.0
    for H, W, dim, n in shapes:
        d, L = 2 * dim, H * W  # SS2D scans d_inner = 2 x its input channels
        leaves = [torch.randn(batch, H, W, d), torch.rand(4, batch, L, d) - 4,  # softplus(delta) ~ 0.02
                  torch.randn(batch, L, 4, n), torch.randn(batch, L, 4, n)]
        x, delta, B, C = (t.requires_grad_() for t in leaves)
        A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(4 * d, 1)
        total += median_seconds(
            lambda: cross_selective_scan(x, delta, A, B, C, torch.ones(4 * d), delta_softplus=True).sum().backward(),
            steps)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="28,64,224")
    parser.add_argument("--batch", type=int, default=32, help="batch size at 28 and 64 px (half that at 224)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm or MedMamba names")
    parser.add_argument("--compile", action="store_true",
                        help="every model under torch.compile, as train.compile trains (the warm-up rounds compile)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32"
          f"{', torch.compile (inductor)' if args.compile else ''}; median of {args.steps} steps")
    print(f"{'size':>4} {'batch':>5} {'model':28} {'train img/s':>12} {'infer img/s':>12} "
          f"{'MedMamba-T train rate / this':>30}")
    verdicts = []
    for size in map(int, args.sizes.split(",")):
        batch = args.batch if size < 224 else max(1, args.batch // 2)
        models, skipped = models_at(size, args.models.split(","))
        if args.compile:
            models = {name: for_training(model, TrainConfig(compile=True)) for name, model in models.items()}
        train, infer = (images_per_second(models, size, batch, args.steps, mode) for mode in (True, False))
        rows = {name: (train[name], infer[name]) for name in models}
        ours = rows["medmamba_t"][0] if "medmamba_t" in rows else None
        for name, (train, infer) in rows.items():
            ratio = f"{ours / train:29.2f}x" if ours else f"{'–':>30}"
            print(f"{size:4d} {batch:5d} {name:28} {train:12.1f} {infer:12.1f} {ratio}")
        for name in skipped:
            print(f"{size:4d} {batch:5d} {name:28} {'does not run at this size':>56}")
        rival = TARGETS.get(size)
        if ours and rival in rows:
            ratio = ours / rows[rival][0]
            scan, rival_step = scan_seconds(size, batch, args.steps), batch / rows[rival][0]
            verdicts.append(f"  {size:3d} px: MedMamba-T trains at {ratio:.2f}x {rival}'s rate: "
                            f"{'met' if ratio >= 1 else 'NOT met'}; its selective scans alone take "
                            f"{scan * 1e3:.0f} ms per step = {scan / rival_step:.2f}x {rival}'s whole step "
                            f"({rival_step * 1e3:.0f} ms)")
    print("\nTarget: MedMamba-T training throughput >= ResNet-18's at 28 and 64 px, >= ResNet-50's at 224 px")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
