"""What the Triton scan compiles to, read without a GPU: its launches for given inputs, compiled
as a launch would compile them, and each cubin's registers, spills and chunk-loop instructions
(read with the cuobjdump that ships with Triton). tests/compile_triton.py guards them in CI;
benchmarks/gpu_check.py turns the instruction counts into an issue floor for the timings."""
from __future__ import annotations

import math
import re
import subprocess
import tempfile
from collections import Counter
from typing import Callable, NamedTuple
from unittest import mock

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import triton_scan


class Launch(NamedTuple):
    kernel: triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def programs(self) -> int:
        return math.prod(self.grid)

    def arg(self, name: str):
        return self.args[self.kernel.arg_names.index(name)]


def launches(call: Callable[[], object]) -> list[Launch]:
    """The Triton launches ``call`` makes (forward and, if it runs one, backward), recorded in place
    of launching: the kernels' outputs stay uninitialised. Works on CPU tensors."""
    made = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: made.append(Launch(self.kernel, tuple(grid), args, kwargs))

    with mock.patch.object(triton_scan, "_scan_fwd", Recorder(triton_scan._scan_fwd)), \
            mock.patch.object(triton_scan, "_scan_bwd", Recorder(triton_scan._scan_bwd)):
        call()
    return made


def compile_launch(launch: Launch, target: GPUTarget):
    """Compile a launch's kernel as the launch would, for ``target``: Triton's own binder specialises
    the integers equal to 1 (unit strides) and marks the ones, and the pointers, divisible by 16."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                                     options)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, *flags, f.name], check=True, capture_output=True,
                              text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """The kernel's registers a thread (REG) and stack bytes (STACK), as cuobjdump reports them."""
    dump = _cuobjdump(cubin, "--dump-resource-usage")
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", dump)}


def chunk_loop(cubin: bytes) -> tuple[Counter, int]:
    """The opcodes of the kernel's chunk loop (the longest backward branch's span of SASS), counted,
    and the memory fences in the whole kernel."""
    code = [(int(addr, 16), text) for addr, text in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", _cuobjdump(cubin, "-sass"))]
    spans = [(int(target, 16), addr) for addr, text in code
             for target in re.findall(r"\bBRA (0x[0-9a-f]+)", text) if int(target, 16) < addr]
    start, end = max(spans, key=lambda span: span[1] - span[0])
    opcodes = Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for addr, text in code
                      if start <= addr <= end)
    opcodes["RED"] += opcodes.pop("REDG", 0)  # sm_90 names the atomic add REDG, sm_80 RED
    return opcodes, sum(text.startswith("MEMBAR") for _, text in code)


def warp_instructions(launch: Launch, loop_instructions: int) -> int:
    """The warp instructions a launch issues in its chunk loops: every program runs its loop once
    a chunk, on each of its warps."""
    return loop_instructions * launch.arg("n_chunks") * launch.programs() * launch.kwargs["num_warps"]
