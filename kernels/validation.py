"""Shape, dtype and device checks shared by every selective-scan backend."""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(u: Tensor) -> torch.dtype:
    """fp64 inputs are scanned in fp64, everything else in fp32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _fail(name: str, t: Tensor, expected: str) -> None:
    raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {expected}")


def check_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> None:
    """Raise ValueError naming the first argument whose type, shape, dtype or device is wrong."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise ValueError(
                f"selective_scan: {name} has dtype {t.dtype} (shape {tuple(t.shape)}), "
                "expected float16, bfloat16, float32 or float64 (complex A is not supported)"
            )
        if t.device != u.device:
            raise ValueError(
                f"selective_scan: {name} is on {t.device} (shape {tuple(t.shape)}), expected {u.device} like u"
            )
    if u.dim() != 3:
        _fail("u", u, "(batch, dim, seqlen)")
    batch, dim, L = u.shape
    if L == 0:
        _fail("u", u, "a sequence length of at least 1")
    if delta.shape != u.shape:
        _fail("delta", delta, f"{tuple(u.shape)} like u")
    if A.dim() != 2 or A.shape[0] != dim:
        _fail("A", A, f"({dim}, d_state)")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2 and M.shape != (dim, N):
            _fail(name, M, f"({dim}, {N}) for a fixed {name}")
        elif M.dim() == 3 and M.shape != (batch, N, L):
            _fail(name, M, f"({batch}, {N}, {L}) = (batch, d_state, seqlen)")
        elif M.dim() == 4:
            if M.shape[0] != batch or M.shape[2:] != (N, L):
                _fail(name, M, f"({batch}, groups, {N}, {L}) = (batch, groups, d_state, seqlen)")
            if M.shape[1] == 0 or dim % M.shape[1]:
                _fail(name, M, f"a number of groups that divides dim={dim}, got {M.shape[1]}")
        elif M.dim() not in (2, 3, 4):
            _fail(name, M, f"({dim}, {N}), ({batch}, {N}, {L}) or ({batch}, groups, {N}, {L})")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            _fail(name, t, f"({dim},)")
    if z is not None and z.shape != u.shape:
        _fail("z", z, f"{tuple(u.shape)} like u")


def check_cross_scan_inputs(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_proj: Tensor | None = None,
) -> None:
    """Raise ValueError naming the first argument of ``cross_selective_scan`` that is wrong."""
    if not isinstance(x, Tensor) or x.dim() != 4 or 0 in x.shape:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"cross_selective_scan: x has shape {shape}, expected a non-empty (batch, H, W, dim)")
    batch, H, W, dim = x.shape
    L = H * W
    N = A.shape[-1] if isinstance(A, Tensor) else -1
    R = delta_proj.shape[-1] if isinstance(delta_proj, Tensor) else -1
    expected = {"delta": (4, batch, L, dim) if delta_proj is None else (batch, L, 4, R), "A": (4 * dim, N),
                "B": (batch, L, 4, N), "C": (batch, L, 4, N), "D": (4 * dim,), "delta_bias": (4 * dim,),
                "delta_proj": (4, dim, R)}
    named = {"delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias, "delta_proj": delta_proj}
    for name, t in named.items():
        if t is None and name in ("D", "delta_bias", "delta_proj"):
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"cross_selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"cross_selective_scan: {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                             f"for x of shape {tuple(x.shape)}")
        if t.dtype not in _FLOATS or t.device != x.device:
            raise ValueError(f"cross_selective_scan: {name} is {t.dtype} on {t.device}, expected a floating "
                             f"tensor on {x.device} like x")


def check_kept(states: Tensor, op: str) -> None:
    """Refuse a scan op's backward whose forward ran for inference (save=False): it kept no states."""
    if states.numel() == 0:
        raise RuntimeError(f"{op}: the forward kept no chunk states (it ran with save=False, as for inference), "
                           "so it has no backward")


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will ask for a scan op's gradients (else its forward keeps no chunk states)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
