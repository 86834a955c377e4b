"""One-shot GPU check: the scan kernels' numerics on the device, the scan against its memory-traffic
floor, and MedMamba's training and inference throughput against timm's ResNet-50 and ConvNeXt-T.

    python benchmarks/gpu_check.py            # on a GPU machine: paste its table into the note
    python benchmarks/gpu_check.py --quick    # fewer steps
    python benchmarks/gpu_check.py --only scan,compiled

Needs only torch, triton (for the Triton scan), timm and this package's model and kernels (no
Ray, MLflow, Flower or medmnist). Without a GPU it runs the same sections on the CPU at small
sizes: a smoke test, not a measurement of anything a GPU user cares about.

Sections:
1. correctness: every scan backend the device has (Triton, chunked PyTorch, mamba-ssm when
   importable, the compiled CPU kernel on a CPU) against the per-step reference, forward and
   gradients, fp32: max relative error, for ``selective_scan_fn`` and for SS2D's
   ``cross_selective_scan`` (four directions of a non-square map, low-rank delta).
2. scan: ``cross_selective_scan`` forward + backward at MedMamba-T's stage-1 and stage-3 shapes
   at 224 px (batch 32 on a GPU): time, peak memory, and two floors. The HBM-traffic floor: the
   bytes the scan must read and write (inputs and output forward; inputs, output gradient and
   input gradients backward) over the copy bandwidth measured in this run. The exp floor: the
   exp(delta*A) any kernel must compute when it does not store the (batch, D, L, N) decays (one
   per state element forward, one backward) over the exp rate measured in this run by a Triton
   kernel of independent exp chains. At N = 16 the scan does ~30 flops and those 2 exps per
   state element, for about 10 bytes of traffic per channel and step: by an H200's data sheet the exp
   floor is about 3x the HBM floor (measured here, not assumed). And for the Triton kernels their
   issue floor: the warp instructions of their chunk loops, read from the SASS they compiled to
   here (``kernels/triton_sass.py``), at the 4 a cycle an SM issues at most: the time this design
   needs however well the GPU hides memory latency.
3. layout: section 4's MedMamba-T with its Conv branch in NCHW and in channels-last, and which
   of them the model runs on this device (``model.conv_layout``).
4. throughput: training (forward, backward, fused AdamW) and inference images/s at 224 px, bf16
   autocast on a GPU (fp32 on a CPU), MedMamba-T/S against ResNet-50 and ConvNeXt-T in one run:
   steps made back to back, as the training loop makes them, and beside them the training rate
   with the GPU synchronised after each step (the gap is the host's share of a step).
5. resume: MedMamba-T trained by ``Trainer`` on the device (synthetic images, no dataset needed)
   in a subprocess SIGKILLed after its first checkpoint, resumed, and compared epoch by epoch
   with a run that was never stopped (equal on a CPU; on a GPU up to the scan's atomic adds).
6. compiled: section 4's training for MedMamba-T and ConvNeXt-T under ``torch.compile``
   (``train.compile``; the scan kernels are custom ops inside one graph), with each model's
   compile time.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # only the exp floor needs Triton
    triton = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from medmamba import create_model  # noqa: E402
from medmamba.kernels import (BACKENDS, auto_backend, cross_selective_scan, resolve_backend,  # noqa: E402
                              selective_scan_fn, selective_scan_ref)
from medmamba.model import SS2D, conv_layout, forced_conv_layout  # noqa: E402
from timing import back_to_back_seconds, median_seconds, sync  # noqa: E402  (benchmarks/, the script's folder)


def backends(device: torch.device) -> list[str]:
    """The scan backends that run on ``device`` here."""
    found = []
    for name in BACKENDS:
        if name in ("auto", "ref"):
            continue
        try:
            resolve_backend(device, name)
            found.append(name)
        except (ValueError, RuntimeError):
            pass
    return found


def correctness(device: torch.device, batch: int = 2, dim: int = 64, n: int = 16, L: int = 300,
                hw: tuple[int, int] = (9, 13)) -> list[str]:
    """Max relative error of each backend's forward and gradients against the reference: the
    selective scan over L steps, and the cross scan over an ``hw`` map."""
    g = torch.Generator().manual_seed(0)
    inputs = dict(u=torch.randn(batch, dim, L, generator=g), delta=0.5 * torch.rand(batch, dim, L, generator=g),
                  A=-(0.5 + 4 * torch.rand(dim, n, generator=g)), B=torch.randn(batch, 2, n, L, generator=g),
                  C=torch.randn(batch, 2, n, L, generator=g), D=torch.randn(dim, generator=g),
                  z=torch.randn(batch, dim, L, generator=g), delta_bias=0.3 * torch.rand(dim, generator=g))
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def run(fn, **kw):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = fn(**leaves, delta_softplus=True, **kw)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
        return out.detach(), {k: v.grad for k, v in leaves.items()}

    want, want_grads = run(selective_scan_ref)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    rows = []
    for name in backends(device):
        rows.append(_errors_row("correctness selective_scan_fn", name, lambda: run(selective_scan_fn, backend=name),
                                want, want_grads, rel))
    return rows + cross_correctness(device, rel, batch, *hw, dim, n)


def failed_row(check: str, path: str, exc: Exception) -> str:
    """The row of a check that raised (its traceback to stderr): one GPU session is short, so the
    other checks still run."""
    traceback.print_exc()
    return f"| {check} | {path} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | |"


def _errors_row(check: str, name: str, run, want: torch.Tensor, want_grads: dict, rel) -> str:
    """One backend's row: its worst errors against the reference, or how it failed (the other
    backends' rows still come: one GPU session is short)."""
    try:
        out, grads = run()
    except Exception as exc:
        return failed_row(check, name, exc)
    worst = max(grads, key=lambda k: rel(grads[k], want_grads[k]))
    return (f"| {check} | {name} | forward rel err {rel(out, want):.1e} | "
            f"gradients rel err {rel(grads[worst], want_grads[worst]):.1e} (worst: {worst}) |")


def cross_correctness(device: torch.device, rel, batch: int, H: int, W: int, dim: int, n: int,
                      rank: int = 6) -> list[str]:
    """``cross_selective_scan`` (SS2D's four directions, low-rank delta, bias, softplus, D) of each
    backend against the reference."""
    g = torch.Generator().manual_seed(1)
    L = H * W
    inputs = dict(x=torch.randn(batch, H, W, dim, generator=g), delta=torch.randn(batch, L, 4, rank, generator=g),
                  A=-(0.5 + 4 * torch.rand(4 * dim, n, generator=g)), B=torch.randn(batch, L, 4, n, generator=g),
                  C=torch.randn(batch, L, 4, n, generator=g), D=torch.randn(4 * dim, generator=g),
                  delta_bias=0.3 * torch.rand(4 * dim, generator=g), delta_proj=0.3 * torch.randn(4, dim, rank,
                                                                                                generator=g))
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def run(backend: str):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = cross_selective_scan(leaves["x"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                                   leaves["delta_bias"], True, leaves["delta_proj"], backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
        return out.detach(), {k: v.grad for k, v in leaves.items()}

    want, want_grads = run("ref")
    return [_errors_row("correctness cross_selective_scan", name, lambda: run(name), want, want_grads, rel)
            for name in backends(device)]


def scan_shapes() -> list[tuple[int, int, int, int, int]]:
    """(H, W, d_inner, d_state, dt_rank) of MedMamba-T's SS2D scans at 224 px, one per stage."""
    model, shapes = create_model("medmamba_t", num_classes=2), {}

    def record(module, args, _out, stage: int) -> None:
        shapes.setdefault(stage, (*args[0].shape[1:3], 2 * args[0].shape[3], module.d_state, module.dt_rank))

    for i, stage in enumerate(model.stages):
        for m in stage.modules():
            if isinstance(m, SS2D):
                m.register_forward_hook(lambda *a, i=i: record(*a, stage=i))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    return [shapes[i] for i in sorted(shapes)]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(64 * 2**20 if device.type == "cuda" else 8 * 2**20, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / median_seconds(lambda: y.copy_(x), 10, device)


if triton is not None:
    @triton.jit
    def _exp_chains(x_ptr, steps, BLOCK: tl.constexpr):
        """Each thread runs BLOCK / threads independent chains of ``steps`` exps (no memory traffic)."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets)
        for _ in range(steps):
            x = tl.exp(x * -0.5)
        tl.store(x_ptr + offsets, x)


def exp_rate(device: torch.device) -> float | None:
    """exps a second this GPU sustains (None without a GPU or Triton)."""
    if device.type != "cuda" or triton is None:
        return None
    block, programs, steps = 4096, 8192, 256
    x = torch.rand(programs * block, device=device)
    seconds = median_seconds(lambda: _exp_chains[(programs,)](x, steps, BLOCK=block), 5, device)
    return x.numel() * steps / seconds


def issue_floor(step, target, sms: int, hertz: float) -> tuple[float, str]:
    """Seconds the Triton kernels that ``step`` launches take to issue their chunk loops' SASS, as
    compiled for ``target``, at one warp instruction a cycle on each of the 4 schedulers of each of
    ``sms`` SMs clocked at ``hertz``, the most a GPU issues; and how that was reckoned."""
    from medmamba.kernels.triton_sass import chunk_loop, compile_launch, launches, warp_instructions

    total = sum(warp_instructions(launch, chunk_loop(compile_launch(launch, target).asm["cubin"])[0].total())
                for launch in launches(step))
    return total / (sms * 4 * hertz), f"{total / 1e6:.1f} M warp instructions, 4 a cycle on {sms} SMs at " \
                                      f"{hertz / 1e9:.2f} GHz"


def _this_gpu(device: torch.device) -> tuple:
    """(Triton's compile target, SMs, SM clock in Hz) of ``device``."""
    driver = triton.runtime.driver.active
    props = driver.utils.get_device_properties(device.index or 0)
    return driver.get_current_target(), props["multiprocessor_count"], props["sm_clock_rate"] * 1e3


def scan_benchmark(device: torch.device, batch: int, steps: int) -> list[str]:
    bandwidth, exps_per_second, rows = copy_bandwidth(device), exp_rate(device), []
    totals: dict[str, float] = {}  # each backend's time over both stages
    shapes = scan_shapes()
    for stage in (0, 2):
        H, W, d, n, rank = shapes[stage]
        L = H * W
        x = torch.randn(batch, H, W, d, device=device, requires_grad=True)
        delta = (torch.rand(batch, L, 4, rank, device=device) - 4).requires_grad_()  # low rank, as SS2D
        proj = (0.1 * torch.randn(4, d, rank, device=device)).requires_grad_()
        B, C = (torch.randn(batch, L, 4, n, device=device, requires_grad=True) for _ in range(2))
        A = -torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(4 * d, 1)
        Dskip, bias = torch.ones(4 * d, device=device), torch.zeros(4 * d, device=device)
        inputs = [x, delta, proj, B, C]
        moved = sum(t.numel() for t in inputs) * 4
        floor = (moved + x.numel() * 4 + 2 * moved + x.numel() * 4) / bandwidth  # fwd: in + out; bwd: in, dout, grads
        exp_floor = 2 * 4 * x.numel() * n / exps_per_second if exps_per_second else None  # 4 directions
        # the chunked PyTorch scan is a GPU's fallback; on a CPU it takes seconds here and tells nothing
        for name in [b for b in backends(device) if b != "torch" or device.type == "cuda"]:
            def step(name=name):
                out = cross_selective_scan(x, delta, A, B, C, Dskip, bias, True, proj, backend=name)
                out.sum().backward()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = median_seconds(step, steps, device)
            except Exception as exc:
                rows.append(failed_row(f"scan stage {stage + 1}", name, exc))
                continue
            totals[name] = totals.get(name, 0.0) + seconds
            peak = (f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda"
                    else "no peak memory on CPU")
            exps = (f"; {seconds / exp_floor:.1f}x the exp floor ({exp_floor * 1e3:.3f} ms at "
                    f"{exps_per_second / 1e12:.2f} T exp/s)" if exp_floor else "")
            rows.append(f"| scan stage {stage + 1} ({H}x{W}, d {d}, n {n}, batch {batch}) | {name} | "
                        f"{seconds * 1e3:.2f} ms fwd+bwd, {peak} | {seconds / floor:.1f}x the HBM floor "
                        f"({floor * 1e3:.3f} ms at {bandwidth / 1e9:.0f} GB/s){exps} |")
            if name == "triton" and device.type == "cuda":
                try:
                    issue, how = issue_floor(step, *_this_gpu(device))
                    rows.append(f"| scan stage {stage + 1}, issue floor | triton | {seconds / issue:.1f}x the issue "
                                f"floor ({issue * 1e3:.3f} ms) | {how} |")
                except Exception as exc:  # reads Triton's compiler internals, which change between versions
                    rows.append(failed_row(f"scan stage {stage + 1}, issue floor", name, exc))
            if stage == 0 and name == "triton" and device.type == "cuda":
                verdict = "met" if seconds <= 2 * floor else "NOT met"
                rows.append(f"| target: Triton scan stage 1 within 2x of the HBM floor | triton | "
                            f"{seconds / floor:.1f}x | {verdict} |")
                from medmamba.kernels import triton_scan

                for changes in TRITON_CONFIGS:  # other launches, for the next session to pick from
                    try:
                        with triton_scan.tiles(**changes) as tiles:
                            other = median_seconds(step, steps, device)
                    except Exception as exc:  # a launch this GPU cannot compile or run
                        rows.append(failed_row("scan stage 1, other Triton tiles", f"triton, {changes}", exc))
                        continue
                    rows.append(f"| scan stage 1, other Triton tiles | triton, {describe(tiles)} | "
                                f"{other * 1e3:.2f} ms fwd+bwd | {other / seconds:.2f}x the default's time |")
    if totals:
        times = ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in totals.items())
        rows.append(f"| scan: fastest here over both stages | {min(totals, key=totals.get)} | auto picks "
                    f"{resolve_backend(device)} | {times} |")
    return rows


# triton_scan.Tiles changed from the default (chunk 16, 16 channels, 4 warps, Triton's pipelining),
# timed against it at stage 1 on an H200 (2026-12-04): 2 and 3 stages 1.02x and 0.98x the time (at
# stage 3, 3 stages took 1.47x the time of 2), 32 channels at 8 warps 1.13x, 168 registers at 3
# stages 1.13x. Dropped after timing: 1 stage 1.31x, 8 warps 1.25x, 168 registers 1.16-1.30x,
# 32-step chunks at 8 warps 1.34x, 32 channels at 16 warps 1.79x, 128 registers 2.26x. Tiles that
# give each thread 4 or more (channel, state) pairs, as (16, 16, 2 warps), spill 3-4 KB in the
# backward (compiled here, Triton 3.6 and 3.8).
TRITON_CONFIGS = [dict(stages=2), dict(stages=3), dict(block_d=32, num_warps=8), dict(max_registers=168, stages=3)]


def describe(tiles) -> str:
    """A triton_scan.Tiles in words, for a row."""
    return (f"chunk {tiles.chunk}, {tiles.block_d} channels, {tiles.num_warps} warps"
            + (f", at most {tiles.max_registers} registers" if tiles.max_registers else "")
            + (f", {tiles.stages} stage{'s' * (tiles.stages > 1)}" if tiles.stages else ", Triton's pipelining"))


def _rates(name: str, device: torch.device, size: int, batch: int, steps: int,
           compiler: str | None = None) -> tuple[float, str]:
    """Training images/s of model ``name`` (forward, backward, fused AdamW; bf16 autocast on a GPU)
    over steps made back to back, as the training loop makes them, and the row's other column: the
    rate with the device synchronised after every step (what earlier runs measured: the host's
    work on a step then no longer overlaps the device's on the one before, so the gap between
    the two rates is the host's share), then inference images/s or, with ``compiler`` (a
    torch.compile backend), the first step's seconds, which compile."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    model = create_model(name, num_classes=2, img_size=size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    run = model if compiler is None else torch.compile(model, backend=compiler, dynamic=False)  # as train.compile

    def train_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(run(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)

    model.train()
    start = time.perf_counter()
    train_step()
    sync(device)
    first = time.perf_counter() - start
    train = batch / back_to_back_seconds(train_step, steps, device)
    synced = f"{batch / median_seconds(train_step, steps, device):.0f} img/s synced each step"
    if compiler is not None:
        return train, f"{synced}; first step (compiling) {first:.0f} s"
    model.eval()
    return train, f"{synced}; infer {batch / back_to_back_seconds(infer_step, steps, device):.0f} img/s"


def _setting(device: torch.device, size: int, batch: int) -> str:
    return f"{size} px, batch {batch}, {'bf16' if device.type == 'cuda' else 'fp32'}"


def throughput(device: torch.device, size: int, batch: int, steps: int,
               names: tuple[str, ...] = ("medmamba_t", "medmamba_s", "resnet50", "convnext_tiny"),
               compiler: str | None = None) -> list[str]:
    """Section 4: each model's training and inference images/s; section 6 with ``compiler``: the
    compiled models' training images/s and compile times."""
    setting = _setting(device, size, batch) + (f", compiled ({compiler})" if compiler else "")
    rows, rates = [], {}
    for name in names:
        rates[name], other = _rates(name, device, size, batch, steps, compiler)
        rows.append(f"| throughput {setting} | {name} | train {rates[name]:.0f} img/s | {other} |")
    if {"medmamba_t", "convnext_tiny"} <= rates.keys():
        ratio = rates["medmamba_t"] / rates["convnext_tiny"]
        verdict = ("met" if ratio >= 1 else "NOT met") if device.type == "cuda" else "CPU smoke test: no target"
        rows.append(f"| target: MedMamba-T trains at least as fast as ConvNeXt-T{', both compiled' if compiler else ''}"
                    f" | | {ratio:.2f}x | {verdict} |")
    return rows


def conv_layouts(device: torch.device, size: int, batch: int, steps: int) -> list[str]:
    """Section 3: MedMamba-T trained with its Conv branch in NCHW and in channels-last, and the
    layout ``model.conv_layout`` picks on this device."""
    rows, rates = [], {}
    layouts = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
    for label, layout in layouts.items():
        with forced_conv_layout(layout):
            rates[label], other = _rates("medmamba_t", device, size, batch, steps)
        rows.append(f"| layout {_setting(device, size, batch)} | medmamba_t, Conv branch {label} | "
                    f"train {rates[label]:.0f} img/s | {other} |")
    picked = next(label for label, layout in layouts.items() if layout == conv_layout(device))
    verdict = "the faster" if rates[picked] == max(rates.values()) else "NOT the faster"
    rows.append(f"| layout: the Conv branch runs {picked} on {device.type} | | "
                f"{rates[picked] / min(rates.values()):.2f}x the slower | {verdict} |")
    return rows


def _train(out: Path, device: str, size: int, images: int, epochs: int, resume: bool = False) -> list[dict]:
    """MedMamba-T trained by the project's ``Trainer`` on synthetic two-class images (a bright
    patch marks class 1); its per-epoch history."""
    from torch.utils.data import TensorDataset

    from medmamba.config import load_config
    from medmamba.data import Datasets
    from medmamba.train import Trainer

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, size, size, generator=generator)
    y = torch.arange(images) % 2
    x[y == 1, :, : size // 2, : size // 2] += 1.0
    split = [TensorDataset(x[i::3], y[i::3]) for i in range(3)]
    data = Datasets(*split, class_names=["a", "b"], name="synthetic", checksum="-")
    cfg = load_config(None, ["model.name=medmamba_t", f"data.size={size}", f"train.epochs={epochs}",
                             "train.batch_size=8", f"train.device={device}"])  # (bf16 autocast on a GPU)
    trainer = Trainer(cfg, data, out, progress=False)
    trainer.fit(resume=resume, test=False)
    return trainer.history


def resume_check(device: torch.device, size: int, images: int, epochs: int = 3) -> list[str]:
    """Section 5: a run killed after its first checkpoint and resumed, against an unbroken one."""
    try:
        import medmamba.train  # noqa: F401  (the training loop's own needs: scikit-learn, ...)
    except ImportError as exc:
        return [f"| resume after SIGKILL | Trainer | skipped: {exc} | |"]
    args = [str(device), str(size), str(images), str(epochs)]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        straight = _train(Path(tmp) / "straight", str(device), size, images, epochs)
        killed = Path(tmp) / "killed"
        proc = subprocess.Popen([sys.executable, __file__, "--train-into", str(killed), *args])
        while proc.poll() is None and not (killed / "last.pt").is_file():
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (killed / "last.pt").is_file():
            return [f"| resume after SIGKILL | Trainer | the run ended (exit {proc.returncode}) before a "
                    "checkpoint | |"]
        after = torch.load(killed / "last.pt", weights_only=True, map_location="cpu")["epoch"]
        resumed = _train(killed, str(device), size, images, epochs, resume=True)
    diff = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(straight, resumed))
    same = [a["epoch"] for a in resumed] == [b["epoch"] for b in straight]
    verdict = f"max |Δ train loss| {diff:.2e} over {epochs} epochs" if same else "NOT the same epochs"
    return [f"| resume after SIGKILL ({size} px, {epochs} epochs) | Trainer on {device.type} | killed after "
            f"epoch {after}, resumed | {verdict} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", metavar="SECTIONS", help="comma-separated sections to run (correctness, scan, "
                        "layout, throughput, resume, compiled), e.g. to rerun what a first run had no time for")
    parser.add_argument("--train-into", nargs=5, metavar=("DIR", "DEVICE", "SIZE", "IMAGES", "EPOCHS"),
                        help=argparse.SUPPRESS)  # section 4's run to kill
    args = parser.parse_args()
    # the header names the scan auto picks and why: its one-time warning would land amid the table
    # (or in the output of the run killed in section 4)
    warnings.filterwarnings("ignore", "selective_scan:", RuntimeWarning)
    if args.train_into:
        out, device, size, images, epochs = args.train_into
        _train(Path(out), device, int(size), int(images), int(epochs))
        return
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    steps = 3 if args.quick or not gpu else 10
    where = torch.cuda.get_device_name() if gpu else "CPU (no GPU: a smoke test at small sizes, not a measurement)"
    picked, why = auto_backend(device)
    print(f"torch {torch.__version__}, {where}; scan backends here: {', '.join(backends(device))}; auto picks "
          f"{picked} ({why})")
    print("| check | path | result | |\n|---|---|---|---|")
    sections = {"correctness": lambda: correctness(device),
                "scan": lambda: scan_benchmark(device, 32 if gpu else 1, steps),
                "layout": lambda: conv_layouts(device, 224 if gpu else 64, 64 if gpu else 2, steps),
                "throughput": lambda: throughput(device, 224 if gpu else 64, 64 if gpu else 2, steps),
                "resume": lambda: resume_check(device, 64 if gpu else 16, 384 if gpu else 48),
                # inductor on a GPU; on a CPU the aot_eager backend (the same graphs, no code generation:
                # inductor takes minutes here) as a smoke test
                "compiled": lambda: throughput(device, 224 if gpu else 64, 64 if gpu else 2, steps,
                                               ("medmamba_t", "convnext_tiny"), "inductor" if gpu else "aot_eager")}
    chosen = args.only.split(",") if args.only else list(sections)
    unknown = sorted(set(chosen) - set(sections))
    if unknown:
        parser.error(f"--only: unknown section {', '.join(unknown)}; the sections are {', '.join(sections)}")
    took, failed = [], 0
    for name in chosen:
        section = sections[name]
        start = time.perf_counter()
        try:
            rows = section()
        except Exception as exc:
            rows, failed = [failed_row(name, "", exc)], failed + 1
        for row in rows:
            print(row, flush=True)
        took.append(f"{name} {time.perf_counter() - start:.0f} s")
    print(f"\nsections took: {', '.join(took)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
