// CPU kernels of the fused softmax cross-entropy.
//
// Rows run in parallel (at::parallel_for); inside a row every loop works on
// at::vec::Vectorized lanes of the accumulation type (float32 for 16-bit
// inputs), so a 16-bit row is widened once per element and never summed in
// 16 bits. The math is spelled out in ../cross_entropy.h.
//
// Forward, per row: pass 1 finds the max m; pass 2 sums exp(x - m) (and, when
// the target spreads mass over every class, sum_c q_c * (x_c - m)). Backward,
// per row: one pass that reads x (or the forward's kept exp(x - m)) and writes
// dx. Where the forward also forms the gradient (autograd's forward on the CPU,
// the in-place op), each row's backward follows its forward while the row is
// in L1: one sweep. Small C (<= 32 classes) runs a vector's width of rows at a
// time, one row per lane; gradients too large for any cache are written with
// non-temporal stores.
//
// This file holds the ops' entry points of one level: argument preparation, reductions, and the
// dispatch over dtypes; the kernels are in vec_helpers.h, problem.h, row_path.h and small_c_path.h.
// It is compiled once per instruction-set level (see kernels.h): everything in it and in those
// headers lives in the namespace of its level, CPU_CAPABILITY, or in an anonymous one, so that the
// levels' copies never meet; what it shares with the other levels (argument preparation, gradient
// memory) is compiled once, for the baseline CPU, elsewhere.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "problem.h"
#include "row_path.h"
#include "small_c_path.h"

namespace fused_softmax::cpu::CPU_CAPABILITY {
namespace {

// Rows per task for at::parallel_for: about 32K elements each.
int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 32768 / C);
}

// Checks the class indices (the message names the first bad one); returns how many rows are
// ignored. Branch-free, so it vectorizes (a check per row and a separate count for 'mean' were a
// tenth of the small-C forward).
int64_t check_target_range_cpu(const at::Tensor& target64, int64_t C, int64_t ignore_index) {
  const int64_t* y = target64.const_data_ptr<int64_t>();
  const int64_t N = target64.numel();
  int64_t ignored = 0, bad = 0;
  for (int64_t i = 0; i < N; ++i) {
    const bool skip = y[i] == ignore_index;
    ignored += skip;
    bad += !skip & (static_cast<uint64_t>(y[i]) >= static_cast<uint64_t>(C));  // negative ones wrap to huge
  }
  for (int64_t i = 0; bad > 0 && i < N; ++i) {
    TORCH_CHECK_INDEX(  // IndexError, as torch's CPU kernel raises
        y[i] == ignore_index || (y[i] >= 0 && y[i] < C),
        "fused_softmax: target: class index ", y[i], " at position ", i, " is out of range for ", C,
        " classes (expected 0 <= target < ", C, " or target == ignore_index ", ignore_index, ")");
  }
  return ignored;
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const PreparedArgs& p, const LossOptions& o) {
  using acc_t = at::opmath_type<scalar_t>;
  Problem<scalar_t> P{};
  fill_kernel_args<scalar_t, acc_t>(P, p, o);
  P.transform = {
      static_cast<acc_t>(o.logit_scale), static_cast<acc_t>(o.softcap), o.logit_scale == 1.0 && o.softcap == 0.0};
  const acc_t w_sum = P.w ? std::accumulate(P.w, P.w + P.classes, acc_t(0)) : static_cast<acc_t>(P.classes);
  // Without smoothing nothing is spread: 0, not 0 * sum(w), which a NaN or infinite weight makes NaN.
  P.spread_index_mass = P.eps > 0 ? P.eps / static_cast<acc_t>(P.classes) * w_sum : acc_t(0);
  return P;
}

// sum_{i < N} f(i) in double. Fixed blocks of rows are summed in parallel, each in four interleaved
// chains (one chain waits on every add's latency), then the block sums in order: the same bits for
// any thread count, and no serial pass over N (at N = 65536, C = 10 that took a third of the forward).
template <typename F>
double ordered_sum(int64_t N, const F& f) {
  constexpr int64_t kBlockRows = 4096;
  std::vector<double> block_sums((N + kBlockRows - 1) / kBlockRows);
  at::parallel_for(0, static_cast<int64_t>(block_sums.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlockRows, end = std::min(N, begin + kBlockRows);
      // Unrolled by hand: an array indexed by i % 4 lived in memory, every add waiting on a store.
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t i = begin;
      for (; i + 4 <= end; i += 4) {
        s0 += f(i);
        s1 += f(i + 1);
        s2 += f(i + 2);
        s3 += f(i + 3);
      }
      for (; i < end; ++i) s0 += f(i);
      block_sums[b] = (s0 + s1) + (s2 + s3);
    }
  });
  return std::accumulate(block_sums.begin(), block_sums.end(), 0.0);
}

// The divisor of 'mean': the summed weights of the rows not ignored (class indices; their count
// without weights), or the row count (probabilities).
template <typename acc_t>
double mean_divisor_cpu(const PreparedArgs& p, int64_t ignore_index, int64_t ignored_rows) {
  const int64_t N = p.input.size(0);
  if (p.probabilities) return static_cast<double>(N);
  if (!p.weight.defined()) return static_cast<double>(N - ignored_rows);  // exact, as the sum of ones is
  const int64_t* y = p.target.const_data_ptr<int64_t>();
  const acc_t* w = p.weight.const_data_ptr<acc_t>();
  return ordered_sum(N, [&](int64_t i) { return y[i] == ignore_index ? 0.0 : static_cast<double>(w[y[i]]); });
}

// The arguments the CPU kernels read, what the 'mean' reduction divides by (1 for the others), and the
// options with the z-loss scaled for 'mean' (with_mean_z_loss).
struct CpuArgs {
  PreparedArgs p;
  double divisor;
  LossOptions options;
};

// The shared preparation plus the CPU's own check of the class indices (the CUDA kernels assert on the
// device instead: no host sync), and the divisor of 'mean'.
CpuArgs prepare_args_cpu(PreparedArgs p, LossOptions options) {
  const int64_t ignored_rows =
      p.probabilities ? 0 : check_target_range_cpu(p.target, p.num_classes, options.ignore_index);
  double divisor = 1.0;
  if (options.reduction == kMean) {
    AT_DISPATCH_FLOATING_TYPES(accumulate_type(p.input.scalar_type()), "prepare_args_cpu", [&] {
      divisor = mean_divisor_cpu<scalar_t>(p, options.ignore_index, ignored_rows);
    });
    options = with_mean_z_loss(options, divisor, p.input.size(0) - ignored_rows);
  }
  return {std::move(p), divisor, options};
}

// This level's ForwardFn (kernels.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& predictions, const LossOptions& options, GradTo grad_to) {
  const CpuArgs args = prepare_args_cpu(prepare_forward_args(input_, target_, weight_, predictions), options);
  const int64_t reduction = options.reduction;
  const PreparedArgs& p = args.p;
  const double divisor = args.divisor;
  TORCH_CHECK(
      grad_to != GradTo::kInput || p.input.is_same(input_) && input_.is_contiguous(),
      "fused_softmax: input: the in-place gradient needs contiguous (rows, classes) logits, got strides ",
      input_.strides());
  const int64_t N = p.input.size(0);
  const int64_t C = p.input.size(1);
  const auto acc = accumulate_type(p.input.scalar_type());
  at::Tensor loss = at::empty({N}, p.input.options().dtype(acc));
  at::Tensor stats = at::empty({N, 2}, p.input.options().dtype(acc));
  at::Tensor grad = grad_to == GradTo::kInput ? input_
                    : grad_to == GradTo::kNew ? empty_for_gradient({N, C}, p.input.options())
                                              : at::Tensor();
  at::Tensor reduced;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<scalar_t> P = make_problem<scalar_t>(p, args.options);
    P.stream_grad = grad_to == GradTo::kNew && static_cast<int64_t>(grad.nbytes()) >= kMinStreamedBytes;
    acc_t* loss_out = loss.data_ptr<acc_t>();
    auto* stats_out = reinterpret_cast<RowStats<acc_t>*>(stats.data_ptr<acc_t>());
    const acc_t unit_grad = static_cast<acc_t>(1.0 / divisor);  // the gradient's grad_loss
    scalar_t* dx = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      P.forward_rows(begin, end, loss_out, stats_out, dx, unit_grad);
    });
    if (reduction != kNone) {
      const double total = ordered_sum(N, [&](int64_t i) { return static_cast<double>(loss_out[i]); });
      reduced = at::scalar_tensor(total / divisor, p.input.options().dtype(acc));  // 0 / 0 = nan, as torch
    }
  });
  return {reduction == kNone ? loss : reduced, stats, grad};
}

// This level's BackwardFn (kernels.h).
at::Tensor backward(
    const at::Tensor& grad_loss_, const at::Tensor& input_, const at::Tensor& target_,
    const std::optional<at::Tensor>& weight_, const at::Tensor& stats_, const LossOptions& options, int64_t class_start,
    int64_t num_classes) {
  const int64_t reduction = options.reduction;
  const CpuArgs args = prepare_args_cpu(prepare_args(input_, target_, weight_, class_start, num_classes), options);
  const PreparedArgs& p = args.p;
  const double divisor = args.divisor;
  check_backward_args(grad_loss_, p.input, stats_, reduction);
  const int64_t N = p.input.size(0);
  const int64_t C = p.input.size(1);
  const auto acc = accumulate_type(p.input.scalar_type());
  at::Tensor grad = empty_for_gradient({N, C}, p.input.options());
  if (N == 0) return grad;
  const at::Tensor grad_loss = grad_loss_.to(acc);
  const at::Tensor stats = stats_.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Problem<scalar_t> P = make_problem<scalar_t>(p, args.options);
    P.stream_grad = static_cast<int64_t>(grad.nbytes()) >= kMinStreamedBytes;
    // Row i's grad_loss is g[i * g_stride]; a reduced loss spreads one value over every row.
    const acc_t* g = grad_loss.const_data_ptr<acc_t>();
    int64_t g_stride = reduction == kNone ? grad_loss.stride(0) : 0;
    acc_t g_value;
    if (reduction != kNone) {
      g_value = static_cast<acc_t>(static_cast<double>(*g) / divisor);
      g = &g_value;
    }
    const auto* stats_in = reinterpret_cast<const RowStats<acc_t>*>(stats.const_data_ptr<acc_t>());
    scalar_t* dx = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      P.backward_rows(begin, end, stats_in, g, g_stride, dx);
    });
  });
  return grad;
}

}  // namespace

extern const Kernels kKernels = {&forward, &backward};

}  // namespace fused_softmax::cpu::CPU_CAPABILITY
