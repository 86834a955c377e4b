"""Random selective-scan inputs shaped like Mamba's (shared by the kernel tests)."""
from __future__ import annotations

import torch

LAYOUTS = ("fixed", "var", "g1", "g2", "g4")  # B/C as (D, N), (b, N, L), (b, G, N, L) with G = 1, 2, 4


def make_inputs(batch, dim, nstate, L, layout, dtype=torch.float32, *, z=True, D=True, bias=True, seed=0):
    """u, delta, A, B, C, D, z, delta_bias with Mamba-like magnitudes (A < 0, small positive delta)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731

    def state_matrix():
        if layout == "fixed":
            return rnd(dim, nstate)
        if layout == "var":
            return rnd(batch, nstate, L)
        return rnd(batch, int(layout[1:]), nstate, L)

    u = rnd(batch, dim, L)
    delta = 0.5 * torch.rand(batch, dim, L, generator=g, dtype=dtype)
    A = -(0.5 + torch.rand(dim, nstate, generator=g, dtype=dtype) * 4)
    return dict(
        u=u, delta=delta, A=A, B=state_matrix(), C=state_matrix(),
        D=rnd(dim) if D else None,
        z=rnd(batch, dim, L) if z else None,
        delta_bias=0.3 * torch.rand(dim, generator=g, dtype=dtype) if bias else None,  # keeps dt >= 0
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are all zero)."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff if scale == 0 else diff / scale
