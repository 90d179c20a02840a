// Run-time choice between the CPU capability builds of the channel_act kernels
// (csrc/channel_act/cpu/channel_act_cpu.h): cpu::slot_mean_var etc., as declared in
// csrc/channel_act/channel_act.h, forward to the DEFAULT or AVX2 copy.
#include <ATen/Version.h>

#include <algorithm>
#include <atomic>
#include <cctype>

#include "channel_act/cpu/channel_act_cpu.h"

namespace fastcnn {
namespace cpu {
namespace {

bool avx2_usable() {
#if defined(FASTCNN_CPU_AVX2)
  // PyTorch's own choice (cpuinfo, and ATEN_CPU_CAPABILITY=default turns it off); AVX2 kernels
  // also need FMA and F16C, which every AVX2 CPU has, but check rather than assume
  static const bool ok = [] {
    const std::string torch_cap = at::get_cpu_capability();
    const bool torch_avx2 = torch_cap.find("AVX2") != std::string::npos ||
                            torch_cap.find("AVX512") != std::string::npos;
    return torch_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

std::atomic<int>& chosen() {
  static std::atomic<int> c{static_cast<int>(avx2_usable() ? Capability::kAvx2 : Capability::kDefault)};
  return c;
}

}  // namespace

Capability capability() { return static_cast<Capability>(chosen().load(std::memory_order_relaxed)); }

const char* capability_name(Capability c) { return c == Capability::kAvx2 ? "avx2" : "default"; }

std::vector<std::string> available_capabilities() {
  std::vector<std::string> caps{"default"};
  if (avx2_usable()) caps.emplace_back("avx2");
  return caps;
}

void set_capability(const std::string& name_) {
  std::string name = name_;
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
  Capability c;
  if (name == "auto") {
    c = avx2_usable() ? Capability::kAvx2 : Capability::kDefault;
  } else if (name == "default") {
    c = Capability::kDefault;
  } else if (name == "avx2") {
    TORCH_CHECK_VALUE(avx2_usable(), "fastcnn: CPU capability 'avx2' is not available (",
#if defined(FASTCNN_CPU_AVX2)
                      "this CPU lacks AVX2/FMA/F16C or ATEN_CPU_CAPABILITY turned it off",
#else
                      "the extension was built without its AVX2 kernels",
#endif
                      "); available: default");
    c = Capability::kAvx2;
  } else {
    TORCH_CHECK_VALUE(false, "fastcnn: unknown CPU capability '", name_, "'; choose auto, default or avx2");
  }
  chosen().store(static_cast<int>(c), std::memory_order_relaxed);
}

#if defined(FASTCNN_CPU_AVX2)
#define FASTCNN_CPU_CALL(fn, ...) \
  (capability() == Capability::kAvx2 ? AVX2::fn(__VA_ARGS__) : DEFAULT::fn(__VA_ARGS__))
#else
#define FASTCNN_CPU_CALL(fn, ...) (DEFAULT::fn(__VA_ARGS__))
#endif

std::tuple<at::Tensor, at::Tensor> slot_mean_var(const at::Tensor& x, Geom g) {
  return FASTCNN_CPU_CALL(slot_mean_var, x, g);
}

void act_forward(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& shift, Geom g, Act act, float act_param) {
  FASTCNN_CPU_CALL(act_forward, x, r, y, scale, shift, g, act, act_param);
}

at::Tensor act_backward_reduce(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& center, Geom g, Act act, float act_param) {
  return FASTCNN_CPU_CALL(act_backward_reduce, gy, x, r, scale, shift, center, g, act, act_param);
}

void act_backward_apply(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                        const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& center,
                        const at::Tensor& alpha, const at::Tensor& beta, at::Tensor& gx,
                        at::Tensor& gr, Geom g, Act act, float act_param) {
  FASTCNN_CPU_CALL(act_backward_apply, gy, x, r, scale, shift, center, alpha, beta, gx, gr, g, act,
                   act_param);
}

at::Tensor act_backward_reduce_dz(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                                  const at::Tensor& scale, const at::Tensor& shift,
                                  const at::Tensor& center, at::Tensor& dz, Geom g, Act act,
                                  float act_param) {
  return FASTCNN_CPU_CALL(act_backward_reduce_dz, gy, x, r, scale, shift, center, dz, g, act, act_param);
}

void dz_backward_apply(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& scale,
                       const at::Tensor& center, const at::Tensor& alpha, const at::Tensor& beta,
                       at::Tensor& gx, Geom g) {
  FASTCNN_CPU_CALL(dz_backward_apply, dz, x, scale, center, alpha, beta, gx, g);
}

}  // namespace cpu
}  // namespace fastcnn
