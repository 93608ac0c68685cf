// The CUDA ops: the kernels of cross_entropy_kernels.cuh launched on the GPU, on the current stream
// of the input's device.
#include "cross_entropy_kernels.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fused_softmax {
namespace {

// Launches kernels on the input's GPU (the device guard holds it current while the op runs).
class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Tensor& input) : guard_(input.device()), stream_(c10::cuda::getCurrentCUDAStream()) {}

  int multiprocessors() const {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
    return sms;
  }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, Args... args) const {
    kernel<<<grid, kBlock, 0, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

constexpr auto cross_entropy_fwd_cuda = &cross_entropy_fwd_on<CudaLauncher>;
constexpr auto cross_entropy_bwd_cuda = &cross_entropy_bwd_on<CudaLauncher>;
constexpr auto cross_entropy_fwd_inplace_cuda = &cross_entropy_fwd_inplace_on<CudaLauncher>;
constexpr auto cross_entropy_fwd_grad_cuda = &cross_entropy_fwd_grad_on<CudaLauncher>;

}  // namespace

TORCH_LIBRARY_IMPL(fused_softmax, CUDA, m) {
  m.impl("cross_entropy_fwd", cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", cross_entropy_bwd_cuda);
  m.impl("cross_entropy_fwd_inplace", cross_entropy_fwd_inplace_cuda);
  m.impl("cross_entropy_fwd_grad", cross_entropy_fwd_grad_cuda);
}

}  // namespace fused_softmax
