"""The Triton scan's kernels compile for real GPUs (A100: sm_80, H100/H200: sm_90) on this CPU-only
machine: tests/compile_triton.py runs Triton's whole compiler, down to a cubin, in a process
without TRITON_INTERPRET. The interpreter tests check the numerics; this checks what only the
compiler checks (a kernel that ran interpreted once failed here: a helper returned a scalar
on one constexpr branch and a vector on the other), and that no kernel spills more registers
than the measured-fastest tiles do (the backward with 32-step chunks spilled 2 KB)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "compile_triton.py"


@pytest.mark.parametrize("arch", [80, 90])
def test_the_triton_kernels_compile_for_the_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled now, not found in a cache
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 8 and all(line.startswith(f"sm_{arch} _scan_") and "registers" in line
                                   for line in lines), done.stdout
