"""The devices the op test families run on, as torchvision's test_ops.py does it.

    @pytest.mark.parametrize("device", DEVICES)   # "cpu", and "cuda" where it can run
    @pytest.mark.parametrize("device", CUDA_ONLY)  # CPU-against-CUDA checks

The "cuda" case is skipped, with its reason, unless a GPU is present and the extension
was built with its CUDA kernels; its test ids end in "[cuda...]", so `pytest tests -k cuda`
selects every CUDA test.
"""

import pytest
import torch

import fastvae

CUDA_READY = torch.cuda.is_available() and fastvae.cuda_kernels_built()
_needs_cuda = pytest.mark.skipif(
    not CUDA_READY, reason="needs a CUDA device and the fastvae extension built with its CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=_needs_cuda)]
CUDA_ONLY = [pytest.param("cuda", marks=_needs_cuda)]


def generator_for(device: str, seed: int) -> torch.Generator:
    """A torch.Generator on `device`, seeded."""
    return torch.Generator(device=device).manual_seed(seed)
