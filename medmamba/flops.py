"""Parameter and FLOP counts in the paper's convention and in full, for any model.

The paper's GFLOPs (Table 1: 2.0 / 3.5 / 7.4 G for T / S / B at 224 px) count multiply-adds of
convolutions and linear layers only, as thop does. The full count adds SS2D's x/dt projections
(parameter tensors applied with matmul/einsum, not nn.Linear layers) and the selective scan
itself, which the paper leaves out, and for other models (timm baselines) every other product
torch's FlopCounterMode sees, such as attention's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .model import SS2D

# Per (batch, channel, step, state) element of the scan: dt*A, exp, (dt*u)*B, the state
# update x = a*x + b and the readout y += C*x; plus the D skip once per (batch, channel, step).
SCAN_OPS_PER_STATE = 5
SCAN_OPS_PER_STEP = 1


@dataclass
class Complexity:
    params: int
    paper_macs: float  # convolution + linear multiply-adds (thop's convention)
    einsum_macs: float  # SS2D's x/dt projections
    scan_macs: float  # the selective scan, counted as documented above
    other_macs: float = 0.0  # models without SS2D: other products, e.g. attention's (bmm, SDPA)

    @property
    def full_macs(self) -> float:
        return self.paper_macs + self.einsum_macs + self.scan_macs + self.other_macs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def complexity(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int = 3) -> Complexity:
    """Count one image's multiply-adds with torch's FlopCounterMode, plus the scan's own cost."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    scans: list[tuple[int, int, int, int]] = []  # (d_inner, steps, states, dt_rank) of each SS2D call

    def record(module: SS2D, args, _out) -> None:
        _, H, W, dim = args[0].shape
        scans.append((2 * dim, H * W, module.d_state, module.dt_rank))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, SS2D)]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with counter, sdpa_kernel(SDPBackend.MATH):  # fused attention kernels are invisible to the counter
            model(torch.zeros(1, in_chans, h, w, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    layers = ("aten.convolution", "aten.mm", "aten.addmm")
    macs = sum(flops.get(op, 0) for op in layers) / 2
    # on the reference scan path SS2D's dt projection is a bmm, already in einsum_macs below
    other = 0.0 if scans else sum(n for op, n in flops.items() if op not in layers) / 2
    # per direction and step: x_proj (d -> dt_rank + 2 N), a matmul the counter sees, and
    # dt_proj (dt_rank -> d), an einsum (bmm, left out above) or part of the CPU scan kernel
    x_proj = sum(4 * L * d * (r + 2 * n) for d, L, n, r in scans)
    dt_proj = sum(4 * L * r * d for d, L, _, r in scans)
    scan = sum(4 * d * L * (n * SCAN_OPS_PER_STATE + SCAN_OPS_PER_STEP) for d, L, n, _ in scans)
    return Complexity(
        params=count_params(model),
        paper_macs=macs - x_proj,
        einsum_macs=float(x_proj + dt_proj),
        scan_macs=float(scan),
        other_macs=float(other),
    )
