import os
import sys

# providers.py sits beside the benchmarks and is imported by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every saved result names the CPU and the ISA level fastvae's kernels ran at (FASTVAE_CPU_LEVEL)."""
    from fastvae.bench import machine_description

    machine_info["fastvae"] = machine_description()
