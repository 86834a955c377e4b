"""Build (once, cached) and load the compiled CPU selective-scan extension.

The C++ source is JIT-compiled with torch's cpp_extension on first use and cached under
``$MEDMAMBA_EXT_DIR`` (default ``~/.cache/medmamba/ext``). The cache key (``build_key``) covers
the source, the flags, the host CPU's instruction-set flags (the code is built for
``-march=native``), and the compiler, torch and Python used. If the build fails (no compiler, no ninja), :func:`load` returns ``None`` and
:func:`load_error` says why; callers fall back to the vectorised PyTorch path.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

# resolved: imported from the checkout (medmamba/kernels -> ../kernels) or through the editable
# install's links, the build sees one path, so that ninja does not recompile on every switch
_SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ninja() -> str:
    """The ninja that builds the extension: the pip package's (a dependency) whatever the PATH,
    else the PATH's. (With the system's ninja in some processes and the venv's in others, one
    build directory was rebuilt at every switch, ~45 s on 2 cores: their logs differ.)"""
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return shutil.which("ninja") or ""


def build_key() -> str:
    """Everything that changes the build: the source, the flags, the CPU, and the compiler, ninja,
    torch and Python it is built with and against (their paths too: two virtualenvs must not
    share a build directory, or each switch rebuilds it)."""
    from torch.utils.cpp_extension import include_paths

    return "|".join([_SOURCE.read_text(), " ".join(_FLAGS), _cpu_signature(), torch.__version__,
                     *include_paths(), sysconfig.get_paths()["include"], sys.executable,
                     os.environ.get("CXX", "c++"), shutil.which(os.environ.get("CXX", "c++")) or "", _ninja()])


def _build_name() -> str:
    return "medmamba_scan_cpu_" + hashlib.sha256(build_key().encode()).hexdigest()[:16]


def load() -> ModuleType | None:
    """The compiled extension, building it on first call; None if it cannot be built."""
    if "module" in _state:  # built (or failed) already: no lock, which torch.compile could not trace
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" not in _state:
            try:
                from torch.utils.cpp_extension import load as build

                build_dir = Path(os.environ.get("MEDMAMBA_EXT_DIR", Path.home() / ".cache/medmamba/ext"))
                name = _build_name()
                (build_dir / name).mkdir(parents=True, exist_ok=True)
                path = os.environ.get("PATH", "")
                os.environ["PATH"] = os.pathsep.join([str(Path(_ninja()).parent), path])  # torch runs `ninja`
                try:
                    _state["module"] = build(
                        name=name,
                        sources=[str(_SOURCE)],
                        extra_cflags=_FLAGS,
                        extra_ldflags=["-fopenmp"],
                        build_directory=str(build_dir / name),
                        verbose=False,
                    )
                finally:
                    os.environ["PATH"] = path
            except Exception as exc:  # a compiler, ninja or the headers are missing
                _state["module"] = None
                _state["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
        return _state["module"]  # type: ignore[return-value]


def load_error() -> str | None:
    """Why the extension could not be built (None if it was, or was never tried)."""
    return _state.get("error")  # type: ignore[return-value]
