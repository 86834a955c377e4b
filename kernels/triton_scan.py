"""The whole selective scan as Triton kernels: GPUs without compiling CUDA.

Triton ships with PyTorch's CUDA builds and compiles at first use, so this path needs no
mamba-ssm build; under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how
the tests check them without a GPU.

One kernel pair serves both entry points, as the compiled CPU kernel does: K scan orders
(directions) of one map u (batch, L, dim), direction k reading step l at position
``scan_positions(H, W)[k, l]`` in place. ``selective_scan`` is K = 1 in order; ``cross_selective_scan``
is SS2D's four directions of a channels-last map, with its low-rank delta projection, bias,
softplus and D skip fused, so neither the four sequences nor the full delta exist. The pair is
the torch custom op ``medmamba::triton_scan`` with its backward registered, so ``torch.compile``
traces a model that calls it as one graph.

One program scans ``BLOCK_D`` channels of one direction of one image, ``CHUNK`` steps at a time:
it loads the chunk's inputs as (CHUNK, BLOCK_D) and (CHUNK, N) tiles, forms the (CHUNK, BLOCK_D, N)
decays exp(delta*A) and inputs delta*u*B, and runs ``tl.associative_scan`` over the steps with
the affine operator (h -> a*h + b), continuing from the state the previous chunk ended with
(fp32). Triton's layout gives each thread all of a chunk's steps for one (channel, state), so
the scan runs in registers, and a chunk's loads are issued together rather than one step after
another. The forward writes each direction's y and the state at the start of every chunk; the
backward walks the chunks last to first, recomputes each chunk's states from its saved start
and runs the adjoint recurrence (G_l = dy_l C_l + a_(l+1) G_(l+1)) as a scan of the chunk's
steps flipped, in the same way. Sums over the states (y, du, delta's gradient) and over a
program's channels (dB, dC) halve the axis in registers after one move of the tile
(``_sum_last``). No (batch, D, L, N) tensor exists. Gradients shared between programs (B and C
by every channel of a group, the low-rank delta by every channel of a direction) are summed with
relaxed fp32 atomic adds, one chunk at a time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cross_scan import scan_positions
from .validation import check_kept, needs_grad

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels made now run on CPU tensors, interpreted


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the kernels are launched. The defaults were timed against the alternatives on an H200
    (benchmarks/gpu_check.py's TRITON_CONFIGS)."""
    chunk: int = 16  # steps scanned together; the state is saved at the start of each chunk
    block_d: int = 16  # channels a program
    # warps a program: at stage 1, 4 took 0.69x the time of 8, and MedMamba-T trained 1.23x faster
    num_warps: int = 4
    # registers a thread may use (ptxas's maxnreg); None: as many as the kernel wants (the backward
    # takes all 255, so 2 programs share an SM; capped at 168, 3 do, with more of it spilled)
    max_registers: Optional[int] = None
    # chunks whose loads are in flight at once (tl.range's num_stages: the next chunks' inputs are
    # copied to shared memory asynchronously while this one is scanned). None: Triton's default,
    # which pipelines the loads that feed the low-rank delta's tl.dot. At stage 1 on an H200, 2
    # stages took 1.02x its time (and the same in MedMamba-T's bf16 step: 2.29 ms a backward), 3
    # stages 0.98x (but at stage 3, 1.47x the time of 2), 1 stage (nothing pipelined) 1.31x
    stages: Optional[int] = None

    def __post_init__(self):
        if min(self.chunk, self.block_d) < 16:
            raise ValueError(f"triton_scan.tiles: chunk and block_d must be at least 16 (the low-rank delta's "
                             f"tl.dot), got {self.chunk} and {self.block_d}")
        if self.stages is not None and self.stages < 1:
            raise ValueError(f"triton_scan.tiles: stages must be at least 1, got {self.stages}")


TILES = Tiles()  # what the entry points launch with


@contextlib.contextmanager
def tiles(**changes) -> Iterator[Tiles]:
    """Launch the kernels with some of ``Tiles``'s fields changed inside the block, for timing them
    (benchmarks/gpu_check.py); the defaults come back after. Not thread-safe."""
    global TILES
    saved, TILES = TILES, dataclasses.replace(TILES, **changes)
    try:
        yield TILES
    finally:
        TILES = saved


@triton.jit
def _affine(a1, b1, a2, b2):
    """Compose two steps of h -> a*h + b, the first (a1, b1) then the second: the scans' operator."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _decay(dt, A):
    """exp(dt*A) for a (CHUNK, BLOCK_D) dt and (BLOCK_D, N) A, as (CHUNK, BLOCK_D, N): computed as
    exp2 with A in base 2, for which Triton emits fewer instructions than for exp (the forward's
    chunk loop 1028 -> 900, tests/compile_triton.py)."""
    return tl.exp2(dt[:, :, None] * (A * 1.4426950408889634)[None, :, :])


@triton.jit
def _sum_last(x):
    """Sum a tile over its last axis (a power of 2, at most 256) by halving the axis with tl.split, which
    needs both halves in one thread: Triton moves the tile once through shared memory to a layout
    holding the whole axis in each thread, and adds in registers. tl.sum instead exchanges every
    element between the threads the axis spans (4 shuffles and adds an element over 16 threads),
    then between warps through shared memory, with barriers, and leaves the sum on every thread it
    spanned. tests/compile_triton.py counts the difference: over the states, the forward's chunk
    loop 759 -> 541 instructions, the backward's 2223 -> 1635; over the channels (dB, dC) the
    backward's 1402 -> 1274, its barriers 55 -> 23 (Triton 3.8)."""
    for _ in tl.static_range(8):
        if x.shape[-1] > 1:
            p, q = tl.split(tl.reshape(x, x.shape[:-1] + [x.shape[-1] // 2, 2]))
            x = p + q
    return tl.reshape(x, x.shape[:-1])


@triton.jit
def _sum_states(x, SHARED: tl.constexpr):
    """Sum a (CHUNK, BLOCK_D, N) tile over its states: by ``_sum_last`` when B and C are both
    (CHUNK, N) tiles (``SHARED``). Not when one is loaded as a (CHUNK, BLOCK_D, N) tile: its load's
    layout then fights the move (Triton 3.6: the backward 3710 -> 5053 instructions, spilling 1368 bytes)."""
    if SHARED:
        return _sum_last(x)
    else:
        return tl.sum(x, axis=2)


@triton.jit
def _enter(x, a, h, t):
    """A chunk's scan inputs x with the state h carried in from the chunk before added to the first
    step (a*h): the scan's b is then the states themselves, and its products of decays go unused, so
    the compiler drops them (a multiply and a fused multiply-add an element)."""
    return tl.where((t == 0)[:, None, None], x + a * h[None, :, :], x)


@triton.jit
def _previous(p1, c1, n1, p2, c2, n2):
    """Combine two runs of steps summarised as (the step before the last, the last, the run's
    length): a scan with it gives every step its previous one (the first its own ``p``)."""
    return tl.where(n2 == 1.0, c1, p2), c2, n1 + n2


@triton.jit
def _row(x, t, at: tl.constexpr):
    """Row ``at`` of a (CHUNK, ...) tile: the state after a chunk's last step, or before its first."""
    return tl.sum(tl.where(t[:, None, None] == at, x, 0.0), axis=0)


@triton.jit
def _bc_offsets(b, g, p, lm, n, nm, dm, s_b, s_g, s_l, s_n, SHARED: tl.constexpr):
    """Offsets and mask of the B or C tile at (image b, groups g, positions p, states n): (CHUNK, N)
    when the program's channels share one group (``SHARED``, g a scalar), else (CHUNK, BLOCK_D, N)."""
    if SHARED:
        off = b * s_b + g * s_g + p[:, None] * s_l + n[None, :] * s_n
        m = lm[:, None] & nm[None, :]
    else:
        off = b * s_b + g[None, :, None] * s_g + p[:, None, None] * s_l + n[None, None, :] * s_n
        m = lm[:, None, None] & dm[None, :, None] & nm[None, None, :]
    return off, m


@triton.jit
def _load_bc(ptr, off, m, SHARED: tl.constexpr):
    """The B or C tile as (CHUNK, BLOCK_D or 1, N), fp32."""
    M = tl.load(ptr + off, mask=m, other=0.0).to(tl.float32)
    if SHARED:
        M = M[:, None, :]
    return M


@triton.jit
def _add_bc(ptr, off, m, value, SHARED: tl.constexpr):
    """Add a chunk's (CHUNK, BLOCK_D, N) gradient into dB or dC, summed over the channels when they
    share a group. Relaxed, as every atomic add here: only the finished kernel's sums are read, and
    Triton's default (acq_rel) fences each add with a wait for all the thread's memory traffic and
    an L1 flush."""
    if SHARED:
        value = tl.sum(value, axis=1)
    tl.atomic_add(ptr + off, value, mask=m, sem="relaxed")


@triton.jit
def _add_bc_pair(dB_ptr, b_off, b_m, dB, dC_ptr, c_off, c_m, dC):
    """``_add_bc`` of dB and dC when both share a group: one ``_sum_last`` of the pair (the
    backward's chunk loop 1497 -> 1274 instructions, Triton 3.8, from tl.sum of each)."""
    dB, dC = tl.split(_sum_last(tl.permute(tl.join(dB, dC), (0, 2, 3, 1))))
    # as new tensors: the interpreter's atomic add reads a split's strided halves as contiguous
    dB, dC = tl.where(b_m, dB, 0.0), tl.where(c_m, dC, 0.0)
    tl.atomic_add(dB_ptr + b_off, dB, mask=b_m, sem="relaxed")
    tl.atomic_add(dC_ptr + c_off, dC, mask=c_m, sem="relaxed")


@triton.jit
def _softplus(x):
    """softplus of a (CHUNK, BLOCK_D) tile as torch's (threshold 20), written stably."""
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _sigmoid(x):
    """sigmoid of a (CHUNK, BLOCK_D) tile: softplus's slope."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0, e) / (1.0 + e)


@triton.jit
def _delta(dt_ptr, W, b, k, p, lm, d, dm, r, rm, bias, s_k, s_b, s_l, s_last,
           LOW_RANK: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt, v) of the program's channels at positions p, (CHUNK, BLOCK_D): delta (+ bias),
    softplus'd if asked, and 0 at steps past the end (so they leave the state as it is); in low
    rank, delta = the position's R-vector v of direction k (CHUNK, BLOCK_R) times W."""
    tm = lm[:, None] & dm[None, :]
    if LOW_RANK:
        v = tl.load(dt_ptr + b * s_b + p[:, None] * s_l + k * s_k + r[None, :] * s_last,
                    mask=lm[:, None] & rm[None, :], other=0.0).to(tl.float32)
        # a dot (fp32 FMAs), not a sum over a (CHUNK, BLOCK_D, BLOCK_R) product: Triton lays its
        # result out once an element, where the sum's layout, that of the (CHUNK, BLOCK_D, N)
        # tiles delta feeds, repeats each element on the threads of its channel's N states, and
        # the softplus and sigmoid after it with it (tests/compile_triton.py counts the
        # instructions: the forward's chunk loop 2264 -> 762 on Triton 3.6, 2016 -> 759 on 3.8). So the
        # dot stays although R (3 at stage 1) is padded to its least 16: with BLOCK_R at R's power of 2
        # and _sum_last's halving instead, that layout came back (486 -> 1869, Triton 3.8)
        raw = tl.dot(v, tl.trans(W), input_precision="ieee") + bias[None, :]
    else:
        v = r  # unused
        raw = tl.load(dt_ptr + k * s_k + b * s_b + p[:, None] * s_l + d[None, :] * s_last, mask=tm,
                      other=0.0).to(tl.float32) + bias[None, :]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return raw, tl.where(tm, dt, 0.0), v


@triton.jit
def _group(k, DIM, c, rows, BLOCK_D: tl.constexpr, SHARED: tl.constexpr):
    """The B/C group (row) of channels c of direction k: one scalar when they all share one."""
    if SHARED:
        g = (k * DIM + tl.program_id(0) * BLOCK_D) // rows
    else:
        g = c // rows
    return g


@triton.jit
def _program(A_ptr, D_ptr, bias_ptr, W_ptr, DIM, N, R, rows_b, rows_c,
             HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, LOW_RANK: tl.constexpr, SHARED_B: tl.constexpr,
             SHARED_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's channels d (rows c = k*DIM + d of A, D, bias, W) of direction k of image b,
    states n, their masks, the per-channel parameters it keeps in registers, and its channels'
    groups of B and C. Channel blocks are the grid's first axis, so the programs that read the
    same B and C run side by side."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.program_id(1)
    b = tl.program_id(2)
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
              SHARED_B: tl.constexpr, SHARED_C: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SAVE_STARTS: tl.constexpr):
    b, k, d, n, r, dm, nm, rm, mask, c, A, Dv, bias, W, gb, gc = _program(
        A_ptr, D_ptr, bias_ptr, W_ptr, DIM, N, R, rows_b, rows_c, HAS_D, HAS_BIAS, LOW_RANK, SHARED_B, SHARED_C,
        BLOCK_D, BLOCK_N, BLOCK_R)
    t = tl.arange(0, CHUNK)
    SHARED: tl.constexpr = SHARED_B and SHARED_C  # B and C both (CHUNK, N) tiles
    state = ((b * K * DIM + c) * n_chunks)[:, None] * N + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for ch in tl.range(n_chunks, num_stages=STAGES):
        if SAVE_STARTS:  # for the backward (not when no input needs a gradient)
            tl.store(start_ptr + state + ch * N, h, mask=mask)
        l = ch * CHUNK + t
        lm = l < L
        tm = lm[:, None] & dm[None, :]
        p = tl.load(pos_ptr + k * L + l, mask=lm, other=0)
        u = tl.load(u_ptr + b * su_b + p[:, None] * su_l + d[None, :] * su_d, mask=tm, other=0.0).to(tl.float32)
        _, dt, _ = _delta(dt_ptr, W, b, k, p, lm, d, dm, r, rm, bias, sdt_k, sdt_b, sdt_l, sdt_last, LOW_RANK,
                          SOFTPLUS)
        b_off, b_m = _bc_offsets(b, gb, p, lm, n, nm, dm, sB_b, sB_g, sB_l, sB_n, SHARED_B)
        c_off, c_m = _bc_offsets(b, gc, p, lm, n, nm, dm, sC_b, sC_g, sC_l, sC_n, SHARED_C)
        x = (dt * u)[:, :, None] * _load_bc(B_ptr, b_off, b_m, SHARED_B)
        a = _decay(dt, A)
        _, hs = tl.associative_scan((a, _enter(x, a, h, t)), 0, _affine)  # the chunk's states, (CHUNK, BLOCK_D, N)
        y = _sum_states(hs * _load_bc(C_ptr, c_off, c_m, SHARED_C), SHARED) + Dv[None, :] * u
        tl.store(y_ptr + k * sy_k + b * sy_b + p[:, None] * sy_l + d[None, :] * sy_d, y, mask=tm)
        h = _row(hs, t, CHUNK - 1)
    tl.store(last_ptr + (b * K * DIM + c)[:, None] * N + n[None, :], h, mask=mask)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, W_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pos_ptr, start_ptr, dout_ptr,
              du_ptr, ddt_ptr, dW_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
              K, DIM, N, L, R, n_chunks, rows_b, rows_c,
              su_b, su_l, su_d, sdt_k, sdt_b, sdt_l, sdt_last,
              sB_b, sB_g, sB_l, sB_n, sC_b, sC_g, sC_l, sC_n, sdo_b, sdo_l, sdo_d, sdu_k, sdu_b, sdu_l, sdu_d,
              sgdt_k, sgdt_b, sgdt_l, sgdt_last, sgB_b, sgB_g, sgB_l, sgB_n, sgC_b, sgC_g, sgC_l, sgC_n,
              HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, LOW_RANK: tl.constexpr, SOFTPLUS: tl.constexpr,
              SHARED_B: tl.constexpr, SHARED_C: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    b, k, d, n, r, dm, nm, rm, mask, c, A, Dv, bias, W, gb, gc = _program(
        A_ptr, D_ptr, bias_ptr, W_ptr, DIM, N, R, rows_b, rows_c, HAS_D, HAS_BIAS, LOW_RANK, SHARED_B, SHARED_C,
        BLOCK_D, BLOCK_N, BLOCK_R)
    t = tl.arange(0, CHUNK)
    SHARED: tl.constexpr = SHARED_B and SHARED_C  # B and C both (CHUNK, N) tiles
    row = b * K * DIM + c  # this program's rows of the per-image outputs
    state = (row * n_chunks)[:, None] * N + n[None, :]
    g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dLoss/d(state) at the first step of the later chunk
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dW = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    a_later = tl.full((BLOCK_D, BLOCK_N), 1.0, tl.float32)  # the first decay of the later chunk (none: 1)
    for cc in tl.range(n_chunks, num_stages=STAGES):
        ch = n_chunks - 1 - cc
        l = ch * CHUNK + t
        lm = l < L
        tm = lm[:, None] & dm[None, :]
        p = tl.load(pos_ptr + k * L + l, mask=lm, other=0)
        u = tl.load(u_ptr + b * su_b + p[:, None] * su_l + d[None, :] * su_d, mask=tm, other=0.0).to(tl.float32)
        dy = tl.load(dout_ptr + b * sdo_b + p[:, None] * sdo_l + d[None, :] * sdo_d, mask=tm, other=0.0).to(tl.float32)
        raw, dt, v = _delta(dt_ptr, W, b, k, p, lm, d, dm, r, rm, bias, sdt_k, sdt_b, sdt_l, sdt_last, LOW_RANK,
                            SOFTPLUS)
        b_off, b_m = _bc_offsets(b, gb, p, lm, n, nm, dm, sB_b, sB_g, sB_l, sB_n, SHARED_B)
        c_off, c_m = _bc_offsets(b, gc, p, lm, n, nm, dm, sC_b, sC_g, sC_l, sC_n, SHARED_C)
        Bt = _load_bc(B_ptr, b_off, b_m, SHARED_B)
        x = (dt * u)[:, :, None] * Bt
        a = _decay(dt, A)
        start = tl.load(start_ptr + state + ch * N, mask=mask, other=0.0)
        _, hs = tl.associative_scan((a, _enter(x, a, start, t)), 0, _affine)  # the states, recomputed
        gc_off, _ = _bc_offsets(b, gc, p, lm, n, nm, dm, sgC_b, sgC_g, sgC_l, sgC_n, SHARED_C)
        if not SHARED:  # added now: kept to dB's add, sm_80 spilled 384 bytes, not 312
            _add_bc(dC_ptr, gc_off, c_m, dy[:, :, None] * hs, SHARED_C)
        ah = hs - x  # a_l * h_(l-1)
        # the adjoint, last step first: G_l = dy_l C_l + a_(l+1) G_(l+1), as a forward scan of the
        # steps flipped: each thread holds all of a chunk's steps, so a flip renames registers, where
        # Triton's reverse scan shuffles across threads (640 instructions a chunk). Flipped, a_(l+1)
        # is the decay a step back, with the later chunk's first in front: a scan with _previous,
        # in registers too, where recomputing it took a second delta and exp (395 instructions)
        first = (t == 0)[:, None, None]
        a_next, _, _ = tl.associative_scan((tl.where(first, a_later[None, :, :], 0.0), tl.flip(a, 0),
                                            tl.full(a.shape, 1.0, tl.float32)), 0, _previous)
        a_later = _row(a, t, 0)
        dyC = tl.flip(dy[:, :, None] * _load_bc(C_ptr, c_off, c_m, SHARED_C), 0)
        _, G = tl.associative_scan((a_next, _enter(dyC, a_next, g, t)), 0, _affine)
        G = tl.flip(G, 0)
        g = _row(G, t, 0)
        gB = _sum_states(G * Bt, SHARED)  # dLoss/d(dt*u)
        tl.store(du_ptr + k * sdu_k + b * sdu_b + p[:, None] * sdu_l + d[None, :] * sdu_d,
                 gB * dt + dy * Dv[None, :], mask=tm)
        gb_off, _ = _bc_offsets(b, gb, p, lm, n, nm, dm, sgB_b, sgB_g, sgB_l, sgB_n, SHARED_B)
        if SHARED:
            _add_bc_pair(dB_ptr, gb_off, b_m, G * (dt * u)[:, :, None], dC_ptr, gc_off, c_m, dy[:, :, None] * hs)
        else:
            _add_bc(dB_ptr, gb_off, b_m, G * (dt * u)[:, :, None], SHARED_B)
        Gah = G * ah
        dA += tl.sum(Gah * dt[:, :, None], axis=0)
        ddt = _sum_states(Gah * A[None, :, :], SHARED) + gB * u
        dD += tl.sum(dy * u, axis=0)
        if SOFTPLUS:
            ddt = ddt * _sigmoid(raw)
        ddt = tl.where(tm, ddt, 0.0)
        dbias += tl.sum(ddt, axis=0)
        if LOW_RANK:  # delta = v W^T: its gradients are dots too
            tl.atomic_add(ddt_ptr + b * sgdt_b + p[:, None] * sgdt_l + k * sgdt_k + r[None, :] * sgdt_last,
                          tl.dot(ddt, W, input_precision="ieee"), mask=lm[:, None] & rm[None, :],
                          sem="relaxed")
            dW += tl.dot(tl.trans(ddt), v, input_precision="ieee")
        else:
            tl.store(ddt_ptr + k * sgdt_k + b * sgdt_b + p[:, None] * sgdt_l + d[None, :] * sgdt_last, ddt, mask=tm)
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
    return groups == K or (K == 1 and groups > 1 and dim // groups % TILES.block_d == 0)


def _meta(u: Tensor, A: Tensor, B: Tensor, C: Tensor, W: Tensor | None, K: int, softplus: bool) -> dict:
    """The kernels' sizes and layout flags for these inputs."""
    _, L, dim = u.shape
    return dict(K=K, dim=dim, N=A.shape[1], L=L, R=1 if W is None else W.shape[1], n_chunks=triton.cdiv(L, TILES.chunk),
                rows_b=K * dim // B.shape[1], rows_c=K * dim // C.shape[1], shared_b=_shared(B, K, dim),
                shared_c=_shared(C, K, dim), softplus=softplus)


@torch.library.custom_op("medmamba::triton_scan", mutates_args=())
def fused_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], bias: Optional[Tensor],
               W: Optional[Tensor], K: int, height: int, width: int, softplus: bool,
               save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The scan along the first K ``scan_positions(height, width)`` orders of u (batch, L, dim), the
    kernels' layout: delta (K, batch, L, dim), or (K, batch, L, R) with W (K*dim, R); A (K*dim, N);
    B, C (batch, G, L, N), size-1 dimensions broadcast; D, bias (K*dim,). Any strides. K = 1 with
    height 1 is a plain sequence in order. Returns (y summed over the directions (batch, L, dim),
    last states (batch, K*dim, N), the chunk starts the backward reads; empty unless ``save``),
    fp32. A torch custom op (with its backward registered), so ``torch.compile`` keeps a model that
    calls it in one graph."""
    batch, L, dim = u.shape
    meta = _meta(u, A, B, C, W, K, softplus)
    A, D, bias, W = (None if t is None else t.contiguous() for t in (A, D, bias, W))
    y = torch.empty(K, batch, L, dim, device=u.device, dtype=torch.float32)
    starts = torch.empty(batch, K * dim, meta["n_chunks"] if save else 0, meta["N"], device=u.device,
                         dtype=torch.float32)
    last = torch.empty(batch, K * dim, meta["N"], device=u.device, dtype=torch.float32)
    _scan_fwd[_grid(meta, batch)](u, delta, _or(W, A), A, B, C, _or(D, A), _or(bias, A),
                                  scan_positions(height, width, u.device)[:K], y, starts, last, *_sizes(meta),
                                  *_strides(u), *_strides(delta), *_strides(B), *_strides(C), *_strides(y),
                                  **_flags(meta, D, bias, W), SAVE_STARTS=save)
    return y.sum(0) if K > 1 else y[0], last, starts


@fused_scan.register_fake
def _(u, delta, A, B, C, D, bias, W, K, height, width, softplus, save):
    batch, L, dim = u.shape
    rows, N = K * dim, A.shape[1]
    return (u.new_empty(batch, L, dim, dtype=torch.float32), u.new_empty(batch, rows, N, dtype=torch.float32),
            u.new_empty(batch, rows, triton.cdiv(L, TILES.chunk) if save else 0, N, dtype=torch.float32))


@torch.library.custom_op("medmamba::triton_scan_bwd", mutates_args=())
def fused_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   bias: Optional[Tensor], W: Optional[Tensor], K: int, height: int, width: int, softplus: bool,
                   starts: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                          Tensor]:
    """``fused_scan``'s gradients, fp32: (du, ddelta, dA, dB, dC, dD, dbias, dW) in the shapes of
    the inputs (dD, dbias and dW also when those are absent: (K*dim,), (K*dim,), (K*dim, 1))."""
    meta = _meta(u, A, B, C, W, K, softplus)
    check_kept(starts, "triton_scan")
    A, D, bias, W = (None if t is None else t.contiguous() for t in (A, D, bias, W))
    batch, KD, N, R = u.shape[0], K * meta["dim"], meta["N"], meta["R"]
    new = lambda *shape: torch.empty(*shape, device=u.device, dtype=torch.float32)  # noqa: E731
    zeros = lambda shape: torch.zeros(shape, device=u.device, dtype=torch.float32)  # noqa: E731
    du, dA, dD, dbias, dW = new(K, *u.shape), new(batch, KD, N), new(batch, KD), new(batch, KD), new(batch, KD, R)
    ddelta = new(delta.shape) if W is None else zeros(delta.shape)  # low rank: summed over channels
    dB, dC = zeros(B.shape), zeros(C.shape)  # summed over a group's channels (and broadcast dimensions)
    _scan_bwd[_grid(meta, batch)](u, delta, _or(W, A), A, B, C, _or(D, A), _or(bias, A),
                                  scan_positions(height, width, u.device)[:K], starts, dout,
                                  du, ddelta, dW, dA, dB, dC, dD, dbias,
                                  *_sizes(meta), *_strides(u), *_strides(delta), *_strides(B), *_strides(C),
                                  *_strides(dout), *_strides(du), *_strides(ddelta), *_strides(dB),
                                  *_strides(dC), **_flags(meta, D, bias, W))
    return du.sum(0), ddelta, dA.sum(0), dB, dC, dD.sum(0), dbias.sum(0), dW.sum(0)


@fused_scan_bwd.register_fake
def _(u, delta, A, B, C, D, bias, W, K, height, width, softplus, starts, dout):
    rows, f32 = K * u.shape[2], dict(dtype=torch.float32)
    return (u.new_empty(u.shape, **f32), u.new_empty(delta.shape, **f32), u.new_empty(rows, A.shape[1], **f32),
            u.new_empty(B.shape, **f32), u.new_empty(C.shape, **f32), u.new_empty(rows, **f32),
            u.new_empty(rows, **f32), u.new_empty(rows, 1 if W is None else W.shape[1], **f32))


def _setup(ctx, inputs, output) -> None:
    *tensors, K, height, width, softplus, _ = inputs
    ctx.save_for_backward(*tensors, output[2])
    ctx.geometry = (K, height, width, softplus)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, dout, _dlast, _dstarts):
    *tensors, starts = ctx.saved_tensors
    grads = fused_scan_bwd(*tensors, *ctx.geometry, starts, dout)
    cast = lambda grad, t: None if t is None else grad.to(t.dtype)  # noqa: E731
    return (*(cast(g, t) for g, t in zip(grads, tensors)), None, None, None, None, None)


fused_scan.register_autograd(_backward, setup_context=_setup)


def _or(t: Tensor | None, other: Tensor) -> Tensor:
    """A pointer for an absent tensor (the kernel never reads it)."""
    return other if t is None else t


def _grid(meta: dict, batch: int) -> tuple[int, int, int]:
    return triton.cdiv(meta["dim"], TILES.block_d), meta["K"], batch


def _sizes(meta: dict) -> tuple[int, ...]:
    return tuple(meta[key] for key in ("K", "dim", "N", "L", "R", "n_chunks", "rows_b", "rows_c"))


def _flags(meta: dict, D, bias, W) -> dict:
    """The kernels' compile-time arguments and launch options."""
    cap = {} if TILES.max_registers is None else {"maxnreg": TILES.max_registers}
    return dict(num_warps=TILES.num_warps, **cap, HAS_D=D is not None, HAS_BIAS=bias is not None,
                LOW_RANK=W is not None, SOFTPLUS=meta["softplus"], SHARED_B=meta["shared_b"],
                SHARED_C=meta["shared_c"], CHUNK=TILES.chunk, STAGES=TILES.stages, BLOCK_D=TILES.block_d,
                BLOCK_N=triton.next_power_of_2(meta["N"]),
                BLOCK_R=max(16, triton.next_power_of_2(meta["R"])) if W is not None else 1)  # 16: tl.dot's least


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
    args = (u.transpose(1, 2), delta.transpose(1, 2)[None], A, _as_groups(B), _as_groups(C), D, delta_bias, None)
    y, last, _ = fused_scan(*args, 1, 1, u.shape[-1], delta_softplus, needs_grad(*args))
    return y.transpose(1, 2), last


def cross_selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         delta_bias: Tensor | None, delta_softplus: bool, delta_proj: Tensor | None) -> Tensor:
    """``kernels.cross_selective_scan`` with every direction read in place: x (batch, H, W, dim);
    delta (4, batch, H*W, dim), or (batch, H*W, 4, R) with delta_proj (4, dim, R); B, C
    (batch, H*W, 4, N). Returns (batch, H, W, dim) fp32."""
    batch, H, W, dim = x.shape
    if delta_proj is not None:
        delta, delta_proj = delta.permute(2, 0, 1, 3), delta_proj.reshape(4 * dim, delta_proj.shape[-1])
    args = (x.reshape(batch, H * W, dim), delta, A, B.transpose(1, 2), C.transpose(1, 2), D, delta_bias, delta_proj)
    y, _, _ = fused_scan(*args, 4, H, W, delta_softplus, needs_grad(*args))
    return y.view(batch, H, W, dim)
