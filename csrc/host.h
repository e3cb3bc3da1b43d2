// host.h: the host side every backend shares, so that cpu/ and cuda/ only launch.
//
// For each op: validate the arguments (checks.h), convert inputs to the compute
// dtype (float32 for half and bfloat16, else the input dtype) and make them
// contiguous, allocate the outputs, and describe all of it to the kernels as a
// plain struct of pointers and sizes. `result()` converts outputs back.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "fastvae.h"

namespace fastvae {

// t in `dtype`. Tensor::to returns t itself when the dtype already matches, but
// only after a trip through the dispatcher: small latent layers feel that.
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) { return as_dtype(t, dtype).contiguous(); }

inline c10::optional<at::Tensor> contiguous_as(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return c10::nullopt;
  return contiguous_as(*t, dtype);
}

template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* defined_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Incoming gradients are not covered by checks.h; a pointer to memory on another
// device must never reach a kernel.
inline void check_on_device(const c10::optional<at::Tensor>& t, const at::Tensor& ref, const char* name,
                            const char* ref_name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == ref.device(), "fastvae: ", name, " is on ", t->device(), " but ", ref_name, " is on ",
              ref.device(), "; they must be on the same device");
}

// ---------------------------------------------------------------------------
// Latent op
// ---------------------------------------------------------------------------
template <typename T>
struct LatentForwardArgs {
  const T* mu;
  const T* logvar;
  const T* eps;  // nullptr: draw from (seed, offset)
  T* z;
  T* kl;
  T* log_q;
  T* log_p;
  int64_t samples, batch, dim;
  uint64_t seed, offset;
  int64_t row_offset;  // global index of this batch's first example (data-parallel shards)
};

struct LatentForwardIO {
  at::ScalarType input_dtype, dtype;
  at::Tensor mu, logvar;
  c10::optional<at::Tensor> eps;
  at::Tensor z, kl, log_q, log_p;
  int64_t samples, batch, dim;
  uint64_t seed, offset;
  int64_t row_offset;

  template <typename T>
  LatentForwardArgs<T> args() const {
    return {mu.data_ptr<T>(),    logvar.data_ptr<T>(), optional_ptr<T>(eps), z.data_ptr<T>(),
            kl.data_ptr<T>(),    log_q.data_ptr<T>(),  log_p.data_ptr<T>(),  samples,
            batch,               dim,                  seed,                 offset,
            row_offset};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result() const {
    return {as_dtype(z, input_dtype), kl, log_q, log_p};
  }
};

inline LatentForwardIO prepare_latent_forward(const at::Tensor& mu, const at::Tensor& logvar,
                                              const c10::optional<at::Tensor>& eps,
                                              c10::optional<int64_t> num_samples, int64_t seed, int64_t offset,
                                              int64_t row_offset) {
  check_latent_inputs(mu, logvar, eps, num_samples);
  TORCH_CHECK(row_offset >= 0, "fastvae: row_offset must be >= 0, got ", row_offset);
  LatentForwardIO io;
  io.input_dtype = mu.scalar_type();
  io.dtype = sum_dtype(io.input_dtype);
  io.mu = contiguous_as(mu, io.dtype);
  io.logvar = contiguous_as(logvar, io.dtype);
  io.eps = contiguous_as(eps, io.dtype);
  io.samples = num_samples.value_or(1);
  io.batch = mu.size(0);
  io.dim = mu.size(1);
  const auto z_shape = latent_z_shape(mu, num_samples);
  const auto row_shape = at::IntArrayRef(z_shape).slice(0, z_shape.size() - 1);
  io.z = at::empty(z_shape, io.mu.options());
  io.kl = at::empty({io.batch}, io.mu.options());
  io.log_q = at::empty(row_shape, io.mu.options());
  io.log_p = at::empty(row_shape, io.mu.options());
  io.seed = static_cast<uint64_t>(seed);
  io.offset = static_cast<uint64_t>(offset);
  io.row_offset = row_offset;
  return io;
}

template <typename T>
struct LatentBackwardArgs {
  const T* grad_z;      // (L,B,D) or nullptr (zero)
  const T* grad_kl;     // (B) or nullptr
  const T* grad_log_q;  // (L,B) or nullptr
  const T* grad_log_p;  // (L,B) or nullptr
  const T* z;
  const T* mu;
  const T* logvar;
  T* grad_mu;
  T* grad_logvar;
  int64_t samples, batch, dim;
  bool stl;  // sticking the landing: log_q's gradient only through z
};

struct LatentBackwardIO {
  at::ScalarType input_dtype, dtype;
  c10::optional<at::Tensor> grad_z, grad_kl, grad_log_q, grad_log_p;
  at::Tensor z, mu, logvar, grad_mu, grad_logvar;
  int64_t samples, batch, dim;
  bool stl;

  template <typename T>
  LatentBackwardArgs<T> args() const {
    return {optional_ptr<T>(grad_z),  optional_ptr<T>(grad_kl), optional_ptr<T>(grad_log_q),
            optional_ptr<T>(grad_log_p), z.data_ptr<T>(),       mu.data_ptr<T>(),
            logvar.data_ptr<T>(),     grad_mu.data_ptr<T>(),    grad_logvar.data_ptr<T>(),
            samples,                  batch,                    dim,
            stl};
  }
  std::tuple<at::Tensor, at::Tensor> result() const {
    return {as_dtype(grad_mu, input_dtype), as_dtype(grad_logvar, input_dtype)};
  }
};

inline LatentBackwardIO prepare_latent_backward(const c10::optional<at::Tensor>& grad_z,
                                                const c10::optional<at::Tensor>& grad_kl,
                                                const c10::optional<at::Tensor>& grad_log_q,
                                                const c10::optional<at::Tensor>& grad_log_p, const at::Tensor& z,
                                                const at::Tensor& mu, const at::Tensor& logvar, bool stl) {
  check_latent_backward_inputs(grad_z, grad_kl, grad_log_q, grad_log_p, z, mu, logvar);
  check_on_device(grad_z, mu, "grad_z", "mu");
  check_on_device(grad_kl, mu, "grad_kl", "mu");
  check_on_device(grad_log_q, mu, "grad_log_q", "mu");
  check_on_device(grad_log_p, mu, "grad_log_p", "mu");
  LatentBackwardIO io;
  io.input_dtype = mu.scalar_type();
  io.dtype = sum_dtype(io.input_dtype);
  io.grad_z = contiguous_as(grad_z, io.dtype);
  io.grad_kl = contiguous_as(grad_kl, io.dtype);
  io.grad_log_q = contiguous_as(grad_log_q, io.dtype);
  io.grad_log_p = contiguous_as(grad_log_p, io.dtype);
  io.z = contiguous_as(z, io.dtype);
  io.mu = contiguous_as(mu, io.dtype);
  io.logvar = contiguous_as(logvar, io.dtype);
  io.grad_mu = at::empty_like(io.mu);
  io.grad_logvar = at::empty_like(io.logvar);
  io.samples = z.dim() == 3 ? z.size(0) : 1;
  io.batch = mu.size(0);
  io.dim = mu.size(1);
  io.stl = stl;
  return io;
}

// ---------------------------------------------------------------------------
// Reconstruction log-likelihood ops
// ---------------------------------------------------------------------------
// Everything a likelihood kernel needs (the traits of csrc/fastvae.h say what
// the parameters mean). `second` is the second parameter per element (the
// Gaussian's log-variance, the logistic's log-scale), nullptr when the op got
// the single float `second_value` for every element instead, or when the
// likelihood has one parameter.
template <typename T>
struct LikelihoodArgs {
  const T* params;  // logits or means, (rows, P)
  const T* x;       // (B, P)
  const T* second;  // (rows, P) or nullptr
  T second_value;
  const T* grad;   // (rows) incoming gradient, backward only
  T* out;          // forward: (rows); backward: grad_params (rows, P)
  T* grad_second;  // backward, when `second` is a tensor: (rows, P)
  T* grad_x;       // backward, when x requires grad: (B, P), else nullptr
  int64_t rows, batch, pixels;
};

struct LikelihoodIO {
  at::ScalarType params_dtype, x_dtype, dtype;
  at::Tensor params, x, second, grad;    // second, grad: undefined when absent
  at::Tensor out, grad_second, grad_x;  // grad_second, grad_x: empty (0,) when not computed
  double second_value = 0.0;
  int64_t rows, batch, pixels;

  template <typename T>
  LikelihoodArgs<T> args() const {
    return {params.data_ptr<T>(),
            x.data_ptr<T>(),
            defined_ptr<T>(second),
            static_cast<T>(second_value),
            defined_ptr<T>(grad),
            out.data_ptr<T>(),
            grad_second.numel() ? grad_second.data_ptr<T>() : nullptr,
            grad_x.numel() ? grad_x.data_ptr<T>() : nullptr,
            rows,
            batch,
            pixels};
  }
  // Backward results: grad_params, grad_second and grad_x in their inputs' dtypes.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads() const {
    return {as_dtype(out, params_dtype), as_dtype(grad_second, params_dtype), as_dtype(grad_x, x_dtype)};
  }
};

// Forward: params (L,B,P) or (B,P), x (B,P), the second parameter shaped like params.
inline LikelihoodIO prepare_likelihood(const at::Tensor& params, const at::Tensor& x,
                                       const c10::optional<at::Tensor>& second, double second_value,
                                       const char* params_name, const char* second_name) {
  check_likelihood_inputs(params, x, params_name);
  if (second.has_value()) {
    check_same(*second, params, second_name, params_name);
    TORCH_CHECK(second->sizes() == params.sizes(), "fastvae: ", second_name, " must have the shape of ", params_name,
                " ", params.sizes(), " (broadcast it first), got ", second->sizes());
  }
  LikelihoodIO io;
  io.params_dtype = params.scalar_type();
  io.x_dtype = x.scalar_type();
  io.dtype = sum_dtype(io.params_dtype);
  io.params = contiguous_as(params, io.dtype);
  io.x = contiguous_as(x, io.dtype);
  if (second.has_value()) io.second = contiguous_as(*second, io.dtype);
  io.second_value = second_value;
  io.batch = x.size(0);
  io.pixels = x.size(1);
  io.rows = params.dim() == 3 ? params.size(0) * params.size(1) : params.size(0);
  // (L, B, P) or (B, P) params -> one output per row, keeping params' leading shape.
  io.out = at::empty(params.sizes().slice(0, params.dim() - 1), io.params.options());
  return io;
}

// Backward: as the forward, plus the incoming per-row gradient; allocates the gradients.
inline LikelihoodIO prepare_likelihood_backward(const at::Tensor& grad, const at::Tensor& params,
                                                const at::Tensor& x, const c10::optional<at::Tensor>& second,
                                                double second_value, bool needs_grad_x, const char* params_name,
                                                const char* second_name) {
  LikelihoodIO io = prepare_likelihood(params, x, second, second_value, params_name, second_name);
  TORCH_CHECK(grad.device() == params.device(), "fastvae: grad is on ", grad.device(), " but ", params_name,
              " is on ", params.device(), "; they must be on the same device");
  TORCH_CHECK(grad.sizes() == io.out.sizes(), "fastvae: grad must have shape ", io.out.sizes(), ", got ",
              grad.sizes());
  io.grad = contiguous_as(grad, io.dtype);
  io.out = at::empty_like(io.params);
  io.grad_second = io.second.defined() ? at::empty_like(io.second) : at::empty({0}, io.params.options());
  io.grad_x = needs_grad_x ? at::empty_like(io.x) : at::empty({0}, io.x.options());
  return io;
}

// Autocast off for the ATen ops a kernel calls. The autocast keys stay in the
// thread's dispatch set while an op without an autocast kernel runs, so an
// at::linear inside a kernel would be cast to bfloat16 under
// torch.autocast(dtype=bfloat16) and return another dtype than the op's inputs.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Rows of t seen as a matrix (..., last): the product of its leading dimensions. A reshape
// to (-1, last) cannot infer it when last is 0.
inline int64_t leading_rows(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

// The device guard of a backend without devices to switch (CPU).
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

// The two sparse_input_linear ops on one backend, which supplies Backend::linear(x,
// weight, bias) (the forward), Backend::weight_grad(grad2d, x2d) (both 2-D and
// contiguous) and Backend::Guard(device). Checks, autocast, the gradients of x and
// bias (a dense product and a sum) and the empty (0,) tensors for gradients not
// asked for are shared here, as HeadOps does for the fused head (head.h).
template <class Backend>
struct SparseInputLinearOps {
  static at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
    check_sparse_input_linear_inputs(x, weight, bias);
    const NoAutocast no_autocast;
    const typename Backend::Guard guard(x.device());
    return Backend::linear(x, weight, bias);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& weight, bool needs_grad_x,
                                                                 bool needs_grad_weight, bool needs_grad_bias) {
    check_sparse_input_linear_backward_inputs(grad, x, weight);
    const NoAutocast no_autocast;
    const typename Backend::Guard guard(x.device());
    const int64_t rows = leading_rows(x);
    const at::Tensor grad2d = grad.reshape({rows, weight.size(0)}).contiguous();
    const at::Tensor none = at::empty({0}, x.options());
    return {needs_grad_x ? at::mm(grad2d, weight).reshape(x.sizes()) : none,
            needs_grad_weight ? Backend::weight_grad(grad2d, x.reshape({rows, x.size(-1)}).contiguous()) : none,
            needs_grad_bias ? grad2d.sum(0) : none};
  }

  template <class Library>
  static void register_kernels(Library& m) {
    m.impl("sparse_input_linear", &forward);
    m.impl("sparse_input_linear_backward", &backward);
  }
};

// The ops of likelihood D (traits in csrc/fastvae.h) on one backend, which
// supplies the kernels: Backend::run<D>(args, backward) launches them for a
// float or double LikelihoodArgs, and Backend::Guard(device) makes the inputs'
// device current. Everything else (checks, dtypes, outputs) is shared here.
template <class D, class Backend>
struct LikelihoodOps {
  static constexpr const char* second_name() { return D::kSecondName ? D::kSecondName : "second"; }

  static void run(const LikelihoodIO& io, bool backward) {
    AT_DISPATCH_FLOATING_TYPES(io.dtype, D::kName,
                               [&] { Backend::template run<D>(io.template args<scalar_t>(), backward); });
  }

  static at::Tensor forward(const at::Tensor& params, const at::Tensor& x, const c10::optional<at::Tensor>& second,
                            double second_value) {
    const typename Backend::Guard guard(params.device());
    const LikelihoodIO io = prepare_likelihood(params, x, second, second_value, D::kParamName, second_name());
    run(io, /*backward=*/false);
    return io.out;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& params,
                                                                 const at::Tensor& x,
                                                                 const c10::optional<at::Tensor>& second,
                                                                 double second_value, bool needs_grad_x) {
    const typename Backend::Guard guard(params.device());
    const LikelihoodIO io = prepare_likelihood_backward(grad, params, x, second, second_value, needs_grad_x,
                                                        D::kParamName, second_name());
    run(io, /*backward=*/true);
    return io.grads();
  }

  // The schemas' two shapes (csrc/ops.cpp): one parameter, or two.
  static at::Tensor forward_one(const at::Tensor& params, const at::Tensor& x) {
    return forward(params, x, c10::nullopt, 0.0);
  }
  static std::tuple<at::Tensor, at::Tensor> backward_one(const at::Tensor& grad, const at::Tensor& params,
                                                         const at::Tensor& x, bool needs_grad_x) {
    auto [grad_params, unused, grad_x] = backward(grad, params, x, c10::nullopt, 0.0, needs_grad_x);
    return {grad_params, grad_x};
  }

  template <class Library>
  static void register_kernels(Library& m) {
    if constexpr (has_second<D>()) {
      m.impl(op_name<D>("_log_prob").c_str(), &forward);
      m.impl(op_name<D>("_log_prob_backward").c_str(), &backward);
    } else {
      m.impl(op_name<D>("_log_prob").c_str(), &forward_one);
      m.impl(op_name<D>("_log_prob_backward").c_str(), &backward_one);
    }
  }
};

// Registers the kernels of every fused likelihood for one backend.
template <class Backend, class Library>
void register_likelihood_kernels(Library& m) {
  for_each_likelihood(FusedLikelihoods{}, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    LikelihoodOps<D, Backend>::register_kernels(m);
  });
}

// 'bernoulli', 'gaussian', ...: the kName of every fused likelihood, for messages.
inline std::string fused_likelihood_names() {
  std::string names;
  for_each_likelihood(FusedLikelihoods{}, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    names += std::string(names.empty() ? "'" : ", '") + D::kName + "'";
  });
  return names;
}

// Calls f(static_cast<D*>(nullptr)) for the fused likelihood D whose kName is `name`
// (the ops that take a likelihood by name, as the fused head does); any other name raises.
template <class F>
void with_fused_likelihood(c10::string_view name, F&& f) {
  bool found = false;
  for_each_likelihood(FusedLikelihoods{}, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    if (!found && name == c10::string_view(D::kName)) {
      found = true;
      f(tag);
    }
  });
  TORCH_CHECK(found, "fastvae: likelihood must be one of ", fused_likelihood_names(), ", got '", std::string(name),
              "'");
}

}  // namespace fastvae
