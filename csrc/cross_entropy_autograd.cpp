// Autograd for the forward op, registered for the Autograd dispatch key in C++
// (as torchvision does for its ops): the backward runs in the autograd engine
// without a trip through Python, which is most of the cost of a small loss.
#include "cross_entropy.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fused_softmax {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fwd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_softmax::cross_entropy_fwd", "")
                       .typed<decltype(call_fwd)>();
  return op.call(input, target, weight, ignore_index, label_smoothing, reduction);
}

at::Tensor call_bwd(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
    int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_softmax::cross_entropy_bwd", "")
                       .typed<decltype(call_bwd)>();
  return op.call(grad_loss, input, target, weight, stats, ignore_index, label_smoothing, reduction);
}

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
      const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;  // the kernels below see plain tensors
    auto [loss, stats] = call_fwd(input, target, weight, ignore_index, label_smoothing, reduction);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), stats});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({stats});  // stats serve backward; they are not a result to train on
    ctx->set_materialize_grads(false);      // so no zero gradient is allocated for stats
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& target = saved[1];
    const std::optional<at::Tensor> weight = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const at::Tensor& stats = saved[3];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double eps = ctx->saved_data["label_smoothing"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const at::Tensor& grad_loss = grads[0];
    at::Tensor grad_input, grad_target;
    if (!grad_loss.defined()) return {grad_input, grad_target, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    if (ctx->needs_input_grad(0)) {
      grad_input = call_bwd(grad_loss, input, target, weight, stats, ignore_index, eps, reduction);
    }
    if (ctx->needs_input_grad(1)) {
      // Probability targets: d loss_i / d t_ic = (1 - eps) * w_c * (lse_i - x_ic), lse - x = log_sum - (x - max).
      const at::Tensor x = input.to(stats.scalar_type());
      at::Tensor lse_minus_x = stats.select(1, 1).unsqueeze(1) - (x - stats.select(1, 0).unsqueeze(1));
      at::Tensor g = grad_loss.to(stats.scalar_type());  // per row, or one value for a reduced loss
      if (reduction == kNone) g = g.unsqueeze(1);
      if (reduction == kMean) g = g / static_cast<double>(input.size(0));  // probabilities: mean over rows
      at::Tensor scale = g * (1 - eps);
      if (weight) scale = scale * weight->to(stats.scalar_type());
      grad_target = (scale * lse_minus_x).to(target.scalar_type());
    }
    return {grad_input, grad_target, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  auto out = CrossEntropyFunction::apply(input, target, weight, ignore_index, label_smoothing, reduction);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_softmax, Autograd, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_autograd);
}

}  // namespace fused_softmax
