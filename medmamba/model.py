"""MedMamba (Yue & Li, arXiv 2403.03849): a hybrid CNN + state-space classifier.

Patch embedding (4x4) -> four stages of SS-Conv-SSM blocks with patch merging between them ->
average pool -> linear head. Each SS-Conv-SSM block splits its channels in two: one half goes
through a Conv branch (BN-Conv3x3-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1-ReLU), the other through an SSM
branch (LayerNorm -> SS2D -> DropPath); the halves are concatenated, channel-shuffled (2 groups)
and added to the block input. SS2D runs a selective scan along four directions of the feature
map (``medmamba.kernels.cross_selective_scan``).

Numerically this is the published implementation (MedMamba.py): same layers, initialisation,
LayerNorm eps (1e-5) and stochastic depth. Differences, both deliberate:
- module names are our own; ``convert_official`` maps published state dicts onto them;
- patch merging zero-pads an odd feature map to even size where the published code crops it
  (which leaves 28x28 inputs with no tokens at all); even sizes, e.g. every stage at 224 px,
  are unaffected.

Variants follow the paper's Table 1 (see ``VARIANTS``).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import OrderedDict
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import cross_selective_scan


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution, then LayerNorm; output channels-last (B, H, W, C)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Halve H and W, double C: 2x2 neighbours concatenated -> LayerNorm(4C) -> Linear(4C, 2C).

    Odd maps are zero-padded at the bottom/right to even size (the published code crops them).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SS2D(nn.Module):
    """2-D selective scan: in_proj -> depthwise conv + SiLU -> 4-direction selective scan ->
    LayerNorm -> gate with SiLU(z) -> out_proj. Input and output channels-last (B, H, W, C)."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 3,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        d_inner = expand * dim
        self.d_state, self.dt_rank, k = d_state, math.ceil(dim / 16), 4
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.dwconv = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner)
        # Per direction: x -> (dt_rank + 2 d_state) projection, dt_rank -> d_inner dt projection.
        x_proj = [nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False) for _ in range(k)]
        self.x_proj_weight = nn.Parameter(torch.stack([p.weight for p in x_proj]))
        std = self.dt_rank**-0.5
        self.dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank).uniform_(-std, std))
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # (4 d_inner, d_state), S4D-real init
        self.D = nn.Parameter(torch.ones(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def scan(self, x: Tensor) -> Tensor:
        """(B, H, W, d_inner) -> (B, H, W, d_inner): the selective scan along all four directions.

        The projections are pointwise, so they run once on the map in row-major order (one
        matmul for all four directions' x_proj); ``cross_selective_scan`` reads each direction's
        order itself and applies the dt projection (``delta_proj``) inside the scan."""
        batch, H, W, d_inner = x.shape
        k = self.x_proj_weight.shape[0]
        x_dbl = torch.matmul(x.reshape(batch, H * W, d_inner), self.x_proj_weight.flatten(0, 1).t())
        dts, Bs, Cs = x_dbl.view(batch, H * W, k, -1).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return cross_selective_scan(x, dts, -torch.exp(self.A_log), Bs, Cs, self.D,
                                    delta_bias=self.dt_proj_bias.flatten(), delta_softplus=True,
                                    delta_proj=self.dt_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        # channels-last memory: 2-5x faster depthwise conv, and the (B, H, W, C) view below is free
        x = F.silu(self.dwconv(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)))
        y = self.scan(x.permute(0, 2, 3, 1))
        y = self.out_norm(y.to(z.dtype)) * F.silu(z)
        return self.out_proj(y)


def concat_shuffle(parts: list[Tensor]) -> Tensor:
    """Concatenate channels-last tensors, then channel-shuffle with one group per part
    (ShuffleNet's shuffle), in one copy: channel i of part g lands at i * len(parts) + g."""
    return torch.stack(parts, dim=-1).flatten(-2)


# How an SS-Conv-SSM block combines its branches: the paper's design and the base models of its
# ablation study (Table 7), which build it step by step.
BLOCKS = {
    "split_shuffle": "channel split -> Conv | SSM -> concat -> channel shuffle (MedMamba)",
    "split_concat": "channel split -> Conv | SSM -> concat, no shuffle (Table 7, Base Model-III)",
    "parallel_add": "Conv and SSM on all channels, fused by addition (Table 7, Base Model-II)",
    "ssm_only": "the SSM branch alone, on all channels (Table 7, Base Model-I)",
}


def conv_branch(dim: int) -> nn.Sequential:
    """BN-Conv3x3-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1-ReLU on ``dim`` channels (NCHW)."""
    return nn.Sequential(OrderedDict([
        ("norm0", nn.BatchNorm2d(dim)),
        ("conv1", nn.Conv2d(dim, dim, 3, padding=1)),
        ("norm1", nn.BatchNorm2d(dim)),
        ("act1", nn.ReLU()),
        ("conv2", nn.Conv2d(dim, dim, 3, padding=1)),
        ("norm2", nn.BatchNorm2d(dim)),
        ("act2", nn.ReLU()),
        ("conv3", nn.Conv2d(dim, dim, 1)),
        ("act3", nn.ReLU()),
    ]))


_forced_layouts: list[torch.memory_format] = []  # forced_conv_layout's, innermost last


def conv_layout(device: torch.device) -> torch.memory_format:
    """The memory format the Conv branch runs in on ``device``: NCHW on a CPU (faster there than
    channels-last, measured), channels-last on a GPU (the layout of tensor-core convolutions; the
    alternative is timed by benchmarks/gpu_check.py), unless ``forced_conv_layout`` says otherwise."""
    if _forced_layouts:
        return _forced_layouts[-1]
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


@contextlib.contextmanager
def forced_conv_layout(layout: torch.memory_format) -> Iterator[None]:
    """Run the Conv branch in ``layout`` on every device inside the block, for timing or testing
    the layout ``conv_layout`` does not pick. Not thread-safe."""
    _forced_layouts.append(layout)
    try:
        yield
    finally:
        _forced_layouts.pop()


class SSConvSSM(nn.Module):
    """The SS-Conv-SSM block: split -> Conv branch | SSM branch -> concat -> shuffle -> residual.

    ``block`` selects one of ``BLOCKS``: the paper's block (default) or an ablation base model."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16, block: str = "split_shuffle"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; expected one of {', '.join(BLOCKS)}")
        self.block = block
        width = dim // 2 if block.startswith("split") else dim
        self.conv_branch = conv_branch(width) if block != "ssm_only" else None
        self.ssm_norm = nn.LayerNorm(width)
        self.ssm = SS2D(width, d_state=d_state)
        self.drop_path = DropPath(drop_path)

    def _conv(self, x: Tensor) -> Tensor:
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=conv_layout(x.device))
        return self.conv_branch(x).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.block == "ssm_only":
            return x + self.drop_path(self.ssm(self.ssm_norm(x)))
        if self.block == "parallel_add":
            return x + self._conv(x) + self.drop_path(self.ssm(self.ssm_norm(x)))
        conv_in, ssm_in = x.chunk(2, dim=-1)
        ssm_out = self.drop_path(self.ssm(self.ssm_norm(ssm_in)))
        if self.block == "split_concat":
            return torch.cat([self._conv(conv_in), ssm_out], dim=-1) + x
        return concat_shuffle([self._conv(conv_in), ssm_out]) + x


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int, drop_paths: list[float], d_state: int, downsample: bool,
                 block: str = "split_shuffle"):
        super().__init__()
        self.blocks = nn.ModuleList(SSConvSSM(dim, p, d_state, block) for p in drop_paths[:depth])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class MedMamba(nn.Module):
    """MedMamba classifier. Input (B, in_chans, H, W) of any size; output logits (B, num_classes)."""

    def __init__(self, depths=(2, 2, 4, 2), dims=(96, 192, 384, 768), num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.1, d_state: int = 16, patch_size: int = 4,
                 block: str = "split_shuffle"):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must have the same length")
        self.depths, self.dims, self.num_classes = list(depths), list(dims), num_classes
        self.patch_embed = PatchEmbed(in_chans, dims[0], patch_size)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            Stage(dims[i], depths[i], rates[starts[i]:], d_state, downsample=i < len(depths) - 1, block=block)
            for i in range(len(depths))
        )
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> pooled features (B, dims[-1])."""
        x = self.patch_embed(x)
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(1, 2))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled features -> logits (``pre_logits``: the features the classifier sees, timm's convention)."""
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# Published name -> our name, applied in order to every key.
_OFFICIAL_RENAMES = [
    (r"^layers\.(\d+)\.", r"stages.\1."),
    (r"\.ln_1\.", ".ssm_norm."),
    (r"\.self_attention\.", ".ssm."),
    (r"\.ssm\.conv2d\.", ".ssm.dwconv."),
    (r"\.ssm\.dt_projs_weight$", ".ssm.dt_proj_weight"),
    (r"\.ssm\.dt_projs_bias$", ".ssm.dt_proj_bias"),
    (r"\.ssm\.A_logs$", ".ssm.A_log"),
    (r"\.ssm\.Ds$", ".ssm.D"),
]
_OFFICIAL_CONV_BRANCH = {"0": "norm0", "1": "conv1", "2": "norm1", "4": "conv2", "5": "norm2", "7": "conv3"}


def is_official_state_dict(state_dict: dict) -> bool:
    """True for a state dict saved from the published MedMamba.py."""
    return any(".self_attention." in k or ".conv33conv33conv11." in k for k in state_dict)


def convert_official(state_dict: dict) -> dict:
    """Map a published MedMamba.py state dict onto this implementation's names (values unchanged)."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _OFFICIAL_RENAMES:
            new = re.sub(pattern, repl, new)
        m = re.search(r"\.conv33conv33conv11\.(\d+)\.", new)
        if m:
            if m.group(1) not in _OFFICIAL_CONV_BRANCH:
                raise ValueError(f"convert_official: unexpected key {key!r}")
            new = new.replace(m.group(0), f".conv_branch.{_OFFICIAL_CONV_BRANCH[m.group(1)]}.")
        out[new] = value
    return out


def infer_config(state_dict: dict) -> dict:
    """depths, dims, num_classes and in_chans of a state dict (ours or published)."""
    sd = convert_official(state_dict) if is_official_state_dict(state_dict) else state_dict
    blocks: dict[int, set[int]] = {}
    for key in sd:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or "patch_embed.proj.weight" not in sd:
        raise ValueError("not a MedMamba state dict: no patch_embed.proj.weight or stages.*.blocks.* keys")
    n = max(blocks) + 1
    return dict(
        depths=[len(blocks.get(i, ())) for i in range(n)],
        dims=[int(sd[f"stages.{i}.blocks.0.ssm_norm.weight"].shape[0]) * 2 for i in range(n)],
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        in_chans=int(sd["patch_embed.proj.weight"].shape[1]),
    )


def checkpoint_filter_fn(state_dict: dict, model: MedMamba | None = None) -> dict:
    """Accept our state dicts and published ones (timm's hook for converting weights)."""
    return convert_official(state_dict) if is_official_state_dict(state_dict) else state_dict


# The paper's Table 1: parameters at 1000 classes and 224 px (conv + linear MACs).
VARIANTS = {
    "medmamba_t": dict(depths=(2, 2, 4, 2), dims=(96, 192, 384, 768)),    # 15.22M, 2.0 G
    "medmamba_s": dict(depths=(2, 2, 12, 2), dims=(96, 192, 384, 768)),   # 23.56M, 3.5 G
    "medmamba_b": dict(depths=(2, 2, 16, 2), dims=(128, 256, 512, 1024)), # 48.14M, 7.4 G
}
# The paper's Table 7: MedMamba-T built step by step (counts at 5 classes and 224 px, as printed).
ABLATIONS = {
    "medmamba_t_ssm_only": dict(VARIANTS["medmamba_t"], block="ssm_only"),          # I: 16.2 M, 2.0 G
    "medmamba_t_parallel_add": dict(VARIANTS["medmamba_t"], block="parallel_add"),  # II: 51.6 M, 7.4 G
    "medmamba_t_no_shuffle": dict(VARIANTS["medmamba_t"], block="split_concat"),    # III: 14.5 M, 2.0 G
}
