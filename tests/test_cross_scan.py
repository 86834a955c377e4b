"""cross_scan / cross_merge: the four SS2D directions, exact index maps, gradients."""
from __future__ import annotations

import pytest
import torch

from medmamba.kernels import cross_merge, cross_scan, cross_selective_scan, scan_positions
from scan_inputs import rel_err


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


@pytest.mark.parametrize("H,W", [(1, 1), (3, 5), (14, 9)])
def test_scan_positions_are_the_cross_scan_orders(H, W):
    x = torch.randn(2, 3, H, W)
    pos = scan_positions(H, W)
    assert pos.shape == (4, H * W) and pos.dtype == torch.int64
    for k in range(4):
        torch.testing.assert_close(cross_scan(x)[:, k], x.flatten(2)[:, :, pos[k]], rtol=0, atol=0)


def _cross_inputs(batch, H, W, dim, nstate, dtype, *, skip=True, low_rank=False, seed=0):
    """cross_selective_scan inputs; B, C (and a low-rank delta) are strided views of one
    projection, as in SS2D."""
    g = torch.Generator().manual_seed(seed)
    L, rank = H * W, 3
    proj = torch.randn(batch, L, 4, rank + 2 * nstate, generator=g, dtype=dtype)
    low = dict(delta=proj[..., :rank], delta_proj=0.5 * torch.randn(4, dim, rank, generator=g, dtype=dtype))
    return dict(
        x=torch.randn(batch, H, W, dim, generator=g, dtype=dtype),
        **(low if low_rank else dict(delta=torch.rand(4, batch, L, dim, generator=g, dtype=dtype) - 0.3)),
        A=-(0.5 + 4 * torch.rand(4 * dim, nstate, generator=g, dtype=dtype)),
        B=proj[..., rank:rank + nstate], C=proj[..., rank + nstate:],
        D=torch.randn(4 * dim, generator=g, dtype=dtype) if skip else None,
        delta_bias=0.3 * torch.rand(4 * dim, generator=g, dtype=dtype) if skip else None,
    )


CROSS_SHAPES = [  # batch, H, W, dim, nstate: 1x1 maps, non-square, several chunks of 64 steps, dim % 16 != 0
    (1, 1, 1, 16, 16), (2, 1, 5, 24, 1), (3, 3, 5, 16, 4), (2, 7, 7, 48, 16), (2, 9, 20, 20, 3),
]


@pytest.mark.parametrize("low_rank", [False, True], ids=["delta", "low-rank-delta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=lambda s: "b{}-{}x{}-d{}-n{}".format(*s))
def test_cross_selective_scan_kernel_matches_the_four_scans(shape, dtype, low_rank):
    # The compiled kernel reads the four directions in place (and applies a low-rank delta's
    # projection itself); "ref" builds the four sequences with cross_scan, runs the per-step
    # reference and merges: forward and every gradient must agree.
    softplus, skip = shape[1] % 2 == 1, shape[3] != 24
    inputs = _cross_inputs(*shape, dtype, skip=skip, low_rank=low_rank, seed=sum(shape))
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    results = []
    for backend in ("cpu", "ref"):
        for t in leaves.values():
            t.grad = None
        out = cross_selective_scan(**{**inputs, **leaves}, delta_softplus=softplus, backend=backend)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves.values()])
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    assert results[0][0].shape == shape[:3] + (shape[3],) and results[0][0].dtype == dtype
    for name, got, want in zip(["out", *leaves], *results):
        assert rel_err(got, want) <= tol, name


@pytest.mark.parametrize("low_rank", [False, True], ids=["delta", "low-rank-delta"])
def test_cross_selective_scan_gradcheck_fp64(low_rank):
    inputs = _cross_inputs(2, 3, 4, 16, 2, torch.float64, low_rank=low_rank, seed=3)
    names = list(inputs)
    leaves = [inputs[k].detach().requires_grad_() for k in names]

    def fn(*xs):
        return cross_selective_scan(**dict(zip(names, xs)), delta_softplus=True, backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves)


def test_cross_selective_scan_errors_name_the_argument():
    inputs = _cross_inputs(2, 3, 4, 16, 2, torch.float32)
    with pytest.raises(ValueError, match=r"delta has shape \(4, 2, 11, 16\), expected \(4, 2, 12, 16\)"):
        cross_selective_scan(**{**inputs, "delta": inputs["delta"][:, :, :11]})
    with pytest.raises(ValueError, match=r"x has shape \(2, 12, 16\)"):
        cross_selective_scan(**{**inputs, "x": inputs["x"].flatten(1, 2)})
    with pytest.raises(ValueError, match="B is torch.int64"):
        cross_selective_scan(**{**inputs, "B": inputs["B"].long()})
    with pytest.raises(ValueError, match="A must be a torch.Tensor, got list"):
        cross_selective_scan(**{**inputs, "A": inputs["A"].tolist()})
    low = _cross_inputs(2, 3, 4, 16, 2, torch.float32, low_rank=True)
    with pytest.raises(ValueError, match=r"delta_proj has shape \(4, 15, 3\), expected \(4, 16, 3\)"):
        cross_selective_scan(**{**low, "delta_proj": low["delta_proj"][:, :15]})


def test_cross_selective_scan_chunked_torch_backend_agrees():
    # The path a GPU without mamba-ssm takes (and a CPU without a compiler).
    inputs = _cross_inputs(2, 5, 3, 16, 4, torch.float64, low_rank=True, seed=7)
    got = cross_selective_scan(**inputs, delta_softplus=True, backend="torch")
    want = cross_selective_scan(**inputs, delta_softplus=True, backend="cpu")
    assert rel_err(got, want) <= 1e-10
