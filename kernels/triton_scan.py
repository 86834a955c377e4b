"""The whole selective scan as Triton kernels: GPUs without compiling CUDA.

Triton ships with PyTorch's CUDA builds and compiles at first use, so this path needs no
mamba-ssm build; under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how
the tests check them without a GPU.

One kernel pair serves both entry points, as the compiled CPU kernel does: K scan orders
(directions) of one map u (batch, L, dim), direction k reading step l at position
``positions[k, l]`` in place. ``selective_scan`` is K = 1 in order; ``cross_selective_scan`` is
SS2D's four directions of a channels-last map, with its low-rank delta projection, bias,
softplus and D skip fused, so neither the four sequences nor the full delta exist.

One program scans ``BLOCK_D`` channels of one direction of one image with an fp32 state of
(BLOCK_D, N) in registers. The forward writes each direction's y and the state at the start of
every ``CHUNK`` steps; the backward walks the chunks last to first, recomputes each chunk's states
from its saved start into a (batch, K*dim, CHUNK, N) scratch buffer and runs the adjoint
recurrence back through it. No (batch, D, L, N) tensor exists. Gradients shared between programs
(B and C by every channel of a group, the low-rank delta by every channel of a direction) are
summed with fp32 atomic adds.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels made now run on CPU tensors, interpreted
CHUNK = 32  # steps between saved states
BLOCK_D = 16  # channels per program


@triton.jit
def _bc_offsets(b, g, l, n, nm, mask, s_b, s_g, s_l, s_n, SHARED: tl.constexpr):
    """Offsets and mask of B or C at (image b, group g, step l, states n): a vector when the
    program's channels share one group (``SHARED``, g a scalar), else a row per channel."""
    if SHARED:
        off, m = b * s_b + g * s_g + l * s_l + n * s_n, nm
    else:
        off, m = b * s_b + g[:, None] * s_g + l * s_l + n[None, :] * s_n, mask
    return off, m


@triton.jit
def _load_bc(ptr, off, m, SHARED: tl.constexpr):
    M = tl.load(ptr + off, mask=m, other=0.0).to(tl.float32)
    if SHARED:
        M = M[None, :]
    return M


@triton.jit
def _add_bc(ptr, off, m, value, SHARED: tl.constexpr):
    if SHARED:
        tl.atomic_add(ptr + off, tl.sum(value, axis=0), mask=m)
    else:
        tl.atomic_add(ptr + off, value, mask=m)


@triton.jit
def _delta(dt_ptr, W, b, k, p, d, r, dm, rm, bias, s_k, s_b, s_l, s_last,
           LOW_RANK: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt) of the program's channels at position p: delta (+ bias), softplus'd if asked;
    in low rank, delta = W @ the position's R-vector of direction k."""
    if LOW_RANK:
        v = tl.load(dt_ptr + b * s_b + p * s_l + k * s_k + r * s_last, mask=rm, other=0.0).to(tl.float32)
        raw = tl.sum(W * v[None, :], axis=1) + bias
    else:
        v = r  # unused
        raw = tl.load(dt_ptr + k * s_k + b * s_b + p * s_l + d * s_last, mask=dm, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:  # as torch's softplus (threshold 20), written stably
        dt = tl.where(raw > 20.0, raw, tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw))))
    else:
        dt = raw
    return raw, dt, v


@triton.jit
def _group(k, DIM, c, rows, BLOCK_D: tl.constexpr, SHARED: tl.constexpr):
    """The B/C group (row) of channels c of direction k: one scalar when they all share one."""
    if SHARED:
        g = (k * DIM + tl.program_id(2) * BLOCK_D) // rows
    else:
        g = c // rows
    return g


@triton.jit
def _program(A_ptr, D_ptr, bias_ptr, W_ptr, DIM, N, R, rows_b, rows_c,
             HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, LOW_RANK: tl.constexpr, SHARED_B: tl.constexpr,
             SHARED_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's image b, direction k, channels d (rows c = k*DIM + d of A, D, bias, W),
    states n, their masks, the per-channel parameters it keeps in registers, and its channels'
    groups of B and C."""
    b = tl.program_id(0)
    k = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    dm, nm, rm = d < DIM, n < N, r < R
    mask = dm[:, None] & nm[None, :]
    c = k * DIM + d
    A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + c, mask=dm, other=0.0).to(tl.float32) if HAS_D else tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.load(bias_ptr + c, mask=dm, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BLOCK_D,), tl.float32)
    if LOW_RANK:
        W = tl.load(W_ptr + c[:, None] * R + r[None, :], mask=dm[:, None] & rm[None, :], other=0.0).to(tl.float32)
    else:
        W = tl.zeros((BLOCK_D, BLOCK_R), tl.float32)
    gb = _group(k, DIM, c, rows_b, BLOCK_D, SHARED_B)
    gc = _group(k, DIM, c, rows_c, BLOCK_D, SHARED_C)
    return b, k, d, n, r, dm, nm, rm, mask, c, A, Dv, bias, W, gb, gc


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, W_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pos_ptr, y_ptr, start_ptr, last_ptr,
              K, DIM, N, L, R, n_chunks, rows_b, rows_c,
              su_b, su_l, su_d, sdt_k, sdt_b, sdt_l, sdt_last,
              sB_b, sB_g, sB_l, sB_n, sC_b, sC_g, sC_l, sC_n, sy_k, sy_b, sy_l, sy_d,
              HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, LOW_RANK: tl.constexpr, SOFTPLUS: tl.constexpr,
              SHARED_B: tl.constexpr, SHARED_C: tl.constexpr, CHUNK: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    b, k, d, n, r, dm, nm, rm, mask, c, A, Dv, bias, W, gb, gc = _program(
        A_ptr, D_ptr, bias_ptr, W_ptr, DIM, N, R, rows_b, rows_c, HAS_D, HAS_BIAS, LOW_RANK, SHARED_B, SHARED_C,
        BLOCK_D, BLOCK_N, BLOCK_R)
    state = ((b * K * DIM + c) * n_chunks)[:, None] * N + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for l in range(L):
        if l % CHUNK == 0:
            tl.store(start_ptr + state + (l // CHUNK) * N, h, mask=mask)
        p = tl.load(pos_ptr + k * L + l)
        u = tl.load(u_ptr + b * su_b + p * su_l + d * su_d, mask=dm, other=0.0).to(tl.float32)
        _, dt, _ = _delta(dt_ptr, W, b, k, p, d, r, dm, rm, bias, sdt_k, sdt_b, sdt_l, sdt_last, LOW_RANK, SOFTPLUS)
        b_off, b_m = _bc_offsets(b, gb, p, n, nm, mask, sB_b, sB_g, sB_l, sB_n, SHARED_B)
        c_off, c_m = _bc_offsets(b, gc, p, n, nm, mask, sC_b, sC_g, sC_l, sC_n, SHARED_C)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * _load_bc(B_ptr, b_off, b_m, SHARED_B)
        y = tl.sum(h * _load_bc(C_ptr, c_off, c_m, SHARED_C), axis=1) + Dv * u
        tl.store(y_ptr + k * sy_k + b * sy_b + p * sy_l + d * sy_d, y, mask=dm)
    tl.store(last_ptr + (b * K * DIM + c)[:, None] * N + n[None, :], h, mask=mask)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, W_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pos_ptr, start_ptr, dout_ptr, scratch_ptr,
              du_ptr, ddt_ptr, dW_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
              K, DIM, N, L, R, n_chunks, rows_b, rows_c,
              su_b, su_l, su_d, sdt_k, sdt_b, sdt_l, sdt_last,
              sB_b, sB_g, sB_l, sB_n, sC_b, sC_g, sC_l, sC_n, sdo_b, sdo_l, sdo_d, sdu_k, sdu_b, sdu_l, sdu_d,
              sgdt_k, sgdt_b, sgdt_l, sgdt_last, sgB_b, sgB_g, sgB_l, sgB_n, sgC_b, sgC_g, sgC_l, sgC_n,
              HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, LOW_RANK: tl.constexpr, SOFTPLUS: tl.constexpr,
              SHARED_B: tl.constexpr, SHARED_C: tl.constexpr, CHUNK: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    b, k, d, n, r, dm, nm, rm, mask, c, A, Dv, bias, W, gb, gc = _program(
        A_ptr, D_ptr, bias_ptr, W_ptr, DIM, N, R, rows_b, rows_c, HAS_D, HAS_BIAS, LOW_RANK, SHARED_B, SHARED_C,
        BLOCK_D, BLOCK_N, BLOCK_R)
    row = b * K * DIM + c  # this program's rows of the per-image outputs
    state = (row * n_chunks)[:, None] * N + n[None, :]
    scratch = (row * CHUNK)[:, None] * N + n[None, :]
    gh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dLoss/d(state after the current step)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dW = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for cc in range(n_chunks):
        ch = n_chunks - 1 - cc
        l0 = ch * CHUNK
        steps = tl.minimum(CHUNK, L - l0)
        h = tl.load(start_ptr + state + ch * N, mask=mask, other=0.0)
        for j in range(steps):  # the chunk's states, recomputed from its start
            p = tl.load(pos_ptr + k * L + l0 + j)
            u = tl.load(u_ptr + b * su_b + p * su_l + d * su_d, mask=dm, other=0.0).to(tl.float32)
            _, dt, _ = _delta(dt_ptr, W, b, k, p, d, r, dm, rm, bias, sdt_k, sdt_b, sdt_l, sdt_last, LOW_RANK,
                              SOFTPLUS)
            b_off, b_m = _bc_offsets(b, gb, p, n, nm, mask, sB_b, sB_g, sB_l, sB_n, SHARED_B)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * _load_bc(B_ptr, b_off, b_m, SHARED_B)
            tl.store(scratch_ptr + scratch + j * N, h, mask=mask)
        for jj in range(steps):  # the adjoint recurrence, last step first
            j = steps - 1 - jj
            p = tl.load(pos_ptr + k * L + l0 + j)
            u = tl.load(u_ptr + b * su_b + p * su_l + d * su_d, mask=dm, other=0.0).to(tl.float32)
            dy = tl.load(dout_ptr + b * sdo_b + p * sdo_l + d * sdo_d, mask=dm, other=0.0).to(tl.float32)
            raw, dt, v = _delta(dt_ptr, W, b, k, p, d, r, dm, rm, bias, sdt_k, sdt_b, sdt_l, sdt_last, LOW_RANK,
                                SOFTPLUS)
            b_off, b_m = _bc_offsets(b, gb, p, n, nm, mask, sB_b, sB_g, sB_l, sB_n, SHARED_B)
            c_off, c_m = _bc_offsets(b, gc, p, n, nm, mask, sC_b, sC_g, sC_l, sC_n, SHARED_C)
            Bl = _load_bc(B_ptr, b_off, b_m, SHARED_B)
            Cl = _load_bc(C_ptr, c_off, c_m, SHARED_C)
            h = tl.load(scratch_ptr + scratch + j * N, mask=mask, other=0.0)
            if j > 0:
                h_prev = tl.load(scratch_ptr + scratch + (j - 1) * N, mask=mask, other=0.0)
            else:
                h_prev = tl.load(start_ptr + state + ch * N, mask=mask, other=0.0)
            gh += dy[:, None] * Cl
            gc_off, _ = _bc_offsets(b, gc, p, n, nm, mask, sgC_b, sgC_g, sgC_l, sgC_n, SHARED_C)
            _add_bc(dC_ptr, gc_off, c_m, dy[:, None] * h, SHARED_C)
            a = tl.exp(dt[:, None] * A)
            ddt = tl.sum(gh * (A * a * h_prev + u[:, None] * Bl), axis=1)
            tl.store(du_ptr + k * sdu_k + b * sdu_b + p * sdu_l + d * sdu_d,
                     tl.sum(gh * dt[:, None] * Bl, axis=1) + dy * Dv, mask=dm)
            gb_off, _ = _bc_offsets(b, gb, p, n, nm, mask, sgB_b, sgB_g, sgB_l, sgB_n, SHARED_B)
            _add_bc(dB_ptr, gb_off, b_m, gh * (dt * u)[:, None], SHARED_B)
            dA += gh * dt[:, None] * a * h_prev
            dD += dy * u
            gh = gh * a
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-raw))
            dbias += ddt
            if LOW_RANK:
                tl.atomic_add(ddt_ptr + b * sgdt_b + p * sgdt_l + k * sgdt_k + r * sgdt_last,
                              tl.sum(ddt[:, None] * W, axis=0), mask=rm)
                dW += ddt[:, None] * v[None, :]
            else:
                tl.store(ddt_ptr + k * sgdt_k + b * sgdt_b + p * sgdt_l + d * sgdt_last, ddt, mask=dm)
    tl.store(dA_ptr + row[:, None] * N + n[None, :], dA, mask=mask)
    tl.store(dD_ptr + row, dD, mask=dm)
    tl.store(dbias_ptr + row, dbias, mask=dm)
    tl.store(dW_ptr + row[:, None] * R + r[None, :], dW, mask=dm[:, None] & rm[None, :])


def _strides(t: Tensor) -> tuple[int, ...]:
    """t's strides with broadcast (size-1) dimensions read at stride 0."""
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def _shared(M: Tensor, K: int, dim: int) -> bool:
    """Whether every program's BLOCK_D channels read one row of B or C (M: (batch, G, L, N))."""
    groups = M.shape[1]
    return groups == K or (K == 1 and groups > 1 and dim // groups % BLOCK_D == 0)


class _FusedScan(torch.autograd.Function):
    """The scan along K orders of u (batch, L, dim), the kernels' layout: delta (K, batch, L, dim),
    or (K, batch, L, R) with W (K*dim, R); A (K*dim, N); B, C (batch, G, L, N), size-1 dimensions
    broadcast; D, bias (K*dim,); positions (K, L). Any strides. Returns (y summed over the
    directions (batch, L, dim), last states (batch, K*dim, N)), fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, bias, W, positions, softplus):
        K, L = positions.shape
        batch, _, dim = u.shape
        N = A.shape[1]
        A, D, bias, W = (None if t is None else t.contiguous() for t in (A, D, bias, W))
        meta = dict(K=K, dim=dim, N=N, L=L, R=1 if W is None else W.shape[1], n_chunks=triton.cdiv(L, CHUNK),
                    rows_b=K * dim // B.shape[1], rows_c=K * dim // C.shape[1], shared_b=_shared(B, K, dim),
                    shared_c=_shared(C, K, dim), softplus=softplus)
        y = torch.empty(K, batch, L, dim, device=u.device, dtype=torch.float32)
        starts = torch.empty(batch, K * dim, meta["n_chunks"], N, device=u.device, dtype=torch.float32)
        last = torch.empty(batch, K * dim, N, device=u.device, dtype=torch.float32)
        _scan_fwd[_grid(meta, batch)](u, delta, _or(W, A), A, B, C, _or(D, A), _or(bias, A), positions, y, starts,
                                      last, *_sizes(meta), *_strides(u), *_strides(delta), *_strides(B),
                                      *_strides(C), *_strides(y), **_flags(meta, D, bias, W))
        ctx.save_for_backward(u, delta, A, B, C, D, bias, W, positions, starts)
        ctx.meta = meta
        ctx.mark_non_differentiable(last)
        return y.sum(0) if K > 1 else y[0], last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, bias, W, positions, starts = ctx.saved_tensors
        meta = ctx.meta
        batch, KD, N, R = u.shape[0], meta["K"] * meta["dim"], meta["N"], meta["R"]
        new = lambda *shape: torch.empty(*shape, device=u.device, dtype=torch.float32)  # noqa: E731
        zeros = lambda shape: torch.zeros(shape, device=u.device, dtype=torch.float32)  # noqa: E731
        du, dA, dD, dbias, dW = new(meta["K"], *u.shape), new(batch, KD, N), new(batch, KD), new(batch, KD), \
            new(batch, KD, R)
        ddelta = new(delta.shape) if W is None else zeros(delta.shape)  # low rank: summed over channels
        dB, dC = zeros(B.shape), zeros(C.shape)  # summed over a group's channels (and broadcast dimensions)
        _scan_bwd[_grid(meta, batch)](u, delta, _or(W, A), A, B, C, _or(D, A), _or(bias, A), positions, starts, dout,
                                      new(batch, KD, CHUNK, N), du, ddelta, dW, dA, dB, dC, dD, dbias,
                                      *_sizes(meta), *_strides(u), *_strides(delta), *_strides(B), *_strides(C),
                                      *_strides(dout), *_strides(du), *_strides(ddelta), *_strides(dB),
                                      *_strides(dC), **_flags(meta, D, bias, W))
        cast = lambda grad, t: None if t is None else grad.to(t.dtype)  # noqa: E731
        return (cast(du.sum(0), u), cast(ddelta, delta), cast(dA.sum(0), A), cast(dB, B), cast(dC, C),
                cast(dD.sum(0), D), cast(dbias.sum(0), bias), cast(dW.sum(0), W), None, None)


def _or(t: Tensor | None, other: Tensor) -> Tensor:
    """A pointer for an absent tensor (the kernel never reads it)."""
    return other if t is None else t


def _grid(meta: dict, batch: int) -> tuple[int, int, int]:
    return batch, meta["K"], triton.cdiv(meta["dim"], BLOCK_D)


def _sizes(meta: dict) -> tuple[int, ...]:
    return tuple(meta[key] for key in ("K", "dim", "N", "L", "R", "n_chunks", "rows_b", "rows_c"))


def _flags(meta: dict, D, bias, W) -> dict:
    return dict(HAS_D=D is not None, HAS_BIAS=bias is not None, LOW_RANK=W is not None, SOFTPLUS=meta["softplus"],
                SHARED_B=meta["shared_b"], SHARED_C=meta["shared_c"], CHUNK=CHUNK, BLOCK_D=BLOCK_D,
                BLOCK_N=triton.next_power_of_2(meta["N"]), BLOCK_R=triton.next_power_of_2(meta["R"]))


def _as_groups(M: Tensor) -> Tensor:
    """selective_scan_fn's B or C as (batch, G, L, N): fixed (D, N) is D groups of one channel."""
    if M.dim() == 2:
        return M[None, :, None, :]
    return (M.unsqueeze(1) if M.dim() == 3 else M).transpose(2, 3)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """``selective_scan_fn`` without the z gate: u, delta (batch, D, L); A (D, N); B, C (D, N),
    (batch, N, L) or (batch, G, N, L); D, delta_bias (D,). Returns (y (batch, D, L), last state
    (batch, D, N)), both fp32."""
    positions = torch.arange(u.shape[-1], device=u.device)[None]
    y, last = _FusedScan.apply(u.transpose(1, 2), delta.transpose(1, 2)[None], A, _as_groups(B), _as_groups(C), D,
                               delta_bias, None, positions, delta_softplus)
    return y.transpose(1, 2), last


def cross_selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         delta_bias: Tensor | None, delta_softplus: bool, delta_proj: Tensor | None,
                         positions: Tensor) -> Tensor:
    """``kernels.cross_selective_scan`` with every direction read in place: x (batch, H, W, dim);
    delta (4, batch, H*W, dim), or (batch, H*W, 4, R) with delta_proj (4, dim, R); B, C
    (batch, H*W, 4, N); positions (4, H*W) from ``scan_positions``. Returns (batch, H, W, dim) fp32."""
    batch, H, W, dim = x.shape
    if delta_proj is not None:
        delta, delta_proj = delta.permute(2, 0, 1, 3), delta_proj.reshape(4 * dim, delta_proj.shape[-1])
    y, _ = _FusedScan.apply(x.reshape(batch, H * W, dim), delta, A, B.transpose(1, 2), C.transpose(1, 2), D,
                            delta_bias, delta_proj, positions, delta_softplus)
    return y.view(batch, H, W, dim)
