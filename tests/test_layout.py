"""The package in layers (fastvae.ops, .models, .training, .io) with the flat layout's module names kept."""

import importlib
import subprocess
import sys

import pytest

import fastvae
from fastvae import _compat


@pytest.mark.parametrize("old, new", sorted(_compat.MOVED.items()))
def test_an_old_module_name_is_the_moved_module(old, new):
    assert importlib.import_module(f"fastvae.{old}") is importlib.import_module(new)
    assert getattr(fastvae, old) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new  # the alias did not overwrite the real spec


def test_a_submodule_under_an_old_name_is_loaded_once():
    from fastvae.architectures.mlp import MLPEncoder
    from fastvae.models.architectures import mlp

    assert MLPEncoder is mlp.MLPEncoder
    assert "fastvae.architectures.mlp" not in sys.modules or sys.modules["fastvae.architectures.mlp"] is mlp


def test_an_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        fastvae.no_such_module  # noqa: B018


def test_old_names_import_first_in_a_fresh_process():
    # What a plugin written against the flat layout does: its first import is an old name.
    code = ("from fastvae.registry import Encoder, register_encoder\n"
            "from fastvae.likelihoods import Likelihood\n"
            "from fastvae.train import train\n"
            "import fastvae.models.registry as r\n"
            "assert Encoder is r.Encoder\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_the_public_names_stay_on_top():
    for name in ("VAE", "load", "latent_terms", "gaussian_kl", "fused_head_log_likelihood", "backend"):
        assert callable(getattr(fastvae, name)), name
