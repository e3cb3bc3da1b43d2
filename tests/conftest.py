"""The test suite needs the compiled extension: without it, the tests marked for it would skip and
the run would pass while testing only the pure-PyTorch fallback. Set FASTVAE_BACKEND=reference to
test the fallback on purpose."""

import os

import pytest


def pytest_configure(config):
    import fastvae

    if fastvae.backend() != "cpp" and os.environ.get("FASTVAE_BACKEND", "").lower() != "reference":
        raise pytest.UsageError(
            "fastvae's C++ extension is not built, so the tests of the fused ops would be skipped. "
            f"{fastvae.ops.build_hint()} To test the pure-PyTorch fallback on purpose, set FASTVAE_BACKEND=reference."
        )
