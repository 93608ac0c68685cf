// The argument checks and layout shared by the CPU and CUDA kernels (cross_entropy.h). The op
// schemas and the Python module are in register.cpp.
#include "cross_entropy.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace fused_softmax {

namespace {
std::string shape_of(const at::Tensor& t) {
  return c10::str(t.sizes());
}
}  // namespace

namespace {
// Validates the arguments shared by both ops. Returns true when `target` holds
// class probabilities rather than class indices.
// classes: the row's class count, input.size(1) unless input is a block of the classes.
bool check_cross_entropy_args(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t classes) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "fused_softmax: input: unsupported dtype ", dtype, "; expected float16, bfloat16, float32 or float64");
  TORCH_CHECK(
      input.dim() == 2, "fused_softmax: input: expected a 2-D (rows, classes) tensor, got shape ", shape_of(input));
  const int64_t rows = input.size(0);
  TORCH_CHECK(input.size(1) >= 1, "fused_softmax: input: expected at least one class, got shape ", shape_of(input));
  TORCH_CHECK(
      target.device() == input.device(), "fused_softmax: target: expected a tensor on ", input.device(),
      " like input, got one on ", target.device());

  bool probabilities = false;
  const auto tdtype = target.scalar_type();
  if (tdtype == at::kLong || tdtype == at::kInt || tdtype == at::kByte) {  // uint8: as torch's nll_loss
    TORCH_CHECK(
        target.dim() == 1 && target.size(0) == rows, "fused_softmax: target: class indices must have shape [", rows,
        "] to match input ", shape_of(input), ", got ", shape_of(target));
  } else if (at::isFloatingType(tdtype)) {
    TORCH_CHECK(
        target.dim() == 2 && target.size(0) == rows && target.size(1) == classes,
        "fused_softmax: target: class probabilities must have shape [", rows, ", ", classes, "] to match input ",
        shape_of(input), ", got ", shape_of(target));
    TORCH_CHECK(
        tdtype == dtype || ((dtype == at::kHalf || dtype == at::kBFloat16) && tdtype == at::kFloat),
        "fused_softmax: target: class probabilities must have input's dtype ", dtype,
        " (or float32 for float16/bfloat16 input), got ", tdtype);
    probabilities = true;
  } else {
    TORCH_CHECK(
        false,
        "fused_softmax: target: expected int64, int32 or uint8 class indices or floating class probabilities, "
        "got dtype ",
        tdtype);
  }

  if (weight.has_value() && weight->defined()) {
    const auto& w = *weight;
    TORCH_CHECK(
        w.dim() == 1 && w.size(0) == classes, "fused_softmax: weight: expected a 1-D tensor of ", classes,
        " class weights, got shape ", shape_of(w));
    TORCH_CHECK(
        w.device() == input.device(), "fused_softmax: weight: expected a tensor on ", input.device(),
        " like input, got one on ", w.device());
    TORCH_CHECK(
        at::isFloatingType(w.scalar_type()), "fused_softmax: weight: expected a floating dtype, got ", w.scalar_type());
  }
  return probabilities;
}
}  // namespace

void check_backward_args(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& stats, int64_t reduction) {
  const int64_t rows = input.size(0);
  const auto acc = accumulate_type(input.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK(
        grad_loss.dim() == 1 && grad_loss.size(0) == rows && grad_loss.device() == input.device(),
        "fused_softmax: grad_loss: expected a 1-D tensor of ", rows, " rows on ", input.device(), ", got shape ",
        shape_of(grad_loss), " on ", grad_loss.device());
  } else {
    TORCH_CHECK(
        grad_loss.dim() == 0 && grad_loss.device() == input.device(),
        "fused_softmax: grad_loss: expected a 0-dim tensor on ", input.device(), " for a reduced loss, got shape ",
        shape_of(grad_loss), " on ", grad_loss.device());
  }
  TORCH_CHECK(
      stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 2 && stats.device() == input.device() &&
          stats.scalar_type() == acc,
      "fused_softmax: stats: expected the forward's ", acc, " (max, log_sum) tensor of shape [", rows, ", 2] on ",
      input.device(), ", got ", stats.scalar_type(), " of shape ", shape_of(stats), " on ", stats.device());
}

LossOptions with_mean_z_loss(LossOptions options, double divisor, int64_t rows_kept) {
  if (options.z_loss > 0 && rows_kept > 0) options.z_loss *= divisor / static_cast<double>(rows_kept);
  return options;
}

LossOptions check_options(
    const at::Tensor& input, int64_t ignore_index, double label_smoothing, int64_t reduction, double logit_scale,
    double softcap, double z_loss) {
  TORCH_CHECK(
      label_smoothing >= 0.0 && label_smoothing <= 1.0,
      "fused_softmax: label_smoothing: expected a value in [0, 1], got ", label_smoothing);
  TORCH_CHECK(
      reduction == kNone || reduction == kMean || reduction == kSum,
      "fused_softmax: reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(
      std::isfinite(logit_scale) && logit_scale > 0, "fused_softmax: logit_scale: expected a finite value > 0, got ",
      logit_scale);
  TORCH_CHECK(
      std::isfinite(softcap) && softcap >= 0,
      "fused_softmax: softcap: expected a finite value > 0 (or 0 for none), got ", softcap);
  TORCH_CHECK(
      std::isfinite(z_loss) && z_loss >= 0, "fused_softmax: z_loss: expected a finite value >= 0, got ", z_loss);
  // The kernels compute in the accumulation dtype: in float32 a scale or cap out of its normal range would
  // round to inf (NaN losses) or towards 0 (a softcap silently off), so it is refused, not rounded.
  if (accumulate_type(input.scalar_type()) == at::kFloat) {
    constexpr double lowest = std::numeric_limits<float>::min(), highest = std::numeric_limits<float>::max();
    const auto fits = [&](double v) { return v >= lowest && v <= highest; };
    TORCH_CHECK(
        fits(logit_scale), "fused_softmax: logit_scale: ", logit_scale, " is outside [", lowest, ", ", highest,
        "], the float32 range in which ", input.scalar_type(), " logits are computed");
    TORCH_CHECK(
        softcap == 0 || fits(softcap), "fused_softmax: softcap: ", softcap, " is outside [", lowest, ", ", highest,
        "], the float32 range in which ", input.scalar_type(), " logits are computed");
  }
  return {ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss};
}

at::ScalarType accumulate_type(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

PreparedArgs prepare_args(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t class_start,
    int64_t num_classes) {
  PreparedArgs p;
  const int64_t columns = input.dim() == 2 ? input.size(1) : 0;  // a wrong dim is reported below
  p.class_start = class_start;
  p.num_classes = num_classes == 0 ? columns : num_classes;
  TORCH_CHECK(
      class_start >= 0 && class_start + columns <= p.num_classes, "fused_softmax: class_start, num_classes: input's ",
      columns, " columns starting at class ", class_start, " must lie within the ", p.num_classes, " classes");
  p.probabilities = check_cross_entropy_args(input, target, weight, p.num_classes);
  p.input = input.stride(1) == 1 ? input : input.contiguous();
  if (p.probabilities) {
    p.target = target.stride(1) == 1 ? target : target.contiguous();
  } else {
    p.target = target.to(at::kLong).contiguous();
  }
  if (weight.has_value() && weight->defined()) {
    p.weight = weight->to(accumulate_type(input.scalar_type())).contiguous();
  }
  return p;
}

PreparedArgs prepare_forward_args(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& predictions) {
  PreparedArgs p = prepare_args(input, target, weight);
  if (predictions.has_value() && predictions->defined()) {
    const at::Tensor& out = *predictions;
    TORCH_CHECK(
        out.scalar_type() == at::kLong && out.dim() == 1 && out.size(0) == input.size(0) && out.is_contiguous() &&
            out.device() == input.device(),
        "fused_softmax: predictions: expected a contiguous int64 tensor of shape [", input.size(0), "] on ",
        input.device(), ", got ", out.scalar_type(), " of shape ", shape_of(out), " on ", out.device());
    p.predictions = out;
  }
  return p;
}

}  // namespace fused_softmax
