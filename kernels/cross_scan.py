"""SS2D's four scan directions: row-major, column-major, and both reversed.

``cross_merge`` is the adjoint of ``cross_scan`` (it maps each direction back to row-major order
and sums), so each op's backward is the other op: no zero-filled gradient buffers per direction.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def _scan(x: Tensor) -> Tensor:
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    both = torch.stack([rows, cols], dim=1)
    return torch.cat([both, both.flip(-1)], dim=1)


def _merge(y: Tensor, H: int, W: int) -> Tensor:
    batch, _, channels, L = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = (y[:, 1] + y[:, 3].flip(-1)).view(batch, channels, W, H).transpose(2, 3).reshape(batch, channels, L)
    return rows + cols


class _CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.hw = x.shape[2:]
        return _scan(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        H, W = ctx.hw
        return _merge(grad, H, W).view(grad.shape[0], grad.shape[2], H, W)


class _CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, H: int, W: int) -> Tensor:
        ctx.hw = (H, W)
        return _merge(y, H, W)

    @staticmethod
    def backward(ctx, grad: Tensor):
        H, W = ctx.hw
        return _scan(grad.reshape(grad.shape[0], grad.shape[1], H, W)), None, None


def cross_scan(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, row-major flipped, column-major flipped."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan: x has shape {tuple(x.shape)}, expected (batch, channels, H, W)")
    return _CrossScan.apply(x)


def cross_merge(y: Tensor, H: int, W: int) -> Tensor:
    """(B, 4, C, H*W) -> (B, C, H*W): map each direction back to row-major order and sum them."""
    if y.dim() != 4 or y.shape[1] != 4 or y.shape[3] != H * W:
        raise ValueError(
            f"cross_merge: y has shape {tuple(y.shape)}, expected (batch, 4, channels, {H * W}) for H={H}, W={W}"
        )
    return _CrossMerge.apply(y, H, W)


@functools.lru_cache(maxsize=64)
def scan_positions(H: int, W: int, device: torch.device | str = "cpu") -> Tensor:
    """(4, H*W) int64 on ``device``: the row-major position that step l of each ``cross_scan``
    direction reads (cached: SS2D asks for it on every call)."""
    rows = torch.arange(H * W, device=device)
    cols = rows.view(H, W).t().reshape(-1)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])
