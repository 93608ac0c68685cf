// The row path of the CPU kernels: a row at a time, at::vec lanes across its classes. Forward: pass 1
// finds the max m, pass 2 sums exp(x - m) (and, when the target spreads mass over every class,
// sum_c q_c * (x_c - m)) in blocks of classes; backward: one pass that reads x (or the forward's
// kept exp(x - m)) and writes dx, streamed past the caches when the gradient is large.
// Part of the CPU kernels that kernels.cpp compiles once per instruction-set level (see kernels.h):
// include it there only, inside nothing; it opens its level's namespace itself.
#pragma once

#include "problem.h"

namespace fused_softmax::cpu::CPU_CAPABILITY {
namespace {

template <typename scalar_t>
inline double Problem<scalar_t>::sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
}

template <typename scalar_t>
inline auto Problem<scalar_t>::max_of(const scalar_t* xi, int64_t j, int64_t end) const -> acc_t {
  // Four running maxima: with one, every vector waited on the previous max (and its NaN check),
  // the forward's bottleneck at C = 1000. A max is exact, so the order changes no bit.
  constexpr acc_t kLowest = -std::numeric_limits<acc_t>::infinity();
  Vec m0(kLowest), m1(kLowest), m2(kLowest), m3(kLowest);
  for (; j + 4 * K <= end; j += 4 * K) {
    m0 = at::vec::maximum(m0, load<acc_t>(xi + j, K));
    m1 = at::vec::maximum(m1, load<acc_t>(xi + j + K, K));
    m2 = at::vec::maximum(m2, load<acc_t>(xi + j + 2 * K, K));
    m3 = at::vec::maximum(m3, load<acc_t>(xi + j + 3 * K, K));
  }
  Vec m = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  for (; j < end; j += K) {
    const int64_t n = std::min(K, end - j);
    m = at::vec::maximum(m, Vec::set(m, load<acc_t>(xi + j, n), n));  // lanes past the row keep m
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
}

// T is monotone: the max of x is T(the max of r).
template <typename scalar_t>
inline auto Problem<scalar_t>::row_max(const scalar_t* xi) const -> acc_t {
  return transform(max_of(xi, 0, C));
}

// The argmax in the same pass: the max of each kArgmaxChunk classes, and the first chunk whose max
// ranks above the earlier ones' (as torch.argmax ranks: larger, or NaN) holds the first class with
// the row's max; only that chunk is read again, from cache. Compared as the softmax sees them (T(max
// of r) is the chunk's max of x): ties that a softcap rounds together go to the first.
template <typename scalar_t>
C10_NOINLINE auto Problem<scalar_t>::row_max_and_argmax(const scalar_t* xi, int64_t* prediction) const -> acc_t {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t chunk = 0;
  for (int64_t j = 0; j < C; j += kArgmaxChunk) {
    const acc_t m = transform(max_of(xi, j, std::min(C, j + kArgmaxChunk)));
    if (fused_softmax::ranks_above(m, best)) {  // the scalar one (cross_entropy.h)
      best = m;
      chunk = j;
    }
  }
  // The chunk's first lane that holds best (or, for NaN, a NaN): a row of -inf gives class 0.
  const int64_t end = std::min(C, chunk + kArgmaxChunk);
  for (int64_t j = chunk; j < end; j += K) {
    const int64_t n = std::min(K, end - j);
    const Vec v = transform.identity ? load<acc_t>(xi + j, n) : transform(load<acc_t>(xi + j, n));
    const Vec other = std::isnan(best) ? v == v : v != Vec(best);  // all ones where v is not best
    const int here = other.zero_mask() & ((1 << n) - 1);  // bit k: lane k holds best (lanes past n: 0s loaded)
    if (here != 0) {
      *prediction = j + __builtin_ctz(here);
      return best;
    }
  }
  *prediction = end - 1;  // not reached: some lane of the chunk holds its max
  return best;
}

// The logits of row i at columns [j, j + n) as the softmax sees them. kTransformed is a template
// argument so that the plain loops carry no trace of tanh: its library call would make the
// compiler save every vector register around it, which halved the forward's speed.
template <typename scalar_t>
template <bool kTransformed>
inline auto Problem<scalar_t>::logits(const scalar_t* xi, int64_t j, int64_t n) const -> Vec {
  const Vec r = load<acc_t>(xi + j, n);
  if constexpr (kTransformed) {
    return transform(r);
  } else {
    return r;
  }
}

// Pass 2 of the forward: stats and loss of row i, given its max m. With e, exp(x_c - m) is kept
// there for the backward of the same row (one exp per element for both).
template <typename scalar_t>
template <bool kTransformed>
inline void Problem<scalar_t>::forward_row(int64_t i, acc_t m, acc_t* loss, RowStats<acc_t>* stats, acc_t* e) const {
  const scalar_t* xi = x + i * x_stride;
  const SpreadMass<acc_t, scalar_t> q = spread(i);
  const bool spread_on = has_spread();
  const Vec zero(0);
  double sum_exp = 0, mass = 0, mass_dot = 0;  // the blocks' sums (see kSumBlock)
  for (int64_t b = 0; b < C; b += kSumBlock) {
    Vec block_exp(0), block_mass(0), block_dot(0);
    for_each_vector<K>(std::min(kSumBlock, C - b), [&](int64_t jb, auto n) {
      const int64_t j = b + jb;
      const Vec xm = Vec::set(zero, logits<kTransformed>(xi, j, n) - Vec(m), n);  // past the row: 0, not inf
      const Vec ej = vexp(xm);
      block_exp += Vec::set(zero, ej, n);
      if (e) ej.store(e + j, n);
      if (spread_on) {
        const Vec qj = spread_at(q, j, n);
        block_mass += qj;
        block_dot = at::vec::fmadd(qj, xm, block_dot);
      }
    });
    sum_exp += sum_lanes(block_exp);
    if (spread_on) {  // horizontal sums cost as much as a short row: only the ones needed
      mass += sum_lanes(block_mass);
      mass_dot += sum_lanes(block_dot);
    }
  }
  // A NaN or +inf logit, or only -inf ones, make the row NaN, as in torch (exp_u20 is not NaN-exact).
  const acc_t log_sum =
      std::isfinite(m) ? std::log(static_cast<acc_t>(sum_exp)) : std::numeric_limits<acc_t>::quiet_NaN();
  stats[i] = {m, log_sum};
  if (ignored(i)) {
    loss[i] = 0;
    return;
  }
  // sum_c q_c * (lse - x_c), with lse - x_c = log_sum - (x_c - m) so no large terms cancel.
  acc_t l = 0;
  if (spread_on) l = static_cast<acc_t>(mass) * log_sum - static_cast<acc_t>(mass_dot);
  if (y) l += target_coef(y[i]) * (log_sum - (transform(static_cast<acc_t>(xi[y[i]])) - m));
  if (z_loss != 0) l += z_loss * stats[i].lse() * stats[i].lse();  // negative under a negative weight sum
  loss[i] = l;
}

// dx_c = g * (exp(x_c - lse) * S - q_c) * dx_c/dr_c for row i, with S its total target mass
// (plus 2 z lse). dx may be x itself: each element is read before it is written. kFromExp: e holds
// the forward's exp(x_c - max) for this row, so p_c = e_c * exp(-log_sum) needs no exp.
template <typename scalar_t>
template <bool kTransformed, bool kFromExp>
inline void Problem<scalar_t>::backward_row(
    int64_t i, RowStats<acc_t> stats, acc_t g, scalar_t* dx, const acc_t* e) const {
  const scalar_t* xi = x + i * x_stride;
  const SpreadMass<acc_t, scalar_t> q = spread(i);
  acc_t S = 0;
  if (t) {  // summed over all the classes, not only x's
    const SpreadMass<acc_t, scalar_t> whole{t + i * t_stride, w, q.a, q.b};
    double mass = 0;
    for (int64_t b = 0; b < classes; b += kSumBlock) {
      Vec block_mass(0);
      const int64_t end = std::min(b + kSumBlock, classes);
      for (int64_t j = b; j < end; j += K) block_mass += spread_at(whole, j, std::min(K, end - j));
      mass += sum_lanes(block_mass);
    }
    S = static_cast<acc_t>(mass);
  } else {
    S = target_coef(y[i]) + spread_index_mass;
  }
  S += 2 * z_loss * stats.lse();
  const int64_t y_col = y ? y[i] - col0 : -1;  // the target class's column in x, if it is one of x's
  const bool y_here = y_col >= 0 && y_col < C;
  const acc_t x_y = y_here ? transform(static_cast<acc_t>(xi[y_col])) : 0;  // read before dx may overwrite it
  const bool spread_on = has_spread();
  const Vec max(stats.max), vg(g);
  // g * p_c * S = exp(x_c - max) * (g * S / sum_c exp(x_c - max)): one multiply per element.
  const Vec scale(g * S * std::exp(-stats.log_sum));
  // With stream_grad the whole vectors go past the caches, from the first address stream() takes
  // on: a shorter first vector up to it. A plain loop: with for_each_vector's constant-width body
  // the 16-bit stores ran 2x slower.
  const int64_t head = stream_grad ? elements_to_stream_alignment(dx) : 0;
  for (int64_t j = 0; j < C;) {
    const int64_t n = std::min(j == 0 && head > 0 ? head : K, C - j);
    Vec xj;  // the logits, read (and transformed, a tanh with a softcap) once, where needed
    if constexpr (!kFromExp || kTransformed) xj = logits<kTransformed>(xi, j, n);
    // p_c from exp(x_c - max), the same arithmetic with or without e: backward is reentrant (a
    // recomputed gradient has the forward-formed one's bits).
    Vec d;
    if constexpr (kFromExp) {
      d = Vec::loadu(e + j, n) * scale;
    } else {
      d = vexp(xj - max) * scale;
    }
    if (spread_on) d = d - vg * spread_at(q, j, n);
    if constexpr (kTransformed) d = d * transform.slope(xj);
    if (stream_grad && n == K) {
      stream(dx + j, d);
    } else {
      store(dx + j, d, n);
    }
    j += n;
  }
  if (stream_grad) sfence();  // the streamed stores are ordered before the target class's below
  if (y_here) {  // the target class, recomputed in acc_t and rounded once: p_y * S - q_y nearly cancels
    const acc_t p_y = std::exp(stats.minus_lse(x_y));
    const acc_t q_y = target_coef(y[i]) + q.b * (w ? w[y[i]] : acc_t(1));
    dx[y_col] = static_cast<scalar_t>(g * (p_y * S - q_y) * transform.slope(x_y));
  }
}

}  // namespace
}  // namespace fused_softmax::cpu::CPU_CAPABILITY
