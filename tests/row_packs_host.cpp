// Host check of csrc/cuda/row_packs.cuh, compiled by tests/test_cuda_build.py with the C++
// compiler alone (no GPU, no CUDA): each group lane is called in turn, and every element of a
// row must be visited exactly once, with its own value, for C from 1 to ~700, every alignment of
// the row, each group size the kernels use (4, 32, 256 threads) and each pack width (16-bit,
// float32, float64 elements; 1 for the backward's unaligned rows). Exit status: the failures.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_on_host.h"  // first: what the CUDA headers below need on the host
#include "../csrc/cuda/row_packs.cuh"

using fused_softmax::for_each_pack;

template <int kThreads, int kVec, typename T>
int check(int64_t C, int offset) {
  std::vector<T> buffer(C + 64);
  T* row = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) / 64 * 64) + offset;
  for (int64_t c = 0; c < C; ++c) row[c] = static_cast<T>(c);
  std::vector<int> visits(C, 0);
  int wrong_values = 0;
  for (int lane = 0; lane < kThreads; ++lane) {
    for_each_pack<kThreads, kVec>(row, C, lane, [&](int64_t col, const auto& pack) {
      for (int k = 0; k < pack.size; ++k) {
        ++visits[col + k];
        wrong_values += pack.v[k] != static_cast<T>(col + k);
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    if (visits[c] != 1 || wrong_values) {
      std::printf(
          "C=%lld offset=%d threads=%d vec=%d: column %lld visited %d times, %d wrong values\n",
          static_cast<long long>(C), offset, kThreads, kVec, static_cast<long long>(c), visits[c], wrong_values);
      return 1;
    }
  }
  return 0;
}

int main() {
  int failures = 0, cases = 0;
  for (int64_t C = 1; C < 700; C += C < 80 ? 1 : 37) {
    for (int offset = 0; offset < 8; ++offset) {  // elements past a 64-byte boundary
      failures += check<4, 8, int16_t>(C, offset) + check<32, 8, int16_t>(C, offset) +
                  check<256, 8, int16_t>(C, offset) + check<256, 1, int16_t>(C, offset);
      failures +=
          check<4, 4, float>(C, offset % 4) + check<32, 4, float>(C, offset % 4) + check<4, 1, float>(C, offset % 4);
      failures += check<4, 2, double>(C, offset % 2) + check<256, 2, double>(C, offset % 2);
      cases += 9;
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
