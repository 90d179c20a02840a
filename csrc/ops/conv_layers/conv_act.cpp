// The conv_layers op family (csrc/ops/conv_layers/): the fused convolution layers as composite
// ops, conv_bn_act.cpp and conv_act.cpp, each with its schema, a CompositeExplicitAutograd
// kernel (device-generic) and an Autograd kernel (its C++ autograd). No cpu/ or cuda/ part:
// their device code is ATen's convolution and the bn_act family's ops, reached through the
// dispatcher, which picks each device's kernels.
//
// The fused layer without BN as one op: act(conv(x) + bias (+ residual)), the convolution
// through ATen (cuDNN / oneDNN), bias + residual + activation through the channel_act epilogue
// (scale_shift_act, in fp32) with its autograd node written here in C++: one dispatcher call forward, no
// Python in between. What the epilogue keeps, by activation:
//   * identity: y = conv(x) + bias (+ residual) with ATen's own add; keeps x and the weight only
//   * relu, leaky_relu (slope >= 0), elu (alpha > 0): act'(v) follows from y = act(v), so it
//     keeps y -- which the next layer keeps anyway -- rather than the pre-activation: one
//     activation per layer, as unfused PyTorch
//   * silu, gelu: keeps the pre-activation z = conv(x) (returned as the second output, so that consumers
//     of y may rebuild y from it: fastcnn.recompute); the second output is empty otherwise
#include <torch/library.h>

#include <string>

#include "include/act.h"
#include "include/common.h"
#include "include/layer_op.h"

namespace fastcnn {
namespace {

using IntList = c10::IntArrayRef;

enum class Keep { kNothing, kOutput, kPreActivation };

Keep what_to_keep(const Act a, double act_param) {
  if (a == kIdentity) return Keep::kNothing;
  if (a == kRelu || (a == kLeakyRelu && act_param >= 0.0) || (a == kElu && act_param > 0.0)) return Keep::kOutput;
  return Keep::kPreActivation;
}

struct ConvActOut {
  Tensor y, z;  // z: the pre-activation when it is kept, else undefined
};

ConvActOut conv_act_compute(const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& residual,
                            IntList stride, IntList padding, IntList dilation, int64_t groups, Keep keep,
                            c10::string_view act, double act_param) {
  if (keep == Keep::kNothing) {
    Tensor z = at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
    if (residual.has_value()) {
      check_like(*residual, z, "residual");
      return {z + *residual, Tensor()};
    }
    return {z, Tensor()};
  }
  const Tensor z = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
  const Tensor y = op_scale_shift_act().call(z, std::nullopt, bias, residual, act, act_param);
  return {y, keep == Keep::kPreActivation ? z : Tensor()};
}

std::tuple<Tensor, Tensor> outputs(const Tensor& x, ConvActOut o) {
  return {o.y, o.z.defined() ? o.z : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor> conv_act_layer(const Tensor& x, const Tensor& weight, const OptT& bias,
                                          const OptT& residual, IntList stride, IntList padding, IntList dilation,
                                          int64_t groups, c10::string_view act, double act_param) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Keep keep = what_to_keep(parse_act(std::string(act)), act_param);
  return outputs(x, conv_act_compute(x, weight, bias, residual, stride, padding, dilation, groups, keep, act,
                                     act_param));
}

// dL/dv from dL/dy and y = act(v): the formulas PyTorch's own ReLU / LeakyReLU / ELU backward use
Tensor act_backward_from_output(const Tensor& gy, const Tensor& y, Act a, double act_param) {
  if (a == kRelu) return at::threshold_backward(gy, y, 0);
  if (a == kLeakyRelu) return at::leaky_relu_backward(gy, y, act_param, true);
  return at::elu_backward(gy, act_param, 1, 1, true, y);
}

// The epilogue's autograd node: y = act(z + bias (+ residual)), the bias and residual added in
// fp32. It keeps y for an activation whose derivative follows from its output, else z (and the
// bias and residual act' needs).
struct EpilogueFunction : public torch::autograd::Function<EpilogueFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const OptT& bias, const OptT& residual,
                        int64_t keep, c10::string_view act, double act_param) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor y = op_scale_shift_act().call(z, std::nullopt, bias, residual, act, act_param);
    if (static_cast<Keep>(keep) == Keep::kOutput)
      ctx->save_for_backward({y});
    else
      ctx->save_for_backward({z, or_undefined(bias), or_undefined(residual)});
    Edges e;
    e.add(z);
    e.add(bias);
    e.add(residual);
    auto& d = ctx->saved_data;
    d["edges"] = c10::IValue(e.index);
    d["keep"] = keep;
    d["act"] = static_cast<int64_t>(parse_act(std::string(act)));
    d["act_param"] = act_param;
    return y;
  }

  // grads by reference: the incoming gradient is let go of as soon as dz exists, before the bias
  // gradient is reduced (the node's peak then stays at the unfused ReLU backward's)
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    variable_list out(6);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto a = static_cast<Act>(d["act"].toInt());
    const double act_param = d["act_param"].toDouble();
    const std::vector<int64_t> edges = d["edges"].toIntVector();
    Tensor gz, gbias;
    if (static_cast<Keep>(d["keep"].toInt()) == Keep::kOutput) {
      gz = act_backward_from_output(grads[0], saved[0], a, act_param);
      grads[0].reset();
      if (needs_grad(ctx, edges, 1)) gbias = gz.sum({0, 2, 3});
    } else {
      auto [g, gr, gs, gt] = op_scale_shift_act_backward().call(grads[0], saved[0], std::nullopt, opt(saved[1]),
                                                                opt(saved[2]), act_name(a), act_param);
      gz = g;
      gbias = gt;
    }
    out[0] = gz;
    if (needs_grad(ctx, edges, 1)) out[1] = gbias;  // autograd casts it to the bias's dtype
    if (needs_grad(ctx, edges, 2)) out[2] = gz;
    return out;
  }
};

// The Autograd-key kernel: ATen's convolution node, then the epilogue's node (two nodes, so
// that the convolution's backward runs after the epilogue's node has let go of the incoming
// gradient and what it kept -- the peak of the unfused layers; see
// csrc/ops/conv_layers/conv_bn_act.cpp).
std::tuple<Tensor, Tensor> conv_act_autograd(const Tensor& x, const Tensor& weight, const OptT& bias,
                                             const OptT& residual, IntList stride, IntList padding,
                                             IntList dilation, int64_t groups, c10::string_view act,
                                             double act_param) {
  const Keep keep = what_to_keep(parse_act(std::string(act)), act_param);
  if (keep == Keep::kNothing)  // identity: ATen's own convolution (with its bias) and add, recorded by ATen
    return outputs(x, conv_act_compute(x, weight, bias, residual, stride, padding, dilation, groups, keep, act,
                                       act_param));
  const Tensor b = or_undefined(bias), r = or_undefined(residual);
  if (!any_requires_grad({&x, &weight, &b, &r}))
    return conv_act_layer(x, weight, bias, residual, stride, padding, dilation, groups, act, act_param);
  const Tensor z = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
  const Tensor y = EpilogueFunction::apply(z, bias, residual, static_cast<int64_t>(keep), act, act_param);
  return outputs(x, {y, keep == Keep::kPreActivation ? z : Tensor()});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // act(conv(x) + bias (+ residual)); returns (y, the pre-activation when the op keeps it for
  // backward -- silu, gelu -- else an empty tensor)
  m.def("conv_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, str act, float act_param) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastcnn, CompositeExplicitAutograd, m) { m.impl("conv_act", &conv_act_layer); }
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) { m.impl("conv_act", &conv_act_autograd); }

}  // namespace fastcnn
