// A row's softmax statistics as the CUDA kernels gather them: the exp they use and the online
// (max, sum of exp, target mass) state each thread keeps and the group merges. In a header of its
// own so that tests/test_cuda_build.py can compile it for the host and check it, without a GPU,
// against float64 (rows with huge, -inf, +inf and NaN logits, merged in the kernels' order).
#pragma once

#include <cfloat>
#include <cmath>

namespace fused_softmax {

// exp via exp2 on float. The argument is x - max, formed before the multiply so
// large logits lose no precision. p = v * log2(e) is rounded: half an ulp of up to
// 126 is 4e-6 relative in the result (65 ulp); its error, recovered exactly by an
// FMA (with log2(e)'s low part), corrects exp2(p) to first order: a few ulp, as
// the CPU kernel's exp, for three FMAs in a kernel bound by memory. Not for -inf,
// NaN or an overflowing p (their exp2 is exact: 0, NaN, inf).
__device__ __forceinline__ float exp_of(float v) {
  constexpr float kLog2eHi = 1.44269502f, kLog2eLo = 1.92596303e-8f, kLn2 = 0.693147182f;
  const float p = v * kLog2eHi;
  const float r = exp2f(p);
  if (!isfinite(p)) return r;
  const float error = fmaf(v, kLog2eLo, fmaf(v, kLog2eHi, -p));  // v * log2(e) - p
  return fmaf(r, error * kLn2, r);
}
__device__ __forceinline__ double exp_of(double v) {
  return exp(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t lowest() {
  return sizeof(acc_t) == 4 ? acc_t(-FLT_MAX) : acc_t(-DBL_MAX);
}

// Online softmax statistics of a part of a row, plus the spread target mass
// q_c and sum_c q_c * (x_c - max) over it. Sums stay relative to the running
// max, so logits near 1e4 lose nothing to cancellation. A thread adds C / 256
// exponentials (65536 at C = 2^24), so its sum is compensated (Kahan): plainly
// summed, the lse at 2^24 float32 classes was 33 float32 ulps off float64.
template <typename acc_t>
struct RowState {
  acc_t max;       // running max; starts at the lowest finite value so -inf adds exp(-inf) = 0
  acc_t sum;       // sum of exp(x - max), less sum_excess
  acc_t mass;      // sum of spread q_c
  acc_t mass_dot;  // sum of spread q_c * (x_c - max)
  acc_t sum_excess;  // what rounding added to sum beyond the exact sum (Kahan's compensation); 0 when
                    // omitted from a brace initializer

  // Moves the sums to a new max m >= max.
  __device__ __forceinline__ void rebase(acc_t m) {
    const acc_t scale = exp_of(max - m);
    sum *= scale;
    sum_excess *= scale;
    if (mass != 0) mass_dot -= (m - max) * mass;  // guarded: an empty state may sit at the lowest value
    max = m;
  }
  // sum += e, compensated: the excess rounding put into sum is taken off the next term.
  __device__ __forceinline__ void add_exp(acc_t e) {
    const acc_t y = e - sum_excess;
    const acc_t t = sum + y;
    sum_excess = (t - sum) - y;
    sum = t;
  }
  // The compensation folded into sum: before states are exchanged (shuffle_xor copies four fields).
  __device__ __forceinline__ RowState folded() const { return {max, sum - sum_excess, mass, mass_dot}; }
  // Adds a pack's logits: one rebase to the pack's max, then an exp per element, no branch.
  template <int n>
  __device__ __forceinline__ void add(const acc_t (&x)[n]) {
    acc_t m = max;
#pragma unroll
    for (int k = 0; k < n; ++k) m = fmax(m, x[k]);  // skips a NaN, whose exp poisons sum instead
    if (m > max) rebase(m);
#pragma unroll
    for (int k = 0; k < n; ++k) add_exp(exp_of(x[k] - max));
  }
  __device__ __forceinline__ void add_mass(acc_t q, acc_t x) {  // after add(x)
    mass += q;
    mass_dot += q * (x - max);
  }
  __device__ __forceinline__ void merge(RowState o) {
    const acc_t m = max > o.max ? max : o.max;
    rebase(m);
    o.rebase(m);
    sum = (sum - sum_excess) + (o.sum - o.sum_excess);  // few merges (a tree): plain sums from here
    sum_excess = 0;
    mass += o.mass;
    mass_dot += o.mass_dot;
  }
  // The row's (max, log_sum) as the CPU kernel and fused_softmax.reference give them: NaN log_sum
  // for a row with a +inf logit or only -inf ones (their loss is NaN, as in torch), whose max is
  // then -inf, not the lowest finite value the state started at. (A row with a finite logit has
  // sum >= 1, from its max; a NaN one has sum NaN.)
  // (After a merge: sum_excess is 0.)
  __device__ __forceinline__ acc_t row_max() const { return sum == 0 ? acc_t(-INFINITY) : max; }
  __device__ __forceinline__ acc_t log_sum() const { return isinf(max) || sum == 0 ? acc_t(NAN) : log(sum); }
};

}  // namespace fused_softmax
