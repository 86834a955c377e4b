"""The mamba-ssm path without a GPU: our dispatch drives mamba-ssm's own Python wrapper
(``mamba_ssm/ops/selective_scan_interface.py`` from its PyPI source release) over a stand-in for its
compiled extension that makes the extension's argument checks (tests/mamba_standin.py).

mamba-ssm cannot be installed here (it compiles CUDA), so the fixture downloads its source
release from PyPI once (a package registry, reachable where CI runs), checks its SHA-256 and
imports only the wrapper and the modules it imports. Only the "tensors are on CUDA" checks are
left out: resolve_backend keeps refusing backend="mamba" for CPU tensors, tested in
test_selective_scan.py.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
import torch

import mamba_standin
from medmamba.kernels import cross_selective_scan, selective_scan, selective_scan_fn, selective_scan_ref
from scan_inputs import make_inputs, rel_err
from test_cross_scan import _cross_inputs

VERSION = "2.3.2.post1"
SDIST = ("https://files.pythonhosted.org/packages/af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534bfef34bb/"
         f"mamba_ssm-{VERSION}.tar.gz")
SHA256 = "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"
# the wrapper and what it imports (mamba_ssm/__init__.py would import the whole model zoo)
MODULES = ["ops/selective_scan_interface.py", "ops/triton/layer_norm.py", "utils/torch.py", "utils/determinism.py"]


def _sdist(cache: Path) -> Path:
    path = cache / f"mamba_ssm-{VERSION}.tar.gz"
    if not path.exists():
        try:
            with urllib.request.urlopen(SDIST, timeout=60) as response:
                data = response.read()
        except OSError as error:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"PyPI unreachable, cannot fetch mamba-ssm's source release: {error}")
        if hashlib.sha256(data).hexdigest() != SHA256:
            raise AssertionError(f"{SDIST} does not have the expected SHA-256")
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def wrapper_root(tmp_path_factory, pytestconfig) -> Path:
    """A folder holding mamba-ssm's wrapper modules (empty package __init__ files)."""
    root = tmp_path_factory.mktemp("mamba_ssm")
    with tarfile.open(_sdist(Path(pytestconfig.cache.mkdir("mamba-ssm")))) as archive:
        for name in MODULES:
            target = root / "mamba_ssm" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(f"mamba_ssm-{VERSION}/mamba_ssm/{name}").read())
    for package in ["", "ops", "ops/triton", "utils"]:
        (root / "mamba_ssm" / package / "__init__.py").touch()
    return root


@pytest.fixture
def mamba(wrapper_root, monkeypatch):
    """backend="mamba" reaching mamba-ssm's wrapper over the stand-in, on CPU tensors."""
    monkeypatch.syspath_prepend(str(wrapper_root))
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", mamba_standin)
    resolve = selective_scan.resolve_backend
    monkeypatch.setattr(selective_scan, "resolve_backend",
                        lambda device, backend="auto": "mamba" if backend == "mamba" else resolve(device, backend))
    selective_scan._mamba_scan.cache_clear()
    assert selective_scan._mamba_scan() is not None, "mamba-ssm's wrapper did not import"
    monkeypatch.setattr(mamba_standin, "calls", {"fwd": 0, "bwd": 0})
    yield
    assert mamba_standin.calls == {"fwd": 1, "bwd": 1}, "the scan did not go through mamba-ssm's extension"
    selective_scan._mamba_scan.cache_clear()
    for name in [name for name in sys.modules if name.split(".")[0] == "mamba_ssm"]:
        del sys.modules[name]


def _run(fn, inputs: dict, softplus: bool) -> list:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = fn(**{**inputs, **leaves}, delta_softplus=softplus, return_last_state=True)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), last] + [leaves[k].grad for k in leaves]


@pytest.mark.parametrize("layout", ["fixed", "var", "g2"])
@pytest.mark.parametrize("options", [True, False], ids=["z-D-bias", "bare"])
def test_selective_scan_fn_passes_mamba_ssm_its_layout(mamba, layout, options):
    inputs = make_inputs(2, 8, 4, 21, layout, z=options, D=options, bias=options, seed=3)
    got = _run(functools.partial(selective_scan_fn, backend="mamba"), inputs, options)
    want = _run(selective_scan_ref, inputs, options)
    for name, g, w in zip(["out", "last state", *[k for k, v in inputs.items() if v is not None]], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and rel_err(g, w) <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_selective_scan_passes_mamba_ssm_its_layout(mamba, dtype):
    """SS2D's call: strided views of one projection, a low-rank delta, in fp32 and bf16."""
    inputs = {k: v.to(dtype) for k, v in _cross_inputs(2, 3, 4, 8, 4, torch.float32, low_rank=True, seed=1).items()}
    results = []
    for backend in ("mamba", "ref"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        scan = functools.partial(cross_selective_scan, backend=backend)
        out = scan(**{**inputs, **leaves}, delta_softplus=True)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves.values()])
    for name, got, want in zip(["out", *inputs], *results):
        assert got.dtype == dtype and rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2), name


def test_auto_backend_names_the_pick_and_why(monkeypatch):
    """``medmamba info`` and gpu_check's header: the backend auto picks and, when it falls back, the
    reason its one-time warning gives, whether or not that warning was spent; it warns nothing itself."""
    import warnings

    monkeypatch.setattr(selective_scan, "_warned", set())
    selective_scan._mamba_scan.cache_clear()  # mamba-ssm is not installed here
    fallback = ("triton", "CUDA tensors use the Triton scan: mamba-ssm is not installed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert selective_scan.auto_backend(torch.device("cuda")) == fallback
        with pytest.warns(RuntimeWarning, match="selective_scan: " + fallback[1]):
            assert selective_scan.resolve_backend(torch.device("cuda")) == "triton"
        assert selective_scan.auto_backend(torch.device("cuda")) == fallback  # the warning spent
        assert selective_scan.auto_backend(torch.device("cpu")) == ("cpu", "the compiled CPU kernel")
    finally:
        selective_scan._mamba_scan.cache_clear()


def test_a_mamba_ssm_build_that_does_not_import_is_named(wrapper_root, monkeypatch):
    """mamba-ssm installed without a working CUDA build (no ``selective_scan_cuda``: the recurring
    complaint): CUDA tensors fall back to the Triton scan and the warning says why; forcing
    backend="mamba" names the import error and the way out."""
    monkeypatch.syspath_prepend(str(wrapper_root))
    monkeypatch.delitem(sys.modules, "selective_scan_cuda", raising=False)
    monkeypatch.setattr(selective_scan, "_warned", set())
    selective_scan._mamba_scan.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"Triton scan: mamba-ssm is installed but does not import "
                                                r"\(ModuleNotFoundError: No module named 'selective_scan_cuda'\)"):
            assert selective_scan.resolve_backend(torch.device("cuda")) == "triton"
        with pytest.raises(RuntimeError, match=r"selective_scan_cuda.*install medmamba\[gpu\].*backend='triton'"):
            selective_scan.resolve_backend(torch.device("cuda"), "mamba")
    finally:
        selective_scan._mamba_scan.cache_clear()
        for name in [name for name in sys.modules if name.split(".")[0] == "mamba_ssm"]:
            del sys.modules[name]
