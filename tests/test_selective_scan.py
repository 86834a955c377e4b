"""Our selective-scan paths against the per-step reference, over a grid of shapes and options."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from medmamba.kernels import resolve_backend, selective_scan_fn, selective_scan_ref
from scan_inputs import LAYOUTS, make_inputs, rel_err

FLAG_COMBOS = list(itertools.product([False, True], repeat=5))  # z, D, bias, softplus, last_state
SHAPES = list(itertools.product([1, 3], [4, 64], [1, 8, 16], [1, 7, 64, 513], LAYOUTS))
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _run(fn, inputs, softplus, last_state, **kw):
    return fn(**inputs, delta_softplus=softplus, return_last_state=last_state, **kw)


def test_cpu_backend_is_the_compiled_kernel():
    # CI has a compiler: the default CPU path must be the compiled kernel, not the fallback.
    assert resolve_backend(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", range(len(SHAPES)), ids=lambda i: "b{}-d{}-n{}-L{}-{}".format(*SHAPES[i]))
def test_forward_matches_reference(case, dtype):
    batch, dim, nstate, L, layout = SHAPES[case]
    z, D, bias, softplus, last_state = FLAG_COMBOS[case % len(FLAG_COMBOS)]
    inputs = make_inputs(batch, dim, nstate, L, layout, dtype, z=z, D=D, bias=bias, seed=case)
    got = _run(selective_scan_fn, inputs, softplus, last_state, backend="cpu")
    want = _run(selective_scan_ref, inputs, softplus, last_state)
    if last_state:
        (got, got_state), (want, want_state) = got, want
        assert got_state.shape == (batch, dim, nstate)
        assert rel_err(got_state, want_state) <= TOL[dtype]
    assert got.shape == (batch, dim, L) and got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=lambda f: "".join("1" if x else "0" for x in f))
def test_every_option_combination(flags):
    z, D, bias, softplus, last_state = flags
    inputs = make_inputs(2, 16, 8, 100, "g2", torch.float64, z=z, D=D, bias=bias)
    for backend in ("cpu", "torch"):
        got = _run(selective_scan_fn, inputs, softplus, last_state, backend=backend)
        want = _run(selective_scan_ref, inputs, softplus, last_state)
        for g, w in zip(got if last_state else [got], want if last_state else [want]):
            assert rel_err(g, w) <= 1e-10


@pytest.mark.parametrize("layout_b,layout_c", [("g2", "fixed"), ("fixed", "g4"), ("g4", "var"), ("var", "g2")])
def test_mixed_b_and_c_layouts(layout_b, layout_c):
    # B and C may have different layouts and group counts: forward tiles must respect both.
    inputs = make_inputs(2, 24, 5, 70, layout_b, torch.float64)
    inputs["C"] = make_inputs(2, 24, 5, 70, layout_c, torch.float64, seed=1)["C"]
    got = _grads(selective_scan_fn, inputs, softplus=True)
    want = _grads(selective_scan_ref, inputs, softplus=True)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-10, name
    out = selective_scan_fn(**inputs, delta_softplus=True)
    assert rel_err(out, selective_scan_ref(**inputs, delta_softplus=True)) <= 1e-10


GRAD_SHAPES = list(itertools.product([1, 3], [4, 64], [1, 16], [1, 64, 513], ["fixed", "var", "g2"]))
# The compiled kernel on the whole grid, the chunked PyTorch path (fallback and GPU) on a third.
GRAD_CASES = [(i, "cpu") for i in range(len(GRAD_SHAPES))] + [(i, "torch") for i in range(0, len(GRAD_SHAPES), 3)]


def _grads(fn, inputs, softplus, **kw):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = fn(**{**inputs, **leaves}, delta_softplus=softplus, return_last_state=True, **kw)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weight).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize(
    "case,backend", GRAD_CASES, ids=["{}-b{}-d{}-n{}-L{}-{}".format(be, *GRAD_SHAPES[i]) for i, be in GRAD_CASES]
)
def test_gradients_match_reference_fp32(case, backend):
    batch, dim, nstate, L, layout = GRAD_SHAPES[case]
    optional = case % 4 != 3  # every fourth case without z, D and delta_bias
    inputs = make_inputs(batch, dim, nstate, L, layout, z=optional, D=optional, bias=optional, seed=case)
    got = _grads(selective_scan_fn, inputs, softplus=case % 2 == 0, backend=backend)
    want = _grads(selective_scan_ref, inputs, softplus=case % 2 == 0)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == inputs[name].shape
        assert rel_err(got[name], want[name]) <= 1e-4, name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_fp64(layout, backend):
    inputs = make_inputs(2, 4, 3, 9, layout, torch.float64)
    names = list(inputs)
    leaves = [inputs[k].clone().requires_grad_() for k in names]

    def f(*xs):
        return selective_scan_fn(**dict(zip(names, xs)), delta_softplus=True, backend=backend)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    inputs = make_inputs(2, 8, 4, 50, "g2", torch.float32)
    inputs = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    got = selective_scan_fn(**inputs, delta_softplus=True)
    want = selective_scan_ref(**inputs, delta_softplus=True)
    assert got.dtype == dtype
    # Both compute in fp32 and round once at the end: at most one rounding step apart.
    assert rel_err(got.float(), want.float()) <= torch.finfo(dtype).eps


def test_results_do_not_depend_on_thread_count():
    inputs = make_inputs(1, 64, 16, 300, "g4")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(selective_scan_fn, inputs, softplus=True)
        torch.set_num_threads(max(2, threads))
        many = _grads(selective_scan_fn, inputs, softplus=True)
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert rel_err(many[name], one[name]) <= 1e-6


def test_nan_in_nan_out():
    inputs = make_inputs(2, 8, 4, 20, "g2")
    inputs["u"][0, 3, 5] = float("nan")
    for backend in ("cpu", "torch"):
        out = selective_scan_fn(**inputs, delta_softplus=True, backend=backend)
        assert out[0, 3, 5:].isnan().all()  # a NaN propagates forward through that channel's state
        assert not out[1].isnan().any() and not out[0, :3].isnan().any()


def test_fallback_without_compiler_warns_once_and_stays_exact(tmp_path):
    # A fresh build directory and no C++ compiler: the package imports, warns once, runs on the
    # chunked PyTorch path and still matches the reference.
    script = textwrap.dedent("""
        import warnings, torch, sys
        sys.path.insert(0, %r)
        from scan_inputs import make_inputs, rel_err
        from medmamba.kernels import selective_scan_fn, selective_scan_ref, resolve_backend
        inputs = make_inputs(2, 8, 4, 40, "g2", torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = selective_scan_fn(**inputs, delta_softplus=True)
            selective_scan_fn(**inputs, delta_softplus=True)
        msgs = [str(w.message) for w in caught if "selective_scan" in str(w.message)]
        assert len(msgs) == 1 and "could not be built" in msgs[0], msgs
        assert resolve_backend(torch.device("cpu")) == "torch"
        assert rel_err(out, selective_scan_ref(**inputs, delta_softplus=True)) < 1e-10
        print("fallback ok")
    """ % os.path.dirname(__file__))
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "MEDMAMBA_EXT_DIR": str(tmp_path / "ext")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fallback ok" in proc.stdout


def test_forced_backends_that_cannot_run_here_say_why():
    inputs = make_inputs(1, 4, 2, 5, "fixed")
    with pytest.raises(ValueError, match="backend 'mamba' needs CUDA"):
        selective_scan_fn(**inputs, backend="mamba")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        selective_scan_fn(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        resolve_backend(torch.device("meta"), "triton")
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors, got meta"):
        resolve_backend(torch.device("meta"), "cpu")


def test_non_contiguous_inputs_and_large_state():
    # Views (transposed u, sliced B) and N = 64 (larger than one SIMD vector) scan like contiguous copies.
    inputs = make_inputs(2, 20, 64, 33, "g2", torch.float64)
    inputs["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["B"] = torch.cat([inputs["B"], inputs["B"]], dim=-1)[..., ::2]
    assert not inputs["u"].is_contiguous() and not inputs["B"].is_contiguous()
    got = _grads(selective_scan_fn, inputs, softplus=True)
    want = _grads(selective_scan_ref, inputs, softplus=True)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-10, name


def test_the_build_cache_key_covers_the_toolchain_and_environment():
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    from medmamba.kernels import _cpu_ext

    key = _cpu_ext.build_key()
    assert all(path in key for path in include_paths())  # this virtualenv's torch headers
    assert sysconfig.get_paths()["include"] in key and sys.executable in key and torch.__version__ in key


def test_the_build_does_not_depend_on_which_ninja_the_path_finds_first(monkeypatch, tmp_path):
    """The system's ninja and the venv's record build commands differently: sharing a directory,
    processes with the one and the other first on their PATH rebuilt the extension at every switch."""
    from medmamba.kernels import _cpu_ext

    before = _cpu_ext._build_name()
    ninja = tmp_path / "ninja"
    ninja.write_text("#!/bin/sh\nexit 1\n")
    ninja.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _cpu_ext._build_name() == before and _cpu_ext._ninja() != str(ninja)
