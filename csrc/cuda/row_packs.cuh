// How the CUDA kernels walk a row: 16-byte packs, kPacksInFlight of them loaded at once, after a
// scalar head up to the row's first 16-byte boundary and before a scalar tail. In a header of its
// own so that tests/test_cuda_build.py can compile it for the host and check, without a GPU, that
// every element is visited exactly once for any C, alignment and group size.
#pragma once

#include <cstdint>
#include <cstring>

namespace fused_softmax {

// kVec elements loaded or stored as one 16-byte access (1 element in heads and tails).
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  static constexpr int size = kVec;
  scalar_t v[kVec];

  // A full pack moves as one uint4, so it stays one 16-byte LDG.128 / STG.128. Copied as a struct
  // it was split into an access per element (2- and 4-byte loads in the SASS), as the code between
  // the elements' uses branches (exp_of, the target).
  static __device__ __forceinline__ Pack load(const scalar_t* p) {
    Pack pack;
    if constexpr (sizeof(Pack) == sizeof(uint4)) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      memcpy(&pack, &raw, sizeof raw);
    } else {
      pack = *reinterpret_cast<const Pack*>(p);
    }
    return pack;
  }
  __device__ __forceinline__ void store(scalar_t* p) const {
    if constexpr (sizeof(Pack) == sizeof(uint4)) {
      uint4 raw;
      memcpy(&raw, this, sizeof raw);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      *reinterpret_cast<Pack*>(p) = *this;
    }
  }
};

// Packs a thread loads before it uses the first: the loads are in flight together (memory-level
// parallelism). One 16-byte load at a time per thread keeps too few bytes in flight to fill HBM
// with 512-1024 threads per SM. The compiler cannot hoist them itself: the backward's stores may
// alias the rows (the in-place gradient), and they do, but only the pack just read.
constexpr int kPacksInFlight = 4;

// Calls f(col, pack) for the packs of row[0, C) that thread `lane` of its group
// owns: a scalar head up to the row's first 16-byte boundary, the aligned body
// in kVec-element packs (kPacksInFlight loaded at a time), then a scalar tail.
// kVec = 1 visits element by element.
template <int kThreads, int kVec, typename scalar_t, typename F>
__device__ __forceinline__ void for_each_pack(const scalar_t* row, int64_t C, int lane, F&& f) {
  using P = Pack<scalar_t, kVec>;
  const auto first = reinterpret_cast<uintptr_t>(row) / sizeof(scalar_t);
  const int64_t to_boundary = (kVec - first % kVec) % kVec;  // elements before the first 16-byte boundary
  const int64_t head = to_boundary < C ? to_boundary : C;
  for (int64_t j = lane; j < head; j += kThreads) f(j, Pack<scalar_t, 1>{{row[j]}});  // head < kVec, maybe > kThreads
  const int64_t packs = (C - head) / kVec;
  const scalar_t* body = row + head;
  // This thread's packs are lane, lane + kThreads, ...; a batch holds the next kPacksInFlight of them.
  for (int64_t k = lane; k < packs; k += kPacksInFlight * kThreads) {
    P batch[kPacksInFlight];
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      if (k + u * kThreads < packs) batch[u] = P::load(body + (k + u * kThreads) * kVec);
    }
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      if (k + u * kThreads < packs) f(head + (k + u * kThreads) * kVec, batch[u]);
    }
  }
  for (int64_t j = head + packs * kVec + lane; j < C; j += kThreads) f(j, Pack<scalar_t, 1>{{row[j]}});
}

// Elements of row before its first 16-byte boundary (for comparing two rows' alignment).
template <typename scalar_t>
__device__ __forceinline__ int head_offset(const void* row) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  return (kVec - (reinterpret_cast<uintptr_t>(row) / sizeof(scalar_t)) % kVec) % kVec;
}

}  // namespace fused_softmax
