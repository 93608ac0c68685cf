// Shared declarations of the fused softmax cross-entropy ops.
//
// Both ops work on 2-D logits `input` of shape (N, C); the Python layer folds
// every other layout ((C,), (N, C, d1, ..., dk)) into that. Per row i, with
// class weights w (all ones without `weight`) and label smoothing eps:
//
//   q[i, c]  = target mass on class c:
//                class indices:        (1 - eps) * w[y_i] * [c == y_i] + eps / C * w[c]
//                class probabilities:  w[c] * ((1 - eps) * t[i, c] + eps / C)
//   S[i]     = sum_c q[i, c]
//   lse[i]   = log(sum_c exp(x[i, c])) = max[i] + log_sum[i],
//              log_sum[i] = log(sum_c exp(x[i, c] - max[i]))
//   loss[i]  = sum_c q[i, c] * (lse[i] - x[i, c])       (0 for an ignored row)
//   dx[i, c] = grad_loss[i] * (exp(x[i, c] - lse[i]) * S[i] - q[i, c])   (0 for an ignored row)
//
// This is torch.nn.functional.cross_entropy with reduction='none'. Options
// beyond it (all off by default, in both kernels):
//   logit_scale s, softcap cap: x above is not the input r but
//              s * r, or cap * tanh(s * r / cap) with a softcap (-inf stays -inf,
//              so padding never takes mass); dr = dx * s * (1 - (x / cap)^2).
//   z_loss z:  loss[i] += z * lse[i]^2 (rows not ignored), the PaLM auxiliary
//              term; its gradient 2 z lse[i] p[i, c] joins S: S[i] -> S[i] + 2 z lse[i].
// With `predictions` (an int64 tensor of N elements) the forward also writes each row's
// argmax of x, found in the pass that finds its max: the first class of the largest value, or of
// the first NaN, as torch.argmax ranks them (ranks_above). It is the argmax of the logits as
// given unless logit_scale or softcap round two of them to one value (then the first of those).
// The ops also
// reduce, as torch's nll_loss does (reduction: 0 none, 1 mean, 2 sum): 'mean'
// divides the sum by D = sum of w[y_i] over the rows not ignored (class
// indices) or by N (class probabilities), and the z-loss by the rows not ignored
// (see with_mean_z_loss); backward then spreads one grad_loss value over the
// rows. Losses and sums are in the accumulation dtype.
//
// The forward saves, per row, stats = (max, log_sum) in the accumulation dtype
// rather than their sum lse: backward forms exp(x - lse) from x - max, exact
// where it matters (x near the max), and log_sum (the CPU kernel as
// exp(x - max) * exp(-log_sum), so the forward's own exp(x - max) can serve
// its fused backward). A rounded lse would be off by half its ulp (5e-4 at
// logits near 1e4) and every probability with it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

namespace fused_softmax {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };  // as at::Reduction

// The loss's options (the comment above says what each does), checked once at each op's boundary
// and passed down whole to both backends' kernels.
struct LossOptions {
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  int64_t reduction = kMean;
  double logit_scale = 1.0;
  double softcap = 0.0;  // 0: none
  double z_loss = 0.0;
};

// The ops' options, checked for input's dtype (whose accumulation dtype must hold the scale and
// cap); the message names the bad one.
LossOptions check_options(
    const at::Tensor& input, int64_t ignore_index, double label_smoothing, int64_t reduction, double logit_scale,
    double softcap, double z_loss);

// The z-loss is a per-row regulariser of the lse: 'mean' divides it by the rows not ignored, as
// Liger-Kernel and flash-attn do, while the cross-entropy is divided by D = sum of w[y_i] over those
// rows. Both go through the one divisor D when z_loss is scaled by D / rows_kept (1 without class
// weights or with probabilities). Returns the options the kernels use for a 'mean' loss.
LossOptions with_mean_z_loss(LossOptions options, double divisor, int64_t rows_kept);

// Extra checks of the backward op's own inputs.
void check_backward_args(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& stats, int64_t reduction);

// The accumulation dtype: float32 for float16/bfloat16/float32, float64 for float64.
at::ScalarType accumulate_type(at::ScalarType input_dtype);

// Whether value v ranks above `best` as torch.argmax ranks values: larger, or NaN where best is
// not (NaN ranks above every number; between equals the first found stays).
template <typename acc_t>
C10_HOST_DEVICE inline bool ranks_above(acc_t v, acc_t best) {
  return v > best || (v != v && best == best);  // v != v: v is NaN
}

// The arguments checked and laid out the way both kernels read them.
struct PreparedArgs {
  at::Tensor input;       // rows with stride(1) == 1 (copied only when they were not)
  at::Tensor target;      // int64 class indices, or probabilities with stride(1) == 1
  at::Tensor weight;      // accumulation dtype, contiguous; undefined without weight
  bool probabilities;     // target holds class probabilities rather than indices
  int64_t class_start;    // input's columns are the classes [class_start, class_start + input.size(1))
  int64_t num_classes;    // of rows of this many classes (the backward op's column blocks; else input.size(1))
  at::Tensor predictions;  // the forward's argmax per row (int64, contiguous), or undefined
};

PreparedArgs prepare_args(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t class_start = 0,
    int64_t num_classes = 0);

// The forward ops' arguments, with the tensor that receives the predictions, if any (checked).
PreparedArgs prepare_forward_args(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& predictions);

// Class probabilities as both kernels read them: in the logits' dtype (scalar_t), or in float32
// (acc_t) for 16-bit logits, read as they are (rounded to 16 bits, a few rows' losses lost digits
// that torch keeps: 4 x 5 bf16, 4.5e-4 relative against 2.6e-5). One flag, the same for a whole
// call, instead of a second instantiation of every kernel.
template <typename acc_t, typename scalar_t>
struct Probabilities {
  const void* p = nullptr;  // nullptr: class indices
  bool wide = false;        // acc_t elements, else scalar_t

  C10_HOST_DEVICE explicit operator bool() const { return p != nullptr; }
  C10_HOST_DEVICE Probabilities operator+(int64_t k) const {  // k elements on
    if (!p) return *this;
    return {
        wide ? static_cast<const void*>(static_cast<const acc_t*>(p) + k)
             : static_cast<const void*>(static_cast<const scalar_t*>(p) + k),
        wide};
  }
  // f(elements), with elements a const acc_t* or a const scalar_t*.
  template <typename F>
  C10_HOST_DEVICE auto visit(F&& f) const {
    return wide ? f(static_cast<const acc_t*>(p)) : f(static_cast<const scalar_t*>(p));
  }
};

// The part of a row's target mass q_c that is spread over classes: q_c = w_c * (a * t_c + b), with t
// the probability row (none for class indices, whose single target class is added separately), w
// the class weights (nullptr for all ones), a = 1 - eps and b = eps / C. at(c) is class c's; the CPU
// kernels read it a vector at a time (spread_at in cpu/vec_helpers.h).
template <typename acc_t, typename scalar_t>
struct SpreadMass {
  Probabilities<acc_t, scalar_t> t;
  const acc_t* w;
  acc_t a;
  acc_t b;

  C10_HOST_DEVICE acc_t at(int64_t c) const {
    const acc_t q = t ? a * t.visit([c](const auto* e) { return static_cast<acc_t>(e[c]); }) + b : b;
    return w ? q * w[c] : q;
  }
};

// The probabilities of p's target (none for class indices).
template <typename acc_t, typename scalar_t>
Probabilities<acc_t, scalar_t> probabilities_of(const PreparedArgs& p) {
  if (!p.probabilities) return {};
  const bool wide = p.target.scalar_type() != p.input.scalar_type();
  TORCH_INTERNAL_ASSERT(!wide || p.target.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
  return {p.target.const_data_ptr(), wide};
}

// Fills what the CPU kernel's Problem and the CUDA kernels' KernelArgs both hold, under the same
// names: the rows (x, x_stride, C, and for a block of classes col0 and classes), the target (class
// indices y, or probabilities t with t_stride), the weights w, ignore_index, eps, z_loss, predictions.
template <typename scalar_t, typename acc_t, typename Args>
void fill_kernel_args(Args& a, const PreparedArgs& p, const LossOptions& o) {
  a.x = p.input.const_data_ptr<scalar_t>();
  a.x_stride = p.input.stride(0);
  a.C = p.input.size(1);
  a.col0 = p.class_start;
  a.classes = p.num_classes;
  a.t = probabilities_of<acc_t, scalar_t>(p);
  if (p.probabilities) {
    a.t_stride = p.target.stride(0);
  } else {
    a.y = p.target.const_data_ptr<int64_t>();
  }
  a.w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  a.ignore_index = o.ignore_index;
  a.eps = static_cast<acc_t>(o.label_smoothing);
  a.z_loss = static_cast<acc_t>(o.z_loss);
  a.predictions = p.predictions.defined() ? p.predictions.data_ptr<int64_t>() : nullptr;
}

// Returns the CPU kernel's cached gradient memory (the last large gradient's mapping, kept for the
// next one) to the system.
void empty_cache();

}  // namespace fused_softmax
