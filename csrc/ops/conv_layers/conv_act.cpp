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
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>

#include "include/act.h"
#include "include/common.h"
#include "include/layer_op.h"
#include "include/saved_hooks.h"
#include "ops/conv_layers/conv_node.h"

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
// fp32. A hand-written Node, as bn_act's BnActBackward (csrc/ops/bn_act/bn_act.cpp) and for the
// same reason: a torch::autograd::Function keeps its constants in a string-keyed map of IValues
// and records per-input metadata, host work on every training call. It keeps y for an
// activation whose derivative follows from its output, else z (and the bias and residual act'
// needs). Edges: z, bias, residual (an absent one gets an invalid edge, which the engine skips).
struct EpilogueBackward final : public torch::autograd::Node {
  // y is this node's own output; a SavedVariable of an output needs the node to unpack it,
  // which torch hands out differently before and after 2.13 (shared_ptr / intrusive_ptr), so y
  // is saved as a detached alias instead: same storage and version counter, so autograd's
  // in-place check and the saved-tensor hooks see it as any saved tensor
  torch::autograd::SavedVariable y, z, bias, residual;
  Keep keep = Keep::kOutput;
  Act act = kRelu;
  double act_param = 0.0;

  std::string name() const override { return "fastcnn::ConvActEpilogueBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    y.reset_data();
    z.reset_data();
    bias.reset_data();
    residual.reset_data();
  }

  // the incoming gradient is let go of as soon as dz exists, before the bias gradient is
  // reduced (the node's peak then stays at the unfused ReLU backward's)
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(3);
    if (!grads[0].defined()) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor gz, gbias;
    if (keep == Keep::kOutput) {
      gz = act_backward_from_output(grads[0], y.unpack(), act, act_param);
      grads[0].reset();
      if (task_should_compute_output(1)) gbias = gz.sum({0, 2, 3});
    } else {
      const Tensor b = bias.unpack(), r = residual.unpack();
      auto [g, gr, gs, gt] = op_scale_shift_act_backward().call(grads[0], z.unpack(), std::nullopt, opt(b), opt(r),
                                                                act_name(act), act_param);
      gz = std::move(g);
      gbias = std::move(gt);
    }
    if (task_should_compute_output(1)) out[1] = std::move(gbias);  // the engine casts it to the bias's dtype
    if (task_should_compute_output(2)) out[2] = gz;
    out[0] = std::move(gz);
    return out;
  }
};

// The Autograd-key kernel: the convolution's node (conv_node.h), then the epilogue's node (two nodes, so
// that the convolution's backward runs after the epilogue's node has let go of the incoming
// gradient and what it kept -- the peak of the unfused layers; see
// csrc/ops/conv_layers/conv_bn_act.cpp).
std::tuple<Tensor, Tensor> conv_act_autograd(const Tensor& x, const Tensor& weight, const OptT& bias,
                                             const OptT& residual, IntList stride, IntList padding,
                                             IntList dilation, int64_t groups, c10::string_view act,
                                             double act_param) {
  const Act a = parse_act(std::string(act));
  const Keep keep = what_to_keep(a, act_param);
  if (keep == Keep::kNothing)  // identity: ATen's own convolution (with its bias) and add, recorded by ATen
    return outputs(x, conv_act_compute(x, weight, bias, residual, stride, padding, dilation, groups, keep, act,
                                       act_param));
  const Tensor b = or_undefined(bias), r = or_undefined(residual);
  if (!any_requires_grad({&x, &weight, &b, &r}))
    return conv_act_layer(x, weight, bias, residual, stride, padding, dilation, groups, act, act_param);
  const Tensor z = conv_recorded(x, weight, std::nullopt, stride, padding, dilation, groups);
  auto node = make_node<EpilogueBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(z, b, r));
  Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    y = op_scale_shift_act().call(z, std::nullopt, bias, residual, act, act_param);
  }
  node->keep = keep;
  node->act = a;
  node->act_param = act_param;
  {
    // y and z are this op's new tensors, the bias a parameter: no rebuild recipe can exist for
    // them, so they are saved past fastcnn.recompute's own hooks (csrc/include/saved_hooks.h);
    // the residual may be an earlier layer's rebuildable output
    PastRecomputeHooks past(recompute_hooks_on_top());
    if (keep == Keep::kOutput) {
      node->y = torch::autograd::SavedVariable(y.detach(), false);
    } else {
      node->z = torch::autograd::SavedVariable(z, false);
      node->bias = torch::autograd::SavedVariable(b, false);
    }
  }
  if (keep == Keep::kPreActivation) node->residual = torch::autograd::SavedVariable(r, false);
  torch::autograd::set_history(y, NodePtr(node));
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
