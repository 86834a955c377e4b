"""Compile the Triton scan's kernels for a GPU without one: Triton's whole compiler (Python AST to
Triton IR, GPU IR, LLVM, PTX and, with ptxas, a cubin) runs on any machine. It type-checks what
the interpreter never does (one type per variable across branches and loop iterations, return
types), so a kernel that passes the interpreter tests but would not compile fails here.

It also reads each cubin's resource use (Triton's bundled cuobjdump): registers a thread and
stack bytes, which are register spills here. More than ``MAX_STACK`` bytes fails the run as a
compile error does. The limit is what the chosen tiles spill, and a little more: on an H200
(benchmarks/gpu_check.py) 4 warps with 264-272 bytes spilled in SS2D's backward were faster than
8 warps with none (0.69x the scan's time at stage 1, MedMamba-T 1.23x the training rate), so a
small spill is allowed (selective_scan_fn's fixed-B backward spills 728). A change that spills
whole tiles (2 KB at 32-step chunks) still fails.

Run without TRITON_INTERPRET (under it ``triton.jit`` makes interpreted functions):
    python tests/compile_triton.py [--arch 90]
Prints one line per kernel variant compiled; exits non-zero at the first that does not compile
or spills.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# data (not gradient) pointers whose dtype follows the inputs'; the rest are fp32 (or int64 positions)
INPUTS = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "dout_ptr"}
MAX_STACK = 768  # bytes of spilled registers a kernel may have
# (name, input dtype, flags): the variants the two entry points launch
VARIANTS = [
    ("SS2D low-rank delta, D, bias", "fp32", dict(HAS_D=True, HAS_BIAS=True, LOW_RANK=True, SOFTPLUS=True,
                                                  SHARED_B=True, SHARED_C=True, BLOCK_N=16, BLOCK_R=8)),
    ("SS2D low-rank delta, D, bias, forward saving no starts", "bf16", dict(HAS_D=True, HAS_BIAS=True, LOW_RANK=True,
                                                             SOFTPLUS=True, SHARED_B=True, SHARED_C=True,
                                                             BLOCK_N=16, BLOCK_R=8, SAVE_STARTS=False)),
    ("SS2D full delta, bare", "fp32", dict(HAS_D=False, HAS_BIAS=False, LOW_RANK=False, SOFTPLUS=False,
                                           SHARED_B=True, SHARED_C=True, BLOCK_N=16, BLOCK_R=1)),
    ("selective_scan_fn fixed B, grouped C", "fp16", dict(HAS_D=True, HAS_BIAS=True, LOW_RANK=False,
                                                          SOFTPLUS=True, SHARED_B=False, SHARED_C=False,
                                                          BLOCK_N=16, BLOCK_R=1)),
]


def compile_variant(kernel, dtype: str, flags: dict, target: GPUTarget):
    from medmamba.kernels import triton_scan

    names = kernel.arg_names
    const = {"SAVE_STARTS": True, **flags, "CHUNK": triton_scan.CHUNK, "BLOCK_D": triton_scan.BLOCK_D}
    const = {key: value for key, value in const.items() if key in names}  # SAVE_STARTS: the forward's
    signature = {}
    for name in names:
        if name in const:
            signature[name] = "constexpr"
        elif name == "pos_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in INPUTS else "*fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(source, target=target, options={"num_warps": triton_scan.NUM_WARPS})


def resource_usage(cubin: bytes) -> dict[str, int]:
    """The kernel's registers a thread (REG) and stack bytes (STACK), as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", dump)}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_triton.py: unset TRITON_INTERPRET (it makes interpreted functions, not compilable ones)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 (A100), 90 (H100/H200)")
    args = parser.parse_args()
    from medmamba.kernels import triton_scan

    target = GPUTarget("cuda", args.arch, 32)
    for name, dtype, flags in VARIANTS:
        for kernel in (triton_scan._scan_fwd, triton_scan._scan_bwd):
            compiled = compile_variant(kernel, dtype, flags, target)
            use = resource_usage(compiled.asm["cubin"])
            print(f"sm_{args.arch} {kernel.__name__} {name} {dtype}: {len(compiled.asm['cubin'])} bytes of cubin, "
                  f"{use['REG']} registers, {use['STACK']} bytes of stack", flush=True)
            if use["STACK"] > MAX_STACK:
                print(f"{kernel.__name__} spills registers ({use['STACK']} bytes of stack)", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
