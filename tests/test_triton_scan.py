"""The Triton scan (backend="triton") against the per-step reference, run by Triton's interpreter
on CPU tensors: the numerics a GPU would run, checked without one.

conftest.py sets TRITON_INTERPRET=1 for the session on a machine without a GPU, before anything
imports Triton. Shapes stay small: the interpreter runs each program step by step in NumPy.
"""
from __future__ import annotations

import os

import pytest
import torch

from medmamba.kernels import cross_selective_scan, resolve_backend, selective_scan_fn, selective_scan_ref, triton_scan
from scan_inputs import make_inputs, rel_err
from test_cross_scan import _cross_inputs

pytestmark = pytest.mark.skipif(not triton_scan.INTERPRETED, reason="Triton kernels on CPU tensors need "
                                "TRITON_INTERPRET=1 (conftest sets it on machines without a GPU)")

# batch, dim, nstate, L, layout, options on: dim not a multiple of BLOCK_D, L across chunk boundaries,
# groups of whole programs (g2 at dim 32: each program's channels read one row of B and C) or not
SHAPES = [(1, 4, 1, 1, "fixed", True), (2, 20, 16, 37, "var", True), (1, 16, 4, 65, "g2", False),
          (2, 8, 3, 33, "g4", True), (1, 5, 8, 32, "g1", False), (2, 32, 4, 40, "g2", True)]


def _leaves(inputs: dict) -> dict:
    return {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}


def _run(fn, inputs, leaves, softplus, **kw):
    out, last = fn(**{**inputs, **leaves}, delta_softplus=softplus, return_last_state=True, **kw)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out.float() * weight.float()).sum().backward()
    return out.detach(), last, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-n{}-L{}-{}-{}".format(*s))
def test_selective_scan_forward_and_gradients_match_the_reference_fp32(shape):
    batch, dim, nstate, L, layout, options = shape
    inputs = make_inputs(batch, dim, nstate, L, layout, z=options, D=options, bias=options, seed=L)
    softplus = L % 2 == 1
    out, last, grads = _run(selective_scan_fn, inputs, _leaves(inputs), softplus, backend="triton")
    want, want_last, want_grads = _run(selective_scan_ref, inputs, _leaves(inputs), softplus)
    assert out.dtype == torch.float32 and rel_err(out, want) <= 1e-5
    assert rel_err(last, want_last) <= 1e-5
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        assert grads[name].shape == inputs[name].shape
        assert rel_err(grads[name], want_grads[name]) <= 1e-4, name


@pytest.mark.parametrize("layout", ["var", "fixed"])
def test_bf16_inputs_compute_in_fp32(layout):
    inputs = make_inputs(2, 12, 4, 40, layout, seed=5)
    half = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    out, _, grads = _run(selective_scan_fn, half, _leaves(half), True, backend="triton")
    want, _, want_grads = _run(selective_scan_ref, half, _leaves(half), True)  # the reference upcasts too
    assert out.dtype == torch.bfloat16 and rel_err(out, want) <= 1e-2
    for name in want_grads:
        assert grads[name].dtype == torch.bfloat16 and rel_err(grads[name], want_grads[name]) <= 2e-2, name


def test_b_and_c_may_have_different_layouts():
    inputs = make_inputs(2, 20, 4, 35, "fixed", seed=3)
    inputs["C"] = make_inputs(2, 20, 4, 35, "g2", seed=4)["C"]
    out, _, grads = _run(selective_scan_fn, inputs, _leaves(inputs), True, backend="triton")
    want, _, want_grads = _run(selective_scan_ref, inputs, _leaves(inputs), True)
    assert rel_err(out, want) <= 1e-5
    for name in want_grads:
        assert rel_err(grads[name], want_grads[name]) <= 1e-4, name


def _cross(inputs: dict, backend: str, softplus: bool) -> list:
    leaves = _leaves(inputs)
    out = cross_selective_scan(**{**inputs, **leaves}, delta_softplus=softplus, backend=backend)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves.values()]


# batch, H, W, dim, nstate (a 1x1 map, a non-square one, one across a chunk boundary with dim over
# two programs), each with a full and a low-rank delta, with and without D and the delta bias
CROSS = [((1, 1, 1, 16, 16), True, True), ((1, 1, 1, 16, 16), False, False), ((2, 3, 5, 8, 4), False, True),
         ((2, 3, 5, 8, 4), True, False), ((1, 5, 7, 24, 3), True, True), ((1, 5, 7, 24, 3), False, False)]


@pytest.mark.parametrize("shape, low_rank, skip", CROSS,
                         ids=lambda v: "b{}-{}x{}-d{}-n{}".format(*v) if isinstance(v, tuple) else str(v))
def test_cross_selective_scan_matches_the_reference(shape, low_rank, skip):
    inputs = _cross_inputs(*shape, torch.float32, skip=skip, low_rank=low_rank, seed=sum(shape))
    softplus = skip or low_rank
    names = ["out", *_leaves(inputs)]
    for name, got, want in zip(names, _cross(inputs, "triton", softplus), _cross(inputs, "ref", softplus)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) <= (1e-5 if name == "out" else 1e-4), name


def test_inference_saves_no_chunk_states_and_gives_the_same_output(monkeypatch):
    """Without inputs that need a gradient the forward writes no chunk starts for a backward."""
    kernel, flags = triton_scan._scan_fwd, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                flags.append((kwargs["SAVE_STARTS"], tuple(args[10].shape)))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_scan, "_scan_fwd", Spy())
    inputs = _cross_inputs(2, 5, 7, 24, 4, torch.float32, low_rank=True, seed=4)
    with torch.no_grad():
        out = cross_selective_scan(**inputs, delta_softplus=True, backend="triton")
    trained = cross_selective_scan(**_leaves(inputs), delta_softplus=True, backend="triton")
    want = cross_selective_scan(**inputs, delta_softplus=True, backend="ref")
    assert rel_err(out, want) <= 1e-5 and torch.equal(out, trained.detach())
    # (batch, 4 directions x 24 channels, 35 steps in chunks of 16, 4 states); none without gradients
    assert flags == [(False, (2, 96, 0, 4)), (True, (2, 96, 3, 4))]


def test_cross_selective_scan_in_bf16_computes_in_fp32():
    inputs = {k: None if v is None else v.to(torch.bfloat16)
              for k, v in _cross_inputs(2, 4, 5, 16, 4, torch.float32, low_rank=True, seed=2).items()}
    for name, got, want in zip(["out", *_leaves(inputs)], _cross(inputs, "triton", True), _cross(inputs, "ref", True)):
        assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 2e-2, name


def test_the_triton_cross_scan_reads_the_directions_in_place(monkeypatch):
    """No four re-ordered copies of the map (cross_scan) and no per-direction selective_scan_fn."""
    from medmamba.kernels import selective_scan as dispatch

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the Triton cross scan built the four sequences")

    monkeypatch.setattr(dispatch, "cross_scan", forbidden)
    monkeypatch.setattr(dispatch, "selective_scan_fn", forbidden)
    inputs = _cross_inputs(1, 2, 3, 16, 4, torch.float32, low_rank=True)
    assert cross_selective_scan(**inputs, delta_softplus=True, backend="triton").shape == (1, 2, 3, 16)


def test_the_triton_backend_runs_here_only_under_the_interpreter():
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    assert resolve_backend(torch.device("cpu")) == "cpu"  # never chosen automatically on a CPU


def _gpu_check():
    """benchmarks/gpu_check.py as a module."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_the_gpu_check_degrades_to_a_cpu_smoke_test(monkeypatch):
    """benchmarks/gpu_check.py on a machine without a GPU: every backend here checked, no crash."""
    gpu_check = _gpu_check()
    device = torch.device("cpu")
    assert gpu_check.backends(device) == ["triton", "cpu", "torch"]  # triton: interpreted in this session
    rows = gpu_check.correctness(device, batch=1, dim=16, n=4, L=40, hw=(3, 5))
    assert len(rows) == 6 and sum("cross_selective_scan" in row for row in rows) == 3
    for row in rows:
        forward, gradients = (float(part.split("err ")[1].split()[0]) for part in row.split("|")[3:5])
        assert forward <= 1e-5 and gradients <= 1e-4, row
    assert gpu_check.scan_shapes() == [(56, 56, 96, 16, 3), (28, 28, 192, 16, 6), (14, 14, 384, 16, 12),
                                       (7, 7, 768, 16, 24)]
    (row,) = gpu_check.resume_check(device, size=16, images=48, epochs=2)  # killed after epoch 1, resumed
    assert "killed after epoch 1, resumed" in row and "over 2 epochs" in row, row
    assert float(row.split("|Δ train loss| ")[1].split()[0]) <= 1e-6, row
    from medmamba.model import conv_layout

    rows = gpu_check.conv_layouts(device, 32, 2, 1)
    assert [row.split("|")[2].strip() for row in rows] == ["medmamba_t, Conv branch NCHW",
                                                           "medmamba_t, Conv branch channels-last", ""], rows
    assert "the Conv branch runs NCHW on cpu" in rows[2] and conv_layout(device) == torch.contiguous_format
    rows = gpu_check.throughput(device, 32, 2, 1, ("medmamba_t", "convnext_tiny"), "aot_eager")
    assert [row.split("|")[2].strip() for row in rows] == ["medmamba_t", "convnext_tiny", ""], rows
    assert "compiled (aot_eager)" in rows[0] and "first step (compiling)" in rows[0] and "both compiled" in rows[2]
    assert all("img/s synced each step; " in row for row in rows[:2]), rows

    def torch_backend_breaks(*args, backend="auto", **kwargs):
        if backend == "torch":
            raise RuntimeError("no kernel image is available for execution on the device")
        return selective_scan_fn(*args, backend=backend, **kwargs)

    monkeypatch.setattr(gpu_check, "selective_scan_fn", torch_backend_breaks)  # a backend failing on the GPU
    rows = gpu_check.correctness(device, batch=1, dim=8, n=4, L=20, hw=(2, 3))
    assert rows[2] == ("| correctness selective_scan_fn | torch | FAILED: RuntimeError: no kernel image is "
                       "available for execution on the device | |") and "FAILED" not in "".join(rows[:2] + rows[3:])


def test_back_to_back_timing_is_the_mean_of_the_calls_after_a_warm_up():
    """benchmarks/timing.py: the training rate's timer makes one warm-up call, then ``steps`` calls."""
    import time

    _gpu_check()  # which imports benchmarks/timing.py
    from timing import back_to_back_seconds

    calls = []
    seconds = back_to_back_seconds(lambda: (calls.append(1), time.sleep(0.01)), 4)
    assert len(calls) == 5 and 0.01 <= seconds < 0.1, (len(calls), seconds)


def test_the_gpu_check_imports_only_what_the_gpu_machine_has_or_is_carried():
    """The lent GPU machine has torch, triton and timm; `make gpu-deps` carries scikit-learn and its
    dependencies. Nothing else may be imported by the check or by the training loop it runs."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check, medmamba.train; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = set(done.stdout.split())
    assert {"torch", "sklearn", "medmamba"} <= imported
    assert not imported & {"matplotlib", "ray", "mlflow", "flwr", "medmnist", "optuna"}, \
        imported & {"matplotlib", "ray", "mlflow", "flwr", "medmnist", "optuna"}


def test_the_gpu_check_runs_the_sections_named_and_refuses_unknown_ones():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    run = lambda *args: subprocess.run([sys.executable, str(script), *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": ""})
    done = run("--only", "scan,typo")
    assert done.returncode == 2 and "--only: unknown section typo; the sections are correctness, scan" in done.stderr
    done = run("--only", "scan")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sections took: scan " in done.stdout and "| scan stage 1" in done.stdout
    header = done.stdout.splitlines()[0]
    assert header.endswith("scan backends here: cpu, torch; auto picks cpu (the compiled CPU kernel)"), header
    assert "correctness" not in done.stdout and "throughput" not in done.stdout


def test_the_tile_sizes_the_gpu_check_times_are_correct_too():
    """The other launches (triton_scan.Tiles) the GPU check times: same results, the defaults back,
    and sizes the kernels cannot take refused by name. Only other tile sizes change what the
    interpreter computes (it ignores warps, stages and registers), so only those are run."""
    gpu_check = _gpu_check()
    inputs = _cross_inputs(1, 3, 7, 24, 4, torch.float32, low_rank=True, seed=11)
    want = _cross(inputs, "ref", True)
    defaults = triton_scan.TILES
    assert defaults == triton_scan.Tiles(chunk=16, block_d=16, num_warps=4, max_registers=None, stages=None)
    for changes in gpu_check.TRITON_CONFIGS:
        with triton_scan.tiles(**changes) as tiles:
            assert triton_scan.TILES == tiles and tiles != defaults
            assert all(getattr(tiles, key) == value for key, value in changes.items())
            if (tiles.chunk, tiles.block_d) == (defaults.chunk, defaults.block_d):
                continue
            got = _cross(inputs, "triton", True)
        for name, g, w in zip(["out", *_leaves(inputs)], got, want):
            assert rel_err(g, w) <= (1e-5 if name == "out" else 1e-4), (changes, name)
    assert triton_scan.TILES == defaults
    with pytest.raises(ValueError, match="chunk and block_d must be at least 16 .*, got 16 and 8"):
        with triton_scan.tiles(block_d=8):
            pass
    with pytest.raises(ValueError, match="stages must be at least 1, got 0"):
        with triton_scan.tiles(stages=0):
            pass
    with pytest.raises(TypeError, match="warps"):
        with triton_scan.tiles(warps=8):
            pass
    assert triton_scan.TILES == defaults


def test_an_ss2d_block_trains_under_bf16_autocast_on_the_triton_scan(monkeypatch):
    """The model's SS2D under train.amp=bf16 (bf16 projections, their strided views fed to the
    kernel) on the Triton scan: finite, and the same gradients as on the reference scan. (A whole
    MedMamba is too slow for the interpreter; the CPU paths train one in test_train.py.)"""
    import functools

    import medmamba.model
    from medmamba.model import SS2D

    grads = {}
    for backend in ("triton", "ref"):
        monkeypatch.setattr(medmamba.model, "cross_selective_scan",
                            functools.partial(cross_selective_scan, backend=backend))
        torch.manual_seed(0)
        block = SS2D(8, d_state=4)
        x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = block(x).float().square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        grads[backend] = {name: p.grad for name, p in block.named_parameters()}
    for name, want in grads["ref"].items():
        assert torch.isfinite(grads["triton"][name]).all() and rel_err(grads["triton"][name], want) <= 2e-2, name
