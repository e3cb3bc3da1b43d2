"""The training step in a user's own loop, all with Adam(fused=True): fastvae.VAE, the plain
PyTorch VAE, torch.compile of it, and the step's GEMM + Adam floor (see user_loop.py, which
runs the same providers interleaved and prints the table with the CPU)."""

import pytest

import user_loop

PROVIDERS = {
    "fastvae.VAE": user_loop.fastvae_step,
    "plain": user_loop.plain_step,
    "compile(plain)": lambda batches: user_loop.plain_step(batches, compile_model=True),
    "floor": lambda batches: user_loop.floor_step(),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_user_loop_step(benchmark, provider):
    step = PROVIDERS[provider](user_loop.minibatches())
    for _ in range(5):  # warm-up: the thread pool, and the compiled model's compilation
        step()
    benchmark.group = "user loop step, Adam(fused=True), MLP 784-200-200-50 B=100"
    benchmark.extra_info["examples"] = user_loop.BATCH
    benchmark(step)
