"""The plain per-step selective scan: the ground truth the fast paths are tested against.

It follows mamba-ssm's ``selective_scan_ref`` algorithm (form exp(delta * A) and delta * B * u for
every step, then run the recurrence one step at a time) with one change: per-step slices are
taken with ``unbind`` instead of indexing, so autograd's backward stays linear in L. Grouped B/C
are contracted through a view instead of being repeated to (batch, D, N, L).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import check_scan_inputs, compute_dtype


def _grouped(M: Tensor) -> Tensor:
    """B or C as (batch, G, N, L) (variable) or (D, N) (fixed)."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def selective_scan_ref(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference selective scan with mamba-ssm's semantics (see ``selective_scan_fn``)."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, ct = u.dtype, compute_dtype(u)
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    B, C = _grouped(B.to(ct)), _grouped(C.to(ct))

    delta_a = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (batch, D, L, N)
    du = delta * u
    if B.dim() == 2:
        delta_b_u = du.unsqueeze(-1) * B.unsqueeze(1)
    else:
        g = B.shape[1]
        delta_b_u = torch.einsum("bgkl,bgnl->bgkln", du.view(batch, g, dim // g, L), B)
        delta_b_u = delta_b_u.reshape(batch, dim, L, -1)

    def readout(x: Tensor, c_l: Tensor | None) -> Tensor:
        if c_l is None:  # fixed C (D, N)
            return (x * C).sum(-1)
        g = c_l.shape[1]
        return torch.einsum("bgkn,bgn->bgk", x.view(batch, g, dim // g, -1), c_l).reshape(batch, dim)

    c_steps = C.unbind(-1) if C.dim() == 4 else [None] * L
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for a_l, bu_l, c_l in zip(delta_a.unbind(2), delta_b_u.unbind(2), c_steps):
        x = a_l * x + bu_l
        ys.append(readout(x, c_l))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out
