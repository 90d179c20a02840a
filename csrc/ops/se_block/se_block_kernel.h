// The se_block family's primitive ops, written once for both devices: templates over the
// device D whose channel_act kernels they call (ChannelAct<D>, csrc/channel_act/channel_act.h),
// instantiated and registered by csrc/ops/se_block/cpu/se_block_cpu.cpp (CPU) and
// csrc/ops/se_block/cuda/se_block_cuda.cpp (CUDA builds).
//
// The fused squeeze-and-excitation block tail, act(x * gate + residual) with
// gate = sigmoid(fc2(relu(fc1(mean_hw(x))))): squeeze = one per-(n, c) reduction pass,
// excitation = two tiny fp32 GEMMs on [N, C] (ATen), scale + residual + act = one elementwise
// pass. Backward: one reduction pass (sum_hw dz * x, the gate gradient), the tiny GEMMs, one
// elementwise pass.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include <string>
#include <tuple>

#include "channel_act/channel_act.h"
#include "include/common.h"
#include "include/layer_op.h"

namespace fastcnn {

inline void check_fc(const Tensor& x, const Tensor& w1, const c10::optional<Tensor>& b1, const Tensor& w2,
                     const c10::optional<Tensor>& b2) {
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == C, "fastcnn: fc1_weight must have shape [hidden, ", C,
                    "], got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == hidden,
                    "fastcnn: fc2_weight must have shape [", C, ", ", hidden, "], got ", w2.sizes());
  if (b1.has_value()) check_vector(*b1, hidden, x, "fc1_bias");
  if (b2.has_value()) check_vector(*b2, C, x, "fc2_bias");
}

inline Tensor opt_f32(const c10::optional<Tensor>& t) { return t.has_value() ? f32(*t) : Tensor(); }

// excitation in fp32: (pre-ReLU fc1 output, hidden, gate), all [N, *]
inline std::tuple<Tensor, Tensor, Tensor> excite(const Tensor& pooled, const Tensor& w1, const Tensor& b1,
                                                 const Tensor& w2, const Tensor& b2) {
  const Tensor a1 = at::linear(pooled, w1, b1);
  const Tensor h = at::relu(a1);
  return {a1, h, at::sigmoid(at::linear(h, w2, b2))};
}

template <c10::DeviceType D>
std::tuple<Tensor, Tensor> se_block_forward(const Tensor& x_, const Tensor& fc1_weight,
                                            const c10::optional<Tensor>& fc1_bias,
                                            const Tensor& fc2_weight,
                                            const c10::optional<Tensor>& fc2_bias,
                                            const c10::optional<Tensor>& residual,
                                            c10::string_view act, double act_param) {
  check_activation(x_, "x");
  check_fc(x_, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  if (residual.has_value()) check_like(*residual, x_, "residual");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  const int64_t N = x.size(0), C = x.size(1);
  const Geom g = plane_geom(x, fmt);
  const Tensor pooled = std::get<0>(ChannelAct<D>::slot_mean_var(x, g)).view({N, C});
  const Tensor gate = std::get<2>(excite(pooled, f32(fc1_weight), opt_f32(fc1_bias), f32(fc2_weight),
                                         opt_f32(fc2_bias)));
  Tensor y = empty_in_format(x, fmt);
  ChannelAct<D>::act_forward(x, r, y, gate.reshape({-1}).contiguous(), at::zeros({N * C}, gate.options()), g, a,
                             static_cast<float>(act_param));
  return {y, pooled};
}

template <c10::DeviceType D>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> se_block_backward(
    const Tensor& gy_, const Tensor& x_, const Tensor& pooled_, const Tensor& fc1_weight,
    const c10::optional<Tensor>& fc1_bias, const Tensor& fc2_weight,
    const c10::optional<Tensor>& fc2_bias, const c10::optional<Tensor>& residual,
    c10::string_view act, double act_param) {
  check_activation(x_, "x");
  check_like(gy_, x_, "grad_y");
  check_fc(x_, fc1_weight, fc1_bias, fc2_weight, fc2_bias);
  if (residual.has_value()) check_like(*residual, x_, "residual");
  const int64_t N = x_.size(0), C = x_.size(1), HW = x_.size(2) * x_.size(3);
  TORCH_CHECK_VALUE(pooled_.dim() == 2 && pooled_.size(0) == N && pooled_.size(1) == C,
                    "fastcnn: pooled must have shape [", N, ", ", C, "], got ", pooled_.sizes());
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), gy = gy_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = plane_geom(x, fmt);
  const Tensor pooled = f32(pooled_), w1 = f32(fc1_weight), w2 = f32(fc2_weight);
  auto [a1, h, gate] = excite(pooled, w1, opt_f32(fc1_bias), w2, opt_f32(fc2_bias));
  const Tensor gate_flat = gate.reshape({-1}).contiguous();
  const Tensor zeros = at::zeros({N * C}, gate.options());
  Tensor gx = empty_in_format(x, fmt);
  Tensor gr = r.defined() ? empty_in_format(x, fmt) : Tensor();
  Tensor da1, da2;
  act_backward<D>(gy, x, r, gate_flat, zeros, zeros, gx, gr, g, a, static_cast<float>(act_param),
                  [&](const Tensor& sums) {
                    const Tensor dgate = sums[1].view({N, C});
                    da2 = dgate * gate * (1 - gate);
                    const Tensor dh = at::mm(da2, w2);
                    da1 = dh * (a1 > 0).to(at::kFloat);
                    const Tensor dpooled = at::mm(da1, w1);
                    const Tensor beta = (dpooled * (1.0 / static_cast<double>(HW))).reshape({-1}).contiguous();
                    return std::make_pair(zeros, beta);
                  });
  const auto b1_type = fc1_bias.has_value() ? fc1_bias->scalar_type() : fc1_weight.scalar_type();
  const auto b2_type = fc2_bias.has_value() ? fc2_bias->scalar_type() : fc2_weight.scalar_type();
  return {gx,
          gr.defined() ? gr : no_grad_tensor(x),
          at::mm(da1.t(), pooled).to(fc1_weight.scalar_type()),
          da1.sum(0).to(b1_type),
          at::mm(da2.t(), h).to(fc2_weight.scalar_type()),
          da2.sum(0).to(b2_type)};
}

}  // namespace fastcnn
