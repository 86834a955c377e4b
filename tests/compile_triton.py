"""Compile the Triton scan's kernels for a GPU without one: Triton's whole compiler (Python AST to
Triton IR, GPU IR, LLVM, PTX and, with ptxas, a cubin) runs on any machine. It type-checks what
the interpreter never does (one type per variable across branches and loop iterations, return
types), so a kernel that passes the interpreter tests but would not compile fails here.

Each kernel is compiled as the entry points launch it at MedMamba's shapes: their launches are
recorded on CPU tensors and handed to Triton's own binder, which specialises the unit strides and
marks the arguments divisible by 16, as a launch on a GPU does.

It reads each cubin's resource use (Triton's bundled cuobjdump): registers a thread and stack
bytes, which are register spills here. More than ``MAX_STACK`` bytes fails the run as a compile
error does. The limit is what the chosen tiles spill (at most 312 bytes, in selective_scan_fn's
fp16 backward with a fixed B on sm_80; 112 in SS2D's fp32 backward), and a little more: on an H200
(benchmarks/gpu_check.py) 4 warps with a small spill in SS2D's backward were faster than 8
warps with none (0.69x the scan's time at stage 1, MedMamba-T 1.23x the training rate). A
change that spills whole tiles (2 KB at 32-step chunks) fails.

And it counts the SASS instructions of each kernel's chunk loop, the work every program repeats
L/CHUNK times, with the costly kinds among them: MUFU (exp, log), SHFL (exchanges between
threads), BAR (barriers), RED (atomic adds), LDG (global loads), STL/LDL (spills). The run fails
when a loop exceeds its budget in ``CALLS`` (about a fifth over today's most on sm_80 or sm_90, so a
change that undoes a saving fails: SS2D's backward took 6017 instructions when its softplus was
repeated on every state's thread and its adjoint used Triton's reverse scan, 2223 with its sums
by tl.sum, 1274 now) or when a kernel has a memory fence (Triton's default acq_rel atomic add
fences each add).

Run without TRITON_INTERPRET (under it ``triton.jit`` makes interpreted functions):
    python tests/compile_triton.py [--arch 90]
Prints one line per kernel variant compiled; exits non-zero at the first that does not compile,
spills, loops too long or fences.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.backends.compiler import GPUTarget

MAX_STACK = 384  # bytes of spilled registers a kernel may have
LOOP_OPCODES = ("MUFU", "SHFL", "BAR", "RED", "LDG", "STL", "LDL")  # counted per chunk


def _ss2d(dtype: torch.dtype, *, low_rank: bool = True, grad: bool = True) -> None:
    """SS2D's scan at MedMamba-T's stage-1 shapes (56x56 map, d 96, N 16, rank 3), batch 2;
    bare (full delta; no D, bias or softplus) unless ``low_rank``."""
    from medmamba.kernels import triton_scan

    batch, H, W, dim, N, R = 2, 56, 56, 96, 16, 3
    leaf = lambda *shape, dtype=dtype: torch.randn(*shape, dtype=dtype, requires_grad=grad)  # noqa: E731
    x, A, D, bias = leaf(batch, H, W, dim), leaf(4 * dim, N, dtype=torch.float32), leaf(4 * dim), leaf(4 * dim)
    if low_rank:  # the layout of SS2D's x_proj output: (batch, L, 4, R + 2N)
        delta, B, C = leaf(batch, H * W, 4, R + 2 * N).split([R, N, N], dim=-1)
        y = triton_scan.cross_selective_scan(x, delta, A, B, C, D, bias, True, leaf(4, dim, R))
    else:
        B, C = leaf(batch, H * W, 4, 2 * N).split([N, N], dim=-1)
        y = triton_scan.cross_selective_scan(x, leaf(4, batch, H * W, dim), A, B, C, None, None, False, None)
    if grad:
        y.float().sum().backward()


def _selective_scan_fn(dtype: torch.dtype, fixed_b: bool) -> None:
    """selective_scan_fn with every option on: B and C variable (batch, N, L), as in Mamba, or a
    fixed (D, N) B and a grouped C."""
    from medmamba.kernels import triton_scan

    batch, dim, N, L = 2, 64, 16, 500
    leaf = lambda *shape, dtype=dtype: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    B, C = (leaf(dim, N), leaf(batch, 2, N, L)) if fixed_b else (leaf(batch, N, L), leaf(batch, N, L))
    y, _ = triton_scan.selective_scan(leaf(batch, dim, L), leaf(batch, dim, L), leaf(dim, N, dtype=torch.float32),
                                      B, C, leaf(dim), leaf(dim), True)
    y.float().sum().backward()


# (name, a call of an entry point, the most SASS instructions its forward and backward chunk
# loops may take): the kernels each call launches are compiled as those launches would be
CALLS = [
    ("SS2D low-rank delta, D, bias, fp32", lambda: _ss2d(torch.float32), {"_scan_fwd": 640, "_scan_bwd": 1600}),
    ("SS2D low-rank delta, D, bias, bf16 (autocast)", lambda: _ss2d(torch.bfloat16),
     {"_scan_fwd": 640, "_scan_bwd": 1600}),
    ("SS2D low-rank delta, D, bias, bf16, inference (no starts saved)",
     lambda: _ss2d(torch.bfloat16, grad=False), {"_scan_fwd": 640}),
    ("SS2D full delta, bare, fp32", lambda: _ss2d(torch.float32, low_rank=False),
     {"_scan_fwd": 480, "_scan_bwd": 1300}),
    ("selective_scan_fn variable B and C, fp32", lambda: _selective_scan_fn(torch.float32, fixed_b=False),
     {"_scan_fwd": 540, "_scan_bwd": 1500}),
    ("selective_scan_fn fixed B, grouped C, fp16", lambda: _selective_scan_fn(torch.float16, fixed_b=True),
     {"_scan_fwd": 1280, "_scan_bwd": 3080}),
]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_triton.py: unset TRITON_INTERPRET (it makes interpreted functions, not compilable ones)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 (A100), 90 (H100/H200)")
    args = parser.parse_args()
    from medmamba.kernels.triton_sass import chunk_loop, compile_launch, launches, resource_usage

    target = GPUTarget("cuda", args.arch, 32)
    for name, call, budget in CALLS:
        for launch in launches(call):
            kernel, compiled = launch.kernel, compile_launch(launch, target)
            use = resource_usage(compiled.asm["cubin"])
            loop, fences = chunk_loop(compiled.asm["cubin"])
            print(f"sm_{args.arch} {kernel.__name__} {name}: {len(compiled.asm['cubin'])} bytes of cubin, "
                  f"{use['REG']} registers, {use['STACK']} bytes of stack; a chunk: {loop.total()} instructions, "
                  + ", ".join(f"{loop[op]} {op}" for op in LOOP_OPCODES), flush=True)
            faults = [f"spills registers ({use['STACK']} bytes of stack)"] * (use["STACK"] > MAX_STACK)
            faults += [f"takes {loop.total()} instructions a chunk, over its {budget[kernel.__name__]}"] * (
                loop.total() > budget[kernel.__name__])
            faults += [f"has {fences} memory fences (an atomic add not relaxed?)"] * (fences > 0)
            if faults:
                print(f"{kernel.__name__} {name}: " + "; ".join(faults), file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
