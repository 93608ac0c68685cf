// The CPU kernels' problem: everything the row and small-C paths read for rows [0, N) of an (N, C)
// loss, their declarations, and the code that runs rows [begin, end) through either path. The
// paths themselves: row_path.h (a row at a time) and small_c_path.h (16 rows at a time, one a lane).
// Part of the CPU kernels that kernels.cpp compiles once per instruction-set level (see kernels.h):
// include it there only, inside nothing; it opens its level's namespace itself.
#pragma once

#include "vec_helpers.h"

#include <memory>

namespace fused_softmax::cpu::CPU_CAPABILITY {
namespace {

// Small C: K = Vec::size() rows at a time, one row per vector lane. A row of
// 10 classes fills under one vector, and its max and sum would cost two
// horizontal reductions; across lanes they are plain vertical operations.
constexpr int64_t kMaxSmallClasses = 32;

// Gradients of this many bytes and more are written past the caches (stream()): they do not fit in
// them, and a normal store first reads each line of the gradient in, a third more memory traffic.
constexpr int64_t kMinStreamedBytes = int64_t(32) << 20;

// A row's exp(x - max) is kept for its backward (the fused sweep) up to this size: 128K classes in
// float32, which with the row itself still fits a 1 MiB L2.
constexpr int64_t kMaxKeptExpBytes = int64_t(512) << 10;

// Everything both passes read, for rows [0, N) of a (N, C) problem.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t K = Vec::size();

  const scalar_t* x;
  int64_t x_stride;
  int64_t C;           // columns of x
  int64_t col0;        // x's columns are the classes [col0, col0 + C) (a block: backward only)
  int64_t classes;     // of this many (C unless a block)
  const int64_t* y;    // class indices, or nullptr for probabilities
  Probabilities<acc_t, scalar_t> t;  // class probabilities, or none
  int64_t t_stride;
  const acc_t* w;      // class weights, or nullptr
  int64_t ignore_index;
  acc_t eps;           // label smoothing
  Transform<acc_t> transform;
  acc_t z_loss;
  acc_t spread_index_mass;  // an index row's spread mass, eps / C * sum(w)
  bool stream_grad;         // the row path writes the gradient with stream() (see kMinStreamedBytes)
  int64_t* predictions;     // the forward's argmax per row (see cross_entropy.h), or nullptr

  bool small() const { return y && C <= kMaxSmallClasses && C == classes; }
  bool has_spread() const { return static_cast<bool>(t) || eps > 0; }
  bool ignored(int64_t i) const { return y && y[i] == ignore_index; }
  acc_t target_coef(int64_t cls) const { return (1 - eps) * (w ? w[cls] : acc_t(1)); }
  // Row i's spread mass at x's columns (lane j of spread_at(q, j, n) is class col0 + j).
  SpreadMass<acc_t, scalar_t> spread(int64_t i) const {
    return {t + (i * t_stride + col0), w ? w + col0 : nullptr, 1 - eps, eps / static_cast<acc_t>(classes)};
  }

  // --- the row path (row_path.h) -----------------------------------------------------------

  // A row's sums go kSumBlock classes at a time into vectors, and each block's total into a double:
  // a lane adds at most 2048 / K (128-256) terms, so the sums stay within a few float32 ulps at any
  // C (a lane adding 2^20 terms of a 2^24-class row put its lse 1.2e-3 off; docs/decisions.md). A
  // row of up to kSumBlock classes is summed exactly as without blocks.
  static constexpr int64_t kSumBlock = 2048;

  static double sum_lanes(const Vec& v);

  // The max of r over columns [j, end) of a row (x before T).
  acc_t max_of(const scalar_t* xi, int64_t j, int64_t end) const;

  // The argmax is looked for this many classes at a time (row_max).
  static constexpr int64_t kArgmaxChunk = 512;

  // The row's max of x.
  acc_t row_max(const scalar_t* xi) const;

  // The row's max of x, and its argmax into prediction (kept out of the loops that need no argmax).
  acc_t row_max_and_argmax(const scalar_t* xi, int64_t* prediction) const;

  template <bool kTransformed>
  Vec logits(const scalar_t* xi, int64_t j, int64_t n) const;

  template <bool kTransformed>
  void forward_row(int64_t i, acc_t m, acc_t* loss, RowStats<acc_t>* stats, acc_t* e = nullptr) const;

  template <bool kTransformed, bool kFromExp>
  void backward_row(int64_t i, RowStats<acc_t> stats, acc_t g, scalar_t* dx, const acc_t* e) const;

  // --- the small-C path (small_c_path.h): K index rows per block, one per lane ----------------

  // K index rows, one per lane r (row i0 + r): x[c * K + r] is its logit of class c as the softmax
  // sees it, cls[r] its target class (-1: ignored, or past the block's rows) and coef[r] that
  // class's (1 - eps) * w (0 where cls is -1). Filled by load_block, read a vector at a time. The
  // backward leaves the block's gradient in grad (same layout).
  struct Block {
    __at_align__ acc_t x[kMaxSmallClasses * K];  // room for classes up to the next multiple of 16
    __at_align__ acc_t cls[K];  // exact: C <= kMaxSmallClasses
    __at_align__ acc_t coef[K];
    __at_align__ acc_t grad[kMaxSmallClasses * K];
  };

  // A block's rows' (max, log_sum), one row per lane.
  struct BlockStats {
    Vec max, log_sum;
  };

  void load_block(int64_t i0, int64_t rows, Block& b) const;

  void load_targets(int64_t i0, int64_t rows, Block& b) const;

  FUSED_SOFTMAX_FLATTEN BlockStats forward_block(
      const Block& b, int64_t i0, int64_t rows, acc_t* loss, RowStats<acc_t>* stats, acc_t* e = nullptr) const;

  BlockStats load_stats(int64_t i0, int64_t rows, const RowStats<acc_t>* stats) const;

  Vec grad_lanes(const acc_t* g, int64_t g_stride, int64_t i0, int64_t rows) const;

  FUSED_SOFTMAX_FLATTEN void backward_block(
      Block& b, const BlockStats& s, const Vec& g, const acc_t* e = nullptr) const;

  void store_block(const Block& b, int64_t i0, int64_t rows, scalar_t* dx) const;

  template <typename F>
  void for_each_block(int64_t begin, int64_t end, Block (&blocks)[2], const F& f) const;

  // --- rows [begin, end), either path ---------------------------------------------------------

  // Overwrites dx's row i (contiguous rows) if it is ignored (no gradient, whatever grad_loss
  // holds) or NaN (the forward found a NaN row); returns whether it did.
  bool mend_row(int64_t i, const RowStats<acc_t>* stats, scalar_t* dx) const {
    scalar_t* dxi = dx + i * C;
    if (ignored(i)) {
      std::fill(dxi, dxi + C, scalar_t(0));
    } else if (std::isnan(stats[i].log_sum)) {
      std::fill(dxi, dxi + C, std::numeric_limits<scalar_t>::quiet_NaN());
    } else {
      return false;
    }
    return true;
  }

  // Row i's gradient into dx (contiguous rows), grad_loss g; e: see backward_row (or nullptr).
  void backward_one_row(
      int64_t i, const RowStats<acc_t>* stats, acc_t g, scalar_t* dx, const acc_t* e = nullptr) const {
    if (mend_row(i, stats, dx)) return;
    scalar_t* dxi = dx + i * C;
    if (transform.identity) {
      e ? backward_row<false, true>(i, stats[i], g, dxi, e) : backward_row<false, false>(i, stats[i], g, dxi, e);
    } else {
      e ? backward_row<true, true>(i, stats[i], g, dxi, e) : backward_row<true, false>(i, stats[i], g, dxi, e);
    }
  }

  // Losses and stats of rows [begin, end). With dx, also each row's gradient for grad_loss
  // unit_grad, right after its forward while the row (or block) is still in L1: one sweep over the
  // logits. dx (contiguous rows) may be x itself: a row is read before it is written.
  void forward_rows(
      int64_t begin, int64_t end, acc_t* loss, RowStats<acc_t>* stats, scalar_t* dx = nullptr,
      acc_t unit_grad = 1) const {
    if (small()) {
      Block blocks[2];
      __at_align__ acc_t e[kMaxSmallClasses * K];
      for_each_block(begin, end, blocks, [&](int64_t i0, int64_t rows, Block& b) {
        const BlockStats s = forward_block(b, i0, rows, loss, stats, dx ? e : nullptr);
        if (!dx) return;
        backward_block(b, s, Vec(unit_grad), e);  // the forward's stats, still in registers
        store_block(b, i0, rows, dx);
      });
      return;
    }
    // With dx, the row's exp(x - max) is kept for its backward while it fits in L2 with the row.
    std::unique_ptr<acc_t[]> e;
    if (dx && C * static_cast<int64_t>(sizeof(acc_t)) <= kMaxKeptExpBytes) e.reset(new acc_t[C]);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t m = predictions ? row_max_and_argmax(x + i * x_stride, predictions + i) : row_max(x + i * x_stride);
      transform.identity ? forward_row<false>(i, m, loss, stats, e.get())
                         : forward_row<true>(i, m, loss, stats, e.get());
      if (dx) backward_one_row(i, stats, unit_grad, dx, e.get());
    }
  }

  // Row i's grad_loss is g[i * g_stride]. dx (contiguous rows) may be x itself.
  void backward_rows(
      int64_t begin, int64_t end, const RowStats<acc_t>* stats, const acc_t* g, int64_t g_stride, scalar_t* dx) const {
    if (small()) {
      Block blocks[2];
      for_each_block(begin, end, blocks, [&](int64_t i0, int64_t rows, Block& b) {
        backward_block(b, load_stats(i0, rows, stats), grad_lanes(g, g_stride, i0, rows));
        store_block(b, i0, rows, dx);
      });
      return;
    }
    for (int64_t i = begin; i < end; ++i) backward_one_row(i, stats, g[i * g_stride], dx);
  }
};

}  // namespace
}  // namespace fused_softmax::cpu::CPU_CAPABILITY
