"""`fastvae info` and `fastvae bench` end to end, in a subprocess as a user runs them."""

import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastvae", *args], capture_output=True, text=True, timeout=300)


def test_info_reports_backend_and_build():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert "backend: cpp" in result.stdout or "backend: reference" in result.stdout
    assert "torch" in result.stdout
    assert "CPU: " in result.stdout and "fastvae kernels " in result.stdout


def test_bench_prints_ratios():
    result = run_cli("bench", "--seconds", "0.05")
    assert result.returncode == 0, result.stderr
    assert "latent fwd+bwd B=128 D=32" in result.stdout and "x" in result.stdout
    assert "latent fwd vs normal_ B=4096 D=256" in result.stdout
    assert "CPU: " in result.stdout and "fastvae kernels " in result.stdout  # the machine every number depends on


def test_bad_arguments_give_one_line_and_nonzero_exit():
    result = run_cli("bench", "--seconds", "many")
    assert result.returncode == 2
    assert "invalid float value" in result.stderr and "Traceback" not in result.stderr
    assert run_cli("no-such-command").returncode == 2
