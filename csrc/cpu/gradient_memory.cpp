// The CPU gradients' memory: large gradients get a memory mapping of their own, kept for the next
// gradient that fits it (see Mapping). Compiled once, for the baseline CPU: every level's kernels
// share it.
#include "kernels.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <mutex>
#include <utility>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fused_softmax {
namespace cpu {
namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// Gradients of kMinMapped bytes and more get their own mapping; the last kCachedMappings freed (up
// to kMaxCached bytes together) are kept for the next gradients that fit them. A training loop's
// fresh N x C gradient each step would otherwise be written page by page, its first-touch faults
// costing more than the arithmetic, and glibc returns such blocks to the system now and then, so a
// small one is faulted in anew every few steps (docs/decisions.md). A few slots, so that two losses per step (or a
// training and an evaluation batch) of different sizes each keep theirs. Like CUDA's caching
// allocator, at the price of holding those mappings between steps. Mappings of 32 MiB and more also
// ask for transparent huge pages (THP "madvise" mode, Linux's default): 512x fewer faults on first use.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinMapped = size_t(1) << 20;
constexpr size_t kMaxCached = size_t(1) << 30;
constexpr size_t kCachedMappings = 4;

struct Mapping {
  void* base = nullptr;
  size_t size = 0;  // bytes mapped from base
};

std::mutex cached_mappings_lock;
// Guarded by cached_mappings_lock: the kept mappings, the most recently freed first, then empty slots
// (base == nullptr). An array, not a container: trivially destructible, it still serves a gradient
// freed during the process's exit, after the static destructors.
Mapping cached_mappings[kCachedMappings];

void release_mapping(Mapping m) {
  Mapping evicted[kCachedMappings + 1];
  size_t n_evicted = 0;
  {
    const std::lock_guard<std::mutex> guard(cached_mappings_lock);
    for (Mapping& slot : cached_mappings) std::swap(m, slot);  // m first, the others one slot back
    if (m.base) evicted[n_evicted++] = m;                      // the oldest, pushed out
    size_t bytes = 0;
    for (Mapping& slot : cached_mappings) {  // the older ones past kMaxCached bytes go too
      bytes += slot.size;
      if (bytes > kMaxCached && slot.base) evicted[n_evicted++] = std::exchange(slot, Mapping{});
    }
  }
  for (size_t i = 0; i < n_evicted; ++i) munmap(evicted[i].base, evicted[i].size);  // outside the lock: slow
}

void empty_cached_mappings() {
  Mapping evicted[kCachedMappings];
  {
    const std::lock_guard<std::mutex> guard(cached_mappings_lock);
    for (size_t i = 0; i < kCachedMappings; ++i) evicted[i] = std::exchange(cached_mappings[i], Mapping{});
  }
  for (const Mapping& m : evicted)
    if (m.base) munmap(m.base, m.size);
}

// A mapping of at least `size` bytes: the smallest kept one that fits and is not over twice as large.
Mapping take_mapping(size_t size) {
  {
    const std::lock_guard<std::mutex> guard(cached_mappings_lock);
    size_t best = kCachedMappings;
    for (size_t i = 0; i < kCachedMappings && cached_mappings[i].base; ++i) {
      const size_t have = cached_mappings[i].size;
      if (have >= size && have <= 2 * size && (best == kCachedMappings || have < cached_mappings[best].size)) best = i;
    }
    if (best < kCachedMappings) {
      const Mapping m = cached_mappings[best];
      std::copy(cached_mappings + best + 1, cached_mappings + kCachedMappings, cached_mappings + best);  // keep order
      cached_mappings[kCachedMappings - 1] = Mapping{};
      return m;
    }
  }
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return base == MAP_FAILED ? Mapping{} : Mapping{base, size};
}
#endif

}  // namespace

// An empty tensor for a gradient (see Mapping above; small ones and non-Linux systems get
// at::empty). A mapped gradient bypasses torch's CPU allocator (its profiler does not see it) and
// is a non-resizable tensor, which a gradient never needs to be.
at::Tensor empty_for_gradient(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes >= kMinMapped) {
    const bool huge = bytes >= 16 * kHugePage;
    const Mapping m = take_mapping(huge ? bytes + kHugePage : bytes);  // room to start on a 2 MiB boundary
    if (m.base) {
      auto* data = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(m.base) + kHugePage - 1) & ~(kHugePage - 1));
      if (huge) {
        madvise(data, bytes, MADV_HUGEPAGE);  // a hint: without THP the pages are ordinary ones
      } else {
        data = m.base;
      }
      return at::from_blob(data, sizes, [m](void*) { release_mapping(m); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu

void empty_cache() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  cpu::empty_cached_mappings();
#endif
}

}  // namespace fused_softmax
