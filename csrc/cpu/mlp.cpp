// CPU elementwise passes of the fused Linear/activation stack (csrc/mlp.h).
//
// Forward: after each product (MKL/oneDNN, written with beta = 0), one pass
// over its output adds the bias and applies the activation while the rows are
// in cache; threads take runs of rows. Backward: one pass multiplies the
// incoming gradient by the activation's derivative (from the saved output) and
// sums the bias gradient in the same pass; threads take runs of columns, so
// every column is summed over the rows in order by one thread and the result
// does not depend on the thread count. float32 loops are compiled per CPU level
// (cpu_level.h) with tanh and sigmoid as branch-free polynomials that GCC
// vectorizes; float64 calls libm. Other dtypes take the ATen passes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../mlp.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

using mlp::Activation;

// tanh(x) to a few float ulps. |x| < 1/4: the odd Taylor series to x^13 (the next term
// is below 1e-11 relative there); beyond, (1 - e) / (1 + e) with e = exp(-2|x|) < 0.61,
// where 1 - e > 0.39 cancels no digits. NaN stays NaN, +-inf give +-1.
FASTVAE_FN float tanh_of(float x) {
  const float a = fabsf(x);
  const float x2 = x * x;
  float p = 21844.0f / 6081075.0f;
  p = p * x2 - 1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float series = x + x * x2 * p;
  const float e = exp_poly(-2.0f * a);
  const float far = (1.0f - e) / (1.0f + e);
  const float signed_far = x < 0.0f ? -far : far;
  return a < 0.25f ? series : signed_far;
}
FASTVAE_FN double tanh_of(double x) { return std::tanh(x); }

FASTVAE_FN float sigmoid_of(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
FASTVAE_FN double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T, Activation kAct>
FASTVAE_FN T activate(T v) {
  if constexpr (kAct == Activation::kTanh) {
    return tanh_of(v);
  } else if constexpr (kAct == Activation::kSigmoid) {
    return sigmoid_of(v);
  } else if constexpr (kAct == Activation::kRelu) {
    return v < T(0) ? T(0) : v;  // NaN stays NaN, as torch.relu
  } else {
    return v;
  }
}

// g * act'(pre) from the output y = act(pre), as aten's tanh_backward,
// sigmoid_backward and threshold_backward compute it.
template <typename T, Activation kAct>
FASTVAE_FN T grad_through(T g, T y) {
  if constexpr (kAct == Activation::kTanh) {
    return g * (T(1) - y * y);
  } else if constexpr (kAct == Activation::kSigmoid) {
    return g * ((T(1) - y) * y);
  } else if constexpr (kAct == Activation::kRelu) {
    return y > T(0) ? g : T(0);
  } else {
    return g;
  }
}

template <typename T>
struct BiasActivationArgs {
  T* y;
  const T* bias;  // nullptr: none
  int64_t cols;
};

// Rows [begin, end) of y: y = act(y + bias).
template <typename T, Activation kAct, bool kBias>
struct BiasActivationRows {
  FASTVAE_FN void operator()(const BiasActivationArgs<T>& a, int64_t begin, int64_t end) const {
    const int64_t cols = a.cols;
    for (int64_t r = begin; r < end; ++r) {
      T* row = a.y + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        T v = row[c];
        if constexpr (kBias) v += a.bias[c];
        row[c] = activate<T, kAct>(v);
      }
    }
  }
};

template <typename T>
struct ActivationGradArgs {
  const T* grad;
  const T* y;      // nullptr for the identity
  T* grad_pre;     // may be grad
  T* grad_bias;    // nullptr: not asked for
  int64_t rows, cols;
};

// Columns [begin, end): grad_pre = grad * act'(.), grad_bias = its column sums.
template <typename T, Activation kAct, bool kBiasGrad>
struct ActivationGradColumns {
  FASTVAE_FN void operator()(const ActivationGradArgs<T>& a, int64_t begin, int64_t end) const {
    const int64_t cols = a.cols;
    T* sums = a.grad_bias;
    if constexpr (kBiasGrad) {
      for (int64_t c = begin; c < end; ++c) sums[c] = T(0);
    }
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* g = a.grad + r * cols;
      const T* y = a.y + (kAct == Activation::kIdentity ? 0 : r * cols);
      T* pre = a.grad_pre + r * cols;
#pragma omp simd
      for (int64_t c = begin; c < end; ++c) {
        const T d = grad_through<T, kAct>(g[c], kAct == Activation::kIdentity ? T(0) : y[c]);
        if constexpr (kAct != Activation::kIdentity) pre[c] = d;
        if constexpr (kBiasGrad) sums[c] += d;
      }
    }
  }
};

// Kernel over [begin, end): float32 at the process's CPU level, float64 as compiled.
template <typename Kernel, typename T>
void run_kernel(const T& args, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, BiasActivationArgs<float>> || std::is_same_v<T, ActivationGradArgs<float>>) {
    run_at_cpu_level<Kernel>(args, begin, end);
  } else {
    Kernel{}(args, begin, end);
  }
}

// f(std::integral_constant<Activation, act>{}).
template <typename F>
void with_activation(Activation act, const F& f) {
  switch (act) {
    case Activation::kTanh:
      return f(std::integral_constant<Activation, Activation::kTanh>{});
    case Activation::kRelu:
      return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSigmoid:
      return f(std::integral_constant<Activation, Activation::kSigmoid>{});
    case Activation::kIdentity:
      return f(std::integral_constant<Activation, Activation::kIdentity>{});
  }
}

template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) return f(std::true_type{});
  return f(std::false_type{});
}

bool has_own_loops(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble; }

void bias_activation(const at::Tensor& y, const at::Tensor& bias, Activation act) {
  if (!has_own_loops(y)) return mlp::aten_elementwise_cpu().bias_activation(y, bias, act);
  cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
  const int64_t rows = y.size(0), cols = y.size(1);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fastvae::mlp", [&] {
    const BiasActivationArgs<scalar_t> args{y.data_ptr<scalar_t>(),
                                            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, cols};
    with_activation(act, [&](auto kind) {
      with_flag(bias.defined(), [&](auto with_bias) {
        using Kernel = BiasActivationRows<scalar_t, decltype(kind)::value, decltype(with_bias)::value>;
        parallel_rows(rows, cols, kElementsPerTask,
                      [&](int64_t begin, int64_t end) { run_kernel<Kernel>(args, begin, end); });
      });
    });
  });
}

void activation_grad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& grad_pre,
                     const at::Tensor& grad_bias, Activation act) {
  if (!has_own_loops(grad)) return mlp::aten_elementwise_cpu().activation_grad(grad, y, grad_pre, grad_bias, act);
  cpu_level();
  const int64_t rows = grad.size(0), cols = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastvae::mlp_backward", [&] {
    const ActivationGradArgs<scalar_t> args{grad.data_ptr<scalar_t>(), y.defined() ? y.data_ptr<scalar_t>() : nullptr,
                                            grad_pre.data_ptr<scalar_t>(),
                                            grad_bias.defined() ? grad_bias.data_ptr<scalar_t>() : nullptr, rows,
                                            cols};
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(rows, 1));
    with_activation(act, [&](auto kind) {
      with_flag(grad_bias.defined(), [&](auto with_sums) {
        using Kernel = ActivationGradColumns<scalar_t, decltype(kind)::value, decltype(with_sums)::value>;
        at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) { run_kernel<Kernel>(args, begin, end); });
      });
    });
  });
}

}  // namespace

const mlp::Elementwise& cpu_mlp_passes() {
  static const mlp::Elementwise passes{false, &bias_activation, &activation_grad};
  return passes;
}

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { mlp::Kernels<&cpu_mlp_passes>::register_kernels(m); }

}  // namespace cpu
}  // namespace fastvae
