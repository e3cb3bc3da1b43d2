"""The IWAE k=50 training step (MLP 784-200-200-50, B=100, Adam) with and without the fused decoder head.

The memory side of the comparison is benchmarks/fused_head.py (and test_bench_memory.py);
this times the same two steps with pytest-benchmark.
"""

import pytest

from fused_head import CONFIGS, batches, make_model, step_fn


@pytest.mark.parametrize("provider", list(CONFIGS))
def test_iwae_training_step(benchmark, provider):
    step = step_fn(make_model(provider), batches())
    for _ in range(2):
        step()
    benchmark.group = "IWAE k=50 train step MLP 784-200-200-50 B=100"
    benchmark.extra_info["examples"] = 100
    benchmark(step)
