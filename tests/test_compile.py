"""torch.compile over the scans and the model: the compiled kernels are torch custom ops
(``medmamba::cpu_scan``, ``medmamba::triton_scan`` and their backward ops), so a model that calls
them compiles to one graph, and ``train.compile`` trains with it.

The ops pass torch's own ``opcheck`` (schema, fake tensors, autograd registration, AOT dispatch);
the model is traced whole (``fullgraph=True``) with the ``aot_eager`` backend, which runs the same
AOTAutograd graphs as inductor without generating code; one Trainer test pays for a real inductor
compile.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medmamba.model
from medmamba import create_model
from medmamba.kernels import cross_selective_scan, selective_scan_fn, triton_scan
from scan_inputs import make_inputs, rel_err
from test_cross_scan import _cross_inputs

KERNEL_BACKENDS = ["cpu", *(["triton"] if triton_scan.INTERPRETED else [])]


class _OpCalls(TorchDispatchMode):
    """Records the medmamba ops a call dispatches, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "medmamba":
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _forward_op_call(scan: functools.partial, grad: bool = True) -> tuple:
    """The (op, args) of the one forward scan op that ``scan`` runs on its tensors, which require
    gradients if ``grad``."""
    inputs = {k: v.detach().clone().requires_grad_(grad) for k, v in _tensors(scan).items()}
    with _OpCalls() as record:
        scan(**inputs)
    (call,) = [c for c in record.calls if not c[0].name().endswith("_bwd")]
    return call


def _tensors(scan: functools.partial) -> dict:
    return {k: v for k, v in scan.keywords.items() if isinstance(v, torch.Tensor)}


def _differentiable(args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                 for a in args)


CASES = {  # entry point, its inputs: grouped and fixed B/C, SS2D's four directions with a low-rank delta
    "selective_scan_fn": lambda backend: functools.partial(
        selective_scan_fn, **make_inputs(2, 8, 4, 21, "g2", z=True, seed=3), delta_softplus=True, backend=backend),
    "selective_scan_fn-fixed-BC": lambda backend: functools.partial(  # 2 channel tiles, 2 chunks of 64 steps
        selective_scan_fn, **make_inputs(1, 20, 3, 70, "fixed", z=False, seed=5), backend=backend),
    "cross_selective_scan": lambda backend: functools.partial(
        cross_selective_scan, **_cross_inputs(2, 3, 5, 8, 4, torch.float32, low_rank=True, seed=4),
        delta_softplus=True, backend=backend),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_scan_ops_pass_torch_opcheck(backend, case):
    op, args = _forward_op_call(CASES[case](backend))
    assert op.name() == f"medmamba::{'cpu' if backend == 'cpu' else 'triton'}_scan"
    torch.library.opcheck(op, _differentiable(args))  # raises on any inconsistency


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
def test_a_compiled_scan_has_the_eager_values_and_gradients(backend, case):
    """The kernels' ops compile into one graph; the chunked PyTorch path compiles too, but its
    backward (autograd.grad over one chunk at a time) breaks the graph."""
    scan = CASES[case](backend)
    inputs = _tensors(scan)
    results = []
    for fn in (scan, torch.compile(scan, backend="aot_eager", fullgraph=backend != "torch")):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves)
        out.square().sum().backward()
        results.append([out.detach(), *(leaf.grad for leaf in leaves.values())])
    for name, got, want in zip(["out", *inputs], *results):
        assert rel_err(got, want) <= 1e-6, (name, rel_err(got, want))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_backward_op_refuses_a_forward_that_kept_no_checkpoints(backend):
    op, args = _forward_op_call(CASES["cross_selective_scan"](backend), grad=False)
    out, _, kept = op(*args)
    assert kept.numel() == 0  # inference: nothing will ask for gradients
    backward = getattr(torch.ops.medmamba, f"{op.name().split('::')[1]}_bwd")
    with pytest.raises(RuntimeError, match="kept no chunk states"):
        backward(*args[:-2 if backend == "cpu" else -1], kept, torch.ones_like(out))


def test_medmamba_compiles_to_one_graph_with_the_eager_gradients(monkeypatch):
    monkeypatch.setattr(medmamba.model, "cross_selective_scan", functools.partial(cross_selective_scan,
                                                                                  backend="cpu"))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model("medmamba_t", num_classes=3, drop_path_rate=0.0)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        run(x).logsumexp(1).sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    scale = max(g.abs().max().item() for g in grads[0].values())  # (a bias before a BatchNorm has ~0 gradient)
    for name, want in grads[0].items():
        assert (grads[1][name] - want).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.integration
def test_train_compile_trains_with_inductor_as_eager_does(medmnist_root, tmp_path, monkeypatch):
    """train.compile=true: one epoch with the inductor-compiled step (the CPU kernel's ops inside
    generated code) has the eager epoch's loss; checkpoints keep the plain model's keys. MedMamba
    compiled first at another size in this process (as a reused Tune actor would): with dynamic
    shapes that made the image size symbolic and inductor failed on it. The model is MedMamba-T's
    first two stages with one block each (patch embedding, an SS-Conv-SSM block, PatchMerging with
    its padding at 28 px, the head): inductor's CPU code generation grows with the blocks, and
    MedMamba-T's ten took 2.5 min on 2 cores, these two 45 s."""
    from torch.utils.data import Subset

    from medmamba.data import build_datasets
    from medmamba.model import MedMamba
    from medmamba.registry import _REGISTRY
    from medmamba.train import Trainer
    from test_train import _cfg

    monkeypatch.setitem(_REGISTRY, "medmamba_two_stages", lambda **kw: MedMamba(depths=(1, 1), dims=(96, 192), **kw))
    torch.compile(create_model("medmamba_two_stages", num_classes=2), backend="aot_eager")(torch.randn(2, 3, 32, 32))
    data = build_datasets(_cfg(medmnist_root).data)
    data = dataclasses.replace(data, train=Subset(data.train, range(128)))
    losses = []
    for compiled in ("false", "true"):
        cfg = _cfg(medmnist_root, "model.name=medmamba_two_stages", "train.epochs=1", f"train.compile={compiled}")
        trainer = Trainer(cfg, data, tmp_path / compiled, progress=False)
        trainer.fit(test=False)
        losses.append(trainer.history[0]["train_loss"])
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert abs(losses[1] - losses[0]) <= 1e-3 * losses[0], losses
    state = torch.load(tmp_path / "true" / "last.pt", weights_only=False)["model"]
    assert state.keys() == create_model("medmamba_two_stages", num_classes=2).state_dict().keys()


def test_a_model_that_cannot_compile_is_a_one_line_config_error(medmnist_root, tmp_path, monkeypatch):
    """train.compile where torch.compile fails (here a backend that raises, as inductor does without
    a C++ compiler): the run stops with the reason and the way out, not torch's traceback page."""
    import medmamba.train
    from medmamba.data import build_datasets
    from medmamba.errors import ConfigError
    from medmamba.train import Trainer
    from test_train import _cfg

    def no_compiler(graph, example_inputs):
        raise RuntimeError("CppCompileError: no C++ compiler found\n(many more lines)")

    monkeypatch.setattr(medmamba.train, "for_training",
                        lambda model, t: torch.compile(model, backend=no_compiler) if t.compile else model)
    cfg = _cfg(medmnist_root, "train.epochs=1", "train.compile=true")
    data = build_datasets(cfg.data)
    with pytest.raises(ConfigError) as failed:
        Trainer(cfg, data, tmp_path / "run", progress=False).fit(test=False)
    assert str(failed.value) == ("train.compile: torch.compile could not compile the model (RuntimeError: "
                                 "CppCompileError: no C++ compiler found); set train.compile=false to train "
                                 "without it")
