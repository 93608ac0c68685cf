// The CUDA ops of csrc/cuda/cross_entropy_kernels.cuh, kernels and all, run on the CPU by the
// simulator of cuda_on_host.h: a Python module (built by tests/test_cuda_on_host.py) whose four
// functions take CPU tensors and do what the CUDA ops do with CUDA tensors.
#include <torch/extension.h>

#include "cuda_on_host.h"

// On a GPU a failed device-side assert stops the kernel; here it is an exception (the process goes on).
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) throw std::runtime_error("device-side assert: " #cond)

#include "../csrc/cuda/cross_entropy_kernels.cuh"

namespace {

int multiprocessors = 2;  // few, so that the grid-stride loops take several steps

struct HostLauncher {
  explicit HostLauncher(const at::Tensor&) {}
  int multiprocessors() const { return ::multiprocessors; }
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, Args... args) const {
    cuda_on_host::run_kernel(grid, dim3(fused_softmax::kBlock), [&] { kernel(args...); });
  }
};

// The simulator's own check: the upper half of each warp skips a shuffle (a GPU would hang or read
// garbage); run_kernel must report it rather than return.
void diverged_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % cuda_on_host::kWarp < 16) v = __shfl_xor_sync(0xffffffff, v, 1);
  out[threadIdx.x] = v;
}

// And a barrier that the block's last warp skips.
void diverged_barrier_kernel(float* out) {
  if (threadIdx.x < blockDim.x - cuda_on_host::kWarp) __syncthreads();
  out[threadIdx.x] = 1;
}

}  // namespace

// The forward ops' arguments, predictions optional as in their schemas (csrc/register.cpp).
#define FORWARD_ARGS                                                                                           \
  py::arg("input"), py::arg("target"), py::arg("weight"), py::arg("ignore_index"), py::arg("label_smoothing"), \
      py::arg("reduction"), py::arg("logit_scale"), py::arg("softcap"), py::arg("z_loss"),                     \
      py::arg("predictions") = py::none()

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fused_softmax;
  m.def("cross_entropy_fwd", &cross_entropy_fwd_on<HostLauncher>, FORWARD_ARGS);
  m.def("cross_entropy_bwd", &cross_entropy_bwd_on<HostLauncher>);
  m.def("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_on<HostLauncher>, FORWARD_ARGS);
  m.def("cross_entropy_fwd_grad", &cross_entropy_fwd_grad_on<HostLauncher>, FORWARD_ARGS);
  m.def(
      "run_diverged",
      [](const std::string& which) {
        std::vector<float> out(fused_softmax::kBlock);
        HostLauncher(at::Tensor())(
            which == "shuffle" ? &diverged_shuffle_kernel : &diverged_barrier_kernel, dim3(1), out.data());
      },
      "Launches a kernel whose threads skip a shuffle or a barrier (the simulator must throw).");
  m.def("set_multiprocessors", [](int n) { multiprocessors = n; }, "The SM count the grids are sized for.");
}
