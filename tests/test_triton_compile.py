"""The Triton scan's kernels compile for real GPUs (A100: sm_80, H100/H200: sm_90) on this CPU-only
machine: tests/compile_triton.py runs Triton's whole compiler, down to a cubin, in a process
without TRITON_INTERPRET. The interpreter tests check the numerics; this checks what only the
compiler checks (a kernel that ran interpreted once failed here: a helper returned a scalar
on one constexpr branch and a vector on the other), that no kernel spills more registers than
the measured-fastest tiles do (the backward with 32-step chunks spilled 2 KB), and that no chunk
loop grows past its instruction budget or fences its atomic adds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "compile_triton.py"


def _compile(args: list[str], tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python args`` with Triton compiling (TRITON_INTERPRET unset) into a fresh cache, so each
    kernel is compiled now, not found in a cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arch", [80, 90])
def test_the_triton_kernels_compile_for_the_gpu(arch, tmp_path):
    done = _compile([str(SCRIPT), "--arch", str(arch)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 11 and all(line.startswith(f"sm_{arch} _scan_") and "registers" in line
                                   and "instructions" in line for line in lines), done.stdout


FENCE_PROBE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from medmamba.kernels.triton_sass import chunk_loop

@triton.jit
def add(x_ptr, n, RELAXED: tl.constexpr):
    for i in range(n):
        if RELAXED:
            tl.atomic_add(x_ptr + tl.arange(0, 16), 1.0, sem="relaxed")
        else:
            tl.atomic_add(x_ptr + tl.arange(0, 16), 1.0)

for relaxed in (False, True):
    source = ASTSource(fn=add, signature={"x_ptr": "*fp32", "n": "i32", "RELAXED": "constexpr"},
                       constexprs={(2,): relaxed})
    opcodes, fences = chunk_loop(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"])
    print(relaxed, fences, opcodes["RED"] + opcodes["ATOMG"])
"""


def test_a_chunk_loop_over_its_budget_fails_the_compile_check(tmp_path):
    """compile_triton.py's instruction budgets can fail: SS2D's forward held to 100 instructions."""
    code = ("import sys, compile_triton as c; name, call, _ = c.CALLS[2]; "
            "c.CALLS = [(name, call, {'_scan_fwd': 100})]; sys.argv[1:] = ['--arch', '90']; sys.exit(c.main())")
    done = _compile(["-c", code], tmp_path, cwd=SCRIPT.parent)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "instructions a chunk, over its 100" in done.stderr


CAP_PROBE = """
import sys, torch
from triton.backends.compiler import GPUTarget
sys.path[:0] = ["tests"]
from compile_triton import _ss2d
from medmamba.kernels import triton_scan
from medmamba.kernels.triton_sass import compile_launch, launches, resource_usage

for cap in (None, 168):
    with triton_scan.tiles(max_registers=cap):
        fwd, bwd = launches(lambda: _ss2d(torch.float32))
    print(resource_usage(compile_launch(bwd, GPUTarget("cuda", 90, 32)).asm["cubin"])["REG"])
"""


def test_a_register_cap_reaches_the_compiled_backward(tmp_path):
    """gpu_check's register-capped tiles: the cap is a launch option that ptxas honours."""
    done = _compile(["-c", CAP_PROBE], tmp_path, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    free, capped = map(int, done.stdout.split())
    assert free > 168 >= capped, done.stdout


def test_the_loop_count_sees_the_fences_of_an_acq_rel_atomic_add(tmp_path):
    """compile_triton.py's fence guard can fail: Triton's default atomic add is fenced, a relaxed one not."""
    probe = tmp_path / "fence_probe.py"  # triton.jit reads its kernel's source from a file
    probe.write_text(FENCE_PROBE)
    done = _compile([str(probe)], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    (_, acq_rel_fences, acq_rel_adds), (_, relaxed_fences, relaxed_adds) = (
        line.split() for line in done.stdout.splitlines())
    assert int(acq_rel_fences) >= 1 and int(acq_rel_adds) >= 1
    assert int(relaxed_fences) == 0 and int(relaxed_adds) >= 1


ISSUE_PROBE = """
import sys, torch
from triton.backends.compiler import GPUTarget
sys.path[:0] = ["benchmarks", "tests"]
import gpu_check
from compile_triton import _ss2d  # SS2D's scan at MedMamba-T's stage-1 shapes, batch 2
from medmamba.kernels.triton_sass import launches

step = lambda: _ss2d(torch.float32)
fwd, bwd = launches(step)
print(fwd.grid, bwd.grid, fwd.arg("n_chunks"), fwd.kwargs["num_warps"])
seconds, how = gpu_check.issue_floor(step, GPUTarget("cuda", 90, 32), 132, 1.98e9)
print(seconds, how)
"""


def test_the_gpu_checks_issue_floor_counts_every_warps_chunk_loops(tmp_path):
    """The issue floor gpu_check.py puts beside the Triton scan's time: both kernels' chunk loops,
    for every program, warp and chunk of the launch, at MedMamba-T's stage-1 shapes (batch 2)."""
    done = _compile(["-c", ISSUE_PROBE], tmp_path, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    launched, floor = done.stdout.splitlines()
    assert launched == "(6, 4, 2) (6, 4, 2) 196 4"  # 96 channels / 16, 4 directions, batch 2; 3136 steps / 16
    seconds, how = floor.split(" ", 1)
    # 48 programs x 4 warps x 196 chunks x (forward + backward loop), the two 1000-8192 instructions
    warp_instructions = float(how.split(" M ")[0]) * 1e6
    assert 48 * 4 * 196 * 1000 <= warp_instructions <= 48 * 4 * 196 * 8192, how
    assert float(seconds) == pytest.approx(warp_instructions / (132 * 4 * 1.98e9), rel=0.01)
    assert how.endswith("4 a cycle on 132 SMs at 1.98 GHz"), how
