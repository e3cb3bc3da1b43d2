"""fastvae.sparse_input_linear: a linear layer computed from the nonzeros of its input."""

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import ops
from fastvae.models.architectures.mlp import MLPEncoder

from devices import DEVICES

requires_cpp = pytest.mark.skipif(fastvae.backend() != "cpp", reason="C++ extension not built")

SPARSE, DENSE = 0.13, 0.6  # fractions of nonzeros: below and above the kernel's switch to the dense product


def sample_inputs(device, dtype=torch.float64, density=SPARSE, shape=(13, 37), out=21, bias=True, binary=False):
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=gen) < density
    values = torch.ones(shape) if binary else torch.randn(shape, generator=gen)
    x = (mask * values).to(device, dtype)
    weight = torch.randn(out, shape[-1], generator=gen).to(device, dtype)
    b = torch.randn(out, generator=gen).to(device, dtype) if bias else None
    return x, weight, b


def grads_of(fn, x, weight, bias, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = fn(*inputs) if bias is not None else fn(*inputs, None)
    y.backward(grad_out)
    return y.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [0.0, 0.05, SPARSE, DENSE, 1.0])
@pytest.mark.parametrize("shape, out", [((13, 37), 21), ((2, 3, 37), 64), ((100, 784), 200), ((5, 9), 1),
                                        ((7, 70), 193), ((7, 70), 15)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_linear(device, density, shape, out, bias):
    x, weight, b = sample_inputs(device, density=density, shape=shape, out=out, bias=bias)
    grad_out = torch.randn(*shape[:-1], out, dtype=x.dtype, device=device)
    got, got_grads = grads_of(ops.sparse_input_linear, x, weight, b, grad_out)
    want, want_grads = grads_of(F.linear, x, weight, b, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_binarized_images(device):
    x, weight, b = sample_inputs(device, torch.float32, shape=(100, 784), out=200, binary=True)
    grad_out = torch.randn(100, 200, device=device)
    got, got_grads = grads_of(ops.sparse_input_linear, x, weight, b, grad_out)
    want, want_grads = grads_of(F.linear, x.double(), weight.double(), b.double(), grad_out.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-4)


@requires_cpp
@pytest.mark.parametrize("density, dense_product_runs", [(SPARSE, False), (DENSE, True)])
def test_the_sparse_kernels_run_below_the_density_switch(density, dense_product_runs):
    # Both paths give the same numbers, so the profiler is what tells them apart.
    x, weight, b = sample_inputs("cpu", torch.float32, density=density, shape=(100, 784), out=200)
    weight.requires_grad_()
    with torch.profiler.profile() as prof:
        ops.sparse_input_linear(x, weight, b).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert ({"aten::linear", "aten::addmm"} & names != set()) == dense_product_runs
    assert ("aten::mm" in names) == dense_product_runs


@requires_cpp
def test_results_do_not_depend_on_the_thread_count():
    x, weight, b = sample_inputs("cpu", torch.float32, shape=(300, 784), out=200, binary=True)
    grad_out = torch.randn(300, 200)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(grads_of(ops.sparse_input_linear, x, weight, b, grad_out))
    finally:
        torch.set_num_threads(before)
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_the_dense_product(dtype):
    x, weight, b = sample_inputs("cpu", torch.float32)
    got = ops.sparse_input_linear(x.to(dtype), weight.to(dtype), b.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got, F.linear(x.to(dtype), weight.to(dtype), b.to(dtype)))


@pytest.mark.parametrize("in_features, out_features", [(0, 5), (7, 0)])
def test_empty_features(in_features, out_features):
    x = torch.ones(3, in_features)
    weight = torch.ones(out_features, in_features, requires_grad=True)
    bias = torch.ones(out_features, requires_grad=True)
    y = ops.sparse_input_linear(x, weight, bias)
    assert torch.equal(y, F.linear(x, weight, bias))
    y.sum().backward()
    assert weight.grad.shape == weight.shape and torch.equal(bias.grad, torch.full_like(bias, 3.0))


def test_empty_batch():
    x, weight, b = sample_inputs("cpu", shape=(0, 37))
    weight.requires_grad_()
    y = ops.sparse_input_linear(x, weight, b)
    assert y.shape == (0, 21)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for density in (0.2, DENSE):
        x, weight, b = sample_inputs(device, density=density, shape=(6, 11), out=5)
        inputs = tuple(t.requires_grad_() for t in (x, weight, b))
        assert torch.autograd.gradcheck(ops.sparse_input_linear, inputs)


@requires_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for density in (SPARSE, DENSE):
        x, weight, b = sample_inputs(device, density=density)
        torch.library.opcheck(torch.ops.fastvae.sparse_input_linear.default,
                              (x, weight.requires_grad_(), b.requires_grad_()))
        torch.library.opcheck(torch.ops.fastvae.sparse_input_linear.default, (x, weight, None))


@requires_cpp
def test_torch_compile_fullgraph_with_backward():
    x, weight, b = sample_inputs("cpu", torch.float32, shape=(100, 784), out=200, binary=True)

    def loss(x, weight, b):
        return ops.sparse_input_linear(x, weight, b).tanh().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled(x, w1, b).backward()
    loss(x, w2, b).backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_bad_input_names_the_argument():
    x, weight, b = sample_inputs("cpu")
    with pytest.raises(RuntimeError, match=r"weight must have shape \(out_features, 37\)"):
        ops.sparse_input_linear(x, weight.t(), b)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(21,\)"):
        ops.sparse_input_linear(x, weight, b[:3])
    with pytest.raises(RuntimeError, match="weight has dtype .* but x has dtype .*; they must match"):
        ops.sparse_input_linear(x, weight.float(), b)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        ops.sparse_input_linear(x.long(), weight, b)
    with pytest.raises(RuntimeError, match="x must have shape"):
        ops.sparse_input_linear(x[0, 0], weight, b)
    if fastvae.backend() == "cpp":
        with pytest.raises(RuntimeError, match=r"grad must have the output's shape \[13, 21\]"):
            torch.ops.fastvae.sparse_input_linear_backward(torch.ones(13, 20, dtype=x.dtype), x, weight,
                                                           False, True, True)


def test_mlp_encoder_gives_the_dense_numbers():
    torch.manual_seed(0)
    encoder = MLPEncoder((1, 28, 28), 10, hidden=(32, 16)).double()
    x = (torch.rand(20, 1, 28, 28) < SPARSE).double()
    outputs = []
    for sparse in (True, False):
        encoder.zero_grad()
        encoder.sparse_input = sparse
        mu, logvar = encoder(x)
        (mu.square().sum() + logvar.sum()).backward()
        outputs.append([mu, logvar, *(p.grad.clone() for p in encoder.parameters())])
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert list(encoder.state_dict()) == [f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    with pytest.raises(ValueError, match="sparse_input must be True, False or None"):
        MLPEncoder((784,), 10, sparse_input="yes")


@pytest.mark.parametrize("density", [SPARSE, DENSE])
def test_autocast_leaves_the_dtype_alone(density):
    # Like the other fused ops: computed in the inputs' dtype, on either path, forward and backward.
    x, weight, b = sample_inputs("cpu", torch.float32, density=density)
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.sparse_input_linear(x, weight, b)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, weight, b))
