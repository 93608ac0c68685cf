// Host check of csrc/cuda/row_state.cuh with csrc/cuda/row_packs.cuh, compiled by
// tests/test_cuda_build.py with the C++ compiler alone (no GPU): float32 rows are gathered as the
// CUDA kernels gather them (each lane of a group walks its packs into a RowState, then the group
// merges by xor shuffles, and past a warp through shared memory, emulated here in the same order),
// and the log-sum-exp and the spread target term sum_c q_c (lse - x_c) are compared with float64.
// Rows: random at scales 1, 30 and 1e4, with some -inf entries, all -inf, a +inf, a NaN.
// Exit status: the failures.
#include <math.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_on_host.h"  // first: what the CUDA headers below need on the host
#include "../csrc/cuda/row_packs.cuh"
#include "../csrc/cuda/row_state.cuh"

using fused_softmax::RowState;

constexpr int kWarp = 32;

// The kernels' gathering of one row by a group of kThreads lanes; q: the spread target mass.
template <int kThreads>
RowState<float> gather(const float* row, const float* q, int64_t C) {
  std::vector<RowState<float>> s(kThreads, RowState<float>{fused_softmax::lowest<float>(), 0, 0, 0});
  for (int lane = 0; lane < kThreads; ++lane) {
    fused_softmax::for_each_pack<kThreads, 4>(row, C, lane, [&](int64_t col, const auto& pack) {
      constexpr int n = std::decay_t<decltype(pack)>::size;
      float v[n];
      for (int k = 0; k < n; ++k) v[k] = pack.v[k];
      s[lane].add(v);
      for (int k = 0; k < n; ++k) s[lane].add_mass(q[col + k], v[k]);
    });
  }
  for (int offset = (kThreads < kWarp ? kThreads : kWarp) / 2; offset > 0; offset /= 2) {  // xor shuffles
    std::vector<RowState<float>> next = s;
    for (int lane = 0; lane < kThreads; ++lane) next[lane].merge(s[lane ^ offset]);
    s = next;
  }
  RowState<float> r = s[0];
  for (int warp = 1; warp < kThreads / kWarp; ++warp) r.merge(s[warp * kWarp]);  // through shared memory
  return r;
}

template <int kThreads>
int check(const std::vector<float>& x, const std::vector<float>& q, const char* what) {
  const int64_t C = static_cast<int64_t>(x.size());
  std::vector<float> buffer(C + 8);
  float* row = buffer.data() + 1;  // not 16-byte aligned: a head, packs, a tail
  for (int64_t c = 0; c < C; ++c) row[c] = x[c];
  const RowState<float> s = gather<kThreads>(row, q.data(), C);
  const double log_sum = s.log_sum(), lse = s.row_max() + log_sum;
  const double term = s.mass * log_sum - s.mass_dot;  // sum_c q_c * (lse - x_c), as the forward forms it

  bool nan = false, pos_inf = false, all_neg_inf = true;
  double m = -INFINITY;
  for (float v : x) {
    nan |= isnan(v);
    pos_inf |= v == INFINITY;
    all_neg_inf &= v == -INFINITY;
    if (v > m) m = v;
  }
  bool ok;
  if (nan || pos_inf || all_neg_inf) {
    ok = isnan(lse);  // as the CPU kernel's and fused_softmax.reference's lse (the row's loss is NaN, as torch's)
  } else {
    double sum = 0, exact_term = 0;
    for (float v : x) sum += exp(double(v) - m);
    const double exact = m + log(sum);
    for (int64_t c = 0; c < C; ++c) exact_term += q[c] * (exact - x[c]);  // inf with mass on a -inf logit, as torch
    ok = fabs(lse - exact) <= 2e-6 * fmax(1.0, fabs(exact)) &&
         (isinf(exact_term) ? term == exact_term : fabs(term - exact_term) <= 2e-5 * fmax(1.0, fabs(exact_term)));
    if (!ok)
      std::printf(
          "%s C=%lld threads=%d: lse %.9g (float64 %.9g), target term %.9g (float64 %.9g)\n", what,
          static_cast<long long>(C), kThreads, lse, exact, term, exact_term);
    return !ok;
  }
  if (!ok) std::printf("%s C=%lld threads=%d: lse %g\n", what, static_cast<long long>(C), kThreads, lse);
  return !ok;
}

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;
  int failures = 0, cases = 0;
  for (int64_t C : {1, 2, 3, 5, 7, 10, 16, 33, 64, 100, 257, 1000, 5000}) {
    for (float scale : {1.0f, 30.0f, 1e4f}) {
      for (int special = 0; special < 5; ++special) {  // none, some -inf, all -inf, a +inf, a NaN
        std::vector<float> x(C), q(C);
        for (int64_t c = 0; c < C; ++c) {
          x[c] = normal(rng) * scale;
          q[c] = uniform(rng) / C;
        }
        if (special == 1)
          for (int64_t c = 0; c < C; c += 3) x[c] = -INFINITY;
        if (special == 2)
          for (float& v : x) v = -INFINITY;
        if (special == 3) x[C / 2] = INFINITY;
        if (special == 4) x[C / 3] = NAN;
        const char* what = special == 0   ? "random"
                           : special == 1 ? "-inf entries"
                           : special == 2 ? "all -inf"
                           : special == 3 ? "+inf"
                                          : "NaN";
        failures += check<4>(x, q, what) + check<32>(x, q, what) + check<256>(x, q, what);
        cases += 3;
      }
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
