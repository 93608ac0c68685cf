// What the CUDA headers under csrc/cuda/ need to compile for the host with the C++ compiler alone:
// their device functions become host functions, and CUDA's 16-byte vector type a plain struct.
// Included by tests/row_*_host.cpp before those headers.
#pragma once

#define __device__
#define __forceinline__ inline
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
