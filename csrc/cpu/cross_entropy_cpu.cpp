// CPU kernels of the fused softmax cross-entropy.
//
// Rows run in parallel (at::parallel_for); inside a row every loop works on
// at::vec::Vectorized lanes of the accumulation type (float32 for 16-bit
// inputs), so a 16-bit row is widened once per element and never summed in
// 16 bits. The math is spelled out in ../cross_entropy.h.
//
// Forward, per row: pass 1 finds the max m; pass 2 sums exp(x - m) (and, when
// the target spreads mass over every class, sum_c q_c * (x_c - m)). Nothing of
// size N x C is written. Backward, per row: one pass that reads x and writes dx.
#include "../cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <numeric>

namespace fused_softmax {
namespace {

using at::vec::Vectorized;

// Loads n <= size() elements as a vector of the accumulation type; lanes >= n are 0.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load(const scalar_t* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if (n == Vec::size()) {
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    }
    __at_align__ acc_t buf[Vec::size()] = {};
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(buf);
  }
}

// Stores the first n lanes, rounding to the output dtype once.
template <typename acc_t, typename scalar_t>
inline void store(scalar_t* p, const Vectorized<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p, n);
  } else {
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

// exp over lanes. float: ATen's exp_u20 (the one its own softmax uses); for 16-bit inputs the cheaper
// fexp_u20 (a degree-3 polynomial), whose error the inputs' own rounding hides. double: libm.
template <typename scalar_t>
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  if constexpr (at::is_reduced_floating_point_v<scalar_t>) {
    return v.fexp_u20();
  } else {
    return v.exp_u20();
  }
}
template <typename scalar_t>
inline Vectorized<double> vexp(const Vectorized<double>& v) {
  return v.map([](double a) { return std::exp(a); });
}

// The part of a row's target mass q_c that is spread over classes:
// q_c = w_c * (a * t_c + b), with t the probability row (nullptr for class
// indices, whose single target class is added separately) and w the class
// weights (nullptr for all ones).
template <typename acc_t, typename scalar_t>
struct SpreadMass {
  const scalar_t* t;
  const acc_t* w;
  acc_t a;
  acc_t b;

  Vectorized<acc_t> at(int64_t j, int64_t n) const {
    using Vec = Vectorized<acc_t>;
    Vec q(b);
    if (t) q = at::vec::fmadd(Vec(a), load<acc_t>(t + j, n), q);
    if (w) q = q * load<acc_t>(w + j, n);
    return Vec::set(Vec(0), q, n);  // lanes past the row carry no mass
  }
  acc_t at(int64_t j) const {
    const acc_t q = t ? a * static_cast<acc_t>(t[j]) + b : b;
    return w ? q * w[j] : q;
  }
};

template <typename acc_t, typename scalar_t>
acc_t row_max(const scalar_t* x, int64_t C) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  Vec m(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < C; j += K) {
    const int64_t n = std::min(K, C - j);
    m = at::vec::maximum(m, Vec::set(m, load<acc_t>(x + j, n), n));  // lanes past the row keep m
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
}

template <typename acc_t>
struct RowSums {
  acc_t sum_exp;   // sum_c exp(x_c - m)
  acc_t mass;      // sum_c q_c over the spread mass
  acc_t mass_dot;  // sum_c q_c * (x_c - m) over the spread mass
};

// Pass 2 of the forward. With spread == nullptr only sum_exp is computed.
template <typename acc_t, typename scalar_t>
RowSums<acc_t> row_sums(const scalar_t* x, int64_t C, acc_t m, const SpreadMass<acc_t, scalar_t>* spread) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const Vec zero(0);
  Vec sum_exp(0), mass(0), mass_dot(0);
  for (int64_t j = 0; j < C; j += K) {
    const int64_t n = std::min(K, C - j);
    const Vec xm = Vec::set(zero, load<acc_t>(x + j, n) - Vec(m), n);  // lanes past the row: 0, never inf
    sum_exp += Vec::set(zero, vexp<scalar_t>(xm), n);
    if (spread) {
      const Vec q = spread->at(j, n);
      mass += q;
      mass_dot = at::vec::fmadd(q, xm, mass_dot);
    }
  }
  auto add = [](Vec& a, Vec& b) { return a + b; };
  RowSums<acc_t> sums{at::vec::vec_reduce_all<acc_t>(add, sum_exp), 0, 0};
  if (spread) {  // horizontal sums cost as much as a short row: only the ones needed
    sums.mass = at::vec::vec_reduce_all<acc_t>(add, mass);
    sums.mass_dot = at::vec::vec_reduce_all<acc_t>(add, mass_dot);
  }
  return sums;
}

template <typename acc_t, typename scalar_t>
acc_t row_mass(int64_t C, const SpreadMass<acc_t, scalar_t>& spread) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  Vec mass(0);
  for (int64_t j = 0; j < C; j += K) mass += spread.at(j, std::min(K, C - j));
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, mass);
}

// A row's saved statistics; x - lse is formed as (x - max) - log_sum.
template <typename acc_t>
struct RowStats {
  acc_t max, log_sum;
  acc_t minus_lse(acc_t x) const { return (x - max) - log_sum; }
};

// dx_c = g * (exp(x_c - lse) * S - q_c) over the spread mass q (the single
// target class of an index row is corrected by the caller).
template <typename acc_t, typename scalar_t>
void row_grad(
    scalar_t* dx, const scalar_t* x, int64_t C, RowStats<acc_t> stats, acc_t g, acc_t S,
    const SpreadMass<acc_t, scalar_t>* spread) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const Vec max(stats.max), log_sum(stats.log_sum), vg(g), vS(S);
  for (int64_t j = 0; j < C; j += K) {
    const int64_t n = std::min(K, C - j);
    Vec p_scaled = vexp<scalar_t>((load<acc_t>(x + j, n) - max) - log_sum) * vS;
    if (spread) p_scaled = p_scaled - spread->at(j, n);
    store(dx + j, vg * p_scaled, n);
  }
}

// Small C: K = Vec::size() rows at a time, one row per vector lane. A row of
// 10 classes fills under one vector, and its max and sum would cost two
// horizontal reductions; across lanes they are plain vertical operations.
constexpr int64_t kMaxSmallClasses = 32;

// Copies rows [0, rows) of a K-row block into buf[c * K + r] (lane r = row r; lanes past rows are 0).
template <typename acc_t, typename scalar_t>
void transpose_in(const scalar_t* x, int64_t x_stride, int64_t rows, int64_t C, acc_t* buf) {
  constexpr int64_t K = Vectorized<acc_t>::size();
  if (rows < K) std::fill(buf, buf + C * K, acc_t(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) buf[c * K + r] = static_cast<acc_t>(x[r * x_stride + c]);
}

// Calls f(i0, rows, buf) for each block of up to K rows of [begin, end), the block transposed into buf.
template <typename acc_t, typename scalar_t, typename F>
void for_each_block(const scalar_t* x, int64_t x_stride, int64_t C, int64_t begin, int64_t end, F&& f) {
  constexpr int64_t K = Vectorized<acc_t>::size();
  __at_align__ acc_t buf[kMaxSmallClasses * K];
  for (int64_t i0 = begin; i0 < end; i0 += K) {
    const int64_t rows = std::min(K, end - i0);
    transpose_in(x + i0 * x_stride, x_stride, rows, C, buf);
    f(i0, rows, buf);
  }
}

inline Vectorized<float> vlog(const Vectorized<float>& v) {
  return v.log();
}
inline Vectorized<double> vlog(const Vectorized<double>& v) {
  return v.log();
}

// The forward of a block of index-target rows held one per lane (see transpose_in): losses and stats
// of rows [0, rows), computed lane-wise, the same math as the row path.
template <typename acc_t, typename scalar_t>
void forward_block(const acc_t* buf, int64_t rows, int64_t C, const int64_t* y, int64_t ignore_index, const acc_t* w,
                   acc_t eps, acc_t* loss, RowStats<acc_t>* stats) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const acc_t b = eps / static_cast<acc_t>(C);
  Vec m(-std::numeric_limits<acc_t>::infinity());
  for (int64_t c = 0; c < C; ++c) m = at::vec::maximum(m, Vec::loadu(buf + c * K));
  Vec sum_exp(0), mass(0), mass_dot(0);
  for (int64_t c = 0; c < C; ++c) {
    const Vec xm = Vec::loadu(buf + c * K) - m;
    sum_exp += vexp<scalar_t>(xm);
    if (eps > 0) {  // label smoothing spreads b * w_c on every class
      const Vec q(w ? b * w[c] : b);
      mass += q;
      mass_dot = at::vec::fmadd(q, xm, mass_dot);
    }
  }
  // A NaN or +inf logit, or only -inf ones, make the row NaN, as in torch (exp_u20 is not NaN-exact).
  const Vec finite = (m - m) == Vec(0);
  const Vec log_sum = Vec::blendv(Vec(std::numeric_limits<acc_t>::quiet_NaN()), vlog(sum_exp), finite);
  __at_align__ acc_t coef[K] = {}, x_y[K] = {}, counted[K] = {};
  for (int64_t r = 0; r < rows; ++r) {
    if (y[r] == ignore_index) continue;
    coef[r] = (1 - eps) * (w ? w[y[r]] : acc_t(1));
    x_y[r] = buf[y[r] * K + r];
    counted[r] = 1;
  }
  // sum_c q_c * (lse - x_c), with lse - x_c = log_sum - (x_c - m) so no large terms cancel.
  const Vec l = Vec::loadu(coef) * (log_sum - (Vec::loadu(x_y) - m)) + (mass * log_sum - mass_dot);
  Vec::blendv(Vec(0), l, Vec::loadu(counted) == Vec(1)).store(loss, rows);  // an ignored row's loss is 0
  __at_align__ acc_t lanes[2][K];
  m.store(lanes[0]);
  log_sum.store(lanes[1]);
  for (int64_t r = 0; r < rows; ++r) stats[r] = {lanes[0][r], lanes[1][r]};
}

// The backward of a block of index-target rows held one per lane, in place in buf:
// g * (p_c * S - q_c), the target class included, so it is rounded once. Ignored and NaN rows
// are left for the caller to overwrite.
template <typename acc_t, typename scalar_t>
void backward_block(acc_t* buf, int64_t rows, int64_t C, const int64_t* y, int64_t ignore_index, const acc_t* w,
                    acc_t eps, acc_t spread_mass, const RowStats<acc_t>* stats, const acc_t* g, int64_t g_stride) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const acc_t b = eps / static_cast<acc_t>(C);
  __at_align__ acc_t max[K] = {}, log_sum[K] = {}, S[K] = {}, gl[K] = {}, coef[K] = {}, cls[K];
  std::fill(cls, cls + K, acc_t(-1));
  for (int64_t r = 0; r < rows; ++r) {
    max[r] = stats[r].max;
    log_sum[r] = stats[r].log_sum;
    if (y[r] == ignore_index) continue;
    coef[r] = (1 - eps) * (w ? w[y[r]] : acc_t(1));
    S[r] = coef[r] + spread_mass;
    gl[r] = g[r * g_stride];
    cls[r] = static_cast<acc_t>(y[r]);  // exact: C <= kMaxSmallClasses
  }
  const Vec vmax = Vec::loadu(max), vlog_sum = Vec::loadu(log_sum), vS = Vec::loadu(S), vg = Vec::loadu(gl);
  const Vec vcoef = Vec::loadu(coef), vcls = Vec::loadu(cls);
  for (int64_t c = 0; c < C; ++c) {
    Vec q = Vec::blendv(Vec(0), vcoef, vcls == Vec(static_cast<acc_t>(c)));
    if (eps > 0) q += Vec(w ? b * w[c] : b);
    const Vec p = vexp<scalar_t>((Vec::loadu(buf + c * K) - vmax) - vlog_sum);
    (vg * (p * vS - q)).store(buf + c * K);
  }
}

// Rows per task for at::parallel_for: about 32K elements each.
int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 32768 / C);
}

void check_target_range_cpu(const at::Tensor& target64, int64_t C, int64_t ignore_index) {
  const int64_t* y = target64.data_ptr<int64_t>();
  for (int64_t i = 0; i < target64.numel(); ++i) {
    TORCH_CHECK(
        y[i] == ignore_index || (y[i] >= 0 && y[i] < C),
        "fused_softmax: target: class index ", y[i], " at position ", i, " is out of range for ", C,
        " classes (expected 0 <= target < ", C, " or target == ignore_index ", ignore_index, ")");
  }
}

// The shared preparation plus the CPU's own checks of the class indices and
// weights (the CUDA kernels assert on the device instead: no host sync).
PreparedArgs prepare_args_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  PreparedArgs p = prepare_args(input, target, weight, label_smoothing, reduction);
  if (!p.probabilities) check_target_range_cpu(p.target, input.size(1), ignore_index);
  if (p.weight.defined()) {
    AT_DISPATCH_FLOATING_TYPES(p.weight.scalar_type(), "check_weight_cpu", [&] {
      const scalar_t* w = p.weight.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < p.weight.numel(); ++c) {
        TORCH_CHECK(
            std::isfinite(w[c]) && w[c] >= 0, "fused_softmax: weight: class weights must be finite and ",
            "non-negative, got ", w[c], " for class ", c);
      }
    });
  }
  return p;
}

// The divisor of 'mean': the summed weights of the rows not ignored (class
// indices; their count without weights), or the row count (probabilities).
// A plain loop: for a small batch, ATen ops would cost more than the kernel.
template <typename acc_t>
double mean_divisor_cpu(const PreparedArgs& p, int64_t ignore_index) {
  if (p.probabilities) return static_cast<double>(p.input.size(0));
  const int64_t* y = p.target.const_data_ptr<int64_t>();
  const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  double divisor = 0;
  for (int64_t i = 0; i < p.input.size(0); ++i) {
    if (y[i] != ignore_index) divisor += w ? static_cast<double>(w[y[i]]) : 1.0;
  }
  return divisor;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  const PreparedArgs p = prepare_args_cpu(input_, target_, weight_, ignore_index, label_smoothing, reduction);
  const int64_t N = p.input.size(0);
  const int64_t C = p.input.size(1);
  const auto acc = accumulate_type(p.input.scalar_type());
  at::Tensor loss = at::empty({N}, p.input.options().dtype(acc));
  at::Tensor stats = at::empty({N, 2}, p.input.options().dtype(acc));
  at::Tensor reduced;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    const int64_t x_stride = p.input.stride(0);
    const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    const acc_t spread_b = eps / static_cast<acc_t>(C);
    acc_t* loss_out = loss.data_ptr<acc_t>();
    RowStats<acc_t>* stats_out = reinterpret_cast<RowStats<acc_t>*>(stats.data_ptr<acc_t>());

    const bool has_spread = p.probabilities || eps > 0;
    const bool small = !p.probabilities && C <= kMaxSmallClasses;

    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      if (small) {  // K rows at once, one per lane
        for_each_block<acc_t>(x, x_stride, C, begin, end, [&](int64_t i0, int64_t rows, const acc_t* buf) {
          forward_block<acc_t, scalar_t>(
              buf, rows, C, p.target.const_data_ptr<int64_t>() + i0, ignore_index, w, eps, loss_out + i0,
              stats_out + i0);
        });
        return;
      }
      for (int64_t i = begin; i < end; ++i) {  // row by row
        const scalar_t* xi = x + i * x_stride;
        SpreadMass<acc_t, scalar_t> spread{nullptr, w, 1 - eps, spread_b};
        if (p.probabilities) spread.t = p.target.const_data_ptr<scalar_t>() + i * p.target.stride(0);
        const acc_t m = row_max<acc_t>(xi, C);
        const RowSums<acc_t> sums = row_sums<acc_t>(xi, C, m, has_spread ? &spread : nullptr);
        // A NaN or +inf logit, or only -inf ones, make the row NaN, as in torch (exp_u20 is not NaN-exact).
        const acc_t log_sum = std::isfinite(m) ? std::log(sums.sum_exp) : std::numeric_limits<acc_t>::quiet_NaN();
        stats_out[i] = {m, log_sum};
        // sum_c q_c * (lse - x_c), with lse - x_c = log_sum - (x_c - m) so no large terms cancel.
        acc_t target_term = 0;  // (1 - eps) * w[y] * (lse - x[y]) for class indices
        if (!p.probabilities) {
          const int64_t y = p.target.const_data_ptr<int64_t>()[i];
          if (y == ignore_index) {
            loss_out[i] = 0;
            continue;
          }
          const acc_t target_coef = (1 - eps) * (w ? w[y] : acc_t(1));
          target_term = target_coef * (log_sum - (static_cast<acc_t>(xi[y]) - m));
        }
        loss_out[i] = target_term + (sums.mass * log_sum - sums.mass_dot);
      }
    });
    if (reduction != kNone) {  // summed in double, in row order: the same bits for any thread count
      double total = 0;
      for (int64_t i = 0; i < N; ++i) total += loss_out[i];
      if (reduction == kMean) total /= mean_divisor_cpu<acc_t>(p, ignore_index);  // 0 / 0 = nan, as torch
      reduced = at::scalar_tensor(total, p.input.options().dtype(acc));
    }
  });
  return {reduction == kNone ? loss : reduced, stats};
}

at::Tensor cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss_, const at::Tensor& input_, const at::Tensor& target_,
    const std::optional<at::Tensor>& weight_, const at::Tensor& stats_, int64_t ignore_index,
    double label_smoothing, int64_t reduction) {
  const PreparedArgs p = prepare_args_cpu(input_, target_, weight_, ignore_index, label_smoothing, reduction);
  check_backward_args(grad_loss_, p.input, stats_, reduction);
  const int64_t N = p.input.size(0);
  const int64_t C = p.input.size(1);
  const auto acc = accumulate_type(p.input.scalar_type());
  at::Tensor grad = at::empty({N, C}, p.input.options());
  if (N == 0) return grad;
  const at::Tensor grad_loss = grad_loss_.to(acc);
  const at::Tensor stats = stats_.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    const int64_t x_stride = p.input.stride(0);
    scalar_t* dx = grad.data_ptr<scalar_t>();
    // Row i's grad_loss is g[i * g_stride]; a reduced loss spreads one value over every row.
    const acc_t* g = grad_loss.const_data_ptr<acc_t>();
    int64_t g_stride = reduction == kNone ? grad_loss.stride(0) : 0;
    acc_t g_value;
    if (reduction != kNone) {
      const double divisor = reduction == kMean ? mean_divisor_cpu<acc_t>(p, ignore_index) : 1.0;
      g_value = static_cast<acc_t>(static_cast<double>(*g) / divisor);
      g = &g_value;
    }
    const auto* stats_in = reinterpret_cast<const RowStats<acc_t>*>(stats.const_data_ptr<acc_t>());
    const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    const acc_t spread_b = eps / static_cast<acc_t>(C);
    const acc_t spread_index_mass = spread_b * (w ? std::accumulate(w, w + C, acc_t(0)) : static_cast<acc_t>(C));

    const bool small = !p.probabilities && C <= kMaxSmallClasses;
    const int64_t* y_in = p.probabilities ? nullptr : p.target.const_data_ptr<int64_t>();
    auto target_coef = [&](int64_t y) { return (1 - eps) * (w ? w[y] : acc_t(1)); };

    // Overwrites row i if it is ignored (no gradient, whatever grad_loss holds) or NaN (the
    // forward found a NaN row); returns whether it did.
    auto mend_row = [&](int64_t i) {
      scalar_t* dxi = dx + i * C;
      if (y_in && y_in[i] == ignore_index) {
        std::fill(dxi, dxi + C, scalar_t(0));
      } else if (std::isnan(stats_in[i].log_sum)) {
        std::fill(dxi, dxi + C, std::numeric_limits<scalar_t>::quiet_NaN());
      } else {
        return false;
      }
      return true;
    };
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      if (small) {  // K rows at once, one per lane
        constexpr int64_t K = Vectorized<acc_t>::size();
        for_each_block<acc_t>(x, x_stride, C, begin, end, [&](int64_t i0, int64_t rows, acc_t* buf) {
          backward_block<acc_t, scalar_t>(
              buf, rows, C, y_in + i0, ignore_index, w, eps, spread_index_mass, stats_in + i0, g + i0 * g_stride,
              g_stride);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < C; ++c) dx[(i0 + r) * C + c] = static_cast<scalar_t>(buf[c * K + r]);
          for (int64_t r = 0; r < rows; ++r) mend_row(i0 + r);
        });
        return;
      }
      for (int64_t i = begin; i < end; ++i) {  // row by row
        if (mend_row(i)) continue;
        SpreadMass<acc_t, scalar_t> spread{nullptr, w, 1 - eps, spread_b};
        acc_t S;  // the row's total target mass
        if (p.probabilities) {
          spread.t = p.target.const_data_ptr<scalar_t>() + i * p.target.stride(0);
          S = row_mass<acc_t>(C, spread);
        } else {
          S = target_coef(y_in[i]) + spread_index_mass;
        }
        const bool has_spread = p.probabilities || eps > 0;
        row_grad<acc_t>(dx + i * C, x + i * x_stride, C, stats_in[i], g[i * g_stride], S,
                        has_spread ? &spread : nullptr);
        if (y_in) {  // the target class, recomputed in acc_t and rounded once: p_y * S - q_y nearly cancels
          const int64_t y = y_in[i];
          const acc_t p_y = std::exp(stats_in[i].minus_lse(static_cast<acc_t>(x[i * x_stride + y])));
          const acc_t q_y = target_coef(y) + spread_b * (w ? w[y] : acc_t(1));
          dx[i * C + y] = static_cast<scalar_t>(g[i * g_stride] * (p_y * S - q_y));
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_softmax, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
}

}  // namespace fused_softmax
