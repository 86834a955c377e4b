"""MedMamba against the published implementation's facts: checkpoints, parameter counts, FLOPs."""
from __future__ import annotations

import pytest
import torch

from medmamba import MedMamba, convert_official, create_model, infer_config, list_models
from medmamba.cli import main as cli_main
from medmamba.errors import ConfigError
from medmamba.flops import complexity


@pytest.fixture(scope="module")
def fixture(reference_root):
    return torch.load(reference_root / "official_mini_fixture.pt", weights_only=True)


def test_published_checkpoint_reproduces_logits(fixture):
    state = convert_official(fixture["state_dict"])
    config = infer_config(fixture["state_dict"])
    assert config == dict(depths=[1, 1, 2, 1], dims=[32, 64, 128, 256], num_classes=5, in_chans=3)
    model = MedMamba(**config)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model.eval()(fixture["input"])
    torch.testing.assert_close(logits, fixture["logits"], rtol=0, atol=1e-4)


def test_create_model_loads_published_and_own_checkpoints(fixture, reference_root, tmp_path):
    kwargs = dict(num_classes=5, depths=(1, 1, 2, 1), dims=(32, 64, 128, 256))
    published = create_model("medmamba_t", checkpoint=reference_root / "official_mini_fixture.pt", **kwargs).eval()
    own_path = tmp_path / "own.pt"
    torch.save({"model": published.state_dict(), "epoch": 3}, own_path)  # a training checkpoint
    own = create_model("medmamba_t", checkpoint=own_path, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(own(fixture["input"]), fixture["logits"], rtol=0, atol=1e-4)


def test_official_key_layout_maps_one_to_one(reference_root):
    # Every key of the published MedMamba-T state dict maps onto ours, with the same shape.
    rows = [line.rstrip("\n").split("\t") for line in open(reference_root / "medmamba_t_state_dict.tsv")]
    shapes = {k: tuple(eval(s)) for k, s in rows if not k.startswith("#")}
    converted = convert_official({k: torch.empty(s) for k, s in shapes.items()})
    ours = create_model("medmamba_t").state_dict()
    assert converted.keys() == ours.keys()
    assert all(tuple(ours[k].shape) == tuple(v.shape) for k, v in converted.items())


@pytest.mark.parametrize("name,params", [("medmamba_t", 15_221_608), ("medmamba_s", 23_557_480), ("medmamba_b", 48_144_872)])
def test_parameter_counts_match_the_paper(name, params):
    model = create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name,gflops", [("medmamba_t", 2.0), ("medmamba_s", 3.5), ("medmamba_b", 7.4)])
def test_flops_in_the_papers_convention(name, gflops):
    c = complexity(create_model(name, num_classes=1000), 224)
    assert round(c.paper_macs / 1e9, 1) == gflops
    assert c.full_macs > c.paper_macs + c.scan_macs > c.paper_macs  # the full count adds einsums and the scan


def test_info_command_prints_both_conventions(capsys):
    assert cli_main(["info", "medmamba_t", "--size", "224", "--num-classes", "1000"]) == 0
    out = capsys.readouterr().out
    assert "15.22 M" in out and "2.0 G" in out and "full" in out
    assert "  selective scan on cpu" in out and out.rstrip().endswith("cpu: the compiled CPU kernel"), out


@pytest.mark.parametrize("args,message", [
    (["--size", "2"], "medmamba_t needs images of at least 4 px (its patch embedding), got 2"),
    (["--size", "0"], "argument --size/--img-size: must be at least 1, got 0"),
    (["--in-chans", "0"], "argument --in-chans: must be at least 1, got 0"),
    (["--num-classes", "two"], "argument --num-classes: expected a whole number, got 'two'"),
])
def test_info_refuses_sizes_and_counts_the_model_cannot_take(args, message, capsys):
    try:
        code = cli_main(["info", "medmamba_t", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs at least 1 class and 1 input channel, got num_classes=0"):
        create_model("resnet18", num_classes=0)


@pytest.mark.parametrize("size", [(28, 28), (64, 64), (128, 128), (28, 44), (50, 30)])
def test_any_input_size_trains(size):
    model = MedMamba(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=3)
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_odd_maps_are_padded_not_cropped():
    # At 28 px the stage maps are 7 -> 4 -> 2 -> 1: padding keeps every row and column's tokens.
    model = MedMamba(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=2).eval()
    sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape[1:3])))
    model(torch.randn(1, 3, 28, 28))
    assert sizes == [(4, 4), (2, 2), (1, 1), (1, 1)]


def test_stochastic_depth_rises_linearly_to_drop_path_rate():
    model = create_model("medmamba_t", drop_path_rate=0.1)
    rates = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert len(rates) == 10 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx(torch.linspace(0, 0.1, 10).tolist())


def test_grayscale_input_channels():
    model = create_model("medmamba_t", num_classes=2, in_chans=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2)


def test_bad_names_and_checkpoints_fail_clearly(reference_root, tmp_path):
    assert list_models() == ["medmamba_b", "medmamba_s", "medmamba_t", "medmamba_t_no_shuffle",
                             "medmamba_t_parallel_add", "medmamba_t_ssm_only"]
    with pytest.raises(ValueError, match="unknown model 'medmamba_xl': neither ours .* nor a timm architecture"
                                         ".*did you mean medmamba_t"):
        create_model("medmamba_xl")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_model("medmamba_t", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"^checkpoint \S*official_mini_fixture.pt does not fit medmamba_t with num_classes=7"):
        create_model("medmamba_t", num_classes=7, checkpoint=reference_root / "official_mini_fixture.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable checkpoint"):
        create_model("medmamba_t", checkpoint=tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="unexpected key"):
        convert_official({"layers.0.blocks.0.conv33conv33conv11.3.weight": torch.zeros(1)})


def test_unrecognised_state_dicts_and_checkpoint_contents(tmp_path):
    with pytest.raises(ValueError, match="not a MedMamba state dict"):
        infer_config({"fc.weight": torch.zeros(2, 2)})
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt holds a list, not a checkpoint dict"):
        create_model("medmamba_t", checkpoint=tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="meta.pt holds no state dict"):
        create_model("medmamba_t", checkpoint=tmp_path / "meta.pt")


def test_concat_shuffle_is_the_published_cat_then_channel_shuffle():
    from medmamba.model import concat_shuffle

    a, b = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    cat = torch.cat([a, b], dim=-1)  # the published block: cat, view (groups, C/groups), transpose, flatten
    shuffled = cat.view(2, 3, 3, 2, 4).transpose(-1, -2).reshape(2, 3, 3, 8)
    torch.testing.assert_close(concat_shuffle([a, b]), shuffled, rtol=0, atol=0)
    assert concat_shuffle([a, b])[..., 1].equal(b[..., 0])


def test_the_conv_branch_computes_the_same_in_either_layout():
    """On a GPU the Conv branch runs channels-last (NCHW on a CPU): same outputs and gradients,
    and the block's output is channels-last contiguous either way."""
    from medmamba.model import SSConvSSM, conv_layout, forced_conv_layout

    assert conv_layout(torch.device("cuda")) == torch.channels_last
    assert conv_layout(torch.device("cpu")) == torch.contiguous_format
    torch.manual_seed(0)
    block = SSConvSSM(16).train()
    x = torch.randn(2, 7, 5, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        block.zero_grad()
        with forced_conv_layout(layout):
            assert conv_layout(x.device) == layout
            out = block(x)
            out.square().mean().backward()
        assert out.is_contiguous()
        results.append([out.detach(), *(p.grad.clone() for p in block.conv_branch.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
