"""The measuring half of benchmarks/gpu/run.sh: op benchmarks, MNIST training, one markdown table.

    python benchmarks/gpu/check.py --data benchmarks/gpu/data/mnist [--tests-summary FILE] [--out FILE]
    python benchmarks/gpu/check.py --device cpu --tiny      # the CPU smoke run the tests use

On the GPU it times, interleaved and with CUDA events:
  - the latent op (fwd, fwd+bwd) and the Bernoulli/Gaussian likelihoods as eager PyTorch,
    torch.compile and fastvae, with each op's unavoidable traffic in GB/s beside a
    device-to-device copy moving the same number of bytes;
  - the Burda MLP VAE (784-200-200-50, tanh, batch 100, Adam) for a fixed number of steps as
    eager PyTorch, as fastvae, and as fastvae with the whole step captured in one CUDA graph
    (torch.cuda.graph), checking that the captured step's noise differs at every replay; each
    fastvae case also with both networks as fused stacks (fastvae.nn.FusedMLP, "fused-mlp").
The results, the floors of issue 15 and the CUDA test summary go into ONE markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import fastvae  # noqa: E402
from fastvae import tuning  # noqa: E402
from fastvae.io import data as data_lib  # noqa: E402
from fastvae.bench import eager_bernoulli, eager_latent, fused_bernoulli, run_mode  # noqa: E402
from fastvae.models.vae import VAE  # noqa: E402

FLOAT_BYTES = 4
LOG_2PI = math.log(2 * math.pi)


@dataclass
class Sizes:
    """What the run measures; --tiny shrinks everything for the CPU smoke run."""

    latent: list = field(default_factory=lambda: [(128, 32), (65536, 256)])
    bandwidth_latent: tuple = (65536, 256)  # the size of the bandwidth floor
    speedup_latent: tuple = (128, 32)  # the size of the fwd+bwd >= 3x eager floor
    likelihood: list = field(default_factory=lambda: [(1024, 784)])
    repeats: int = 7  # timed repeats per case (the median is reported)
    calls: int = 50  # calls per repeat
    train_steps: int = 300
    train_batch: int = 100
    compile: bool = True
    compile_until: float = math.inf  # perf_counter time after which torch.compile is left out


TINY = Sizes(latent=[(8, 4)], bandwidth_latent=(8, 4), speedup_latent=(8, 4), likelihood=[(4, 16)], repeats=2,
             calls=2, train_steps=6, train_batch=10, compile=False)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
class Timer:
    """Seconds per call of fn: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, calls: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls


def interleaved_medians(cases: dict, timer: Timer, sizes: Sizes) -> dict:
    """Median seconds per call of each case, the cases taking turns so drifts hit all alike."""
    for fn in cases.values():  # warm-up (and compilation) outside the timing
        for _ in range(3):
            fn()
    samples = {name: [] for name in cases}
    for _ in range(sizes.repeats):
        for name, fn in cases.items():
            samples[name].append(timer(fn, sizes.calls))
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------
# Op benchmarks
# ---------------------------------------------------------------------------
def eager_gaussian(mean, x):
    return torch.sum(-0.5 * (x - mean).pow(2) - 0.5 * LOG_2PI, dim=-1)


def fused_gaussian(mean, x):
    return fastvae.gaussian_log_likelihood(mean, x, 0.0)


def latent_bytes(batch, dim, mode):
    forward = 3 * batch * dim * FLOAT_BYTES  # mu, logvar in; z out
    backward = 6 * batch * dim * FLOAT_BYTES  # z, grad_z, mu, logvar in; two grads out
    return forward + (backward if mode != "forward" else 0)


def likelihood_bytes(batch, pixels, mode):
    traffic = 2 * batch * pixels * FLOAT_BYTES  # params, x in
    return traffic if mode == "forward" else 2 * traffic + batch * pixels * FLOAT_BYTES  # + grad out


def copy_seconds(num_bytes: int, device, timer: Timer, sizes: Sizes) -> float:
    """A device-to-device copy moving num_bytes (half read, half written)."""
    numel = max(1, num_bytes // (2 * FLOAT_BYTES))
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    return interleaved_medians({"copy": lambda: dst.copy_(src)}, timer, sizes)["copy"]


_compiled = {}


def compiled(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def provider_functions(eager, fused, sizes: Sizes) -> dict:
    functions = {"eager": eager}
    if sizes.compile and time.perf_counter() < sizes.compile_until:
        functions["compile"] = lambda *args: compiled(eager)(*args)
    functions["fastvae"] = fused
    return functions


def bench_ops(device, timer: Timer, sizes: Sizes) -> list[dict]:
    rows = []
    for batch, dim in sizes.latent:
        torch.manual_seed(0)
        for mode in ("forward", "forward+backward"):
            grad = mode != "forward"
            mu = torch.randn(batch, dim, device=device, requires_grad=grad)
            logvar = (0.1 * torch.randn(batch, dim, device=device)).requires_grad_(grad)
            functions = provider_functions(eager_latent, fastvae.latent_terms, sizes)
            cases = {name: run_mode(fn, (mu, logvar), mode) for name, fn in functions.items()}
            rows.append(op_row(f"latent {mode}", f"B={batch} D={dim}", interleaved_medians(cases, timer, sizes),
                               latent_bytes(batch, dim, mode), device, timer, sizes))
    for name, eager, fused in (("bernoulli", eager_bernoulli, fused_bernoulli),
                               ("gaussian", eager_gaussian, fused_gaussian)):
        for batch, pixels in sizes.likelihood:
            torch.manual_seed(0)
            for mode in ("forward", "forward+backward"):
                params = torch.randn(batch, pixels, device=device, requires_grad=mode != "forward")
                x = torch.bernoulli(torch.full((batch, pixels), 0.3, device=device))
                cases = {p: run_mode(fn, (params, x), mode) for p, fn in provider_functions(eager, fused, sizes).items()}
                rows.append(op_row(f"{name} {mode}", f"B={batch} P={pixels}",
                                   interleaved_medians(cases, timer, sizes), likelihood_bytes(batch, pixels, mode),
                                   device, timer, sizes))
    return rows


def op_row(op, size, seconds, num_bytes, device, timer, sizes) -> dict:
    copy = copy_seconds(num_bytes, device, timer, sizes)
    fused = seconds["fastvae"]
    return {
        "section": "op", "case": f"{op} {size}",
        "eager_us": seconds["eager"] * 1e6, "compile_us": seconds.get("compile", math.nan) * 1e6,
        "fastvae_us": fused * 1e6, "speedup": seconds["eager"] / fused,
        "gbps": num_bytes / fused / 1e9, "copy_fraction": copy / fused,
    }


# ---------------------------------------------------------------------------
# MNIST training: eager PyTorch, fastvae, fastvae in one CUDA graph
# ---------------------------------------------------------------------------
def burda_mlp(sizes_in, sizes_out):
    layers = []
    for i, (a, b) in enumerate(zip(sizes_in, sizes_out)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes_in) - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class EagerBurdaVAE(nn.Module):
    """784-200-200-50 tanh with a Bernoulli decoder, every term in plain PyTorch."""

    def __init__(self, latent=50):
        super().__init__()
        self.latent = latent
        self.encoder = burda_mlp([784, 200, 200], [200, 200, 2 * latent])
        self.decoder = burda_mlp([latent, 200, 200], [200, 200, 784])

    def loss(self, x):
        """The training loss and the step's noise eps (for the check that it changes every step)."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z, kl, _, _ = eager_latent(mu, logvar)
        rec = eager_bernoulli(self.decoder(z), x)
        return -(rec - kl).mean(), noise_of(z, mu, logvar)


def noise_of(z, mu, logvar):
    """eps = (z - mu) / std, recovered to float rounding."""
    return ((z - mu) * torch.exp(-0.5 * logvar)).detach()


class FastvaeBurdaVAE(nn.Module):
    def __init__(self, fused_mlp: bool):
        super().__init__()
        # The rules of fastvae/tuning.py, not a calibration: it times the CPU, not this GPU.
        with tuning.rules_only():
            config = {"hidden": [200, 200], "fused_mlp": fused_mlp}
            self.vae = VAE((784,), latent_dim=50, encoder="mlp", encoder_config=config, decoder_config=config)

    def loss(self, x):
        out = self.vae(x)
        return out.loss, noise_of(out.z[0], out.mu, out.logvar)


def load_images(data_dir: Path | None, device, count: int) -> tuple[torch.Tensor, str]:
    """count MNIST training images (784 floats in [0, 1]) on the device; random ones without data."""
    if data_dir is not None:
        images = data_lib.load_dataset(f"mnist:{data_dir}", "train").images[:count]
        source = f"MNIST ({data_dir})"
    else:
        images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        source = "random images (no --data)"
    return images.reshape(len(images), 784).to(device), source


def train(kind: str, images, device, sizes: Sizes, timer: Timer) -> dict:
    """Trains one model for sizes.train_steps steps; returns time per step and the noise check."""
    torch.manual_seed(0)
    model = (EagerBurdaVAE() if kind == "eager" else FastvaeBurdaVAE("fused-mlp" in kind)).to(device)
    capture = kind.endswith("-graph")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=capture)
    batch = sizes.train_batch
    count = len(images) // batch * batch
    static_x = torch.empty(batch, 784, device=device)

    def step():
        x = torch.bernoulli(static_x)  # dynamic binarization, drawn in the step (graph-safe too)
        loss, eps = model.loss(x)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        return loss, eps

    def feed(i):
        start = (i * batch) % count
        static_x.copy_(images[start:start + batch])

    run = step
    if capture:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for i in range(3):
                feed(i)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss, static_eps = step()

        def run():
            graph.replay()
            return static_loss, static_eps
    else:
        for i in range(3):
            feed(i)
            step()

    losses, noise_changed, previous = [], [], None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    for i in range(sizes.train_steps):
        feed(i)
        loss, eps = run()
        if i < 3:  # the noise check: consecutive (replayed) steps draw different eps (the same
            # eps, recovered from other mu and logvar, would differ by float rounding only)
            noise_changed.append(previous is None or (eps - previous).abs().max().item() > 1e-2)
            previous = eps.clone()
        if i >= sizes.train_steps - 50:
            losses.append(loss.detach().clone())
    sync()
    seconds = (time.perf_counter() - begin) / sizes.train_steps
    return {"kind": kind, "step_us": seconds * 1e6, "examples_per_s": batch / seconds,
            "final_loss": torch.stack(losses).mean().item(), "noise_fresh": all(noise_changed)}


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------
def fmt(value, spec=".1f"):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def status(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(header: dict, op_rows, train_rows, tests: str, sizes: Sizes) -> str:
    lines = [f"GPU check: {header['device']}; torch {header['torch']} (CUDA {header['cuda']}); "
             f"fastvae backend {header['backend']}, CUDA kernels {header['kernels']}; {header['when']}; "
             f"data: {header['data']}", "",
             "| section | case | eager us | compile us | fastvae us | fastvae vs eager | fastvae GB/s "
             "| vs D2D copy | floor / check |",
             "|---|---|---|---|---|---|---|---|---|"]
    if tests != "not run":
        passed = "passed" in tests and not any(word in tests for word in ("failed", "error", "timed out"))
        lines.append(f"| tests | {tests} | | | | | | | every CUDA test passes: {status(passed)} |")
    else:
        lines.append("| tests | not run | | | | | | | |")
    band = "{} B={} D={}".format("latent forward", *sizes.bandwidth_latent)
    speed = "{} B={} D={}".format("latent forward+backward", *sizes.speedup_latent)
    for r in op_rows:
        floor = ""
        if r["case"] == band:
            floor = f"fwd >= 60% of copy bandwidth: {status(r['copy_fraction'] >= 0.6)}"
        elif r["case"] == speed:
            floor = f"fwd+bwd >= 3x eager: {status(r['speedup'] >= 3)}"
        lines.append(f"| op | {r['case']} | {fmt(r['eager_us'])} | {fmt(r['compile_us'])} | {fmt(r['fastvae_us'])} "
                     f"| {r['speedup']:.2f}x | {fmt(r['gbps'])} | {100 * r['copy_fraction']:.0f}% | {floor} |")
    eager = next(r for r in train_rows if r["kind"] == "eager")
    for r in train_rows:
        ratio = eager["step_us"] / r["step_us"]
        check = f"final loss {r['final_loss']:.2f}"
        if r["kind"] == "fastvae-graph":  # the floor is the default model's
            check += (f"; >= 2x eager: {status(ratio >= 2)}; noise fresh at every replay: "
                      f"{status(r['noise_fresh'])}")
        case = f"MLP 784-200-200-50 tanh B={sizes.train_batch}, {sizes.train_steps} steps: {r['kind']}"
        lines.append(f"| train | {case} | {fmt(eager['step_us'])} | | {fmt(r['step_us'])} | {ratio:.2f}x "
                     f"| {r['examples_per_s']:.0f} ex/s | | {check} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the real run) or cpu (smoke run)")
    parser.add_argument("--data", type=Path, default=None, help="folder with the MNIST IDX .gz files")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, no torch.compile: a smoke run")
    parser.add_argument("--tests-summary", type=Path, default=None, help="file with pytest's summary line")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: torch.compile cases are left out after half of it")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("check.py: no CUDA device visible to torch", file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"check.py: --data {args.data} is not a folder (run benchmarks/gpu/run.sh --prepare first)",
              file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else Sizes()
    if args.budget is not None:
        sizes.compile_until = time.perf_counter() + args.budget / 2
    if os.environ.get("FASTVAE_GPU_COMPILE") == "0":
        sizes.compile = False
    timer = Timer(device)
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({device})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "backend": fastvae.backend(),
        "kernels": "built" if fastvae.cuda_kernels_built() else "not built",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    tests = args.tests_summary.read_text().strip() if args.tests_summary else "not run"
    started = time.perf_counter()
    op_rows = bench_ops(device, timer, sizes)
    print(f"check.py: op benchmarks took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    images, header["data"] = load_images(args.data, device, sizes.train_batch * max(10, sizes.train_steps))
    kinds = ["eager", "fastvae", "fastvae-fused-mlp"]
    if device.type == "cuda":
        kinds += ["fastvae-graph", "fastvae-fused-mlp-graph"]
    train_rows = [train(kind, images, device, sizes, timer) for kind in kinds]
    text = table(header, op_rows, train_rows, tests, sizes)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
