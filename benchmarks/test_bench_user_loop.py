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


def test_profile_table_lists_the_step_ops():
    table = user_loop.profile_table(user_loop.fastvae_step(user_loop.minibatches(count=2)), steps=2, rows=5)
    lines = table.splitlines()
    assert lines[0].startswith("minor page faults per step:") and "profiled" in lines[0]
    assert len(lines) == 4 + 5 and any("aten::mm" in line or "aten::addmm" in line for line in lines)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--rounds", "0"], ["--profile", "-1"], ["--threads", "0"]])
def test_bad_counts_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        user_loop.main(argv)
    assert exit_info.value.code == 2
    assert f"{argv[0]} must be at least" in capsys.readouterr().err


def test_paths_add_one_provider_per_combination():
    steps = user_loop.providers(user_loop.minibatches(count=2), compile_plain=False, paths=True)
    names = [n for n in steps if n.startswith("fastvae.VAE [")]
    assert len(names) == len(user_loop.tuning.CONFIGS) and "fastvae.VAE [dense]" in names
    rates = user_loop.interleaved_rates({n: steps[n] for n in names[:2]}, rounds=2, steps_per_round=1)
    assert all(len(r) == 2 and min(r) > 0 for r in rates.values())


def test_ratios_are_taken_within_each_round():
    # the host twice as fast in round 2: within-round ratios stay 2x, the medians' ratio would not
    rates = {"fastvae.VAE": [2.0, 4.0, 2.2], "plain": [1.0, 2.0, 1.1], "floor": [4.0, 8.0, 4.4]}
    assert user_loop.round_ratios(rates, "fastvae.VAE", "plain") == pytest.approx(2.0)
    lines = user_loop.table(rates).splitlines()
    assert "| fastvae.VAE | 2 | 2.00x | 2.00x |" in lines
