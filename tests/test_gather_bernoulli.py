"""fastvae.ops.gather_bernoulli: rows of a data set binarized in the pass that gathers them."""

import pytest
import torch

import fastvae
from fastvae import ops
from fastvae.ops import reference

from devices import CUDA_ONLY, DEVICES

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")


def sample_inputs(device, dtype=torch.float32, rows=30, shape=(1, 5, 7)):
    probs = torch.rand(rows, *shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    index = torch.tensor([29, 0, 3, 3, 17], device=device)
    return probs, index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 32, 32), (1,), (0,)])
def test_matches_the_reference_stream_bit_for_bit(device, dtype, shape):
    probs, index = sample_inputs(device, dtype, shape=shape)
    got = ops.gather_bernoulli(probs, index, seed=2**62 + 7)
    assert got.shape == (5, *shape) and got.dtype == dtype and got.device == probs.device
    assert torch.equal(got.cpu(), reference.gather_bernoulli(probs.cpu(), index.cpu(), 2**62 + 7))


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_draw_depends_on_seed_and_row_only(device):
    probs, _ = sample_inputs(device)
    whole = ops.gather_bernoulli(probs, torch.arange(30, device=device), seed=3)
    part = ops.gather_bernoulli(probs, torch.tensor([17, 4, 4], device=device), seed=3)
    assert torch.equal(part, whole[[17, 4, 4]])
    assert not torch.equal(ops.gather_bernoulli(probs, torch.arange(30, device=device), seed=4), whole)
    # Every dtype draws the same uniforms, so the same bits.
    assert torch.equal(ops.gather_bernoulli(probs.double(), torch.arange(30, device=device), seed=3), whole.double())


@pytest.mark.parametrize("device", DEVICES)
def test_draws_are_bernoulli_with_the_pixel_as_probability(device):
    p = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 1e-7], device=device).repeat(40_000, 1)
    draws = ops.gather_bernoulli(p, torch.arange(len(p), device=device), seed=1)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(draws.mean(0)[:5], p[0, :5], atol=5e-3, rtol=0)
    assert draws[:, 0].max() == 0 and draws[:, 4].min() == 1
    # Neighbouring pixels and rows are independent draws.
    half = ops.gather_bernoulli(torch.full((20_000, 2), 0.5, device=device), torch.arange(20_000, device=device),
                                seed=2)
    assert abs(float((half[:, 0] * half[:, 1]).mean()) - 0.25) < 0.015
    assert abs(float((half[1:, 0] * half[:-1, 0]).mean()) - 0.25) < 0.015


def test_generator_seed_reproduces_and_advances():
    probs, index = sample_inputs("cpu")
    a = ops.gather_bernoulli(probs, index, generator=torch.Generator().manual_seed(5))
    b = ops.gather_bernoulli(probs, index, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(5)
    first, second = (ops.gather_bernoulli(probs, index, generator=gen) for _ in range(2))
    assert torch.equal(first, a) and not torch.equal(first, second)
    torch.manual_seed(8)
    c = ops.gather_bernoulli(probs, index)
    torch.manual_seed(8)
    assert torch.equal(ops.gather_bernoulli(probs, index), c)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    probs, index = sample_inputs(device)
    with pytest.raises(IndexError, match="index 30 is out of range for probs with 30 rows"):
        ops.gather_bernoulli(probs, torch.tensor([1, 30], device=device), seed=0)
    with pytest.raises(IndexError, match="index -1 is out of range"):
        ops.gather_bernoulli(probs, torch.tensor([-1], device=device), seed=0)
    with pytest.raises(RuntimeError, match="index must be a 1-D int64 tensor"):
        ops.gather_bernoulli(probs, index.int(), seed=0)
    with pytest.raises(RuntimeError, match="probs must be float32 or float64"):
        ops.gather_bernoulli(probs.half(), index, seed=0)
    with pytest.raises(RuntimeError, match="probs must have a row dimension"):
        ops.gather_bernoulli(probs[0, 0, 0, 0], index, seed=0)
    with pytest.raises(ValueError, match="seed must be in"):
        ops.gather_bernoulli(probs, index, seed=-1)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    probs, index = sample_inputs(device)
    torch.library.opcheck(torch.ops.fastvae.gather_bernoulli.default, (probs, index, 12))
    torch.library.opcheck(torch.ops.fastvae.gather_bernoulli.default, (probs.double()[:0], index[:0], 12))


@requires_cpp
def test_torch_compile_fullgraph():
    probs, index = sample_inputs("cpu")
    compiled = torch.compile(lambda p, i: ops.gather_bernoulli(p, i, seed=9).sum(0), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(probs, index), ops.gather_bernoulli(probs, index, seed=9).sum(0))


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_and_cpu_draw_the_same_bits(device):
    probs, index = sample_inputs("cpu", shape=(3, 17, 19))
    got = ops.gather_bernoulli(probs.to(device), index.to(device), seed=77)
    assert torch.equal(got.cpu(), ops.gather_bernoulli(probs, index, seed=77))
