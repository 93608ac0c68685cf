// Vector helpers of the CPU kernels: loads and stores that widen 16-bit values to the accumulation
// type and round them back once, non-temporal stores, register transposes, our exp, the logit
// transform (logit_scale, softcap), the spread target mass, and a row's saved statistics.
// Part of the CPU kernels that kernels.cpp compiles once per instruction-set level (see kernels.h):
// include it there only, inside nothing; it opens its level's namespace itself.
#pragma once

#include "../cross_entropy.h"  // Probabilities

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fused_softmax::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Inlines everything a function calls (the vector exp included): the compiler kept ATen's exp_u20
// out of line in the small-C block loops, a call per class (docs/decisions.md, small C).
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
// single lanes of row pairs, lane pairs of row quads, then 128-bit quarters twice: half the time of
// 4 x 4 tiles through memory (copy_transposed; docs/decisions.md, small C).
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

// Lanes where x ranks above best as torch.argmax ranks values (ranks_above in ../cross_entropy.h):
// larger, or NaN where best is not.
template <typename acc_t>
inline Vectorized<acc_t> ranks_above(const Vectorized<acc_t>& x, const Vectorized<acc_t>& best) {
  return (x > best) | (x.isnan() & (best == best));
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

// Lanes [j, j + n) of a row's spread target mass (SpreadMass in ../cross_entropy.h); 0 past them.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> spread_at(const SpreadMass<acc_t, scalar_t>& q, int64_t j, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec m(q.b);
  if (q.t) m = at::vec::fmadd(Vec(q.a), q.t.visit([&](const auto* e) { return load<acc_t>(e + j, n); }), m);
  if (q.w) m = m * load<acc_t>(q.w + j, n);
  return Vec::set(Vec(0), m, n);  // lanes past the row carry no mass
}

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

}  // namespace
}  // namespace fused_softmax::cpu::CPU_CAPABILITY
