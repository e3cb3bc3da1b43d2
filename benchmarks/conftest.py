import os
import sys

# providers.py sits beside the benchmarks and is imported by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    """Refuse to time the pure-PyTorch fallback as if it were the fused ops."""
    import pytest

    import fastvae

    if fastvae.backend() != "cpp" and os.environ.get("FASTVAE_BACKEND", "").lower() != "reference":
        raise pytest.UsageError(
            "fastvae's C++ extension is not built: the benchmarks would time the pure-PyTorch fallback "
            f"(or skip). {fastvae.ops.build_hint()} To benchmark the fallback on purpose, set FASTVAE_BACKEND=reference."
        )
