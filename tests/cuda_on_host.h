// What the CUDA code under csrc/cuda/ needs to compile and run on the host with the C++ compiler
// alone, for the tests: its device functions become host functions, CUDA's vector types plain
// structs, and a kernel launch runs every thread of every block on the CPU (run_kernel below).
// Included by tests/row_*_host.cpp and tests/cuda_kernels_host.cpp before those headers.
//
// The simulator runs a block's threads as fibers (ucontext) on one OS thread, one block after
// another. A thread runs until it reaches a barrier: __syncthreads() waits for all the block's
// threads, __shfl_xor_sync() for all 32 lanes of the warp, and both must be reached by every thread
// (a thread that skips one, or finishes while others wait, deadlocks the block: reported as an
// error, as on a GPU it would hang or read garbage). Between barriers the threads run in a random
// order (seeded: the same each run), one of them as late as it can (see run_kernel), so that a
// missing barrier shows as a wrong result. __shared__ variables are function statics:
// one copy, shared by the threads of the block that runs. Arithmetic is the host's (exp2f, log,
// tanh differ from the GPU's in the last bits): the simulator checks the kernels' logic, indexing
// and synchronisation, not their rounding or speed.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

// The running thread's coordinates (1-D grids and blocks), set by the simulator before it resumes a thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_on_host {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = size_t(128) << 10;

// A barrier that `expected` threads must reach before any goes on.
struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;  // how many times it released
};

struct Warp {
  Barrier barrier;
  uint64_t values[2][kWarp];  // each lane's value of a shuffle, by the shuffle's generation's parity
  int lane_masks[2][kWarp];
};

struct Thread {
  ucontext_t context;
  char* stack = nullptr;  // kStackBytes
  bool done = false;
};

// One launch's state. A shuffle's two buffers: a lane may write the next shuffle's value before
// every lane has read this one's, but not the one after (that needs every lane at the next).
struct Block {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier block_barrier;
  const std::function<void()>* body = nullptr;
  int current = 0;
  bool progress = false;  // whether any thread arrived at or passed a barrier, or finished, since the last check
  std::exception_ptr error;
};

inline Block* running = nullptr;

inline void yield() {
  swapcontext(&running->threads[running->current].context, &running->scheduler);
}

// Arrives at b, which releases when `expected` threads have arrived; returns when it has.
inline void arrive_and_wait(Barrier& b, int expected) {
  running->progress = true;
  const uint64_t generation = b.generation;
  if (++b.arrived == expected) {
    b.arrived = 0;
    ++b.generation;
    yield();  // the last to arrive goes on when the scheduler resumes it, as the others do
  } else {
    while (b.generation == generation) yield();
  }
  running->progress = true;
}

inline void thread_main() {
  try {
    (*running->body)();
  } catch (...) {
    if (!running->error) running->error = std::current_exception();
  }
  running->threads[running->current].done = true;
  running->progress = true;
}  // returns to the scheduler (uc_link)

// Runs body as every thread of a grid of `grid` blocks of `block` threads (1-D), block after block.
// Throws what a thread threw, or std::runtime_error when the threads wait at barriers that not all
// of them reach.
inline void run_kernel(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (block.x % kWarp != 0 || grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1)
    throw std::invalid_argument("cuda_on_host: 1-D launches of whole warps only");
  Block b;
  b.threads.resize(block.x);
  // The threads' stacks outlive the launch: allocating (and zeroing) 32 MiB per launch cost more than
  // most launches here.
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() < block.x) stacks.emplace_back(new char[kStackBytes]);
  for (unsigned t = 0; t < block.x; ++t) b.threads[t].stack = stacks[t].get();
  b.body = &body;
  // Between barriers the threads of a block (and the lanes of a warp) may run in any order on a GPU.
  // Here each round resumes them in a new order, and one thread of each block, the laggard (a
  // different one in each block), only when all the others wait: it reads what the others wrote
  // last, so a missing barrier shows.
  std::vector<unsigned> order(block.x);
  std::iota(order.begin(), order.end(), 0u);
  std::minstd_rand random(grid.x * 7919u + block.x);
  running = &b;
  gridDim = grid;
  blockDim = block;
  auto resume = [&](unsigned t) {
    b.current = static_cast<int>(t);
    threadIdx = dim3(t);
    swapcontext(&b.scheduler, &b.threads[t].context);
  };
  for (unsigned block_id = 0; block_id < grid.x && !b.error; ++block_id) {
    blockIdx = dim3(block_id);
    b.warps.assign(block.x / kWarp, Warp{});
    b.block_barrier = {};
    for (Thread& t : b.threads) {
      t.done = false;
      getcontext(&t.context);
      t.context.uc_stack.ss_sp = t.stack;
      t.context.uc_stack.ss_size = kStackBytes;
      t.context.uc_link = &b.scheduler;
      makecontext(&t.context, thread_main, 0);
    }
    const unsigned laggard = block_id % block.x;  // thread 0 (which writes a row's results) in block 0
    for (bool all_done = false; !all_done && !b.error;) {
      all_done = true;
      b.progress = false;
      std::shuffle(order.begin(), order.end(), random);
      for (unsigned t : order) {
        if (b.error) break;
        if (b.threads[t].done || t == laggard) continue;
        all_done = false;
        resume(t);
      }
      if (!b.threads[laggard].done && !b.error) {
        all_done = false;
        if (!b.progress) resume(laggard);
      }
      if (!all_done && !b.progress && !b.error) {
        running = nullptr;
        throw std::runtime_error(
            "cuda_on_host: deadlock in block " + std::to_string(block_id) +
            ": threads wait at a barrier (__syncthreads or a shuffle) that not all of them reach");
      }
    }
  }
  running = nullptr;
  if (b.error) std::rethrow_exception(b.error);
}

}  // namespace cuda_on_host

inline void __syncthreads() {
  cuda_on_host::arrive_and_wait(cuda_on_host::running->block_barrier, static_cast<int>(blockDim.x));
}

// value from lane (this lane ^ lane_mask) of the warp; every lane of the warp must call it, with the
// same lane_mask (a group of lanes on another path would not).
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves up to 8 bytes");
  if (mask != 0xffffffffu) throw std::invalid_argument("cuda_on_host: shuffles of whole warps only");
  cuda_on_host::Warp& w = cuda_on_host::running->warps[threadIdx.x / cuda_on_host::kWarp];
  const int lane = static_cast<int>(threadIdx.x % cuda_on_host::kWarp);
  const int buffer = static_cast<int>(w.barrier.generation % 2);
  std::memcpy(&w.values[buffer][lane], &value, sizeof value);
  w.lane_masks[buffer][lane] = lane_mask;
  cuda_on_host::arrive_and_wait(w.barrier, cuda_on_host::kWarp);
  for (int other : w.lane_masks[buffer]) {
    if (other != lane_mask)
      throw std::runtime_error("cuda_on_host: the lanes of a warp shuffled with different offsets");
  }
  T out;
  std::memcpy(&out, &w.values[buffer][lane ^ lane_mask], sizeof out);
  return out;
}
