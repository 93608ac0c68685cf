// The small-C path of the CPU kernels (C <= 32 class indices): a vector's width of rows at a time,
// one row per lane, transposed in registers, so that a row's max and sum are vertical operations
// instead of two horizontal reductions per row.
// Part of the CPU kernels that kernels.cpp compiles once per instruction-set level (see kernels.h):
// include it there only, inside nothing; it opens its level's namespace itself.
#pragma once

#include "problem.h"

namespace fused_softmax::cpu::CPU_CAPABILITY {
namespace {

// Fills b with rows [i0, i0 + rows); lanes past them are 0 (class -1, coefficient 0).
template <typename scalar_t>
inline void Problem<scalar_t>::load_block(int64_t i0, int64_t rows, Block& b) const {
  const scalar_t* xi = x + i0 * x_stride;
#if defined(CPU_CAPABILITY_AVX512)
  // 16 classes at a time: each row's in a register (16-bit ones widened there), transposed.
  static_assert(!std::is_same_v<acc_t, float> || (K == 16 && kMaxSmallClasses % K == 0));
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t c0 = 0; c0 < C; c0 += K) {
      const int64_t n = std::min(K, C - c0);
      __m512 r[K];
      for (int64_t i = 0; i < K; ++i)
        r[i] = i < rows ? __m512(load<acc_t>(xi + i * x_stride + c0, n)) : _mm512_setzero_ps();
      transpose_16x16(r);
      // All 16 (b.x has room): a count known only at run time made the compiler spill r and copy it.
      for (int64_t c = 0; c < K; ++c) _mm512_store_ps(b.x + (c0 + c) * K, r[c]);
    }
  } else
#endif
  {
    // One element at a time (ATen's register transpose, transpose_mxn, and vector gathers both
    // measured slower), or AVX2's 4 x 4 float tiles; 16-bit rows back to back are widened a
    // vector at a time first (one element at a time, the conversions were a quarter of bf16's
    // fwd+bwd at 65536 x 10).
    if (rows < K) std::fill(b.x, b.x + C * K, acc_t(0));
    if (!std::is_same_v<acc_t, scalar_t> && x_stride == C) {
      __at_align__ acc_t wide[kMaxSmallClasses * K];
      for (int64_t k = 0; k < rows * C; k += K) load<acc_t>(xi + k, std::min(K, rows * C - k)).store(wide + k);
      copy_transposed(wide, C, b.x, K, rows, C);
    } else {
      copy_transposed(xi, x_stride, b.x, K, rows, C);
    }
  }
  load_targets(i0, rows, b);
  if (!transform.identity)
    for (int64_t c = 0; c < C; ++c) transform(Vec::loadu(b.x + c * K)).store(b.x + c * K);
}

// b.cls and b.coef of rows [i0, i0 + rows).
template <typename scalar_t>
inline void Problem<scalar_t>::load_targets(int64_t i0, int64_t rows, Block& b) const {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {  // in registers: 2-4% of the 65536 x 10 forward
    auto first8 = [](int64_t n) { return static_cast<__mmask8>((1u << std::clamp<int64_t>(n, 0, 8)) - 1); };
    const __m512i ignore = _mm512_set1_epi64(ignore_index);
    const __m512i lo = _mm512_maskz_loadu_epi64(first8(rows), y + i0);  // rows i0 .. i0 + 7
    const __m512i hi = _mm512_maskz_loadu_epi64(first8(rows - 8), y + i0 + 8);
    // The lanes with a target class: rows of the block that are not ignored.
    const __mmask16 targeted = _mm512_mask_cmpneq_epi64_mask(first8(rows), lo, ignore) |
                               static_cast<__mmask16>(_mm512_mask_cmpneq_epi64_mask(first8(rows - 8), hi, ignore) << 8);
    // Their classes (< C <= 32, checked) as 16 32-bit integers.
    const __m512i cls =
        _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
    _mm512_store_ps(b.cls, _mm512_mask_cvtepi32_ps(_mm512_set1_ps(-1), targeted, cls));
    const __m512 w_y = w ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), targeted, cls, w, 4) : _mm512_set1_ps(1);
    _mm512_store_ps(b.coef, _mm512_maskz_mul_ps(targeted, _mm512_set1_ps(1 - eps), w_y));  // target_coef
    return;
  }
#endif
  std::fill(b.cls + rows, b.cls + K, acc_t(-1));
  std::fill(b.coef + rows, b.coef + K, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t cls = y[i0 + r];
    b.cls[r] = cls == ignore_index ? acc_t(-1) : static_cast<acc_t>(cls);
    b.coef[r] = cls == ignore_index ? acc_t(0) : target_coef(cls);
  }
}

// Losses and stats of a block, the same math as forward_row, lane-wise; returns the stats. With
// e, each class's exp(x - max) is kept there (e[c * K + r]) for the block's backward.
template <typename scalar_t>
FUSED_SOFTMAX_FLATTEN inline auto Problem<scalar_t>::forward_block(
    const Block& b, int64_t i0, int64_t rows, acc_t* loss, RowStats<acc_t>* stats, acc_t* e) const -> BlockStats {
  const acc_t spread = eps / static_cast<acc_t>(C);
  const Vec cls = Vec::loadu(b.cls);
  Vec m(-std::numeric_limits<acc_t>::infinity()), x_y(0), class_c(0);
  // With predictions: each lane's best logit so far, as torch.argmax ranks them, and its class (m may
  // drop a NaN, see block_max, so the best is kept apart).
  Vec best(-std::numeric_limits<acc_t>::infinity()), arg(0);
  for (int64_t c = 0; c < C; ++c, class_c += Vec(1)) {
    const Vec xc = Vec::loadu(b.x + c * K);
    m = block_max(m, xc);
    x_y = where_equal(cls, class_c, xc, x_y);  // the target class's logit
    if (predictions) {
      const Vec above = ranks_above(xc, best);
      best = Vec::blendv(best, xc, above);
      arg = Vec::blendv(arg, class_c, above);
    }
  }
  if (predictions) {
    __at_align__ acc_t lanes[K];
    arg.store(lanes);
    for (int64_t r = 0; r < rows; ++r) predictions[i0 + r] = static_cast<int64_t>(lanes[r]);  // exact: c < 32
  }
  Vec sum_exp(0), mass(0), mass_dot(0);
  for (int64_t c = 0; c < C; ++c) {
    const Vec xm = Vec::loadu(b.x + c * K) - m;
    const Vec ec = vexp(xm);
    sum_exp += ec;
    if (e) ec.store(e + c * K);
    if (eps > 0) {  // label smoothing spreads eps / C * w_c on every class
      const Vec q(w ? spread * w[c] : spread);
      mass += q;
      mass_dot = at::vec::fmadd(q, xm, mass_dot);
    }
  }
  // A NaN or +inf logit, or only -inf ones, make the row NaN, as in torch: +inf and -inf rows have
  // no finite max, and a NaN logit is in the max (block_max) or in the sum (vexp).
  const Vec finite = (m - m) == Vec(0);
  const Vec log_sum = Vec::blendv(Vec(std::numeric_limits<acc_t>::quiet_NaN()), sum_exp.log(), finite);
  // sum_c q_c * (lse - x_c), with lse - x_c = log_sum - (x_c - m) so no large terms cancel.
  Vec l = Vec::loadu(b.coef) * (log_sum - (x_y - m)) + (mass * log_sum - mass_dot);
  if (z_loss != 0) l = l + Vec(z_loss) * (m + log_sum) * (m + log_sum);
  where_equal(cls, Vec(-1), Vec(0), l).store(loss + i0, rows);  // an ignored row's loss is 0
  // RowStats are (max, log_sum) pairs: interleaved, the block's stats are two vector stores.
  const auto [first, second] = at::vec::interleave2(m, log_sum);
  acc_t* out = reinterpret_cast<acc_t*>(stats + i0);
  first.store(out, std::min(2 * rows, K));
  if (2 * rows > K) second.store(out + K, 2 * rows - K);
  return {m, log_sum};
}

// Rows [i0, i0 + rows)' saved stats as lanes (lanes past the rows: 0).
template <typename scalar_t>
inline auto Problem<scalar_t>::load_stats(int64_t i0, int64_t rows, const RowStats<acc_t>* stats) const -> BlockStats {
  const acc_t* in = reinterpret_cast<const acc_t*>(stats + i0);
  const Vec first = Vec::loadu(in, std::min(2 * rows, K));
  const Vec second = 2 * rows > K ? Vec::loadu(in + K, 2 * rows - K) : Vec(0);
  const auto [max, log_sum] = at::vec::deinterleave2(first, second);
  return {max, log_sum};
}

// Rows [i0, i0 + rows)' grad_loss, g[i * g_stride], as lanes.
template <typename scalar_t>
inline auto Problem<scalar_t>::grad_lanes(const acc_t* g, int64_t g_stride, int64_t i0, int64_t rows) const -> Vec {
  if (g_stride == 0) return Vec(*g);
  if (g_stride == 1) return Vec::loadu(g + i0, rows);
  __at_align__ acc_t lanes[K] = {};
  for (int64_t r = 0; r < rows; ++r) lanes[r] = g[(i0 + r) * g_stride];
  return Vec::loadu(lanes);
}

// The backward of a block, into b.grad: g * (p_c * S - q_c) * slope, the target class included, so
// it is rounded once (by store_block); 0 in ignored rows, NaN in NaN rows. e: forward_block's kept
// exps, or nullptr (p_c has the same bits either way, as in backward_row).
template <typename scalar_t>
FUSED_SOFTMAX_FLATTEN inline void Problem<scalar_t>::backward_block(
    Block& b, const BlockStats& s, const Vec& g, const acc_t* e) const {
  const acc_t spread = eps / static_cast<acc_t>(C);
  const Vec cls = Vec::loadu(b.cls), coef = Vec::loadu(b.coef);
  const Vec S = coef + Vec(spread_index_mass) + Vec(2 * z_loss) * (s.max + s.log_sum);  // sum_c q_c + 2 z lse
  const Vec inv_sum = vexp(Vec(0) - s.log_sum);  // 1 / sum_c exp(x_c - max), per lane
  // g * p_c * S = exp(x_c - max) * (g * S / sum): one multiply per class; NaN for a NaN row (only
  // AVX-512's exp above keeps NaN).
  const Vec scale = Vec::blendv(g * inv_sum * S, Vec(std::numeric_limits<acc_t>::quiet_NaN()), s.log_sum.isnan());
  const Vec g_coef = g * coef;
  Vec class_c(0);
  for (int64_t c = 0; c < C; ++c, class_c += Vec(1)) {
    Vec gq = where_equal(cls, class_c, g_coef, Vec(0));  // g * q_c
    if (eps > 0) gq += g * Vec(w ? spread * w[c] : spread);
    const Vec xc = Vec::loadu(b.x + c * K);
    const Vec ec = e ? Vec::loadu(e + c * K) : vexp(xc - s.max);
    Vec d = ec * scale - gq;
    if (!transform.identity) d = d * transform.slope(xc);
    where_equal(cls, Vec(-1), Vec(0), d).store(b.grad + c * K);  // 0 in ignored rows, whatever grad_loss holds
  }
}

// A block's gradient (b.grad, see backward_block) into dx's rows (contiguous rows), rounded to the
// output dtype a vector at a time (element by element took as long as the rest of the bf16
// backward). AVX-512: transposed in registers, a masked store per row; otherwise through float tiles.
template <typename scalar_t>
inline void Problem<scalar_t>::store_block(const Block& b, int64_t i0, int64_t rows, scalar_t* dx) const {
  scalar_t* out = dx + i0 * C;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {  // 16 classes at a time, transposed to a row per register
    for (int64_t c0 = 0; c0 < C; c0 += K) {
      const int64_t n = std::min(K, C - c0);
      __m512 r[K];
      for (int64_t c = 0; c < K; ++c) r[c] = c < n ? _mm512_load_ps(b.grad + (c0 + c) * K) : _mm512_setzero_ps();
      transpose_16x16(r);
      for (int64_t i = 0; i < rows; ++i) store(out + i * C + c0, Vec(r[i]), n);
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    copy_transposed(b.grad, K, out, C, C, rows);
  } else {
    __at_align__ acc_t wide[kMaxSmallClasses * K];
    copy_transposed(b.grad, K, wide, C, C, rows);
    for (int64_t k = 0; k < rows * C; k += K) store(out + k, Vec::loadu(wide + k), std::min(K, rows * C - k));
  }
}

// Calls f(i0, rows, block) for the blocks of rows [begin, end), block filled by load_block. The
// next block is loaded before f works on this one: without AVX-512 a block is written in pieces
// smaller than the vectors that read it, and a vector load of bytes still in the store buffer
// stalls (store forwarding).
template <typename scalar_t>
template <typename F>
inline void Problem<scalar_t>::for_each_block(int64_t begin, int64_t end, Block (&blocks)[2], const F& f) const {
  load_block(begin, std::min(K, end - begin), blocks[0]);
  for (int64_t i0 = begin, b = 0; i0 < end; i0 += K, b ^= 1) {
    if (i0 + K < end) load_block(i0 + K, std::min(K, end - i0 - K), blocks[b ^ 1]);
    f(i0, std::min(K, end - i0), blocks[b]);
  }
}

}  // namespace
}  // namespace fused_softmax::cpu::CPU_CAPABILITY
