// The ops' schemas, defined once (each backend registers its kernels in its own file:
// cpu/cross_entropy_cpu.cpp, cuda/cross_entropy_cuda.cu, cross_entropy_autograd.cpp), and the Python
// module that carries them.
#include "cross_entropy.h"
#include "cpu/kernels.h"

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_softmax, m) {
  // The loss (per row for reduction 0, else 0-dim; in the accumulation dtype) and
  // the per-row statistics (max, log_sum) that backward needs; lse = max + log_sum.
  // logit_scale, softcap and z_loss: see cross_entropy.h. predictions (int64, one per row), when
  // given, receives each row's argmax of the logits, found in the same pass as the max (the forward
  // ops all take it).
  m.def(
      "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
      "int reduction, float logit_scale=1., float softcap=0., float z_loss=0., Tensor(p!)? predictions=None) -> "
      "(Tensor loss, Tensor stats)");
  // d(grad_loss . loss) / d input, in one pass over input. With class_start and num_classes, input
  // holds the classes [class_start, class_start + input.size(1)) of rows of num_classes classes
  // (0: input.size(1)): target, weight and stats describe the whole rows, the gradient is of the
  // block's columns (fused linear cross-entropy forms its weight gradient a block of classes at a time).
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor stats, "
      "int ignore_index, float label_smoothing, int reduction, float logit_scale=1., float softcap=0., "
      "float z_loss=0., int class_start=0, int num_classes=0) -> Tensor");
  // The forward that also overwrites input with d loss / d input (for grad_loss = 1): forward and
  // backward in one sweep, and no N x C allocation. input must have contiguous rows.
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, float logit_scale=1., float softcap=0., float z_loss=0., "
      "Tensor(p!)? predictions=None) -> (Tensor loss, Tensor stats)");
  // The forward that also returns d loss / d input (for grad_loss = 1) in a new tensor, formed while
  // each row is in cache: autograd's forward when input needs a gradient, on the CPU (its backward
  // then only scales it).
  m.def(
      "cross_entropy_fwd_grad(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, float logit_scale=1., float softcap=0., float z_loss=0., "
      "Tensor(p!)? predictions=None) -> (Tensor loss, Tensor stats, Tensor grad)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_softmax kernels; the ops live in torch.ops.fused_softmax";
  m.def(
      "cuda_built",
      [] {
#ifdef FUSED_SOFTMAX_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build.");
  m.def("empty_cache", &fused_softmax::empty_cache, "Return the CPU kernel's cached gradient memory to the system.");
  m.def(
      "cpu_capability", &fused_softmax::cpu::capability,
      "The instruction-set level of the CPU kernels in use (see csrc/cpu/kernels.h).");
  m.def(
      "cpu_capabilities", &fused_softmax::cpu::capabilities,
      "The levels of CPU kernels this build holds, lowest first, each with whether this CPU runs it.");
}
