"""The training step in a user's own loop: fastvae.VAE against a plain PyTorch VAE, all with Adam(fused=True).

    python benchmarks/user_loop.py [--threads N] [--rounds 7] [--steps 50] [--no-compile]
    python benchmarks/user_loop.py --threads 2 --profile 50   # where fastvae.VAE's step spends its time
    python benchmarks/user_loop.py --threads 2 --no-compile --paths   # every combination of the optional paths

Providers (Burda et al.'s MLP 784-200-200-50, tanh, batches of 100 binarized MNIST images,
or random binary images without --mnist DIR / FASTVAE_MNIST):
  fastvae.VAE      fastvae.VAE(...) stepped by the ten-line loop a user writes (loss, zero_grad,
                   backward, optimizer.step) with torch.optim.Adam(fused=True); with --paths,
                   also once per combination of its optional paths (sparse_input, fused_head,
                   fused_mlp: fastvae/tuning.py), each forced in the configs ("dense": all off)
  plain            benchmarks/plain_vae.py (the canonical PyTorch example) in the same loop
  compile(plain)   torch.compile(plain model) in the same loop
  floor            every GEMM of the same network, forward and backward, dense, back to back
                   (per layer: addmm forward, the weight-gradient mm, and the input-gradient mm
                   for all but the first layer), plus one Adam(fused=True) step over the same
                   parameters: what no implementation of this step can go below on this CPU
The providers run interleaved (one block of steps each per round) so that a change in the
machine's speed hits all of them alike; the table gives the median round of each, its ratios to
the plain model and to the floor (each the median over rounds of the ratio within the round),
and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_vae import PlainVAE, plain_loss  # noqa: E402
from train_compare import DEFAULT_MNIST, cpu_description  # noqa: E402

import fastvae  # noqa: E402
from fastvae import tuning  # noqa: E402
from fastvae.io import data as data_lib  # noqa: E402

BATCH = 100
# (in, out) of every Linear of the network: encoder 784-200-200 and its (mu, logvar) layer,
# decoder 50-200-200-784.
LAYERS = ((784, 200), (200, 200), (200, 100), (50, 200), (200, 200), (200, 784))


def minibatches(count: int = 20, mnist: Path | None = DEFAULT_MNIST) -> list[torch.Tensor]:
    torch.manual_seed(0)
    if mnist is not None and mnist.is_dir():
        images = data_lib.load_dataset(f"mnist:{mnist}", "train").images[: BATCH * count]
    else:
        images = torch.rand(BATCH * count, 1, 28, 28)
    return [torch.bernoulli(images[i * BATCH:(i + 1) * BATCH]) for i in range(count)]


def loop_step(forward_loss, parameters, batches):
    """The loop a user writes, with the optimizer a careful user picks."""
    optimizer = torch.optim.Adam(parameters, lr=1e-3, fused=True)
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(batches)
        loss = forward_loss(batches[state["i"]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def fastvae_step(batches, paths: dict[str, bool] | None = None):
    """fastvae.VAE's step; `paths` (a combination of fastvae.tuning.CONFIGS) fixes its optional
    paths in the configs instead of leaving them to the defaults."""
    torch.manual_seed(0)
    encoder_config, decoder_config = {"hidden": [200, 200]}, {"hidden": [200, 200]}
    if paths is not None:
        encoder_config.update(sparse_input=paths["sparse_input"], fused_mlp=paths["fused_mlp"])
        decoder_config.update(fused_head=paths["fused_head"], fused_mlp=paths["fused_mlp"])
    model = fastvae.VAE((1, 28, 28), latent_dim=50, encoder_config=encoder_config, decoder_config=decoder_config)
    return loop_step(lambda x: model(x).loss, model.parameters(), batches)


def plain_step(batches, compile_model: bool = False):
    torch.manual_seed(0)
    model = PlainVAE()
    forward = torch.compile(model) if compile_model else model

    def loss_of(x):
        recon, mu, logvar = forward(x)
        return plain_loss(recon, x, mu, logvar)

    return loop_step(loss_of, model.parameters(), batches)


def floor_step():
    """The GEMMs of one step and one fused Adam step over parameters of the same shapes."""
    torch.manual_seed(0)
    weights = [torch.randn(n_out, n_in) * 0.05 for n_in, n_out in LAYERS]
    biases = [torch.zeros(n_out) for _, n_out in LAYERS]
    inputs = [torch.rand(BATCH, n_in) for n_in, _ in LAYERS]
    grads_out = [torch.randn(BATCH, n_out) for _, n_out in LAYERS]
    outputs = [torch.empty(BATCH, n_out) for _, n_out in LAYERS]
    grad_w = [torch.empty_like(w) for w in weights]
    grad_in = [torch.empty(BATCH, n_in) for n_in, _ in LAYERS]
    params = [torch.nn.Parameter(t) for t in weights + biases]
    for p, g in zip(params, grad_w + [torch.randn_like(b) for b in biases]):
        p.grad = g
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)

    def step():
        with torch.no_grad():
            for i, (w, b, x) in enumerate(zip(weights, biases, inputs)):
                torch.addmm(b, x, w.t(), out=outputs[i])
            for i, (w, x, g) in enumerate(zip(weights, inputs, grads_out)):
                torch.mm(g.t(), x, out=grad_w[i])
                if i != 0:  # the first layer's input is the data: no gradient wanted
                    torch.mm(g, w, out=grad_in[i])
        optimizer.step()

    return step


def providers(batches, compile_plain: bool, paths: bool = False) -> dict:
    """The providers to interleave; with `paths`, fastvae.VAE once per combination of its
    optional paths (fastvae.tuning.CONFIGS), named after it, besides the defaults."""
    steps = {"fastvae.VAE": fastvae_step(batches)}
    if paths:
        for combination in tuning.CONFIGS:
            steps[f"fastvae.VAE [{tuning.config_name(combination)}]"] = fastvae_step(batches, combination)
    steps["plain"] = plain_step(batches)
    if compile_plain:
        steps["compile(plain)"] = plain_step(batches, compile_model=True)
    steps["floor"] = floor_step()
    return steps


def interleaved_rates(steps: dict, rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    """Examples per second of each provider in each round, the providers taking turns. Each round
    starts one provider later than the one before: a place in the order that runs faster or
    slower is shared out."""
    for step in steps.values():  # warm-up (compiles the compiled model)
        for _ in range(5):
            step()
    rates = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            rates[name].append(steps_per_round * BATCH / (time.perf_counter() - start))
    return rates


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile_table(step, steps: int, rows: int = 25) -> str:
    """torch.profiler over `steps` calls of `step` (after 20 warm-up calls): the ops by self CPU
    time, in microseconds per step, with how often each runs per step.

    The first line gives the minor page faults per step with and without the profiler: its own
    allocations change when glibc hands freed blocks back to the kernel, so under it an op that
    first touches a fresh buffer (a fill, mostly) can carry page faults an unprofiled step does
    not have."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(20):
        step()
    before = _minor_faults()
    for _ in range(steps):
        step()
    unprofiled = (_minor_faults() - before) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        before = _minor_faults()
        for _ in range(steps):
            step()
        profiled = (_minor_faults() - before) / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / steps
    lines = [f"minor page faults per step: {unprofiled:g} unprofiled, {profiled:g} profiled",
             f"self CPU time per step, all ops: {total:,.0f} us",
             "| op | calls per step | self CPU us per step |", "|---|---:|---:|"]
    for e in events[:rows]:
        lines.append(f"| `{e.key}` | {e.count / steps:g} | {e.self_cpu_time_total / steps:,.1f} |")
    return "\n".join(lines)


def round_ratios(rates: dict[str, list[float]], name: str, reference: str) -> float:
    """The median over rounds of name's rate / reference's rate in the same round: the host's
    speed moves between rounds (2x on a shared machine), less between neighbours in one round."""
    return statistics.median(a / b for a, b in zip(rates[name], rates[reference]))


def table(rates: dict[str, list[float]]) -> str:
    lines = ["| step | examples/s (median round) | vs plain | step time / floor |", "|---|---:|---:|---:|"]
    for name, rate in rates.items():
        lines.append(f"| {name} | {statistics.median(rate):,.0f} | {round_ratios(rates, name, 'plain'):.2f}x "
                     f"| {round_ratios(rates, 'floor', name):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's own choice)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=50, help="steps per provider per round")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile(plain)")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST,
                        help="MNIST IDX folder (the default comes from $FASTVAE_MNIST; none: random binary images)")
    parser.add_argument("--paths", action="store_true",
                        help="also fastvae.VAE with each combination of its optional paths forced, in the same run")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="instead of the table: profile STEPS steps of fastvae.VAE and print its ops per step")
    args = parser.parse_args(argv)
    for name, minimum in {"threads": 1, "rounds": 1, "steps": 1, "profile": 0}.items():
        if getattr(args, name) is not None and getattr(args, name) < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.profile:
        print(f"CPU: {cpu_description()}; fastvae.VAE, {args.profile} steps, batch {BATCH}")
        print(profile_table(fastvae_step(minibatches(mnist=args.mnist)), args.profile))
        return
    steps = providers(minibatches(mnist=args.mnist), not args.no_compile, args.paths)
    rates = interleaved_rates(steps, args.rounds, args.steps)
    print(f"CPU: {cpu_description()}; {args.rounds} rounds of {args.steps} steps, batch {BATCH}")
    print(table(rates))


if __name__ == "__main__":
    main()
