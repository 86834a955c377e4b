"""Where a MedMamba-T training step spends its time: torch.profiler's kernels, by self time.

    python benchmarks/gpu_profile.py               # on a GPU: 224 px, batch 64, bf16 autocast
    python benchmarks/gpu_profile.py --size 64 --batch 2   # CPU smoke test
    python benchmarks/gpu_profile.py --by-shape aten::copy_   # which tensors a copy op moves
    python benchmarks/gpu_profile.py --compile     # the step torch.compile makes

Prints the profiler's table of the ops that took the most device (GPU) or CPU time over three
training steps (forward, backward, fused AdamW) after three warm-up steps, and the scan ops'
share of the total: which part of the model a faster step has to come from.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from medmamba import create_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--by-shape", metavar="OP", action="append", default=[],
                        help="also list OP's calls (e.g. aten::copy_) by input shapes, most time first; repeatable")
    parser.add_argument("--compile", action="store_true",
                        help="profile the step torch.compile makes (inductor, as train.compile; compiles first)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else None
    model = create_model("medmamba_t", num_classes=2, img_size=args.size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=gpu)
    run = torch.compile(model, dynamic=False) if args.compile else model  # as train.compile
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(run(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=bool(args.by_shape)) as prof:
        for _ in range(3):
            step()
        if gpu:
            torch.cuda.synchronize()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = prof.key_averages()
    where = f"bf16 on {torch.cuda.get_device_name()}" if gpu else "fp32 on CPU"
    print(f"MedMamba-T{', compiled' if args.compile else ''}, {args.size} px, batch {args.batch}, {where}; "
          "3 training steps")
    print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    # on a GPU the kernels' own events (an op's self device time repeats its kernels')
    timed = [e for e in events if not gpu or e.device_type == DeviceType.CUDA]
    total = sum(getattr(e, key) for e in timed)
    scan = sum(getattr(e, key) for e in timed if "scan" in e.key.lower())
    print(f"ops named *scan* (the selective scan's kernels and ops): {scan / max(total, 1):.0%} of the "
          f"{'device' if gpu else 'CPU'} self time ({scan / 3e3:.1f} of {total / 3e3:.1f} ms a step)")
    shaped = prof.key_averages(group_by_input_shape=True) if args.by_shape else []
    for op in args.by_shape:
        calls = sorted((e for e in shaped if e.key == op), key=lambda e: -getattr(e, key))
        print(f"{op} by input shapes ({len(calls)} kinds; a step's calls and time):")
        for e in calls[:args.rows]:
            print(f"  {e.count // 3:4d} calls {getattr(e, key) / 3e3:6.2f} ms  {e.input_shapes}")


if __name__ == "__main__":
    main()
