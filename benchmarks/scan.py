"""Selective-scan benchmark: the per-step reference vs our fast paths at MedMamba-T's shapes.

Each (shape, implementation, mode) runs in a fresh subprocess so that its peak memory (the rise
of the process's resident-set high-water mark over its size once the inputs exist) is its own.
Times are medians of several runs after a warm-up. Prints one table of times and ratios measured
in this run, the targets of the foundation issue, and a compute floor measured on this machine.

    python benchmarks/scan.py                 # both shapes, ref vs cpu (compiled) vs torch (chunked)
    python benchmarks/scan.py --impls ref,cpu --repeats 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

# MedMamba-T at 224 px: stage 1 (56x56 tokens, d_inner 96 x 4 directions) and stage 3 (14x14).
SHAPES = {
    "stage1": dict(batch=4, dim=384, nstate=16, L=3136, groups=4),
    "stage3": dict(batch=4, dim=1536, nstate=16, L=196, groups=4),
}
MODES = ("fwd", "fwd+bwd")
TARGET_SPEEDUP, TARGET_MEMORY = 30.0, 0.25


def _inputs(batch, dim, nstate, L, groups, requires_grad):
    g = torch.Generator().manual_seed(0)
    t = dict(
        u=torch.randn(batch, dim, L, generator=g),
        delta=torch.randn(batch, dim, L, generator=g) * 0.5,
        A=-torch.exp(torch.rand(dim, nstate, generator=g) * 2.7),  # like -exp(A_log), A_log = log(1..16)
        B=torch.randn(batch, groups, nstate, L, generator=g),
        C=torch.randn(batch, groups, nstate, L, generator=g),
        D=torch.ones(dim),
        delta_bias=torch.randn(dim, generator=g) * 0.1 - 3.0,  # like softplus^-1 of dt in [1e-3, 0.1]
    )
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(impl: str, mode: str, shape: str, repeats: int) -> dict:
    """Time one implementation in this process; returns median seconds and peak extra MiB."""
    from medmamba.kernels import selective_scan_fn, selective_scan_ref

    backward = mode == "fwd+bwd"
    inputs = _inputs(**SHAPES[shape], requires_grad=backward)
    if impl == "ref":
        fn = lambda: selective_scan_ref(**inputs, delta_softplus=True)  # noqa: E731
    else:
        fn = lambda: selective_scan_fn(**inputs, delta_softplus=True, backend=impl)  # noqa: E731
    if impl == "cpu":
        from medmamba.kernels import _cpu_ext

        _cpu_ext.load()  # build or load before measuring the baseline
    baseline = _rss_kib("VmRSS")
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = fn()
            if backward:
                out.sum().backward()
        times.append(time.perf_counter() - start)
        del out
        for v in inputs.values():
            v.grad = None
    return {"seconds": statistics.median(times[1:]), "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024}


# Vector operations per SIMD group of (b, d, l, n) elements in the compiled kernel: forward
# = 2^x (1 mul, 2 clamps, round, sub, 2 muls + 6 FMAs (Estrin), convert, add, shift, mul = 17)
# + the state FMA, the drive multiply and the readout FMA; backward = the forward's
# recomputation + 14 for the adjoint step (h, t, dC, dB, du, ddt, dA, carry) + about 1 for the
# lane sums of dB and dC.
OPS_FWD, OPS_BWD = 20, 20 + 15


def compute_floor(shape: str, backward: bool) -> tuple[float, str]:
    """Seconds the kernel's arithmetic needs at 2 vector ops per cycle on every core, and how."""
    s = SHAPES[shape]
    lanes = 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8
    mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    ops = s["batch"] * s["dim"] * s["L"] * s["nstate"] / lanes * (OPS_FWD + (OPS_BWD if backward else 0))
    rate = torch.get_num_threads() * mhz * 1e6 * 2
    return ops / rate, f"{ops / 1e6:.0f}M vector ops ({lanes} lanes) / ({torch.get_num_threads()} cores x {mhz:.0f} MHz x 2)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="ref,cpu,torch", help="comma-separated: ref, cpu, torch")
    parser.add_argument("--shapes", default="stage1,stage3")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return

    impls = args.impls.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; median of {args.repeats} runs")
    results = {}
    for shape in args.shapes.split(","):
        for mode in MODES:
            for impl in impls:
                cmd = [sys.executable, __file__, "--worker", impl, mode, shape, "--repeats", str(args.repeats)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[shape, mode, impl] = json.loads(proc.stdout.strip().splitlines()[-1])

    header = f"{'shape':7} {'mode':8} {'impl':6} {'time ms':>10} {'speedup':>8} {'peak MiB':>9} {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        for mode in MODES:
            ref = results.get((shape, mode, "ref"))
            for impl in impls:
                r = results[shape, mode, impl]
                speed = f"{ref['seconds'] / r['seconds']:8.1f}x" if ref else f"{'-':>9}"
                mem = f"{r['peak_mib'] / ref['peak_mib']:9.3f}" if ref and ref["peak_mib"] > 0 else f"{'-':>9}"
                print(f"{shape:7} {mode:8} {impl:6} {r['seconds'] * 1e3:10.1f} {speed} {r['peak_mib']:9.1f} {mem}")

    if "ref" in impls and "cpu" in impls and "stage1" in args.shapes:
        print(f"\nTargets at stage1 (compiled CPU kernel vs reference): >= {TARGET_SPEEDUP:.0f}x faster, "
              f"<= {TARGET_MEMORY} of the peak memory")
        for mode in MODES:
            ref, fast = results["stage1", mode, "ref"], results["stage1", mode, "cpu"]
            speed, mem = ref["seconds"] / fast["seconds"], fast["peak_mib"] / ref["peak_mib"]
            ok = speed >= TARGET_SPEEDUP and mem <= TARGET_MEMORY
            print(f"  {mode:8} {speed:7.1f}x  memory {mem:.3f}  {'met' if ok else 'NOT met'}")
        print("\nCompute floor at stage1 (an estimate from operation counts, see OPS_FWD/OPS_BWD):")
        for mode in MODES:
            floor, how = compute_floor("stage1", backward=mode == "fwd+bwd")
            got = results["stage1", mode, "cpu"]["seconds"]
            print(f"  {mode:8} {floor * 1e3:6.1f} ms = {how}; measured {got * 1e3:.1f} ms = {got / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
