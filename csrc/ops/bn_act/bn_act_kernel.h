// The bn_act family's primitive ops, written once for both devices: templates over the device
// D whose channel_act kernels they call (ChannelAct<D>, csrc/channel_act/channel_act.h),
// instantiated and registered by csrc/ops/bn_act/cpu/bn_act_cpu.cpp (CPU) and
// csrc/ops/bn_act/cuda/bn_act_cuda.cpp (CUDA builds). Also the BN coefficient helpers
// (bn_coef, bn_grad) that the `bn_act` composite (csrc/ops/bn_act/bn_act.cpp) shares with them,
// so that its eval-mode folding computes the very same fp32 coefficients.
//
// The fused BatchNorm + residual + activation ops and the scale/shift + activation op (the
// eval-mode BN and conv-bias epilogue). Training forward: one statistics pass (shifted sums,
// fp64 combine) and one normalise+residual+act pass. Backward: one reduction pass (sum dz,
// sum dz*(x-mean)) and one elementwise pass; only x (and the residual) plus the fp32 mean/var
// are needed. Passes over memory on the CPU, counting each tensor read or written: forward 3
// (4 with a residual), backward 5 (7 with a residual: the reduction also writes dz, the
// residual's gradient, and the elementwise pass reads it back instead of recomputing it from
// grad_y, x and the residual; act_backward in csrc/channel_act/channel_act.h).
//
// On CUDA (ChannelAct<D>::kFusedBn) the per-channel steps between the passes run in the
// kernels (csrc/channel_act/cuda/channel_act_kernel.cu): no ATen ops, clones or casts. Kernel
// launches per op there (up to 2048 channels; above, one more for a forward or backward -- a
// finalize kernel of its own -- and for the rebuild -- a coefficient kernel):
//   bn_act_forward   2  statistics, whose last block to finish also computes mean, var and
//                    scale/shift (the finalize); apply
//   bn_act layer, training  2  the same, the finalize also updating the running statistics
//                    (bn_train_forward, called directly for real tensors: csrc/ops/bn_act/bn_act.cpp)
//   bn_act_backward  2  dz sums, whose last block computes alpha, beta, grad_weight, grad_bias;
//                    apply
//   bn_act_apply     1  (a rebuilt activation, and the bn_act layer in eval) the apply kernel
//                    computes the coefficients from the statistics itself
// -- 4 for a training layer's forward + backward, as eager BatchNorm2d + ReLU's 4 (cuDNN) and
// under its 7-8 (ATen's BN), by reading the code (tests/test_cuda_bn_act_launches.py counts
// them on a GPU). While a CUDA graph is captured, each reduction adds a memset node (its own
// ticket counter). On the CPU: bn_coef / bn_grad's loops between the channel_act kernels, as before
// (results pinned by the CPU tests).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include <cmath>
#include <string>
#include <tuple>
#include <utility>

#include "channel_act/channel_act.h"
#include "include/common.h"
#include "include/layer_op.h"

namespace fastcnn {

// Per-channel fp32 vectors of BN: scale = weight / sqrt(var + eps), shift = bias - mean * scale
// (and invstd = 1 / sqrt(var + eps)). On CPU one loop computes them: the chain of tiny ATen ops
// it replaces cost more than the kernels themselves at the zoo's small shapes.
struct BnCoef {
  Tensor scale, shift, invstd;
};

inline BnCoef bn_coef(const Tensor& weight, const Tensor& bias, const Tensor& mean_, const Tensor& var_,
                      double eps) {
  const Tensor mean = f32(mean_), var = f32(var_);
  if (!plain_cpu(mean) || !plain_cpu(var) || !plain_cpu(weight) || !plain_cpu(bias)) {
    const Tensor invstd = at::rsqrt(var + eps);
    const Tensor scale = f32(weight) * invstd;
    return {scale, f32(bias) - mean * scale, invstd};
  }
  const Tensor w = f32(weight), b = f32(bias);
  const int64_t C = mean.numel();
  BnCoef k{at::empty({C}, mean.options()), at::empty({C}, mean.options()), at::empty({C}, mean.options())};
  const float *wp = w.const_data_ptr<float>(), *bp = b.const_data_ptr<float>(),
              *mp = mean.const_data_ptr<float>(), *vp = var.const_data_ptr<float>();
  float *sp = k.scale.data_ptr<float>(), *tp = k.shift.data_ptr<float>(), *ip = k.invstd.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  for (int64_t c = 0; c < C; ++c) {
    ip[c] = 1.f / std::sqrt(vp[c] + feps);
    sp[c] = wp[c] * ip[c];
    tp[c] = bp[c] - mp[c] * sp[c];
  }
  return k;
}

// From the backward sums [2, C] (sum dz, sum dz * (x - mean)) over m values per channel:
// grad_x = scale * dz + alpha * (x - mean) + beta, and the fp32 parameter gradients.
struct BnGrad {
  Tensor alpha, beta, grad_weight, grad_bias;
};

inline BnGrad bn_grad(const BnCoef& k, const Tensor& sums, int64_t m) {
  const double inv_m = 1.0 / static_cast<double>(m);
  if (!plain_cpu(sums)) {
    const Tensor sum_dz = sums[0].contiguous(), sum_dzx = sums[1].contiguous();
    return {(-inv_m) * k.scale * k.invstd * k.invstd * sum_dzx, (-inv_m) * k.scale * sum_dz,
            sum_dzx * k.invstd, sum_dz.clone()};
  }
  const int64_t C = k.scale.numel();
  const auto opts = k.scale.options();
  BnGrad d{at::empty({C}, opts), at::empty({C}, opts), at::empty({C}, opts), at::empty({C}, opts)};
  const float *sp = k.scale.const_data_ptr<float>(), *ip = k.invstd.const_data_ptr<float>(),
              *dz = sums.const_data_ptr<float>(), *dzx = dz + C;
  float *ap = d.alpha.data_ptr<float>(), *bp = d.beta.data_ptr<float>(), *gw = d.grad_weight.data_ptr<float>(),
        *gb = d.grad_bias.data_ptr<float>();
  const float neg_inv_m = static_cast<float>(-inv_m);
  for (int64_t c = 0; c < C; ++c) {
    ap[c] = neg_inv_m * sp[c] * ip[c] * ip[c] * dzx[c];
    bp[c] = neg_inv_m * sp[c] * dz[c];
    gw[c] = dzx[c] * ip[c];
    gb[c] = dz[c];
  }
  return d;
}

// The training forward: (y, batch mean, biased batch var); with running statistics (the
// bn_act layer) their update in place as well -- in the statistics kernel's finalize on CUDA,
// update_running_stats on the CPU.
template <c10::DeviceType D>
std::tuple<Tensor, Tensor, Tensor> bn_train_forward(const Tensor& x_, const Tensor& weight, const Tensor& bias,
                                                    const c10::optional<Tensor>& residual, double eps,
                                                    c10::string_view act, double act_param,
                                                    const OptT& running_mean, const OptT& running_var,
                                                    double momentum) {
  check_activation(x_, "x");
  const int64_t C = x_.size(1);
  check_vector(weight, C, x_, "weight");
  check_vector(bias, C, x_, "bias");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  if (running_mean.has_value()) check_vector(*running_mean, C, x_, "running_mean");
  if (running_var.has_value()) check_vector(*running_var, C, x_, "running_var");
  TORCH_CHECK_VALUE(C > 0 && x_.numel() / C > 1,
                    "fastcnn: bn_act_forward needs more than one value per channel, got x of shape ", x_.sizes());
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  Tensor y = empty_in_format(x, fmt);
  if constexpr (ChannelAct<D>::kFusedBn) {
    const auto fopts = x.options().dtype(at::kFloat);
    Tensor mean = at::empty({C}, fopts), var = at::empty({C}, fopts);
    const BnRunning run{or_undefined(running_mean), or_undefined(running_var), momentum};
    ChannelAct<D>::bn_forward(x, r, y, BnParams{weight, bias, eps}, mean, var, run, g, a,
                              static_cast<float>(act_param));
    if (run.mean.defined() && run.var.defined() && momentum != 0.0) {
      // written by the kernel: count the in-place update as ATen's lerp_ would
      for (const Tensor* t : {&run.mean, &run.var})
        if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
    }
    return {y, mean, var};
  } else {
    auto [mean, var] = ChannelAct<D>::slot_mean_var(x, g);
    const BnCoef k = bn_coef(weight, bias, mean, var, eps);
    ChannelAct<D>::act_forward(x, r, y, k.scale, k.shift, g, a, static_cast<float>(act_param));
    update_running_stats(running_mean, running_var, mean, var, g.per_slot(), momentum);
    return {y, mean, var};
  }
}

template <c10::DeviceType D>
std::tuple<Tensor, Tensor, Tensor> bn_act_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                  const c10::optional<Tensor>& residual, double eps,
                                                  c10::string_view act, double act_param) {
  return bn_train_forward<D>(x, weight, bias, residual, eps, act, act_param, OptT(), OptT(), 0.0);
}

// The checks bn_act_apply and bn_act_backward share: x an activation, [C] weight, bias and
// statistics, a residual like x.
inline void check_bn_stats_args(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var) {
  check_activation(x, "x");
  const int64_t C = x.size(1);
  check_vector(weight, C, x, "weight");
  check_vector(bias, C, x, "bias");
  check_vector(mean, C, x, "mean");
  check_vector(var, C, x, "var");
  if (residual.has_value()) check_like(*residual, x, "residual");
}

// y of bn_act_forward from its own statistics: the same coefficients (bn_coef on the same fp32
// mean and var) and the same elementwise kernel, so the result is identical bit for bit.
template <c10::DeviceType D>
Tensor bn_act_apply(const Tensor& x_, const Tensor& weight, const Tensor& bias,
                    const c10::optional<Tensor>& residual, const Tensor& mean_, const Tensor& var_,
                    double eps, c10::string_view act, double act_param) {
  check_bn_stats_args(x_, weight, bias, residual, mean_, var_);
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  Tensor y = empty_in_format(x, fmt);
  if constexpr (ChannelAct<D>::kFusedBn) {
    ChannelAct<D>::bn_apply(x, r, y, BnParams{weight, bias, eps}, f32(mean_), f32(var_), channel_geom(x, fmt), a,
                            static_cast<float>(act_param));
  } else {
    const BnCoef k = bn_coef(weight, bias, mean_, var_, eps);
    ChannelAct<D>::act_forward(x, r, y, k.scale, k.shift, channel_geom(x, fmt), a, static_cast<float>(act_param));
  }
  return y;
}

template <c10::DeviceType D>
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& gy_, const Tensor& x_, const Tensor& weight, const Tensor& bias,
    const c10::optional<Tensor>& residual, const Tensor& mean_, const Tensor& var_, double eps,
    c10::string_view act, double act_param) {
  check_bn_stats_args(x_, weight, bias, residual, mean_, var_);
  check_like(gy_, x_, "grad_y");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), gy = gy_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  const Tensor mean = f32(mean_);
  Tensor gx = empty_in_format(x, fmt);
  Tensor gr = r.defined() ? empty_in_format(x, fmt) : Tensor();
  if constexpr (ChannelAct<D>::kFusedBn) {
    Tensor gw = at::empty({weight.numel()}, weight.options()), gb = at::empty({bias.numel()}, bias.options());
    ChannelAct<D>::bn_backward(gy, x, r, BnParams{weight, bias, eps}, mean, f32(var_), gx, gr, gw, gb, g, a,
                               static_cast<float>(act_param));
    return {gx, gr.defined() ? gr : no_grad_tensor(x), gw, gb};
  } else {
    const BnCoef k = bn_coef(weight, bias, mean, var_, eps);
    BnGrad d;
    act_backward<D>(gy, x, r, k.scale, k.shift, mean, gx, gr, g, a, static_cast<float>(act_param),
                    [&](const Tensor& sums) {
                      d = bn_grad(k, sums, g.per_slot());
                      return std::make_pair(d.alpha, d.beta);
                    });
    return {gx, gr.defined() ? gr : no_grad_tensor(x), d.grad_weight.to(weight.scalar_type()),
            d.grad_bias.to(bias.scalar_type())};
  }
}

// scale / shift default to 1 / 0 when absent
inline std::pair<Tensor, Tensor> scale_shift(const Tensor& x, const c10::optional<Tensor>& scale,
                                             const c10::optional<Tensor>& shift) {
  const int64_t C = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  if (scale.has_value()) check_vector(*scale, C, x, "scale");
  if (shift.has_value()) check_vector(*shift, C, x, "shift");
  return {scale.has_value() ? f32(*scale) : at::ones({C}, fopts),
          shift.has_value() ? f32(*shift) : at::zeros({C}, fopts)};
}

template <c10::DeviceType D>
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
  ChannelAct<D>::act_forward(x, r, y, scale, shift, channel_geom(x, fmt), a, static_cast<float>(act_param));
  return y;
}

template <c10::DeviceType D>
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
    const Tensor sums =
        ChannelAct<D>::act_backward_reduce(gy, x, r, scale, shift, zeros, g, a, static_cast<float>(act_param));
    if (scale_.has_value()) gscale = sums[1].to(scale_->scalar_type(), false, /*copy=*/true);
    if (shift_.has_value()) gshift = sums[0].to(shift_->scalar_type(), false, /*copy=*/true);
  }
  Tensor gx = empty_in_format(x, fmt);
  Tensor gr = r.defined() ? empty_in_format(x, fmt) : Tensor();
  ChannelAct<D>::act_backward_apply(gy, x, r, scale, shift, zeros, zeros, zeros, gx, gr, g, a,
                                    static_cast<float>(act_param));
  return {gx, gr.defined() ? gr : no_grad_tensor(x), gscale, gshift};
}

}  // namespace fastcnn
