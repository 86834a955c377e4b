"""The selective scan's recurrence as Triton kernels: GPUs without compiling CUDA.

Triton ships with PyTorch's CUDA builds and compiles at first use, so this path needs no
mamba-ssm build; under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how
the tests check them without a GPU.

One program scans ``BLOCK_D`` channels of one sequence with an fp32 state of (BLOCK_D, N) held in
registers. The forward writes y and the state at the start of every ``CHUNK`` steps; the backward
walks the chunks last to first, recomputes each chunk's states from its saved start into a
(batch, D, CHUNK, N) scratch buffer, and runs the adjoint recurrence back through it. No
(batch, D, L, N) tensor exists. B and C are (batch, G, N, L) (variable, grouped) or (D, N)
(fixed); their gradients are summed over the channels of a group with atomic adds in fp32.
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
def _bc_offsets(b, d, n, l, rows_per_group, s_b, s_row, s_n, s_l):
    """Offsets of B or C at (batch b, channels d, states n, step l): its row is d's group."""
    return b * s_b + (d // rows_per_group)[:, None] * s_row + n[None, :] * s_n + l * s_l


@triton.jit
def _program(A_ptr, D, N, L, n_chunks, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch element b, channels d, states n, masks, A rows, and the offsets of
    its channels' sequences (row) and saved chunk-start states (state)."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm = d < D
    mask = dm[:, None] & (n < N)[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    return b, d, n, dm, mask, A, (b * D + d) * L, ((b * D + d) * n_chunks)[:, None] * N + n[None, :]


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, start_ptr, last_ptr,
              D, N, L, n_chunks, rows_b, rows_c,
              sB_b, sB_row, sB_n, sB_l, sC_b, sC_row, sC_n, sC_l,
              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b, d, n, dm, mask, A, row, state = _program(A_ptr, D, N, L, n_chunks, BLOCK_D, BLOCK_N)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for l in range(L):
        if l % CHUNK == 0:
            tl.store(start_ptr + state + (l // CHUNK) * N, h, mask=mask)
        u = tl.load(u_ptr + row + l, mask=dm, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row + l, mask=dm, other=0.0).to(tl.float32)
        Bl = tl.load(B_ptr + _bc_offsets(b, d, n, l, rows_b, sB_b, sB_row, sB_n, sB_l), mask=mask, other=0.0)
        Cl = tl.load(C_ptr + _bc_offsets(b, d, n, l, rows_c, sC_b, sC_row, sC_n, sC_l), mask=mask, other=0.0)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bl.to(tl.float32)
        tl.store(y_ptr + row + l, tl.sum(h * Cl.to(tl.float32), axis=1), mask=dm)
    tl.store(last_ptr + (b * D + d)[:, None] * N + n[None, :], h, mask=mask)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, start_ptr, dy_ptr, scratch_ptr,
              du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr,
              D, N, L, n_chunks, rows_b, rows_c,
              sB_b, sB_row, sB_n, sB_l, sC_b, sC_row, sC_n, sC_l,
              CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b, d, n, dm, mask, A, row, state = _program(A_ptr, D, N, L, n_chunks, BLOCK_D, BLOCK_N)
    scratch = ((b * D + d) * CHUNK)[:, None] * N + n[None, :]
    gh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dLoss/d(state after the current step)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        l0 = c * CHUNK
        steps = tl.minimum(CHUNK, L - l0)
        h = tl.load(start_ptr + state + c * N, mask=mask, other=0.0)
        for j in range(steps):  # the chunk's states, recomputed from its start
            u = tl.load(u_ptr + row + l0 + j, mask=dm, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + row + l0 + j, mask=dm, other=0.0).to(tl.float32)
            Bl = tl.load(B_ptr + _bc_offsets(b, d, n, l0 + j, rows_b, sB_b, sB_row, sB_n, sB_l), mask=mask,
                         other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bl
            tl.store(scratch_ptr + scratch + j * N, h, mask=mask)
        for jj in range(steps):  # the adjoint recurrence, last step first
            j = steps - 1 - jj
            l = l0 + j
            u = tl.load(u_ptr + row + l, mask=dm, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + row + l, mask=dm, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row + l, mask=dm, other=0.0).to(tl.float32)
            b_off = _bc_offsets(b, d, n, l, rows_b, sB_b, sB_row, sB_n, sB_l)
            c_off = _bc_offsets(b, d, n, l, rows_c, sC_b, sC_row, sC_n, sC_l)
            Bl = tl.load(B_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
            Cl = tl.load(C_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(scratch_ptr + scratch + j * N, mask=mask, other=0.0)
            if j > 0:
                h_prev = tl.load(scratch_ptr + scratch + (j - 1) * N, mask=mask, other=0.0)
            else:
                h_prev = tl.load(start_ptr + state + c * N, mask=mask, other=0.0)
            gh += dy[:, None] * Cl
            tl.atomic_add(dC_ptr + c_off, dy[:, None] * h, mask=mask)
            a = tl.exp(dt[:, None] * A)
            tl.store(ddt_ptr + row + l, tl.sum(gh * (A * a * h_prev + u[:, None] * Bl), axis=1), mask=dm)
            tl.store(du_ptr + row + l, tl.sum(gh * dt[:, None] * Bl, axis=1), mask=dm)
            tl.atomic_add(dB_ptr + b_off, gh * (dt * u)[:, None], mask=mask)
            dA += gh * dt[:, None] * a * h_prev
            gh = gh * a
    tl.store(dA_ptr + (b * D + d)[:, None] * N + n[None, :], dA, mask=mask)


def _layout(M: Tensor, dim: int) -> tuple[int, tuple[int, int, int, int]]:
    """(channels per row of M, strides over (batch, row, n, l)) of B or C: variable (batch, G, N, L)
    rows are groups; fixed (D, N) rows are channels, the same for every batch and step."""
    if M.dim() == 2:
        return 1, (0, M.stride(0), M.stride(1), 0)
    return dim // M.shape[1], tuple(M.stride())


def _grouped(M: Tensor) -> Tensor:
    return M.unsqueeze(1) if M.dim() == 3 else M


class TritonScan(torch.autograd.Function):
    """The bare recurrence x_l = exp(dt_l A) x_{l-1} + dt_l B_l u_l, y_l = C_l x_l on Triton.
    u, dt: (batch, D, L) fp32; A: (D, N); B, C: (D, N), (batch, N, L) or (batch, G, N, L).
    Returns (y, last state); differentiable in u, dt, A, B, C (not through the last state)."""

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor):
        A_dtype = A.dtype
        u, dt, A = u.contiguous(), dt.contiguous(), A.float().contiguous()
        Bg, Cg = _grouped(B).contiguous(), _grouped(C).contiguous()  # their gradients share the layout
        batch, dim, L = u.shape
        N = A.shape[1]
        n_chunks = triton.cdiv(L, CHUNK)
        y = torch.empty(batch, dim, L, device=u.device, dtype=torch.float32)
        starts = torch.empty(batch, dim, n_chunks, N, device=u.device, dtype=torch.float32)
        last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
        (rows_b, sb), (rows_c, sc) = _layout(Bg, dim), _layout(Cg, dim)
        grid = (batch, triton.cdiv(dim, BLOCK_D))
        _scan_fwd[grid](u, dt, A, Bg, Cg, y, starts, last, dim, N, L, n_chunks, rows_b, rows_c, *sb, *sc,
                        CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(N))
        ctx.save_for_backward(u, dt, A, Bg, Cg, starts)
        ctx.shapes, ctx.dtypes = (B.shape, C.shape), (u.dtype, dt.dtype, A_dtype)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy: Tensor, _dlast):
        u, dt, A, Bg, Cg, starts = ctx.saved_tensors
        batch, dim, L = u.shape
        N = A.shape[1]
        du, ddt = torch.empty_like(u, dtype=torch.float32), torch.empty_like(dt, dtype=torch.float32)
        dA = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
        dB = torch.zeros(Bg.shape, device=u.device, dtype=torch.float32)
        dC = torch.zeros(Cg.shape, device=u.device, dtype=torch.float32)
        scratch = torch.empty(batch, dim, CHUNK, N, device=u.device, dtype=torch.float32)
        (rows_b, sb), (rows_c, sc) = _layout(Bg, dim), _layout(Cg, dim)
        grid = (batch, triton.cdiv(dim, BLOCK_D))
        _scan_bwd[grid](u, dt, A, Bg, Cg, starts, dy.contiguous(), scratch, du, ddt, dA, dB, dC,
                        dim, N, L, starts.shape[2], rows_b, rows_c, *sb, *sc,
                        CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(N))
        (shape_b, shape_c), (u_dtype, dt_dtype, A_dtype) = ctx.shapes, ctx.dtypes
        return (du.to(u_dtype), ddt.to(dt_dtype), dA.sum(0).to(A_dtype), dB.view(shape_b).to(Bg.dtype),
                dC.view(shape_c).to(Cg.dtype))
