// The CPU kernels, compiled once per instruction-set level and chosen when the library loads, as
// ATen's DispatchStub chooses its own: kernels.cpp is compiled for each level (setup.py passes the
// level's compiler flags and -DCPU_CAPABILITY=<LEVEL>, which also names the namespace its entry
// points live in), cross_entropy_cpu.cpp picks the best level the running CPU supports and registers
// the ops, gradient_memory.cpp is the gradients' memory, shared by every level.
#pragma once

#include "../cross_entropy.h"

#include <tuple>
#include <vector>

namespace fused_softmax::cpu {

// Where the forward also writes d loss / d input for grad_loss = 1: nowhere, over input itself
// (the in-place op), or into a new tensor (cross_entropy_fwd_grad).
enum class GradTo { kNowhere, kInput, kNew };

// The forward; with a gradient, each chunk of rows' gradient is written right after the chunk's
// forward, while its rows are still in cache; with predictions, each row's argmax goes there.
// Returns (loss, stats, grad or undefined).
using ForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& predictions, const LossOptions& options, GradTo grad_to);

// cross_entropy_bwd (see csrc/register.cpp), with the options checked.
using BackwardFn = at::Tensor (*)(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, const LossOptions& options, int64_t class_start,
    int64_t num_classes);

// One level's kernels.
struct Kernels {
  ForwardFn forward;
  BackwardFn backward;
};

// Each level's, defined by its compilation of kernels.cpp (setup.py compiles the levels this compiler
// and architecture have: DEFAULT everywhere, the others on x86-64; FUSED_SOFTMAX_CPU_LEVEL_<LEVEL>
// says which are linked in).
namespace DEFAULT {
extern const Kernels kKernels;
}
namespace AVX2 {
extern const Kernels kKernels;
}
namespace AVX512 {
extern const Kernels kKernels;
}
namespace AVX512_BF16 {
extern const Kernels kKernels;
}

// The level in use: the best this CPU supports, or a lower one named by the environment variable
// FUSED_SOFTMAX_CPU_CAPABILITY (default, avx2, avx512, avx512_bf16) when the library loaded.
const Kernels& kernels();
std::string capability();

// The levels this build holds, each with whether this CPU can run it, lowest first.
std::vector<std::pair<std::string, bool>> capabilities();

// An empty tensor for a gradient: large ones get memory of their own, kept for the next gradient
// (gradient_memory.cpp).
at::Tensor empty_for_gradient(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fused_softmax::cpu
