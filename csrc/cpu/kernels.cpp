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
// This file is compiled once per instruction-set level (see kernels.h): everything in it lives in
// the namespace of its level, CPU_CAPABILITY, or in an anonymous one, so that the levels' copies
// never meet; what it shares with the other levels (argument preparation, gradient memory) is
// compiled once, for the baseline CPU, elsewhere.
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

namespace fused_softmax::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Inlines everything a function calls (the vector exp included): the compiler kept ATen's exp_u20
// out of line in the small-C block loops, a call per class (fused fwd+bwd at 65536 x 10: 0.56 ms
// without, 0.52 with).
#if defined(__GNUC__)
#define FUSED_SOFTMAX_FLATTEN __attribute__((flatten))
#else
#define FUSED_SOFTMAX_FLATTEN
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The first n <= 16 lanes as a mask.
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1);
}

// The first n <= 16 elements of a 16-bit type at p as float lanes (the others 0): one masked load,
// widened in registers.
template <typename scalar_t>
inline __m512 load_16_bits(const scalar_t* p, int64_t n) {
  const __m256i bits = _mm256_maskz_loadu_epi16(first_lanes(n), p);
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return _mm512_cvtph_ps(bits);
  } else {  // a bfloat16 is the upper half of a float
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
}
#endif

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
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) return load_16_bits(p, n);
#endif
    __at_align__ acc_t buf[Vec::size()] = {};
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(buf);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 float lanes rounded to bfloat16 or float16, to nearest even as c10's scalar conversions. With
// AVX512-BF16 one instruction for bfloat16 (ATen's sequence takes seven), which also flushes values
// below 1.2e-38 to zero.
template <typename scalar_t>
inline __m256i round_to_16_bits(const __m512& v) {
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return at::vec::cvtfp32_fp16(v);
  } else {
#if defined(__AVX512BF16__)
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
    return at::vec::cvtfp32_bf16(v);
#endif
  }
}
#endif

// Stores the first n lanes, rounding to the output dtype once (to nearest even, as c10's scalar
// conversions do).
template <typename acc_t, typename scalar_t>
inline void store(scalar_t* p, const Vectorized<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p, n);
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (std::is_same_v<acc_t, float> && at::is_reduced_floating_point_v<scalar_t>) {
    // 16 lanes rounded in registers and written with one (masked) 32-byte store: the scalar loop
    // below cost more than the rest of the backward (ATen's Vectorized<BFloat16>::store(p, n) of
    // half a vector goes through a stack copy).
    _mm256_mask_storeu_epi16(p, first_lanes(n), round_to_16_bits<scalar_t>(v));
#endif
  } else {
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

// Stores a whole vector past the caches (non-temporal) at p, aligned to the vector's bytes (64 for
// float, 32 for 16-bit): a write to memory that is not in cache otherwise first reads each line in.
// Other builds store normally. Callers order these stores with sfence() before anything reads them.
template <typename acc_t, typename scalar_t>
inline void stream(scalar_t* p, const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(p, __m512(v));
    return;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    _mm512_stream_pd(p, __m512d(v));
    return;
  } else if constexpr (std::is_same_v<acc_t, float> && at::is_reduced_floating_point_v<scalar_t>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), round_to_16_bits<scalar_t>(v));
    return;
  }
#endif
  store(p, v, Vectorized<acc_t>::size());
}

inline void sfence() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// How many elements of type T from p until p is aligned for stream() (0 where streams are not used).
template <typename T>
inline int64_t elements_to_stream_alignment(const T* p) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr uintptr_t kBytes = sizeof(T) == 2 ? 32 : 64;  // one vector's stores: 16 lanes of 16 bits, or 64 bytes
  return static_cast<int64_t>(((kBytes - reinterpret_cast<uintptr_t>(p) % kBytes) % kBytes) / sizeof(T));
#else
  return 0;
#endif
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < ni, j < nj: the transpositions of the
// small-C blocks without AVX-512 (see transpose_16x16). float with AVX2: 4 x 4 tiles through
// registers (four 16-byte loads and stores and eight shuffles per 16 elements, where copying one
// element at a time made the stores a fifth of a block's time); otherwise, and at the edges, one
// element at a time, converted.
template <typename To, typename From>
inline void copy_transposed(const From* src, int64_t src_stride, To* dst, int64_t dst_stride, int64_t ni, int64_t nj) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<From, float> && std::is_same_v<To, float>) {
    for (; i + 4 <= ni; i += 4) {
      int64_t j = 0;
      for (; j + 4 <= nj; j += 4) {
        const float* s = src + i * src_stride + j;
        __m128 a = _mm_loadu_ps(s), b = _mm_loadu_ps(s + src_stride);
        __m128 c = _mm_loadu_ps(s + 2 * src_stride), d = _mm_loadu_ps(s + 3 * src_stride);
        _MM_TRANSPOSE4_PS(a, b, c, d);
        float* o = dst + j * dst_stride + i;
        _mm_storeu_ps(o, a);
        _mm_storeu_ps(o + dst_stride, b);
        _mm_storeu_ps(o + 2 * dst_stride, c);
        _mm_storeu_ps(o + 3 * dst_stride, d);
      }
      for (; j < nj; ++j)
        for (int64_t k = i; k < i + 4; ++k) dst[j * dst_stride + k] = src[k * src_stride + j];
    }
  }
#endif
  for (; i < ni; ++i)
    for (int64_t j = 0; j < nj; ++j) dst[j * dst_stride + i] = static_cast<To>(src[i * src_stride + j]);
}

#if defined(CPU_CAPABILITY_AVX512)
// Transposes 16 x 16 floats held a row per register (r[i] lane j <-> r[j] lane i): the small-C
// blocks' transpositions, both ways. Four rounds of 16 shuffles, each swapping ever larger pieces:
// single lanes of row pairs, lane pairs of row quads, then 128-bit quarters twice. A round trip of
// 65536 x 10 floats took 0.16 ms this way, 0.34 through 4 x 4 tiles in memory (copy_transposed).
inline void transpose_16x16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i], t[i + 1]: rows i and i + 1 interleaved lane by lane
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  auto pairs_lo = [](__m512 a, __m512 b) {  // the low 64-bit lane pairs of a and b, interleaved
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto pairs_hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 16; i += 4) {  // each 128-bit quarter of r[i..i+3] is now a 4 x 4 tile transposed
    r[i] = pairs_lo(t[i], t[i + 2]);
    r[i + 1] = pairs_hi(t[i], t[i + 2]);
    r[i + 2] = pairs_lo(t[i + 1], t[i + 3]);
    r[i + 3] = pairs_hi(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 0x88: quarters 0 and 2 of each source, 0xdd: quarters 1 and 3
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

// exp over float lanes of x - max (<= 0; -inf gives 0; NaN gives NaN with AVX-512, elsewhere any
// value: the callers mark NaN rows).
// AVX-512: exp(v) = 2^n * exp(r), n = round(v / ln 2), r = v - n ln 2 (ln 2 in two parts, so r is
// exact to a float's precision), exp(r) by the degree-5 minimax polynomial on |r| <= ln(2) / 2 that
// ATen's exp_u20 also uses (relative error ~1e-7), and 2^n applied by one scalef, which handles the
// exponent's range itself: 11 instructions, where exp_u20 takes 19 (its clamps, conversions and
// exponent arithmetic) and fexp_u20, the degree-3 one we used for 16-bit inputs, 13. Elsewhere
// ATen's exp_u20, for every dtype: fexp_u20's 1e-4 relative error showed in the losses of 16-bit
// logits with float32 probabilities (AVX2 build, 4 x 5 bf16: 3.6e-5 against float64).
inline Vectorized<float> vexp(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  // exp(-104) = 2^-150.04 rounds to 0; max() turns -inf into -104 and keeps NaN (vmaxps returns its
  // second operand where either is NaN).
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.f), __m512(v));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // n * 0.693359375 is exact (|n| <= 150, 9 significant bits); -2.12194440e-4 is the rest of ln 2.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00828929059f), r, _mm512_set1_ps(0.0418978221f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166676521f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.499991506f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999999701f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
#else
  return v.exp_u20();
#endif
}
inline Vectorized<double> vexp(const Vectorized<double>& v) {
  return v.map([](double a) { return std::exp(a); });
}

// The small-C blocks' lane-wise helpers. AVX-512 spells them with mask registers: ATen's
// comparisons return vectors of all-ones lanes, which its blendv turns back into a mask (four
// instructions for one compare and blend), and its maximum keeps NaN with three more.

// Lanes of a where cls == c, of b elsewhere.
template <typename acc_t>
inline Vectorized<acc_t> where_equal(
    const Vectorized<acc_t>& cls, const Vectorized<acc_t>& c, const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
  return Vectorized<acc_t>::blendv(b, a, cls == c);
}

// The running max of a block's rows.
template <typename acc_t>
inline Vectorized<acc_t> block_max(const Vectorized<acc_t>& m, const Vectorized<acc_t>& x) {
  return at::vec::maximum(m, x);
}

#if defined(CPU_CAPABILITY_AVX512)  // float lanes, chosen over the templates above
inline Vectorized<float> where_equal(
    const Vectorized<float>& cls, const Vectorized<float>& c, const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm512_mask_blend_ps(_mm512_cmpeq_ps_mask(cls, c), b, a);
}

// A NaN logit may be dropped here, but vexp keeps it, so the row's sum of exponentials is NaN.
inline Vectorized<float> block_max(const Vectorized<float>& m, const Vectorized<float>& x) {
  return _mm512_max_ps(m, x);
}
#endif

template <typename acc_t>
inline acc_t first_lane(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  return lanes[0];
}

// The logits as the softmax sees them: x = scale * r, or cap * tanh(scale * r / cap)
// with a softcap; -inf stays -inf so that padding never takes probability mass.
template <typename acc_t>
struct Transform {
  using Vec = Vectorized<acc_t>;
  acc_t scale;
  acc_t cap;  // 0: no softcap
  bool identity;

  Vec operator()(const Vec& r) const {
    if (identity) return r;
    const Vec x = r * Vec(scale);
    if (cap == 0) return x;
    const Vec capped = Vec(cap) * (x / Vec(cap)).tanh();
    return Vec::blendv(capped, x, x == Vec(-std::numeric_limits<acc_t>::infinity()));
  }
  acc_t operator()(acc_t r) const {  // through a vector, so that it has the same bits as a lane
    return identity ? r : first_lane((*this)(Vec(r)));
  }
  // dx / dr at x = T(r); 0 at x = -inf (where the gradient before it is 0 too).
  Vec slope(const Vec& x) const {
    if (cap == 0) return Vec(scale);
    const Vec t = x / Vec(cap);
    return Vec::blendv(Vec(scale) * (Vec(1) - t * t), Vec(0), x == Vec(-std::numeric_limits<acc_t>::infinity()));
  }
  acc_t slope(acc_t x) const { return identity ? acc_t(1) : first_lane(slope(Vec(x))); }
};

// The part of a row's target mass q_c that is spread over classes:
// q_c = w_c * (a * t_c + b), with t the probability row (none for class
// indices, whose single target class is added separately) and w the class
// weights (nullptr for all ones).
template <typename acc_t, typename scalar_t>
struct SpreadMass {
  Probabilities<acc_t, scalar_t> t;
  const acc_t* w;
  acc_t a;
  acc_t b;

  Vectorized<acc_t> at(int64_t j, int64_t n) const {
    using Vec = Vectorized<acc_t>;
    Vec q(b);
    if (t) q = at::vec::fmadd(Vec(a), t.visit([&](const auto* e) { return load<acc_t>(e + j, n); }), q);
    if (w) q = q * load<acc_t>(w + j, n);
    return Vec::set(Vec(0), q, n);  // lanes past the row carry no mass
  }
};

// Calls f(j, n) for the vectors of a row of C elements: full ones (n a compile-time K, so the
// partial-load and lane masks fold away in the hot loop), then one partial tail (n < K).
template <int64_t K, typename F>
inline void for_each_vector(int64_t C, F&& f) {
  int64_t j = 0;
  for (; j + K <= C; j += K) f(j, std::integral_constant<int64_t, K>{});
  if (j < C) f(j, C - j);
}

// A row's saved statistics; x - lse is formed as (x - max) - log_sum.
template <typename acc_t>
struct RowStats {
  acc_t max, log_sum;
  acc_t minus_lse(acc_t x) const { return (x - max) - log_sum; }
  acc_t lse() const { return max + log_sum; }
};

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

  bool small() const { return y && C <= kMaxSmallClasses && C == classes; }
  bool has_spread() const { return static_cast<bool>(t) || eps > 0; }
  bool ignored(int64_t i) const { return y && y[i] == ignore_index; }
  acc_t target_coef(int64_t cls) const { return (1 - eps) * (w ? w[cls] : acc_t(1)); }
  // Row i's spread mass at x's columns (q.at(j) is class col0 + j).
  SpreadMass<acc_t, scalar_t> spread(int64_t i) const {
    return {t + (i * t_stride + col0), w ? w + col0 : nullptr, 1 - eps, eps / static_cast<acc_t>(classes)};
  }

  // --- the row path -------------------------------------------------------------------------

  // A row's sums go kSumBlock classes at a time into vectors, and each block's total into a double:
  // a lane adds at most 2048 / K (128-256) terms, so the sums stay within a few float32 ulps at any
  // C (a lane adding 2^20 terms of a 2^24-class row put its lse 1.2e-3 off; docs/decisions.md). A
  // row of up to kSumBlock classes is summed exactly as without blocks.
  static constexpr int64_t kSumBlock = 2048;

  static double sum_lanes(const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
  }

  acc_t row_max(const scalar_t* xi) const {  // T is monotone: the max of x is T(the max of r)
    // Four running maxima: with one, every vector waited on the previous max (and its NaN check),
    // the forward's bottleneck at C = 1000. A max is exact, so the order changes no bit.
    constexpr acc_t kLowest = -std::numeric_limits<acc_t>::infinity();
    Vec m0(kLowest), m1(kLowest), m2(kLowest), m3(kLowest);
    int64_t j = 0;
    for (; j + 4 * K <= C; j += 4 * K) {
      m0 = at::vec::maximum(m0, load<acc_t>(xi + j, K));
      m1 = at::vec::maximum(m1, load<acc_t>(xi + j + K, K));
      m2 = at::vec::maximum(m2, load<acc_t>(xi + j + 2 * K, K));
      m3 = at::vec::maximum(m3, load<acc_t>(xi + j + 3 * K, K));
    }
    Vec m = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    for (; j < C; j += K) {
      const int64_t n = std::min(K, C - j);
      m = at::vec::maximum(m, Vec::set(m, load<acc_t>(xi + j, n), n));  // lanes past the row keep m
    }
    return transform(at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m));
  }

  // The logits of row i at columns [j, j + n) as the softmax sees them. kTransformed is a template
  // argument so that the plain loops carry no trace of tanh: its library call would make the
  // compiler save every vector register around it, which halved the forward's speed.
  template <bool kTransformed>
  Vec logits(const scalar_t* xi, int64_t j, int64_t n) const {
    const Vec r = load<acc_t>(xi + j, n);
    if constexpr (kTransformed) {
      return transform(r);
    } else {
      return r;
    }
  }

  // Pass 2 of the forward: stats and loss of row i, given its max m. With e, exp(x_c - m) is kept
  // there for the backward of the same row (one exp per element for both).
  template <bool kTransformed>
  void forward_row(int64_t i, acc_t m, acc_t* loss, RowStats<acc_t>* stats, acc_t* e = nullptr) const {
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
          const Vec qj = q.at(j, n);
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
  template <bool kTransformed, bool kFromExp>
  void backward_row(int64_t i, RowStats<acc_t> stats, acc_t g, scalar_t* dx, const acc_t* e) const {
    const scalar_t* xi = x + i * x_stride;
    const SpreadMass<acc_t, scalar_t> q = spread(i);
    acc_t S = 0;
    if (t) {  // summed over all the classes, not only x's
      const SpreadMass<acc_t, scalar_t> whole{t + i * t_stride, w, q.a, q.b};
      double mass = 0;
      for (int64_t b = 0; b < classes; b += kSumBlock) {
        Vec block_mass(0);
        const int64_t end = std::min(b + kSumBlock, classes);
        for (int64_t j = b; j < end; j += K) block_mass += whole.at(j, std::min(K, end - j));
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
      if (spread_on) d = d - vg * q.at(j, n);
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

  // --- the small-C path: K index rows per block, one per lane ---------------------------------

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

  // Fills b with rows [i0, i0 + rows); lanes past them are 0 (class -1, coefficient 0).
  void load_block(int64_t i0, int64_t rows, Block& b) const {
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
  void load_targets(int64_t i0, int64_t rows, Block& b) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {  // in registers: 2-4% of the 65536 x 10 forward
      auto first8 = [](int64_t n) { return static_cast<__mmask8>((1u << std::clamp<int64_t>(n, 0, 8)) - 1); };
      const __m512i ignore = _mm512_set1_epi64(ignore_index);
      const __m512i lo = _mm512_maskz_loadu_epi64(first8(rows), y + i0);  // rows i0 .. i0 + 7
      const __m512i hi = _mm512_maskz_loadu_epi64(first8(rows - 8), y + i0 + 8);
      // The lanes with a target class: rows of the block that are not ignored.
      const __mmask16 targeted =
          _mm512_mask_cmpneq_epi64_mask(first8(rows), lo, ignore) |
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
  FUSED_SOFTMAX_FLATTEN BlockStats forward_block(
      const Block& b, int64_t i0, int64_t rows, acc_t* loss, RowStats<acc_t>* stats, acc_t* e = nullptr) const {
    const acc_t spread = eps / static_cast<acc_t>(C);
    const Vec cls = Vec::loadu(b.cls);
    Vec m(-std::numeric_limits<acc_t>::infinity()), x_y(0), class_c(0);
    for (int64_t c = 0; c < C; ++c, class_c += Vec(1)) {
      const Vec xc = Vec::loadu(b.x + c * K);
      m = block_max(m, xc);
      x_y = where_equal(cls, class_c, xc, x_y);  // the target class's logit
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
  BlockStats load_stats(int64_t i0, int64_t rows, const RowStats<acc_t>* stats) const {
    const acc_t* in = reinterpret_cast<const acc_t*>(stats + i0);
    const Vec first = Vec::loadu(in, std::min(2 * rows, K));
    const Vec second = 2 * rows > K ? Vec::loadu(in + K, 2 * rows - K) : Vec(0);
    const auto [max, log_sum] = at::vec::deinterleave2(first, second);
    return {max, log_sum};
  }

  // Rows [i0, i0 + rows)' grad_loss, g[i * g_stride], as lanes.
  Vec grad_lanes(const acc_t* g, int64_t g_stride, int64_t i0, int64_t rows) const {
    if (g_stride == 0) return Vec(*g);
    if (g_stride == 1) return Vec::loadu(g + i0, rows);
    __at_align__ acc_t lanes[K] = {};
    for (int64_t r = 0; r < rows; ++r) lanes[r] = g[(i0 + r) * g_stride];
    return Vec::loadu(lanes);
  }

  // The backward of a block, into b.grad: g * (p_c * S - q_c) * slope, the target class included, so
  // it is rounded once (by store_block); 0 in ignored rows, NaN in NaN rows. e: forward_block's kept
  // exps, or nullptr (p_c has the same bits either way, as in backward_row).
  FUSED_SOFTMAX_FLATTEN void backward_block(
      Block& b, const BlockStats& s, const Vec& g, const acc_t* e = nullptr) const {
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
  void store_block(const Block& b, int64_t i0, int64_t rows, scalar_t* dx) const {
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
  template <typename F>
  void for_each_block(int64_t begin, int64_t end, Block (&blocks)[2], const F& f) const {
    load_block(begin, std::min(K, end - begin), blocks[0]);
    for (int64_t i0 = begin, b = 0; i0 < end; i0 += K, b ^= 1) {
      if (i0 + K < end) load_block(i0 + K, std::min(K, end - i0 - K), blocks[b ^ 1]);
      f(i0, std::min(K, end - i0), blocks[b]);
    }
  }

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
      const acc_t m = row_max(x + i * x_stride);
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

// Rows per task for at::parallel_for: about 32K elements each.
int64_t grain_rows(int64_t C) {
  return std::max<int64_t>(1, 32768 / C);
}

// Checks the class indices (the message names the first bad one); returns how many rows are
// ignored. Branch-free, so it vectorizes: a check per row and a separate count for 'mean' took
// 0.05 ms of the forward's 0.41 at 65536 x 10.
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
Problem<scalar_t> make_problem(
    const PreparedArgs& p, int64_t ignore_index, double label_smoothing, const LogitOptions& o) {
  using acc_t = at::opmath_type<scalar_t>;
  Problem<scalar_t> P{};
  fill_kernel_args<scalar_t, acc_t>(P, p, ignore_index, label_smoothing, o.z_loss);
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
  LogitOptions options;
};

// The shared preparation plus the CPU's own check of the class indices (the CUDA kernels assert on the
// device instead: no host sync), and the divisor of 'mean'.
CpuArgs prepare_args_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, LogitOptions options, int64_t class_start = 0, int64_t num_classes = 0) {
  PreparedArgs p = prepare_args(input, target, weight, label_smoothing, reduction, class_start, num_classes);
  const int64_t ignored_rows = p.probabilities ? 0 : check_target_range_cpu(p.target, p.num_classes, ignore_index);
  double divisor = 1.0;
  if (reduction == kMean) {
    AT_DISPATCH_FLOATING_TYPES(accumulate_type(p.input.scalar_type()), "prepare_args_cpu", [&] {
      divisor = mean_divisor_cpu<scalar_t>(p, ignore_index, ignored_rows);
    });
    options = with_mean_z_loss(options, divisor, p.input.size(0) - ignored_rows);
  }
  return {std::move(p), divisor, options};
}

// This level's ForwardFn (kernels.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_, int64_t ignore_index,
    double label_smoothing, int64_t reduction, const LogitOptions& options, GradTo grad_to) {
  const CpuArgs args = prepare_args_cpu(input_, target_, weight_, ignore_index, label_smoothing, reduction, options);
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
    Problem<scalar_t> P = make_problem<scalar_t>(p, ignore_index, label_smoothing, args.options);
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
    const std::optional<at::Tensor>& weight_, const at::Tensor& stats_, int64_t ignore_index, double label_smoothing,
    int64_t reduction, const LogitOptions& options, int64_t class_start, int64_t num_classes) {
  const CpuArgs args = prepare_args_cpu(
      input_, target_, weight_, ignore_index, label_smoothing, reduction, options, class_start, num_classes);
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
    Problem<scalar_t> P = make_problem<scalar_t>(p, ignore_index, label_smoothing, args.options);
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
