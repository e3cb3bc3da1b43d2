"""benchmarks/gpu/run.sh, the prepared GPU check: what of it can run without a GPU.

Without a GPU it must stop at once, saying why; its --prepare step must copy the MNIST files
into the folder that travels with the working tree; its python half (check.py) must produce
the table, here on the CPU with tiny sizes (--dry-run).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
HAS_GPU = shutil.which("nvidia-smi") is not None or any(Path("/dev").glob("nvidia[0-9]*"))


def run_sh(*args, env=None, timeout=600):
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)


@pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU")
def test_without_a_gpu_it_stops_at_once_with_a_clear_message():
    built = {p: p.stat().st_mtime_ns for p in (REPO / "fastvae").glob("_C*.so")}
    start = time.perf_counter()
    result = run_sh()
    assert result.returncode == 2, result.stderr
    assert "no NVIDIA GPU" in result.stderr and "stopping" in result.stderr
    assert time.perf_counter() - start < 10
    # It stopped before the build stage, which replaces the in-place extension.
    assert {p: p.stat().st_mtime_ns for p in (REPO / "fastvae").glob("_C*.so")} == built


def test_prepare_copies_mnist_into_the_folder_that_travels(tmp_path):
    source = tmp_path / "mnist"
    source.mkdir()
    for name in MNIST_FILES:
        (source / name).write_bytes(name.encode())
    target = tmp_path / "carried"
    result = run_sh("--prepare", str(source), env={"FASTVAE_GPU_DATA": str(target)})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(MNIST_FILES)
    assert (target / MNIST_FILES[0]).read_bytes() == MNIST_FILES[0].encode()
    (source / MNIST_FILES[-1]).unlink()
    result = run_sh("--prepare", str(source), env={"FASTVAE_GPU_DATA": str(tmp_path / "other")})
    assert result.returncode == 1 and f"has no {MNIST_FILES[-1]}" in result.stderr


def test_the_data_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "benchmarks/gpu/data/mnist/train-images-idx3-ubyte.gz"],
                            cwd=REPO)
    assert result.returncode == 0


def test_unknown_argument_is_refused():
    result = run_sh("--bogus")
    assert result.returncode == 1 and "unknown argument --bogus" in result.stderr


def test_dry_run_writes_the_table_on_the_cpu(tmp_path):
    result = run_sh("--dry-run", env={"OUT": str(tmp_path), "FASTVAE_GPU_DATA": str(tmp_path / "no-data")})
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in result.stdout
    assert table.startswith("GPU check: CPU (cpu); torch ")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| section | case | eager us | compile us | fastvae us |")
    cases = [row.split(" | ")[1] for row in rows[2:]]
    for op in ("latent forward", "latent forward+backward", "bernoulli forward", "bernoulli forward+backward",
               "gaussian forward", "gaussian forward+backward"):
        assert any(case.startswith(op + " B=") for case in cases), (op, cases)
    assert any(case.endswith("steps: eager") for case in cases)
    assert any(case.endswith("steps: fastvae") for case in cases)
    assert "fwd >= 60% of copy bandwidth" in table and "fwd+bwd >= 3x eager" in table
