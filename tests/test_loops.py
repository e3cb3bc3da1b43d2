"""docs/loops.md: fastvae.VAE in a plain PyTorch loop and in a Lightning module, run as the page
writes them (a few epochs on the embedded 8x8 digits, CPU): the loss falls, and the Lightning
checkpoint loads back into a fastvae.VAE."""

import pytest
import torch

import fastvae
from docs_helpers import ROOT, run_python_blocks

PAGE = ROOT / "docs" / "loops.md"


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The namespace the page's examples leave behind, run in a temporary folder."""
    folder = tmp_path_factory.mktemp("loops")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        namespace = run_python_blocks(PAGE)
    namespace["folder"] = folder
    return namespace


def test_the_plain_loop_lowers_the_loss(examples):
    losses = torch.tensor(examples["losses"])
    assert len(losses) >= 40
    assert losses[-10:].mean() < losses[:10].mean() - 5  # nats per example


def test_the_lightning_module_raises_the_validation_elbo(examples):
    assert examples["trainer"].global_step >= 40
    assert examples["val_after"] > examples["val_before"] + 5


def test_the_lightning_checkpoint_loads_back_into_a_vae(examples):
    trained = examples["trainer"].lightning_module.vae
    exported = fastvae.load(examples["folder"] / "runs" / "digits-vae")
    for loaded in (examples["vae"], examples["plain"], exported):
        assert type(loaded) is fastvae.VAE
        state = loaded.state_dict()
        assert state.keys() == trained.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
