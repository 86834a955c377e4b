"""cross_scan / cross_merge: the four SS2D directions, exact index maps, gradients."""
from __future__ import annotations

import pytest
import torch

from medmamba.kernels import cross_merge, cross_scan


@pytest.mark.parametrize("H,W", [(1, 1), (4, 4), (3, 5), (7, 2), (14, 9)])
def test_directions_are_the_four_scan_orders(H, W):
    x = torch.arange(2 * 3 * H * W, dtype=torch.float64).view(2, 3, H, W)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, H * W)
    rows = [x[:, :, i, j] for i in range(H) for j in range(W)]  # row-major order
    cols = [x[:, :, i, j] for j in range(W) for i in range(H)]  # column-major order
    torch.testing.assert_close(xs[:, 0], torch.stack(rows, -1), rtol=0, atol=0)
    torch.testing.assert_close(xs[:, 1], torch.stack(cols, -1), rtol=0, atol=0)
    torch.testing.assert_close(xs[:, 2], torch.stack(rows[::-1], -1), rtol=0, atol=0)
    torch.testing.assert_close(xs[:, 3], torch.stack(cols[::-1], -1), rtol=0, atol=0)


@pytest.mark.parametrize("H,W", [(4, 4), (3, 5), (8, 1)])
def test_merge_inverts_scan_on_each_direction(H, W):
    x = torch.randn(2, 5, H, W, dtype=torch.float64)
    xs = cross_scan(x)
    # Each direction mapped back is x itself, so merging the four gives 4x.
    torch.testing.assert_close(cross_merge(xs, H, W), 4 * x.flatten(2))
    for k in range(4):
        only = torch.zeros_like(xs)
        only[:, k] = xs[:, k]
        torch.testing.assert_close(cross_merge(only, H, W), x.flatten(2))


@pytest.mark.parametrize("H,W", [(3, 5), (6, 2)])
def test_gradients(H, W):
    x = torch.randn(2, 3, H, W, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, H * W, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_scan, (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, H, W), (y,))
    # cross_merge is the adjoint of cross_scan: <scan(x), y> == <x, merge(y)>.
    lhs = (cross_scan(x) * y).sum()
    rhs = (x.flatten(2) * cross_merge(y, H, W)).sum()
    torch.testing.assert_close(lhs, rhs)
