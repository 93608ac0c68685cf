// Autograd for the forward ops, registered for the Autograd dispatch key in C++
// (as torchvision does for its ops): the backward runs in the autograd engine
// without a trip through Python, which is most of the cost of a small loss.
#include "cross_entropy.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace fused_softmax {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of the op `name` with signature Fn (each caller looks it up once, in a static).
template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The ops through the dispatcher, the options unpacked into their schema's arguments.
// predictions: the forward ops' optional output of each row's argmax (csrc/register.cpp).
using Predictions = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> call_fwd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, const LossOptions& o,
    const Predictions& predictions) {
  static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, int64_t, double, double,
      double, const Predictions&)>("fused_softmax::cross_entropy_fwd");
  return op.call(
      input, target, weight, o.ignore_index, o.label_smoothing, o.reduction, o.logit_scale, o.softcap, o.z_loss,
      predictions);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd_grad(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, const LossOptions& o,
    const Predictions& predictions) {
  static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, int64_t, double, double,
      double, const Predictions&)>("fused_softmax::cross_entropy_fwd_grad");
  return op.call(
      input, target, weight, o.ignore_index, o.label_smoothing, o.reduction, o.logit_scale, o.softcap, o.z_loss,
      predictions);
}

std::tuple<at::Tensor, at::Tensor> call_fwd_inplace(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, const LossOptions& o,
    const Predictions& predictions) {
  static const auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
      at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, int64_t, double, double,
      double, const Predictions&)>("fused_softmax::cross_entropy_fwd_inplace");
  return op.call(
      input, target, weight, o.ignore_index, o.label_smoothing, o.reduction, o.logit_scale, o.softcap, o.z_loss,
      predictions);
}

at::Tensor call_bwd(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, const LossOptions& o) {
  static const auto op = typed_op<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      int64_t, double, int64_t, double, double, double, int64_t, int64_t)>("fused_softmax::cross_entropy_bwd");
  return op.call(
      grad_loss, input, target, weight, stats, o.ignore_index, o.label_smoothing, o.reduction, o.logit_scale, o.softcap,
      o.z_loss, /*class_start=*/0, /*num_classes=*/0);
}

// The options, kept in ctx->saved_data (which holds IValues), and back.
void save_options(AutogradContext* ctx, const LossOptions& o) {
  ctx->saved_data["ignore_index"] = o.ignore_index;
  ctx->saved_data["label_smoothing"] = o.label_smoothing;
  ctx->saved_data["reduction"] = o.reduction;
  ctx->saved_data["logit_scale"] = o.logit_scale;
  ctx->saved_data["softcap"] = o.softcap;
  ctx->saved_data["z_loss"] = o.z_loss;
}

LossOptions saved_options(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  return {d["ignore_index"].toInt(),   d["label_smoothing"].toDouble(), d["reduction"].toInt(),
          d["logit_scale"].toDouble(), d["softcap"].toDouble(),         d["z_loss"].toDouble()};
}

// Whether t is being traced (torch.compile's fake tensors, or a Python dispatch mode is active): then
// no value can be read and the graph must stay functional.
bool traced(const at::Tensor& t) {
  return t.key_set().has(c10::DispatchKey::Python) || c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python);
}

// Whether grad_loss is known to be all ones: read where that costs no device sync and it holds real values.
bool all_ones(const at::Tensor& grad_loss) {
  if (traced(grad_loss) || !grad_loss.device().is_cpu()) return false;
  if (grad_loss.numel() == 1) return grad_loss.item<double>() == 1.0;  // a reduced loss's: no tensor ops
  return grad_loss.eq(1).all().item<bool>();
}

// A (rows, classes) gradient formed for grad_loss = 1, scaled in place to grad_loss (per row for
// reduction 'none'); as it is for the usual grad_loss of 1.
at::Tensor scaled_in_place(at::Tensor grad, const at::Tensor& grad_loss, int64_t reduction) {
  if (all_ones(grad_loss)) return grad;
  // grad_loss as a column in its own (accumulation) dtype, so that each product rounds once.
  const int64_t N = grad.size(0);
  const at::Tensor g = reduction == kNone ? grad_loss.unsqueeze(1) : grad_loss.expand({N, 1});
  if (traced(grad) || !grad.device().is_cpu() || grad.scalar_type() == g.scalar_type()) {
    grad.mul_(g);
    return grad;
  }
  // On the CPU a mixed-dtype mul_ first converts its whole operand to float32 (twice a 16-bit
  // gradient's memory; 8.6 GB at 2^31 elements): a slice of rows at a time keeps that small.
  const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, grad.size(1)));
  for (int64_t r = 0; r < N; r += rows) {
    const int64_t n = std::min(rows, N - r);
    grad.narrow(0, r, n).mul_(g.narrow(0, r, n));
  }
  return grad;
}

// With form_grad the forward also forms the input's gradient for grad_loss = 1 (one sweep over the
// logits instead of two); the first backward scales it in place and hands it over, and a later one
// (retain_graph) recomputes it from the saved logits.
class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
      const LossOptions& options, bool form_grad, const Predictions& predictions) {
    at::AutoDispatchBelowADInplaceOrView guard;  // the kernels below see plain tensors
    at::Tensor loss, stats;
    if (form_grad) {
      at::Tensor grad;
      std::tie(loss, stats, grad) = call_fwd_grad(input, target, weight, options, predictions);
      ctx->saved_data["formed_grad"] = grad;  // not a saved variable: backward hands it over
    } else {
      std::tie(loss, stats) = call_fwd(input, target, weight, options, predictions);
    }
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), stats});
    save_options(ctx, options);
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
    const LossOptions o = saved_options(ctx);
    const at::Tensor& grad_loss = grads[0];
    variable_list out(6);  // one per forward argument; only input and target have gradients
    if (!grad_loss.defined()) return out;
    // create_graph=True: the gradients must be differentiable (a gradient penalty, gradgradcheck). The
    // backward op then goes through its own autograd (fused_softmax/_ops.py), and nothing formed for
    // grad_loss = 1 without a graph is handed over.
    const bool create_graph = at::GradMode::is_enabled();
    at::Tensor formed_grad;
    const auto formed = ctx->saved_data.find("formed_grad");
    if (formed != ctx->saved_data.end() && formed->second.isTensor()) {
      formed_grad = formed->second.toTensor();
      formed->second = c10::IValue();  // handed over (or dropped): a later backward recomputes
    }
    // The gradient formed for grad_loss = 1 serves for grad_loss = 1 (the usual case). For any other it
    // is recomputed: scaled, a 16-bit one would be rounded twice (loss scaling, a loss divided for
    // gradient accumulation), and any other would differ from a recomputed one (a second backward,
    // gradcheck's reentrancy check) in the last bit.
    if (ctx->needs_input_grad(0) && formed_grad.defined() && !create_graph && all_ones(grad_loss)) {
      out[0] = std::move(formed_grad);
    } else if (ctx->needs_input_grad(0)) {
      formed_grad.reset();  // freed first: the recomputed gradient takes its memory, the peak stays one gradient
      std::optional<at::AutoDispatchBelowADInplaceOrView> plain;  // no graph wanted: skip the op's autograd
      if (!create_graph) plain.emplace();
      out[0] = call_bwd(grad_loss, input, target, weight, stats, o);
    }
    if (ctx->needs_input_grad(1)) {
      // Probability targets: d loss_i / d t_ic = (1 - eps) * w_c * (lse_i - x_ic), lse - x = log_sum - (x - max),
      // x the logits as the softmax saw them. With create_graph the lse is recomputed from the logits, so
      // that this gradient's own gradient reaches them.
      at::Tensor x = input.to(stats.scalar_type()) * o.logit_scale;
      if (o.softcap > 0) x = at::where(at::isneginf(x), x, at::tanh(x / o.softcap) * o.softcap);
      at::Tensor lse_minus_x = create_graph ? at::logsumexp(x, 1, /*keepdim=*/true) - x
                                            : stats.select(1, 1).unsqueeze(1) - (x - stats.select(1, 0).unsqueeze(1));
      at::Tensor g = grad_loss.to(stats.scalar_type());  // per row, or one value for a reduced loss
      if (o.reduction == kNone) g = g.unsqueeze(1);
      if (o.reduction == kMean) g = g / static_cast<double>(input.size(0));  // probabilities: mean over rows
      at::Tensor scale = g * (1 - o.label_smoothing);
      if (weight) scale = scale * weight->to(stats.scalar_type());
      out[1] = (scale * lse_minus_x).to(target.scalar_type());
    }
    return out;
  }
};

// The in-place variant: the forward leaves d loss / d input (for grad_loss = 1) in input's own
// storage, and backward only scales it by grad_loss. input is marked dirty, so autograd's version
// counter catches a use of the old logits elsewhere in the graph instead of reading the gradient.
//
// `rows` (N, C), which the kernel overwrites, may be a same-size view (logits.view(-1, V), the usual
// language-model call): autograd lets a Function that marks a view dirty return nothing else, so
// `whole`, the tensor they view (or rows themselves), is the one marked dirty and returned. It is
// the first output, as it was its producer's (output 0 of the op that made the logits), so that
// autograd moves a retain_grad() hook to the same output number.
class CrossEntropyInplaceFunction : public torch::autograd::Function<CrossEntropyInplaceFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, at::Tensor whole, at::Tensor rows, const at::Tensor& target,
      const std::optional<at::Tensor>& weight, const LossOptions& options, const Predictions& predictions) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const int64_t num_rows = rows.size(0), num_classes = rows.size(1);
    auto [loss, stats] = call_fwd_inplace(rows, target, weight, options, predictions);
    ctx->mark_dirty({whole});
    ctx->save_for_backward({whole});  // now the gradient
    ctx->saved_data["reduction"] = options.reduction;
    ctx->saved_data["num_rows"] = num_rows;
    ctx->saved_data["num_classes"] = num_classes;
    ctx->saved_data["used"] = false;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {whole, loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(
        !grads[0].defined(),
        "fused_softmax: input: with inplace_backward=True the logits were overwritten by their gradient; they "
        "cannot feed another differentiable computation after the loss");
    TORCH_CHECK(
        !ctx->saved_data["used"].toBool(),
        "fused_softmax: inplace_backward=True: the stored gradient was already used by a backward; it cannot be "
        "backpropagated twice (retain_graph)");
    TORCH_CHECK(
        !at::GradMode::is_enabled(),
        "fused_softmax: inplace_backward=True: second derivatives (backward with create_graph=True) need the "
        "logits, which the forward overwrote with their gradient; use inplace_backward=False");
    ctx->saved_data["used"] = true;
    variable_list out(6);  // one per forward argument; only whole has a gradient (rows are in it)
    const at::Tensor& grad_loss = grads[1];
    if (!grad_loss.defined()) return out;
    const at::Tensor whole = ctx->get_saved_variables()[0];
    const at::Tensor rows = whole.view({ctx->saved_data["num_rows"].toInt(), ctx->saved_data["num_classes"].toInt()});
    out[0] = scaled_in_place(rows, grad_loss, ctx->saved_data["reduction"].toInt()).view(whole.sizes());
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const Predictions& predictions) {
  const LossOptions options{ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss};
  // On the CPU the gradient is formed during the forward when one will be needed. Not on CUDA, where
  // the two kernels cost the same either way and scaling by an unknown grad_loss would add a pass,
  // nor while tracing (the traced graph keeps forward and backward apart).
  const bool form_grad =
      at::GradMode::is_enabled() && input.requires_grad() && input.device().is_cpu() && !traced(input);
  auto out = CrossEntropyFunction::apply(input, target, weight, options, form_grad, predictions);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_autograd(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const Predictions& predictions) {
  TORCH_CHECK(
      !target.requires_grad(),
      "fused_softmax: target: inplace_backward=True gives no gradient for probability targets; pass "
      "target.detach()");
  const LossOptions options{ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss};
  if (!at::GradMode::is_enabled() || !input.requires_grad()) {  // no graph: a plain in-place op
    auto out = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return call_fwd_inplace(input, target, weight, options, predictions);
    }();
    input.unsafeGetTensorImpl()->bump_version();  // as an in-place op does: saved copies of input see it
    return out;
  }
  const at::Tensor whole = input.is_view() ? at::Tensor(input._base()) : input;
  // All of a contiguous tensor, itself contiguous: then the two cover the same memory.
  TORCH_CHECK(
      whole.sym_numel() == input.sym_numel() && whole.is_contiguous() && input.is_contiguous(),
      "fused_softmax: input: inplace_backward=True needs contiguous logits that are all of the tensor they view");
  TORCH_CHECK(
      !(whole.retains_grad() && whole.output_nr() != 0),
      "fused_softmax: input: inplace_backward=True cannot keep retain_grad() on logits that are output ",
      whole.output_nr(), " of the op that made them");
  auto out = CrossEntropyInplaceFunction::apply(whole, input, target, weight, options, predictions);
  return {out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_softmax, Autograd, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_autograd);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_autograd);
}

}  // namespace fused_softmax
