"""A CPU stand-in for mamba-ssm's compiled extension ``selective_scan_cuda``.

It makes the checks the extension makes on its arguments (mamba-ssm's
csrc/selective_scan/selective_scan.cpp: dtypes, shapes, unit last strides; all but "is on CUDA")
and returns its results in the extension's layout (the pre-gate ``out`` in delta's dtype, the
chunk states ``x`` (batch, dim, n_chunks, 2N) whose last chunk's odd entries are the final
state, ``out_z``; fp32 gradients of variable B and C), computed by our reference scan. With it,
mamba-ssm's own Python wrapper runs on CPU, so the arguments our dispatch passes it are checked
without a GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medmamba.kernels import selective_scan_ref

SEQ_CHUNK = 2048  # the extension's steps per saved chunk
calls = {"fwd": 0, "bwd": 0}


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"selective_scan_cuda stand-in: expected {what}")


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:
    itype = u.dtype
    _require(itype in (torch.float32, torch.float16, torch.bfloat16), "u in fp32, fp16 or bf16")
    _require(A.dtype == torch.float32, "A in fp32")
    _require(delta.dtype == itype, "delta in u's dtype")
    batch, dim, L = u.shape
    N = A.shape[1]
    _require(u.stride(-1) == 1 and delta.stride(-1) == 1, "u and delta with unit last stride")
    _require(tuple(delta.shape) == (batch, dim, L) and tuple(A.shape) == (dim, N), "delta (b, D, L), A (D, N)")
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            _require(tuple(M.shape) == (dim, N) and M.dtype == A.dtype, f"fixed {name} (D, N) in A's dtype")
        else:
            _require(M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (N, L) and dim % M.shape[1] == 0,
                     f"variable {name} (batch, G, N, L) with G dividing D")
            _require(M.dtype == itype and M.stride(-1) == 1, f"variable {name} in u's dtype, unit last stride")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            _require(v.dtype == torch.float32 and tuple(v.shape) == (dim,) and v.stride(-1) == 1, f"{name} fp32 (D,)")
    if z is not None:
        _require(z.dtype == itype and tuple(z.shape) == (batch, dim, L) and z.stride(-1) == 1, "z like u")


def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    _check(u, delta, A, B, C, D, z, delta_bias)
    calls["fwd"] += 1
    batch, dim, L = u.shape
    with torch.no_grad():
        out, last = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus, True)
    x = torch.zeros(batch, dim, math.ceil(L / SEQ_CHUNK), 2 * A.shape[1], dtype=A.dtype)
    x[:, :, -1, 1::2] = last
    result = [out.to(delta.dtype), x]
    if z is not None:
        result.append((out.float() * F.silu(z.float())).to(u.dtype))
    return result


def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
    _check(u, delta, A, B, C, D, z, delta_bias)
    calls["bwd"] += 1
    batch, dim, L = u.shape
    _require(x.dtype == A.dtype and x.is_contiguous()
             and tuple(x.shape) == (batch, dim, math.ceil(L / SEQ_CHUNK), 2 * A.shape[1]), "x as fwd returned it")
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        y = selective_scan_ref(*leaves, delta_softplus=delta_softplus)
        given = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, given, dout))
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = (None if t is None else next(grads) for t in leaves)
    variable = lambda g, M: g.float() if M.dim() == 4 else g  # noqa: E731  (the extension's fp32 dB, dC)
    result = [du, ddelta, dA, variable(dB, B), variable(dC, C), dD, ddelta_bias]
    return result + ([dz] if z is not None else [])
