"""Process-level state a run depends on: the device, the distributed world, seeds and RNG states,
and joining Ray (``init_ray``, for the orchestrator and the federation alike) with SIGTERM still ours.

Nothing here depends on which device a run trains on in a way a CPU test cannot see: RNG states
are captured and restored as CPU tensors and plain data (a checkpoint loads with
``weights_only=True`` on any machine), and the CUDA generators are restored when the saved state
has them and this process has CUDA.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str = "auto", option: str = "train.device") -> torch.device:
    """The device ``name`` means here (``auto``: CUDA when there is one); errors name ``option``,
    the config key or command-line option it came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} is {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} is {name!r} but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{option} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_dtype(amp: str | bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` asks for on ``device`` (None: fp32). ``auto`` (or true):
    bf16 on CUDA (fp16 on GPUs without bf16), fp32 on a CPU, where bf16 autocast gained 2% at
    28 px and 16% at 64 px on an AVX512-BF16 machine (not worth bf16 numerics by default);
    ``bf16`` also on a CPU; ``fp16`` (CUDA only) trains with a GradScaler; ``off`` (or false): fp32."""
    if amp in ("off", False):
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"train.amp=fp16 needs a CUDA device (on {device.type}: bf16 or off)")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def release_freed_memory() -> None:
    """What finished runs left, before the next one in this process (a reused Ray Tune actor):
    torch.compile's compiled graphs are dropped, and the C heap's free memory goes back to the OS
    (glibc's ``malloc_trim``; a no-op elsewhere). Without the trim, freed tensors stayed as
    fragmented heap: a matrix worker grew 0.35 GB a cell and its later cells trained up to 20%
    slower. Without the reset, every earlier cell's graphs count against dynamo's recompile limit
    (8 per function): after it, ``train.compile`` runs trained eagerly, with one warning in the log."""
    torch._dynamo.reset()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not Linux with glibc (macOS, musl): nothing to trim
        pass


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic  # fixed input sizes: let cuDNN pick its fastest kernels
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every random generator a training step draws from, as tensors and plain data: Python's,
    NumPy's, torch's CPU and CUDA generators, and ``generator`` (a DataLoader's shuffle order)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].copy()),
                                        "pos": int(np_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Restore what ``rng_state`` captured (loaded on the CPU, whatever device wrote it)."""
    random.setstate(_as_tuples(state["python"]))
    numpy = dict(state["numpy"])
    numpy["state"] = {"key": state["numpy"]["state"]["key"].numpy(), "pos": state["numpy"]["state"]["pos"]}
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None:
        if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        else:
            log.warning("the checkpoint holds the RNG states of %d CUDA devices, this process has %d: "
                        "CUDA random draws will differ from an uninterrupted run", len(state["cuda"]),
                        torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"].cpu())


def _as_tuples(value):
    """random.setstate wants tuples where a checkpoint round trip may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


RAY_CONNECT_TIMEOUT_S = 10.0  # for a Ray cluster's address to answer before ray.init is tried


def _check_ray_reachable(address: str, named: str) -> None:
    """ConfigError at once for a Ray ``host:port`` (or ``ray://host:port``) that nothing answers
    at, ``named`` by where it came from: ray.init would retry it for minutes, printing only its
    C++ client's warnings. Other forms ("auto") are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()  # [IPv6]:port
    except OSError as exc:
        raise ConfigError(f"{named} is {address}, but no Ray cluster answers there ({exc.strerror or exc}); start "
                          "one (`ray start --head`), fix the address, or leave ray.address unset for a local cluster") from exc


@contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Around ``ray.init()``: Ray's core worker takes SIGTERM over with a C++ handler that aborts
    the driver (exit 134, a stack dump, its MLflow runs left RUNNING); the Python handler set
    before (the CLI's, which ends a command as Ctrl-C does) is put back on the way out."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def init_ray(address: str | None = None, **options) -> None:
    """Join the Ray cluster at ``address`` (or $RAY_ADDRESS, which `ray job submit` sets); without
    either, the one `ray start` runs on this machine, else a new local one (``"local"``: always
    a new one), which goes away with this process however it ends. ``options`` go to ray.init.
    Idempotent. An address nothing answers at is a ConfigError at once, and SIGTERM keeps the
    handler it had (``_sigterm_kept``)."""
    import ray

    from .reaper import reap_on_exit

    if ray.is_initialized():
        return
    named = "ray.address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address in (None, "", "local"):
        reap_on_exit()
    else:
        _check_ray_reachable(address, named)
    with _sigterm_kept():
        try:
            ray.init(address=address, configure_logging=False, **options)
        except ConnectionError as exc:  # "auto" with no cluster running, say: Ray's message, without its traceback
            raise ConfigError(f"{named} is {address}: {exc}" if address else f"cannot start or join Ray: {exc}") from exc
