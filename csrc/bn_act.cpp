// The fused BatchNorm + residual + activation ops and the scale/shift + activation op (the
// eval-mode BN and conv-bias epilogue), composed from the channel_act primitives
// (csrc/cpu/channel_act_kernel.cpp, csrc/cuda/channel_act_kernel.cu); registered for CPU
// and, when built with CUDA, CUDA.
//
// Training forward: one statistics pass (shifted sums, fp64 combine) and one
// normalise+residual+act pass. Backward: one reduction pass (sum dz, sum dz*(x-mean)) and one
// elementwise pass; only x (and the residual) plus the fp32 mean/var are needed.
#include <torch/library.h>

#include "common.h"

namespace fastcnn {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> bn_act_forward(const Tensor& x_, const Tensor& weight,
                                                  const Tensor& bias,
                                                  const c10::optional<Tensor>& residual, double eps,
                                                  c10::string_view act, double act_param) {
  check_activation(x_, "x");
  const int64_t C = x_.size(1);
  check_vector(weight, C, x_, "weight");
  check_vector(bias, C, x_, "bias");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  TORCH_CHECK_VALUE(x_.numel() / C > 1, "fastcnn: bn_act_forward needs more than one value per channel, got x of shape ",
                    x_.sizes());
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  auto [mean, var] = FASTCNN_ON_DEVICE(x, slot_mean_var, x, g);
  const Tensor scale = f32(weight) * at::rsqrt(var + eps);
  const Tensor shift = f32(bias) - mean * scale;
  Tensor y = empty_in_format(x, fmt);
  FASTCNN_ON_DEVICE(x, act_forward, x, r, y, scale, shift, g, a, static_cast<float>(act_param));
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& gy_, const Tensor& x_, const Tensor& weight, const Tensor& bias,
    const c10::optional<Tensor>& residual, const Tensor& mean_, const Tensor& var_, double eps,
    c10::string_view act, double act_param) {
  check_activation(x_, "x");
  check_like(gy_, x_, "grad_y");
  const int64_t C = x_.size(1);
  check_vector(weight, C, x_, "weight");
  check_vector(bias, C, x_, "bias");
  check_vector(mean_, C, x_, "mean");
  check_vector(var_, C, x_, "var");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), gy = gy_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  const Tensor mean = f32(mean_), invstd = at::rsqrt(f32(var_) + eps);
  const Tensor scale = f32(weight) * invstd;
  const Tensor shift = f32(bias) - mean * scale;
  const Tensor sums = FASTCNN_ON_DEVICE(x, act_backward_reduce, gy, x, r, scale, shift, mean, g, a,
                                        static_cast<float>(act_param));
  const Tensor sum_dz = sums[0].contiguous(), sum_dzx = sums[1].contiguous();
  const double inv_m = 1.0 / static_cast<double>(g.per_slot());
  const Tensor alpha = (-inv_m) * scale * invstd * invstd * sum_dzx;
  const Tensor beta = (-inv_m) * scale * sum_dz;
  Tensor gx = empty_in_format(x, fmt);
  Tensor gr = r.defined() ? empty_in_format(x, fmt) : Tensor();
  FASTCNN_ON_DEVICE(x, act_backward_apply, gy, x, r, scale, shift, mean, alpha, beta, gx, gr, g, a,
                    static_cast<float>(act_param));
  return {gx, gr.defined() ? gr : no_grad_tensor(x), (sum_dzx * invstd).to(weight.scalar_type()),
          sum_dz.to(bias.scalar_type(), false, /*copy=*/true)};
}

// scale / shift default to 1 / 0 when absent
std::pair<Tensor, Tensor> scale_shift(const Tensor& x, const c10::optional<Tensor>& scale,
                                      const c10::optional<Tensor>& shift) {
  const int64_t C = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  if (scale.has_value()) check_vector(*scale, C, x, "scale");
  if (shift.has_value()) check_vector(*shift, C, x, "shift");
  return {scale.has_value() ? f32(*scale) : at::ones({C}, fopts),
          shift.has_value() ? f32(*shift) : at::zeros({C}, fopts)};
}

Tensor scale_shift_act(const Tensor& x_, const c10::optional<Tensor>& scale_,
                       const c10::optional<Tensor>& shift_, const c10::optional<Tensor>& residual,
                       c10::string_view act, double act_param) {
  check_activation(x_, "x");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  auto [scale, shift] = scale_shift(x_, scale_, shift_);
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  Tensor y = empty_in_format(x, fmt);
  FASTCNN_ON_DEVICE(x, act_forward, x, r, y, scale, shift, channel_geom(x, fmt), a,
                    static_cast<float>(act_param));
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scale_shift_act_backward(
    const Tensor& gy_, const Tensor& x_, const c10::optional<Tensor>& scale_,
    const c10::optional<Tensor>& shift_, const c10::optional<Tensor>& residual,
    c10::string_view act, double act_param) {
  check_activation(x_, "x");
  check_like(gy_, x_, "grad_y");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  auto [scale, shift] = scale_shift(x_, scale_, shift_);
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), gy = gy_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  const Tensor zeros = at::zeros_like(scale);
  Tensor gscale = no_grad_tensor(x), gshift = no_grad_tensor(x);
  if (scale_.has_value() || shift_.has_value()) {
    const Tensor sums = FASTCNN_ON_DEVICE(x, act_backward_reduce, gy, x, r, scale, shift, zeros, g,
                                          a, static_cast<float>(act_param));
    if (scale_.has_value()) gscale = sums[1].to(scale_->scalar_type(), false, /*copy=*/true);
    if (shift_.has_value()) gshift = sums[0].to(shift_->scalar_type(), false, /*copy=*/true);
  }
  Tensor gx = empty_in_format(x, fmt);
  Tensor gr = r.defined() ? empty_in_format(x, fmt) : Tensor();
  FASTCNN_ON_DEVICE(x, act_backward_apply, gy, x, r, scale, shift, zeros, zeros, zeros, gx, gr, g,
                    a, static_cast<float>(act_param));
  return {gx, gr.defined() ? gr : no_grad_tensor(x), gscale, gshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("bn_act_backward", &bn_act_backward);
  m.impl("scale_shift_act", &scale_shift_act);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("bn_act_backward", &bn_act_backward);
  m.impl("scale_shift_act", &scale_shift_act);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward);
}
#endif

}  // namespace fastcnn
