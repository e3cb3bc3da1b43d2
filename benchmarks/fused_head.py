"""The fused decoder head on the IWAE k=50 training step: memory and time, with and without it, in one run.

    python benchmarks/fused_head.py [--rounds 7] [--steps 10]     # prints the markdown tables

Model: the Burda et al. MLP (784-200-200-50, tanh), batch 100, IWAE with k = L = 50 samples,
Bernoulli likelihood, Adam; every configuration starts from the same weights and sees the same
batches. The configurations (CONFIGS) switch the mlp decoder's two memory savers:
- fused_head=False: the decoder's output layer gives the (50, 100, 784) logits and the
  likelihood op scores them, instead of the fused head op;
- recompute_hidden=False: autograd keeps the first hidden layer's (5000, 200) output, instead
  of the backward recomputing it.

Memory, for one forward+backward:
- saved for backward: bytes of the tensors autograd keeps from the forward for the backward
  (torch.autograd.graph.saved_tensors_hooks, each storage once), parameters not counted
  (they exist anyway), and the part that is the decoder head's (the output layer and the
  likelihood: what the fused op replaces).
- peak: the highest total of live tensors allocated during forward+backward (CPU allocator
  events of torch.profiler), parameters and batch excluded; this includes the gradient of
  the logits that the unfused backward allocates.
Time: median step time (forward, backward, Adam) of each, the two measured in alternating
rounds so that the shared machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from fastvae import ops
from fastvae.models.vae import VAE

sys.path.insert(0, str(Path(__file__).parent))
from memory import saved_bytes  # noqa: E402

BATCH, SAMPLES, LATENT, HIDDEN = 100, 50, 50, [200, 200]


# name -> the mlp decoder's switches; "fused" is fastvae's default, "unfused" the same model without the head.
CONFIGS = {
    "fused": {},
    "unfused": {"fused_head": False},
    "fused, hidden kept": {"recompute_hidden": False},
    "unfused, hidden kept": {"fused_head": False, "recompute_hidden": False},
}


def make_model(name: str) -> VAE:
    torch.manual_seed(0)
    return VAE((1, 28, 28), LATENT, "mlp", encoder_config={"hidden": HIDDEN},
               decoder_config={"hidden": HIDDEN, **CONFIGS[name]})


def batches(count: int = 10) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.bernoulli(torch.full((BATCH, 1, 28, 28), 0.13), generator=gen) for _ in range(count)]


def loss_of(model: VAE, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model(x, num_samples=SAMPLES, objective="iwae", generator=gen).loss


def activation_bytes_saved(model: VAE, x: torch.Tensor) -> int:
    """Bytes saved for backward by one forward, parameters' storages excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, x)
    return sum(storages.values())


def head_bytes_saved(model: VAE, x: torch.Tensor) -> int:
    """Bytes the decoder head alone saves for backward: output layer + likelihood, or the fused op."""
    torch.manual_seed(0)
    z = torch.randn(SAMPLES, BATCH, LATENT)
    decoder = model.decoder
    h = decoder.hidden(z.reshape(-1, LATENT)).reshape(SAMPLES, BATCH, -1).detach().requires_grad_()
    layer = decoder.output_layer
    flat_x = x.reshape(BATCH, -1)

    def fused(h):
        return ops.fused_head_log_likelihood(h, layer.weight, layer.bias, flat_x, "bernoulli", precompute_grads=False)

    def unfused(h):
        return ops.bernoulli_log_likelihood(layer(h), flat_x)

    return saved_bytes(fused if decoder.fused_head else unfused, h)


def peak_bytes(model: VAE, x: torch.Tensor) -> int:
    """Peak of live tensor bytes allocated during one forward+backward (profiler allocator events)."""
    for p in model.parameters():  # parameter gradients allocated beforehand: the same for both, not the point
        p.grad = torch.zeros_like(p)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_of(model, x).backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak


def step_fn(model: VAE, data: list[torch.Tensor]):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"i": 0}

    def step():
        x = data[state["i"] % len(data)]
        state["i"] += 1
        loss = loss_of(model, x, state["i"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_times(rounds: int, steps: int) -> dict[str, list[float]]:
    data = batches()
    runs = {name: step_fn(make_model(name), data) for name in CONFIGS}
    for step in runs.values():
        for _ in range(3):
            step()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, step in runs.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times


def machine() -> str:
    """CPU model (from /proc/cpuinfo where there is one) and the ISA ATen dispatches to."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    x = batches(1)[0]
    memory = {}
    for name in CONFIGS:
        model = make_model(name)
        memory[name] = (activation_bytes_saved(model, x), head_bytes_saved(model, x), peak_bytes(model, x))
    times = step_times(args.rounds, args.steps)
    print(f"Machine: {machine()}; torch {torch.__version__}; {torch.get_num_threads()} threads\n")
    print("IWAE k=50 training step, MLP 784-200-200-50 tanh, B=100, float32\n")
    print("| decoder | saved for backward (MiB) | of which the head (MiB) | peak during fwd+bwd (MiB) "
          "| step median (ms) |")
    print("|---|---:|---:|---:|---:|")
    mib = 2**20
    for name in CONFIGS:
        saved, head, peak = memory[name]
        print(f"| {name} | {saved / mib:.2f} | {head / mib:.2f} | {peak / mib:.2f} | "
              f"{1e3 * statistics.median(times[name]):.2f} |")
    for baseline in ("unfused", "unfused, hidden kept"):  # the same model without the head; the step before either saver
        ratio = [memory[baseline][i] / memory["fused"][i] for i in range(3)]
        speed = statistics.median(times[baseline]) / statistics.median(times["fused"])
        print(f"| {baseline} / fused | {ratio[0]:.2f}x | {ratio[1]:.2f}x | {ratio[2]:.2f}x | {speed:.2f}x |")


if __name__ == "__main__":
    main()
