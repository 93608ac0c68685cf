// The CUDA kernels of the fused softmax cross-entropy and the host code that launches them, written
// against a Launcher (see the ops at the end): the GPU's (cross_entropy_cuda.cu), or, for the tests,
// tests/cuda_on_host.h's simulator, which runs these same kernels thread by thread on the CPU. The
// math is spelled out in ../cross_entropy.h; ../cpu/cross_entropy_cpu.cpp is the plain reference
// implementation of the same contract.
//
// Schedule: a group of kThreads consecutive threads owns one row at a time.
//   tiny C:  kThreads = 4 (8 rows per warp; a row of up to kPacksInFlight packs a lane)
//   small C: kThreads = 32 (a warp per row, several rows per block; no __syncthreads)
//   large C: kThreads = kBlock (the whole block per row)
// Rows are visited grid-stride, so any N works with a bounded grid.
// Blocks of 256 threads, at least two resident per SM (__launch_bounds__): while
// one block merges a row's statistics across its warps (its loads drained, a
// barrier), another keeps loading. Two blocks per SM allow ptxas 128 registers a
// thread; with the default occupancy target it capped the kernels at 64 and spilled.
//
// Forward reads each row once: every thread keeps an online (max, sum of exp)
// over its elements, loaded 16 bytes at a time, kPacksInFlight loads at once,
// and the group merges them.
// Backward reads the row once more and writes the gradient once.
// All offsets are int64; nothing synchronises with the host.
#pragma once

#include "../cross_entropy.h"
#include "row_packs.cuh"
#include "row_state.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <type_traits>

namespace fused_softmax {

constexpr int kWarp = 32;
constexpr int kQuad = 4;           // threads per row for tiny C
constexpr int kBlock = 256;        // threads per block for every schedule
constexpr int kMinBlocksPerSM = 2;  // see the schedule above
constexpr int64_t kSmallC = 1024;  // up to this many classes a warp owns a row (tiny C: see launch_for_classes)

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shuffle_xor(const RowState<acc_t>& s, int offset) {
  return {
      __shfl_xor_sync(0xffffffff, s.max, offset), __shfl_xor_sync(0xffffffff, s.sum, offset),
      __shfl_xor_sync(0xffffffff, s.mass, offset), __shfl_xor_sync(0xffffffff, s.mass_dot, offset)};
}

// A part of a row's argmax (the forward's predictions): its best logit as torch.argmax ranks them
// (ranks_above in ../cross_entropy.h) and that logit's class; index -1 for no logit yet.
template <typename acc_t>
struct RowArgmax {
  acc_t value;
  int64_t index;

  // A thread adds its classes in increasing order (for_each_pack): a tie keeps the first.
  __device__ __forceinline__ void add(acc_t v, int64_t c) {
    if (index < 0 || ranks_above(v, value)) {
      value = v;
      index = c;
    }
  }
  // Another part's: the better logit, or between equal ones (or two NaNs) the lower class.
  __device__ __forceinline__ void merge(const RowArgmax& o) {
    if (o.index < 0) return;
    const bool tie = o.value == value || (o.value != o.value && value != value);
    if (index < 0 || ranks_above(o.value, value) || (tie && o.index < index)) *this = o;
  }
};

template <typename acc_t>
__device__ __forceinline__ RowArgmax<acc_t> shuffle_xor(const RowArgmax<acc_t>& s, int offset) {
  return {__shfl_xor_sync(0xffffffff, s.value, offset), __shfl_xor_sync(0xffffffff, s.index, offset)};
}

// Merges the states (RowState, RowArgmax) of a row's kThreads threads; every thread gets the result.
// Groups smaller than a warp are aligned within it, so xor offsets below kThreads stay inside the group.
template <int kThreads, typename State>
__device__ __forceinline__ State group_merge(State s, State* smem) {
  constexpr int kFirstOffset = (kThreads < kWarp ? kThreads : kWarp) / 2;
  for (int offset = kFirstOffset; offset > 0; offset /= 2) s.merge(shuffle_xor(s, offset));
  if constexpr (kThreads > kWarp) {
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) smem[warp] = s;
    __syncthreads();  // every warp's partial is in smem
    s = smem[0];
    for (int k = 1; k < kThreads / kWarp; ++k) s.merge(smem[k]);
    __syncthreads();  // smem is read by all before the next row overwrites it
  }
  return s;
}

template <typename scalar_t, typename acc_t>
struct KernelArgs {
  const scalar_t* x;
  int64_t x_stride;
  int64_t N;
  int64_t C;             // columns of x
  int64_t col0;          // x's columns are the classes [col0, col0 + C) (a block: backward only)
  int64_t classes;       // of this many (C unless a block)
  const int64_t* y;      // class indices, or nullptr
  Probabilities<acc_t, scalar_t> t;  // class probabilities, or none
  int64_t t_stride;
  const acc_t* w;        // class weights, or nullptr
  const acc_t* w_sum;    // backward: sum of w, or nullptr
  int64_t ignore_index;
  acc_t eps;             // label smoothing
  bool transformed;      // logit_scale != 1 or a softcap: x = T(r) (see transform below)
  acc_t scale;           // logit_scale
  acc_t cap;             // softcap, 0 for none
  acc_t z_loss;
  int64_t* predictions;  // forward: each row's argmax, or nullptr for none
  const acc_t* stats;    // backward: the forward's (max, log_sum) per row
  const acc_t* g;        // backward: grad_loss
  int64_t g_stride;      // 0 when autograd expanded one value
};

// The kernels come in two kinds. kPlain ones serve the common case, class indices without label
// smoothing and logits as they are (logit_scale 1, no softcap), with the per-element branches of
// those options compiled away (the backward ran ~35 instructions an element, near what HBM allows
// an SM for 16-bit rows); the others serve every option.

// The logits as the softmax sees them: x = scale * r, or cap * tanh(scale * r / cap) with a
// softcap; -inf stays -inf so that padding never takes probability mass.
template <bool kPlain, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t transform(const KernelArgs<scalar_t, acc_t>& a, acc_t r) {
  if (kPlain || !a.transformed) return r;
  const acc_t x = r * a.scale;
  return a.cap > 0 && x != -INFINITY ? a.cap * tanh(x / a.cap) : x;
}

// dx / dr at x = transform(r); 0 at x = -inf, where the gradient before it is 0 too.
template <bool kPlain, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t slope(const KernelArgs<scalar_t, acc_t>& a, acc_t x) {
  if (kPlain || !a.transformed) return acc_t(1);
  if (a.cap == 0) return a.scale;
  const acc_t t = x / a.cap;
  return x == -INFINITY ? acc_t(0) : a.scale * (acc_t(1) - t * t);
}

// Per-row target description shared by both kernels.
template <typename scalar_t, typename acc_t>
struct RowTarget {
  SpreadMass<acc_t, scalar_t> spread;
  bool has_spread;   // the target puts mass on (possibly) every class
  bool ignored;      // index == ignore_index
  int64_t y;         // the target class of an index row, else -1
  acc_t target_coef; // (1 - eps) * w[y]: an index row's mass on its target class

  __device__ __forceinline__ RowTarget(const KernelArgs<scalar_t, acc_t>& a, int64_t i) {
    spread = {{}, a.w, acc_t(1) - a.eps, a.eps / static_cast<acc_t>(a.classes)};  // at(c): class c
    target_coef = 0;
    y = -1;
    ignored = false;
    if (a.t) {
      spread.t = a.t + i * a.t_stride;
      has_spread = true;
      return;
    }
    has_spread = a.eps > 0;
    const int64_t cls = a.y[i];
    if (cls == a.ignore_index) {
      ignored = true;
      return;
    }
    // A device-side assert, as torch's own kernels do; the printed condition names the argument.
    CUDA_KERNEL_ASSERT(cls >= 0 && cls < a.classes && "fused_softmax: target: class index out of range");
    if (cls < 0 || cls >= a.classes) {  // never read out of bounds, even if asserts are compiled out
      ignored = true;
      return;
    }
    y = cls;
    target_coef = (acc_t(1) - a.eps) * (a.w ? a.w[y] : acc_t(1));
  }
};

// The row of this thread's group in the grid-stride step that starts at row `first`. Every group
// of a warp (every thread of a block) takes the same steps: a group past the last row redoes the
// last row with live = false and writes nothing, so that all lanes reach the warp's shuffles (all
// threads the block's barriers) together.
struct GroupRow {
  int64_t i;
  bool live;
};
template <int kThreads>
__device__ __forceinline__ GroupRow group_row(int64_t first, int64_t N) {
  const int64_t mine = first + threadIdx.x / kThreads;
  return {mine < N ? mine : N - 1, mine < N};
}

template <typename scalar_t, int kThreads, bool kPlain>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM) cross_entropy_fwd_kernel(
    KernelArgs<scalar_t, at::opmath_type<scalar_t>> a, at::opmath_type<scalar_t>* loss,
    at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kRowsPerBlock = kBlock / kThreads;
  __shared__ RowState<acc_t> smem[kBlock / kWarp];
  __shared__ RowArgmax<acc_t> argmax_smem[kBlock / kWarp];
  const int lane = threadIdx.x % kThreads;
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerBlock; first < a.N; first += int64_t(gridDim.x) * kRowsPerBlock) {
    const auto [i, live] = group_row<kThreads>(first, a.N);
    const scalar_t* row = a.x + i * a.x_stride;
    const RowTarget<scalar_t, acc_t> target(a, i);
    RowState<acc_t> s{lowest<acc_t>(), 0, 0, 0};
    RowArgmax<acc_t> argmax{0, -1};
    for_each_pack<kThreads, kVec>(row, a.C, lane, [&](int64_t col, const auto& pack) {
      constexpr int n = std::decay_t<decltype(pack)>::size;
      acc_t v[n];
#pragma unroll
      for (int k = 0; k < n; ++k) v[k] = transform<kPlain>(a, static_cast<acc_t>(pack.v[k]));
      s.add(v);
      if (!kPlain && target.has_spread) {
#pragma unroll
        for (int k = 0; k < n; ++k) s.add_mass(target.spread.at(col + k), v[k]);
      }
      if (a.predictions) {  // the same for the whole grid: no divergence
#pragma unroll
        for (int k = 0; k < n; ++k) argmax.add(v[k], col + k);
      }
    });
    s = group_merge<kThreads>(s.folded(), smem);  // folded: the shuffles copy no compensation
    if (a.predictions) {  // every thread of the block takes it (group_merge's barriers)
      argmax = group_merge<kThreads>(argmax, argmax_smem);
      if (lane == 0 && live) a.predictions[i] = argmax.index;  // C >= 1: some thread saw a class
    }
    if (lane == 0 && live) {
      const acc_t log_sum = s.log_sum();
      stats[2 * i] = s.row_max();  // the row's (max, log_sum); lse = max + log_sum
      stats[2 * i + 1] = log_sum;
      if (target.ignored) {
        loss[i] = 0;
      } else {
        // sum_c q_c * (lse - x_c), with lse - x_c = log_sum - (x_c - max) so no large terms cancel.
        const acc_t x_y = transform<kPlain>(a, static_cast<acc_t>(row[target.y >= 0 ? target.y : 0]));
        const acc_t y_term = target.y >= 0 ? log_sum - (x_y - s.max) : acc_t(0);
        const acc_t lse = s.max + log_sum;
        loss[i] = target.target_coef * y_term + (s.mass * log_sum - s.mass_dot) + a.z_loss * lse * lse;
      }
    }
  }
}

// Sum over a row's kThreads threads; every thread gets the result.
template <int kThreads, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, RowState<acc_t>* smem) {
  return group_merge<kThreads>(RowState<acc_t>{lowest<acc_t>(), acc_t(0), v, acc_t(0)}, smem).mass;
}

template <typename scalar_t, int kThreads, bool kPlain>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    cross_entropy_bwd_kernel(KernelArgs<scalar_t, at::opmath_type<scalar_t>> a, scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kRowsPerBlock = kBlock / kThreads;
  __shared__ RowState<acc_t> smem[kBlock / kWarp];
  const int lane = threadIdx.x % kThreads;
  for (int64_t first = int64_t(blockIdx.x) * kRowsPerBlock; first < a.N; first += int64_t(gridDim.x) * kRowsPerBlock) {
    const auto [i, live] = group_row<kThreads>(first, a.N);
    const scalar_t* row = a.x + i * a.x_stride;
    scalar_t* out = dx + i * a.C;  // the gradient is contiguous
    const RowTarget<scalar_t, acc_t> target(a, i);
    acc_t S;  // the row's total target mass
    if (!kPlain && a.t) {  // summed over all the classes, not only x's
      acc_t partial = 0;
      for (int64_t c = lane; c < a.classes; c += kThreads) partial += target.spread.at(c);
      S = group_sum<kThreads>(partial, smem);
    } else {
      const acc_t spread_total = a.w_sum ? *a.w_sum : static_cast<acc_t>(a.classes);
      // Without smoothing nothing is spread: not 0 * sum(w), which a NaN or infinite weight makes NaN.
      S = target.target_coef + (target.has_spread ? target.spread.b * spread_total : acc_t(0));
    }
    // An ignored row has no gradient, whatever grad_loss holds (it may be inf for an all-ignored mean).
    const acc_t g = target.ignored ? acc_t(0) : a.g[i * a.g_stride];
    const acc_t row_max = a.stats[2 * i];  // x - lse is formed as (x - max) - log_sum
    const acc_t log_sum = a.stats[2 * i + 1];
    S += 2 * a.z_loss * (row_max + log_sum);  // the z-loss gradient 2 z lse p_c
    auto write = [&](int64_t col, const auto& pack) {
      if (!live) return;  // a group past the last row (see group_row)
      Pack<scalar_t, std::decay_t<decltype(pack)>::size> o;
      const int64_t y_at = target.y - (a.col0 + col);  // the target class's place in the pack, if there
#pragma unroll
      for (int k = 0; k < pack.size; ++k) {
        acc_t q = k == y_at ? target.target_coef : acc_t(0);
        if (!kPlain && target.has_spread) q += target.spread.at(a.col0 + col + k);  // class a.col0 + col + k
        // The target class is formed here in acc_t and rounded once: p_y * S - q_y nearly cancels.
        const acc_t x = transform<kPlain>(a, static_cast<acc_t>(pack.v[k]));
        o.v[k] = static_cast<scalar_t>(g * (exp_of((x - row_max) - log_sum) * S - q) * slope<kPlain>(a, x));
      }
      if (target.ignored) o = {};  // once a pack, not a branch an element; the logits may be anything
      o.store(out + col);
    };
    // 16-byte stores need the output row to share the input row's alignment; else element by element.
    if (head_offset<scalar_t>(row) == head_offset<scalar_t>(out)) {
      for_each_pack<kThreads, kVec>(row, a.C, lane, write);
    } else {
      for_each_pack<kThreads, 1>(row, a.C, lane, write);
    }
  }
}

template <typename scalar_t, typename Launcher>
KernelArgs<scalar_t, at::opmath_type<scalar_t>> kernel_args(
    const Launcher& launch, const PreparedArgs& p, const LossOptions& o) {
  using acc_t = at::opmath_type<scalar_t>;
  KernelArgs<scalar_t, acc_t> a{};
  fill_kernel_args<scalar_t, acc_t>(a, p, o);
  a.N = p.input.size(0);
  a.transformed = o.logit_scale != 1.0 || o.softcap != 0.0;
  a.scale = static_cast<acc_t>(o.logit_scale);
  a.cap = static_cast<acc_t>(o.softcap);
  return a;
}

// Launches kernel(threads, plain), the kernel<scalar_t, kThreads, kPlain> that kernel returns for
// std::integral_constant arguments, with the schedule that suits the rows and the kind that suits the options.
template <typename scalar_t, typename Launcher, typename Kernel, typename acc_t, typename... Rest>
void launch_for_classes(
    const Launcher& launch, const Kernel& kernel, const KernelArgs<scalar_t, acc_t>& a, Rest... rest) {
  // Tiny rows: 4 lanes load up to kPacksInFlight packs each in one batch, 8 rows to a warp (a warp
  // to such a row left most lanes idle and paid a warp's shuffles for a few hundred bytes).
  constexpr int64_t kTinyC = kQuad * kPacksInFlight * (16 / sizeof(scalar_t));
  // By the rows' class count, not x's columns: the backward of a block of the classes takes the whole
  // rows' schedule, so its gradient has the same bits as theirs (the sum of a row's target mass, for
  // probabilities, runs over all the classes in the schedule's order).
  const int threads = a.classes <= kTinyC ? kQuad : a.classes <= kSmallC ? kWarp : kBlock;
  const int64_t rows_per_block = kBlock / threads;
  const int64_t max_blocks =
      int64_t(launch.multiprocessors()) * 64;  // enough to fill the GPU; rows beyond are walked grid-stride
  const dim3 grid(static_cast<unsigned>(std::min((a.N + rows_per_block - 1) / rows_per_block, max_blocks)));
  auto go = [&](auto plain) {  // plain: std::true_type or std::false_type (see kPlain above)
    if (threads == kQuad) {
      launch(kernel(std::integral_constant<int, kQuad>{}, plain), grid, a, rest...);
    } else if (threads == kWarp) {
      launch(kernel(std::integral_constant<int, kWarp>{}, plain), grid, a, rest...);
    } else {
      launch(kernel(std::integral_constant<int, kBlock>{}, plain), grid, a, rest...);
    }
  };
  if (!a.transformed && !a.t && a.eps == 0) {
    go(std::true_type{});
  } else {
    go(std::false_type{});
  }
}

// The divisor of 'mean' as a 0-dim device tensor (no host synchronisation): the
// summed weights of the rows not ignored, or the row count for probabilities.
inline at::Tensor mean_divisor(const PreparedArgs& p, int64_t ignore_index, at::ScalarType acc) {
  if (p.probabilities) return at::scalar_tensor(static_cast<double>(p.input.size(0)), p.input.options().dtype(acc));
  const at::Tensor counted = p.target != ignore_index;
  if (!p.weight.defined()) return counted.sum().to(acc);
  return (p.weight.index_select(0, p.target.masked_fill(~counted, 0)) * counted).sum();
}

// The options the kernels use (with_mean_z_loss). D is a device tensor here: one host sync, only for a
// z-loss with class weights under 'mean' (otherwise D is the number of rows kept, and the scale 1).
inline LossOptions kernel_options(const LossOptions& options, const PreparedArgs& p) {
  if (options.reduction != kMean || options.z_loss == 0 || !p.weight.defined() || p.probabilities) return options;
  const at::Tensor kept = (p.target != options.ignore_index).sum().to(at::kDouble);
  const at::Tensor both = at::stack({mean_divisor(p, options.ignore_index, at::kDouble), kept}).cpu();
  return with_mean_z_loss(options, both[0].item<double>(), both[1].item<int64_t>());
}

// Launches the backward kernel: dx = d(grad_loss . loss) / d input (dx may be input itself).
template <typename Launcher>
void launch_bwd(
    const Launcher& launch, const PreparedArgs& p, const at::Tensor& grad_loss, const at::Tensor& stats,
    const LossOptions& options, const at::Tensor& dx) {
  const int64_t N = p.input.size(0);
  const auto acc = accumulate_type(p.input.scalar_type());
  // Row i's grad_loss is g[i * g_stride]; a reduced loss spreads one value over every row (stride 0).
  at::Tensor g = grad_loss.to(acc);
  if (options.reduction == kMean) g = g / mean_divisor(p, options.ignore_index, acc);
  if (options.reduction != kNone) g = g.expand({N});
  const at::Tensor stats_c = stats.contiguous();
  // Only backward needs sum(weight); it stays on the device (no host synchronisation).
  const at::Tensor weight_sum = p.weight.defined() ? p.weight.sum() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cross_entropy_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = kernel_args<scalar_t>(launch, p, options);
    a.stats = stats_c.const_data_ptr<acc_t>();
    if (weight_sum.defined()) a.w_sum = weight_sum.const_data_ptr<acc_t>();
    a.g = g.const_data_ptr<acc_t>();
    a.g_stride = g.stride(0);
    auto kernel = [](auto threads, auto plain) { return &cross_entropy_bwd_kernel<scalar_t, threads(), plain()>; };
    launch_for_classes(launch, kernel, a, dx.data_ptr<scalar_t>());
  });
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> forward(const Launcher& launch, const PreparedArgs& p, const LossOptions& options) {
  const int64_t N = p.input.size(0);
  const auto acc = accumulate_type(p.input.scalar_type());
  at::Tensor loss = at::empty({N}, p.input.options().dtype(acc));
  at::Tensor stats = at::empty({N, 2}, p.input.options().dtype(acc));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cross_entropy_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto kernel = [](auto threads, auto plain) { return &cross_entropy_fwd_kernel<scalar_t, threads(), plain()>; };
      launch_for_classes(
          launch, kernel, kernel_args<scalar_t>(launch, p, options), loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
    });
  }
  if (options.reduction == kNone) return {loss, stats};
  at::Tensor total = loss.sum();  // a deterministic tree reduction, no atomics
  return {options.reduction == kMean ? total / mean_divisor(p, options.ignore_index, acc) : total, stats};  // 0/0 = nan
}

// The forward, then the backward for grad_loss = 1 into dx. Each kernel reads the rows once.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> forward_and_unit_grad(
    const Launcher& launch, const PreparedArgs& p, const LossOptions& options, const at::Tensor& dx) {
  auto result = forward(launch, p, options);
  if (p.input.size(0) > 0) {
    const auto options_f = p.input.options().dtype(at::kFloat);
    const at::Tensor unit =
        options.reduction == kNone ? at::ones({p.input.size(0)}, options_f) : at::ones({}, options_f);
    launch_bwd(launch, p, unit, std::get<1>(result), options, dx);
  }
  return result;
}

// The forward ops' arguments checked (devices first) and laid out, and the options the kernels use.
inline std::pair<PreparedArgs, LossOptions> forward_args(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const std::optional<at::Tensor>& predictions) {
  const LossOptions checked =
      check_options(input, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss);
  PreparedArgs p = prepare_forward_args(input, target, weight, predictions);
  const LossOptions options = kernel_options(checked, p);
  return {std::move(p), options};
}

// The four ops (their schemas: ../register.cpp) on the device that Launcher launches kernels on:
// Launcher(input) selects it (after the arguments' devices are checked), launcher.multiprocessors()
// sizes the grid, launcher(kernel, grid, args...) runs kernel on kBlock threads a block.

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_on(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const std::optional<at::Tensor>& predictions) {
  const auto [p, options] = forward_args(
      input, target, weight, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, predictions);
  return forward(Launcher(input), p, options);
}

// The in-place op: the backward's writes land where it has just read.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_on(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const std::optional<at::Tensor>& predictions) {
  const auto [p, options] = forward_args(
      input, target, weight, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, predictions);
  TORCH_CHECK(
      p.input.is_same(input) && input.is_contiguous(),
      "fused_softmax: input: the in-place gradient needs contiguous (rows, classes) logits, got strides ",
      input.strides());
  return forward_and_unit_grad(Launcher(input), p, options, input);
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_grad_on(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const std::optional<at::Tensor>& predictions) {
  const auto [p, options] = forward_args(
      input, target, weight, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, predictions);
  const Launcher launch(input);
  at::Tensor grad = at::empty({p.input.size(0), p.input.size(1)}, p.input.options());
  auto [loss, stats] = forward_and_unit_grad(launch, p, options, grad);
  return {loss, stats, grad};
}

template <typename Launcher>
at::Tensor cross_entropy_bwd_on(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
    int64_t reduction, double logit_scale, double softcap, double z_loss, int64_t class_start, int64_t num_classes) {
  const LossOptions checked =
      check_options(input, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss);
  const PreparedArgs p =  // checks devices first
      prepare_args(input, target, weight, class_start, num_classes);
  const LossOptions options = kernel_options(checked, p);
  check_backward_args(grad_loss, p.input, stats, reduction);
  const Launcher launch(input);
  at::Tensor grad = at::empty({p.input.size(0), p.input.size(1)}, p.input.options());
  if (p.input.size(0) > 0) launch_bwd(launch, p, grad_loss, stats, options, grad);
  return grad;
}

}  // namespace fused_softmax
