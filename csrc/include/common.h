// Small helpers shared by the op implementations under csrc/ops/: argument checks (clear
// messages before any kernel runs), layout handling and the device guard.
//
// csrc/include/ holds what every part of the extension shares: act.h (the activations, host
// and device), common.h (this file) and layer_op.h (the composite layer ops' dispatcher
// handles and autograd bookkeeping). They are included as "include/<name>.h" (setup.py puts
// csrc/ on the include path).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

namespace fastcnn {

// Memory format the kernels use for x: channels_last when x is laid out that way (and not
// also plain contiguous), else NCHW. The fake (meta) implementations mirror this rule.
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

inline void check_activation(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastcnn: ", name, " must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "fastcnn: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "fastcnn: ", name, " has shape ", t.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fastcnn: ", name, " has dtype ",
                   t.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "fastcnn: ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}

inline void check_vector(const at::Tensor& t, int64_t n, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == n, "fastcnn: ", name, " must have shape [", n,
                    "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), "fastcnn: ", name, " must be floating point");
  TORCH_CHECK_VALUE(t.device() == x.device(), "fastcnn: ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}

// `t` in `dtype`: `t` itself when it already is (without calling aten::to, which a schema
// check flags when it returns its input from below autograd, as inside the composite ops)
inline at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// fp32, contiguous copy of a small parameter vector (or the vector itself when it already is one)
inline at::Tensor f32(const at::Tensor& t) {
  const at::Tensor f = cast(t, at::kFloat);
  return f.is_contiguous() ? f : f.contiguous();
}

inline at::Tensor in_format(const c10::optional<at::Tensor>& t, at::MemoryFormat fmt) {
  return t.has_value() && t->defined() ? t->contiguous(fmt) : at::Tensor();
}

inline at::Tensor empty_in_format(const at::Tensor& x, at::MemoryFormat fmt) {
  return at::empty(x.sizes(), x.options().memory_format(fmt));
}

inline at::Tensor no_grad_tensor(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace fastcnn
