// The CPU ops: each checks its options and runs the kernels of the instruction-set level in use,
// chosen once, when the library loads, from the levels this build holds (kernels.h). Compiled for
// the baseline CPU, as is everything outside kernels.cpp: nothing here may need more than it.
#include "kernels.h"

#include <torch/library.h>

#include <cstdlib>

namespace fused_softmax::cpu {
namespace {

struct Level {
  const char* name;
  const Kernels* kernels;
  bool (*supported)();  // whether this CPU runs it
};

#if defined(__x86_64__) || defined(_M_X64)
// The levels' needs, as the compiler flags that build them (setup.py) assume; the CPU and the
// operating system both (__builtin_cpu_supports checks that the OS saves the vector registers).
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512_bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#endif

// Lowest first.
const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
      {"default", &DEFAULT::kKernels, [] { return true; }},
#ifdef FUSED_SOFTMAX_CPU_LEVEL_AVX2
      {"avx2", &AVX2::kKernels, &has_avx2},
#endif
#ifdef FUSED_SOFTMAX_CPU_LEVEL_AVX512
      {"avx512", &AVX512::kKernels, &has_avx512},
#endif
#ifdef FUSED_SOFTMAX_CPU_LEVEL_AVX512_BF16
      {"avx512_bf16", &AVX512_BF16::kKernels, &has_avx512_bf16},
#endif
  };
  return all;
}

const Level* find_level(const std::string& name) {
  for (const Level& level : levels()) {
    if (name == level.name) return &level;
  }
  return nullptr;
}

std::string level_names() {
  std::string names;
  for (const Level& level : levels()) names += (names.empty() ? "" : ", ") + std::string(level.name);
  return names;
}

// The best level this CPU runs, or the one FUSED_SOFTMAX_CPU_CAPABILITY names (a lower one: like
// ATEN_CPU_CAPABILITY, it cannot raise the level past what the CPU runs).
const Level* choose_level() {
  const Level* best = &levels().front();
  for (const Level& level : levels()) {
    if (level.supported()) best = &level;
  }
  const char* wanted = std::getenv("FUSED_SOFTMAX_CPU_CAPABILITY");
  if (wanted == nullptr || *wanted == '\0') return best;
  const Level* asked = find_level(wanted);
  TORCH_CHECK(
      asked != nullptr, "fused_softmax: FUSED_SOFTMAX_CPU_CAPABILITY=", wanted,
      " is not a CPU level of this build (it holds: ", level_names(), ")");
  if (!asked->supported()) {
    TORCH_WARN(
        "fused_softmax: FUSED_SOFTMAX_CPU_CAPABILITY=", wanted, " is more than this CPU runs; using ", best->name);
    return best;
  }
  return asked;
}

// Chosen at the first call (the library's import asks for its name).
const Level& level_in_use() {
  static const Level* const level = choose_level();
  return *level;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const std::optional<at::Tensor>& predictions) {
  const LossOptions options =
      check_options(input, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss);
  auto [loss, stats, _] = kernels().forward(input, target, weight, predictions, options, GradTo::kNowhere);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cpu(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const std::optional<at::Tensor>& predictions) {
  const LossOptions options =
      check_options(input, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss);
  auto [loss, stats, _] = kernels().forward(input, target, weight, predictions, options, GradTo::kInput);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, double logit_scale, double softcap, double z_loss,
    const std::optional<at::Tensor>& predictions) {
  const LossOptions options =
      check_options(input, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss);
  return kernels().forward(input, target, weight, predictions, options, GradTo::kNew);
}

at::Tensor cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
    int64_t reduction, double logit_scale, double softcap, double z_loss, int64_t class_start, int64_t num_classes) {
  const LossOptions options =
      check_options(input, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss);
  return kernels().backward(grad_loss, input, target, weight, stats, options, class_start, num_classes);
}

}  // namespace

const Kernels& kernels() {
  return *level_in_use().kernels;
}

std::string capability() {
  return level_in_use().name;
}

std::vector<std::pair<std::string, bool>> capabilities() {
  std::vector<std::pair<std::string, bool>> all;
  for (const Level& level : levels()) all.emplace_back(level.name, level.supported());
  return all;
}

TORCH_LIBRARY_IMPL(fused_softmax, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_cpu);
  m.impl("cross_entropy_fwd_grad", &cross_entropy_fwd_grad_cpu);
}

}  // namespace fused_softmax::cpu
