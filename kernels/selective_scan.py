"""Selective scan (Mamba's S6) with mamba-ssm's API, dispatched to the fastest available path.

Backends:
- ``"mamba"``: mamba-ssm's CUDA kernel (CUDA tensors, ``pip install medmamba[gpu]``).
- ``"triton"``: Triton kernels of the whole scan (``triton_scan``; CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``, which is how CI checks them): no CUDA build step.
- ``"cpu"``: our compiled C++ kernel (CPU tensors; JIT-built on first use, see ``_cpu_ext``).
- ``"torch"``: a chunked, vectorised PyTorch formulation that runs on any device, with a
  backward that recomputes one chunk at a time; used on a GPU without mamba-ssm and on a CPU
  where the extension cannot be built.
- ``"ref"``: the per-step reference (tests and benchmarks only; never chosen automatically).

``"auto"`` picks mamba on CUDA when importable, else Triton there; the compiled kernel on CPU;
otherwise ``"torch"``, with a one-time warning that names why. (Which of mamba-ssm and Triton is
faster at MedMamba's shapes has not been measured yet: benchmarks/gpu_check.py does, on a GPU.)
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu_ext
from .cross_scan import cross_merge, cross_scan, scan_positions
from .reference import selective_scan_ref
from .validation import check_cross_scan_inputs, check_kept, check_scan_inputs, compute_dtype, needs_grad

BACKENDS = ("auto", "mamba", "triton", "cpu", "torch", "ref")
CPU_CHUNK = 64  # steps between saved states in the compiled kernel's forward
TORCH_CHUNK = 8  # steps per block of the chunked PyTorch path (cost grows with it; 8 measured best)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_import_errors: dict[str, str] = {}  # why mamba-ssm or Triton is not usable, for the messages


def _why(error: Exception, package: str) -> str:
    """'is not installed', or how an installed package failed to import (a CUDA build that does not
    match this torch, a missing libcudart, ...)."""
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == package:
        return "is not installed"
    return f"is installed but does not import ({type(error).__name__}: {str(error)[:300]})"


@functools.lru_cache(maxsize=1)
def _mamba_scan():
    """mamba-ssm's selective_scan_fn, or None when mamba-ssm (or its CUDA build) is missing."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:
        _import_errors["mamba-ssm"] = _why(error, "mamba_ssm")
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def _triton_scan():
    """The Triton scan module (``triton_scan``), or None when Triton is not importable."""
    try:
        from . import triton_scan
    except Exception as error:
        _import_errors["triton"] = _why(error, "triton")
        return None
    return triton_scan


@torch.compiler.assume_constant_result  # torch.compile calls it once while tracing, not in the graph
def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend that ``selective_scan_fn`` uses for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}, expected one of {BACKENDS}")
    if backend == "mamba":
        if device.type != "cuda":
            raise ValueError(f"selective_scan: backend 'mamba' needs CUDA tensors, got {device}")
        if _mamba_scan() is None:
            raise RuntimeError(f"selective_scan: mamba-ssm {_import_errors['mamba-ssm']}; install medmamba[gpu] "
                               "(it compiles against this torch and CUDA) or use backend='triton'")
    if backend == "triton":
        if _triton_scan() is None:
            raise RuntimeError(f"selective_scan: triton {_import_errors['triton']}")
        if device.type != "cuda" and not (device.type == "cpu" and _triton_scan().INTERPRETED):
            raise ValueError(f"selective_scan: backend 'triton' needs CUDA tensors (or CPU ones when the "
                             f"process started with TRITON_INTERPRET=1), got {device}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"selective_scan: backend 'cpu' needs CPU tensors, got {device}")
        if _cpu_ext.load() is None:
            raise RuntimeError(f"selective_scan: the CPU kernel could not be built: {_cpu_ext.load_error()}")
    if backend != "auto":
        return backend
    name, why = _auto(device)
    if why:
        _warn_once(device.type, f"selective_scan: {why}")
    return name


def _auto(device: torch.device) -> tuple[str, str | None]:
    """The backend ``"auto"`` picks for tensors on ``device``, and why when it falls back (None
    when it picks the device's preferred kernel)."""
    if device.type == "cuda":
        if _mamba_scan() is not None:
            return "mamba", None
        if _triton_scan() is not None:
            return "triton", f"CUDA tensors use the Triton scan: mamba-ssm {_import_errors['mamba-ssm']}"
        return "torch", (f"CUDA tensors use the slower chunked PyTorch scan: mamba-ssm {_import_errors['mamba-ssm']}, "
                         f"and triton {_import_errors['triton']}")
    if device.type == "cpu":
        if _cpu_ext.load() is not None:
            return "cpu", None
        return "torch", (f"the compiled CPU kernel could not be built ({_cpu_ext.load_error()}); using the slower "
                         "chunked PyTorch scan")
    return "torch", None


# each automatic backend in words, for auto_backend
_KERNELS = {"mamba": "mamba-ssm's CUDA kernel", "triton": "the Triton scan", "cpu": "the compiled CPU kernel",
            "torch": "the chunked PyTorch scan"}


def auto_backend(device: torch.device) -> tuple[str, str]:
    """The backend ``"auto"`` picks for tensors on ``device`` and why, in words: the reason its
    one-time warning gives when it falls back, else the kernel's name (for ``medmamba info`` and
    benchmarks/gpu_check.py's header). Warns nothing."""
    name, why = _auto(device)
    return name, why or _KERNELS[name]


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """y = selective_scan(u, delta, A, B, C) with mamba-ssm's semantics and shapes.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (D, N), (batch, N, L) or (batch, G, N, L) with
    D divisible by G; D, delta_bias: (D,). Computes ``x_l = exp(dt_l A) x_{l-1} + dt_l B_l u_l``,
    ``y_l = C_l x_l + D u_l``, times ``silu(z_l)`` when z is given, where ``dt = delta +
    delta_bias`` (softplus'd if ``delta_softplus``). Returns y (batch, D, L) in u's dtype (computed
    in fp32 for half inputs, fp64 for fp64) and, with ``return_last_state``, the final state
    (batch, D, N) in the compute dtype. Differentiable in every tensor argument except through the
    last state.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(u.device, backend)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "mamba":
        return _mamba_scan()(*args)
    if name == "ref":
        return selective_scan_ref(*args)
    if name == "cpu":
        out, last = _cpu_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    elif name == "triton":
        from . import triton_scan  # imported already: resolve_backend chose it

        out, last = triton_scan.selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)
        if z is not None:
            out = out * F.silu(z.float())
        out = out.to(u.dtype)
    else:
        out, last = _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def cross_selective_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    delta_proj: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """SS2D's selective scan along the four ``cross_scan`` directions of a map, merged.

    x: (batch, H, W, dim), channels-last; delta: (4, batch, H*W, dim); B, C: (batch, H*W, 4, N);
    A: (4*dim, N); D, delta_bias: (4*dim,). Direction k has rows k*dim .. (k+1)*dim - 1 of A, D
    and delta_bias, and its delta, B and C are stored by row-major position: its step l uses
    position ``scan_positions(H, W)[k, l]``. Returns (batch, H, W, dim) in x's dtype, equal to
    ``cross_merge(selective_scan_fn(cross_scan(x), ...))`` with delta, B and C in scan order.
    With ``delta_proj`` (4, dim, R), delta is given in low rank as (batch, H*W, 4, R) and
    ``delta[k, b, l, d] = sum_r delta[b, l, k, r] * delta_proj[k, d, r]`` (SS2D's dt projection).
    The compiled CPU kernel and the Triton one read every direction in place and apply delta_proj
    themselves, so the full delta never exists; the other backends build the four sequences.
    """
    check_cross_scan_inputs(x, delta, A, B, C, D, delta_bias, delta_proj)
    name = resolve_backend(x.device, backend)
    batch, H, W, dim = x.shape
    ct = compute_dtype(x)
    flat = functools.partial(_dense, dtype=ct)
    if name == "cpu":
        by_direction = lambda t: t.to(ct).transpose(1, 2).contiguous()  # noqa: E731  (batch, 4, L, N): each
        # direction's rows together, which the kernel streams through (measured faster than in place)
        dt_w = None if delta_proj is None else flat(delta_proj).view(4 * dim, -1)
        delta = flat(delta) if delta_proj is None else by_direction(delta)
        args = (flat(x).view(batch, H * W, dim), delta, flat(A), by_direction(B), by_direction(C), flat(D), None,
                flat(delta_bias), dt_w)
        out, _, _ = cpu_scan(*args, 4, H, W, True, delta_softplus, needs_grad(*args), False)
        return out.view(batch, H, W, dim).to(x.dtype)
    if name == "triton":
        from . import triton_scan  # imported already: resolve_backend chose it

        return triton_scan.cross_selective_scan(x, delta, A, B, C, D, delta_bias, delta_softplus,
                                                delta_proj).to(x.dtype)
    if delta_proj is not None:
        delta = torch.einsum("blkr,kdr->kbld", delta, delta_proj)
    pos = scan_positions(H, W, x.device)
    in_order = lambda t: torch.stack([t[k][:, pos[k]] for k in range(4)]).permute(1, 0, 3, 2)  # noqa: E731
    u = cross_scan(x.permute(0, 3, 1, 2)).flatten(1, 2)
    y = selective_scan_fn(u.to(ct), in_order(delta).flatten(1, 2).to(ct), A.to(ct),
                          in_order(B.permute(2, 0, 1, 3)).to(ct), in_order(C.permute(2, 0, 1, 3)).to(ct),
                          flat(D), delta_bias=flat(delta_bias), delta_softplus=delta_softplus, backend=name)
    y = cross_merge(y.view(batch, 4, dim, H * W), H, W)
    return y.transpose(1, 2).reshape(batch, H, W, dim).to(x.dtype)


# ------------------------------------------------------------------------- compiled CPU kernel
# The compiled kernel in its own layout (kernels/csrc/selective_scan_cpu.cpp): the whole scan (bias,
# softplus, D skip and z gate included) along the first K scan_positions(height, width) orders of a
# channels-last u (batch, L, dim), or of a channels-first one (batch, dim, L) in order. Torch custom
# ops with their backward registered, so torch.compile keeps a model that calls them in one graph.
@torch.library.custom_op("medmamba::cpu_scan", mutates_args=())
def cpu_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], dt_w: Optional[Tensor], K: int, height: int, width: int,
             channels_last: bool, delta_softplus: bool, save: bool, want_last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out like u, last state (batch, K*dim, N) if ``want_last``, the chunk checkpoints the backward
    reads if ``save``), in u's dtype; the unrequested ones are empty."""
    return tuple(_cpu_ext.load().fwd(u, delta, A, B, C, D, z, delta_bias, dt_w, scan_positions(height, width)[:K],
                                     channels_last, delta_softplus, CPU_CHUNK, save, want_last))


@cpu_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dt_w, K, height, width, channels_last, delta_softplus, save, want_last):
    batch, L, dim = u.shape if channels_last else (u.shape[0], u.shape[2], u.shape[1])
    groups = lambda M: M.shape[1] if M.dim() == 4 else 0  # noqa: E731  (0: a fixed B or C)
    ckpt = _cpu_ext.load().ckpt_shape(K, dim, L, A.shape[1], CPU_CHUNK, groups(B), groups(C))
    return (torch.empty_like(u), u.new_empty(batch if want_last else 0, K * dim, A.shape[1]),
            u.new_empty(batch if save else 0, *ckpt))


@torch.library.custom_op("medmamba::cpu_scan_bwd", mutates_args=())
def cpu_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], dt_w: Optional[Tensor], K: int, height: int,
                 width: int, channels_last: bool, delta_softplus: bool, ckpt: Tensor,
                 dout: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``cpu_scan``'s gradients (du, ddelta, dA, dB, dC, dD, dz, dbias, ddt_w); dz and ddt_w are
    empty when z and dt_w are absent."""
    check_kept(ckpt, "cpu_scan")
    return tuple(_cpu_ext.load().bwd(u, delta, A, B, C, D, z, delta_bias, dt_w, scan_positions(height, width)[:K],
                                     channels_last, delta_softplus, CPU_CHUNK, ckpt, dout.contiguous()))


@cpu_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dt_w, K, height, width, channels_last, delta_softplus, ckpt, dout):
    rows, N = K * (u.shape[2] if channels_last else u.shape[1]), A.shape[1]
    fixed = lambda M: M.new_empty(M.shape if M.dim() == 4 else (rows, N))  # noqa: E731
    return (torch.empty_like(u), torch.empty_like(delta), A.new_empty(rows, N), fixed(B), fixed(C),
            u.new_empty(rows), u.new_empty((K, *u.shape) if z is not None else (0,)), u.new_empty(rows),
            u.new_empty(rows, 0 if dt_w is None else dt_w.shape[1]))


def _cpu_setup(ctx, inputs, output) -> None:
    *tensors, K, height, width, channels_last, softplus, _, _ = inputs
    ctx.save_for_backward(*tensors, output[2])
    ctx.flags = (K, height, width, channels_last, softplus)
    ctx.mark_non_differentiable(output[1], output[2])


def _cpu_backward(ctx, dout, _dlast, _dckpt):
    *tensors, ckpt = ctx.saved_tensors
    grads = cpu_scan_bwd(*tensors, *ctx.flags, ckpt, dout)
    return (*(None if t is None else g for g, t in zip(grads, tensors)), None, None, None, None, None, None, None)


cpu_scan.register_autograd(_cpu_backward, setup_context=_cpu_setup)


def _dense(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t (if given) in ``dtype`` and contiguous, as the compiled kernel reads it."""
    return None if t is None else t.to(dtype).contiguous()


def _kernel_layout(M: Tensor, dtype: torch.dtype) -> Tensor:
    """selective_scan_fn's B or C as the kernel reads them: fixed (D, N), variable (batch, G, L, N)."""
    M = M.to(dtype)
    if M.dim() == 3:
        M = M.unsqueeze(1)
    return M.contiguous() if M.dim() == 2 else M.transpose(-1, -2).contiguous()


def _cpu_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, want_last) -> tuple[Tensor, Tensor]:
    """selective_scan_fn on the compiled kernel: one scan order of (batch, D, L) tensors."""
    ct = compute_dtype(u)
    flat = functools.partial(_dense, dtype=ct)
    args = (flat(u), flat(delta)[None], flat(A), _kernel_layout(B, ct), _kernel_layout(C, ct), flat(D),
            None if z is None else flat(z)[None], flat(delta_bias), None)
    out, last, _ = cpu_scan(*args, 1, 1, u.shape[-1], False, delta_softplus, needs_grad(*args), want_last)
    return out.to(u.dtype), last


# ------------------------------------------------------------------------- chunked PyTorch path
def _expand_states(M: Tensor, batch: int, dim: int) -> Tensor:
    """B or C of one chunk as (batch, D, k, N) views (fixed (D, N) broadcasts)."""
    if M.dim() == 2:
        return M[None, :, None, :]
    if M.dim() == 3:
        M = M.unsqueeze(1)
    g = M.shape[1]
    M = M.transpose(-1, -2).unsqueeze(2)  # (batch, G, 1, k, N)
    return M.expand(batch, g, dim // g, *M.shape[-2:]).reshape(batch, dim, *M.shape[-2:])


def _chunk(x0: Tensor, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Scan k steps at once: x_l = sum_{j<=l} exp(S_l - S_j) dt_j B_j u_j + exp(S_l) x0."""
    batch, dim, k = u.shape
    S = torch.cumsum(dt.unsqueeze(-1) * A[:, None, :], dim=2)  # (batch, D, k, N)
    drive = (dt * u).unsqueeze(-1) * _expand_states(B, batch, dim)
    causal = torch.ones(k, k, dtype=torch.bool, device=u.device).tril()[:, :, None]
    decay = (S.unsqueeze(3) - S.unsqueeze(2)).masked_fill(~causal, float("-inf")).exp()
    x = torch.einsum("bdljn,bdjn->bdln", decay, drive) + S.exp() * x0.unsqueeze(2)
    y = (x * _expand_states(C, batch, dim)).sum(-1)
    return y, x[:, :, -1].contiguous()  # a copy: a view would keep the whole block alive


class _ChunkedScan(torch.autograd.Function):
    """The bare recurrence in blocks of TORCH_CHUNK steps. Forward keeps only the state at each
    block boundary; backward walks the blocks last to first, recomputing one block at a time."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        starts, ys = [], []
        for steps in _blocks(u.shape[-1]):
            starts.append(x)
            y, x = _chunk(x, dt[..., steps], u[..., steps], A, _steps(B, steps), _steps(C, steps))
            ys.append(y)
        ctx.save_for_backward(u, dt, A, B, C, *starts)
        ctx.mark_non_differentiable(x)
        return torch.cat(ys, dim=-1), x

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, dt, A, B, C, *starts = ctx.saved_tensors
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        gx = torch.zeros_like(starts[0])  # dLoss/d(state after the block)
        for x0, steps in reversed(list(zip(starts, _blocks(u.shape[-1])))):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in
                          (x0, dt[..., steps], u[..., steps], A, _steps(B, steps), _steps(C, steps))]
                y, x = _chunk(*leaves)
                gx, gdt, gu, gA, gB, gC = torch.autograd.grad((y, x), leaves, (dy[..., steps], gx))
            ddt[..., steps], du[..., steps] = gdt, gu
            dA += gA
            for total, g, M in ((dB, gB, B), (dC, gC, C)):
                if M.dim() == 2:
                    total += g
                else:
                    total[..., steps] = g
        return du, ddt, dA, dB, dC


def _blocks(L: int) -> list[slice]:
    return [slice(l0, min(L, l0 + TORCH_CHUNK)) for l0 in range(0, L, TORCH_CHUNK)]


def _steps(M: Tensor, steps: slice) -> Tensor:
    return M if M.dim() == 2 else M[..., steps]


def _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    """The scan on any device: elementwise parts in torch around the blocked recurrence."""
    ct = compute_dtype(u)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uc = u.to(ct)
    out, last = _ChunkedScan.apply(uc, dt, A.to(ct), B.to(ct), C.to(ct))
    if D is not None:
        out = out + uc * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(u.dtype), last
