"""Bad inputs to the selective scan and cross scan: a ValueError naming the argument and shapes."""
from __future__ import annotations

import pytest
import torch

from medmamba.kernels import cross_merge, cross_scan, selective_scan_fn, selective_scan_ref
from scan_inputs import make_inputs

BATCH, DIM, N, L = 2, 8, 4, 10


def _inputs(**changes):
    inputs = make_inputs(BATCH, DIM, N, L, "g2")
    inputs.update(changes)
    return inputs


BAD = {
    "u-rank": (dict(u=torch.randn(DIM, L)), r"u has shape \(8, 10\), expected \(batch, dim, seqlen\)"),
    "u-empty": (dict(u=torch.randn(BATCH, DIM, 0), delta=torch.rand(BATCH, DIM, 0)), r"u has shape \(2, 8, 0\)"),
    "delta-shape": (dict(delta=torch.rand(BATCH, DIM, L + 1)), r"delta has shape \(2, 8, 11\), expected \(2, 8, 10\)"),
    "A-dim": (dict(A=-torch.rand(DIM + 1, N)), r"A has shape \(9, 4\), expected \(8, d_state\)"),
    "B-N": (dict(B=torch.randn(BATCH, 2, N + 1, L)), r"B has shape \(2, 2, 5, 10\), expected \(2, groups, 4, 10\)"),
    "B-groups": (dict(B=torch.randn(BATCH, 3, N, L)), r"B has shape \(2, 3, 4, 10\), expected a number of groups that divides dim=8"),
    "C-batch": (dict(C=torch.randn(BATCH + 1, N, L)), r"C has shape \(3, 4, 10\), expected \(2, 4, 10\)"),
    "C-fixed": (dict(C=torch.randn(DIM, N + 2)), r"C has shape \(8, 6\), expected \(8, 4\) for a fixed C"),
    "C-rank": (dict(C=torch.randn(1, BATCH, 2, N, L)), r"C has shape \(1, 2, 2, 4, 10\), expected \(8, 4\), \(2, 4, 10\) or"),
    "D-shape": (dict(D=torch.randn(DIM, 1)), r"D has shape \(8, 1\), expected \(8,\)"),
    "z-shape": (dict(z=torch.randn(BATCH, DIM)), r"z has shape \(2, 8\), expected \(2, 8, 10\)"),
    "bias-shape": (dict(delta_bias=torch.randn(DIM + 1)), r"delta_bias has shape \(9,\), expected \(8,\)"),
    "dtype": (dict(u=torch.ones(BATCH, DIM, L, dtype=torch.int64)), r"u has dtype torch.int64 \(shape \(2, 8, 10\)\)"),
    "complex-A": (dict(A=torch.randn(DIM, N, dtype=torch.complex64)), r"A has dtype torch.complex64.*complex A is not supported"),
    "device": (dict(B=torch.randn(BATCH, 2, N, L, device="meta")), r"B is on meta \(shape \(2, 2, 4, 10\)\), expected cpu"),
    "not-a-tensor": (dict(D=[1.0] * DIM), r"D must be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fast", "ref"])
@pytest.mark.parametrize("name", BAD)
def test_bad_input_names_argument_and_shapes(fn, name):
    changes, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        fn(**_inputs(**changes))


def test_cross_scan_bad_shapes():
    with pytest.raises(ValueError, match=r"cross_scan: x has shape \(2, 3, 4\), expected \(batch, channels, H, W\)"):
        cross_scan(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"cross_merge: y has shape \(2, 4, 3, 12\), expected \(batch, 4, channels, 20\)"):
        cross_merge(torch.randn(2, 4, 3, 12), 4, 5)
    with pytest.raises(ValueError, match=r"cross_merge: y has shape \(2, 2, 3, 20\)"):
        cross_merge(torch.randn(2, 2, 3, 20), 4, 5)
