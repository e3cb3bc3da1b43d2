"""Shared fixtures, and the hypothesis profiles of tests/test_properties.py.

HYPOTHESIS_PROFILE picks the profile: "default" (few examples, so the whole suite stays
quick) unless set; .ci/run sets "ci", which tries many more.

The test suite needs the compiled extension: without it, the tests marked for it would skip and
the run would pass while testing only the pure-PyTorch fallback. Set FASTVAE_BACKEND=reference to
test the fallback on purpose.
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# The fast paths of fastvae.VAE's mlp networks by the CPU's rules (the default), even where the
# environment asks for a calibration (fastvae/tuning.py): no timing in tests or their subprocesses.
os.environ["FASTVAE_TUNING"] = "rules"

from fastvae.models import likelihoods, objectives, priors, registry  # noqa: E402

# deadline=None: the first call of an op shape can be slow on a loaded machine (allocation,
# thread start-up); a timing limit would fail correct code.
settings.register_profile("default", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def scratch_registries(monkeypatch):
    """Run a test on copies of the architecture registry and the likelihood, objective and prior tables,
    so what it registers (or what plugins it installs register) never leaks into another test."""
    for table in (registry.ENCODERS, registry.DECODERS, likelihoods.LIKELIHOODS, objectives.OBJECTIVES, priors.PRIORS):
        table.names()  # built-ins and installed plugins in place before the copy
        monkeypatch.setattr(table, "_entries", dict(table._entries))
        monkeypatch.setattr(table.group, "loaded", True)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path that plays site-packages; forgets the modules installed there afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def pytest_configure(config):
    import fastvae

    if fastvae.backend() != "cpp" and os.environ.get("FASTVAE_BACKEND", "").lower() != "reference":
        raise pytest.UsageError(
            "fastvae's C++ extension is not built, so the tests of the fused ops would be skipped. "
            f"{fastvae.ops.build_hint()} To test the pure-PyTorch fallback on purpose, set FASTVAE_BACKEND=reference."
        )
