// The fused pre-activation unit as one op: conv(act(BN(x))) (+ residual) -- ResNet-164, WRN and
// DenseNet are made of it. BN + activation through the `bn_act` composite's code
// (csrc/ops/bn_act/), the convolution through ATen (cuDNN / oneDNN), the running statistics
// updated and eval-mode BN folded inside the op. One dispatcher call forward.
//
// Why one op: as two (bn_act, then the convolution) the BN+activation output h is a tensor the
// convolution's autograd node keeps for backward -- a second activation per unit, or, inside
// a fused model, a Python recipe and a Python saved-tensor hook call per unit that rebuild it
// (fastcnn.recompute): about 15 us of host time per unit, measured, which made the unit cost
// the host 1.35x eager's BN + ReLU + conv in training. Here the convolution's node keeps what h
// is rebuilt from instead -- x (kept anyway by the BN node), the BN parameters and the batch
// statistics ([C] vectors) -- and rebuilds h in C++ in its backward, with the very kernel and
// coefficients of the forward (bn_act_apply: bit for bit the forward's h).
//
// Passes over activation memory, training (the BN part's launches on CUDA in brackets, see
// csrc/ops/bn_act/bn_act_kernel.h): forward -- BN statistics (reads x) and apply (reads x,
// writes h) [2], the convolution (reads h, writes y), the residual added in place; backward
// -- the rebuild (reads x, writes h) [1], the convolution's backward (reads gy and h, writes
// gh; the weight gradient), the BN backward (reads gh and x twice, writes gx) [2]. Kept
// between forward and backward: x and [C] vectors (two-op unfused: x and h). Eval: apply [1]
// and the convolution.
//
// Autograd: two nodes, as the unfused unit's two halves -- the `bn_act` composite's node and
// ConvOfRebuiltBackward below (the convolution with h rebuilt) -- so the convolution's incoming
// gradient and the rebuilt h are freed before the BN node's backward runs (see
// csrc/ops/conv_layers/conv_bn_act.cpp for why one node for both raised the peak).
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>

#include "include/common.h"
#include "include/layer_op.h"
#include "ops/bn_act/bn_act.h"
#include "ops/conv_layers/conv_node.h"

namespace fastcnn {
namespace {

using IntList = c10::IntArrayRef;

Tensor conv(const Tensor& h, const Tensor& weight, const OptT& bias, IntList stride, IntList padding,
            IntList dilation, int64_t groups, const OptT& residual) {
  Tensor y = at::convolution(h, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  if (residual.has_value()) {
    check_like(*residual, y, "residual");
    y.add_(*residual);  // y is this op's own new tensor (the convolution does not keep it)
  }
  return y;
}

Tensor bn_act_conv_layer(const Tensor& x, const Tensor& bn_weight, const Tensor& bn_bias, const OptT& running_mean,
                         const OptT& running_var, const Tensor& weight, const OptT& bias, const OptT& residual,
                         IntList stride, IntList padding, IntList dilation, int64_t groups, bool training,
                         double momentum, double eps, c10::string_view act, double act_param, bool /*rebuild*/) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor h = bn_layer_forward(x, bn_weight, bn_bias, running_mean, running_var, std::nullopt, training,
                                    momentum, eps, act, act_param)
                       .y;
  return conv(h, weight, bias, stride, padding, dilation, groups, residual);
}

// What h is rebuilt from: the BN input and parameters, and the statistics the forward used (the
// batch statistics in training, the running statistics in eval). Not autograd inputs of the
// convolution's node (a plain struct, no edge).
struct HRecipe {
  Tensor x, bn_weight, bn_bias, mean, var;
  bool training;
};

// The convolution's backward node, written as ATen's generated nodes are (plain members, no
// torch::autograd::Function saved_data map: see BnActBackward in csrc/ops/bn_act/bn_act.cpp).
// Edges: h, weight, bias, residual (an absent one gets an invalid edge).
struct ConvOfRebuiltBackward final : public torch::autograd::Node {
  // x through SavedVariable (a fused model's saved-tensor hooks may keep it as a recipe of its
  // own; in-place changes are caught), the convolution's weight and geometry as SavedConv keeps
  // them (conv_node.h); the BN parameters and statistics as the bn_act node keeps them (SavedBn)
  torch::autograd::SavedVariable x;
  SavedConv conv;
  SavedBn bn;

  std::string name() const override { return "fastcnn::ConvOfRebuiltBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    conv.weight.reset_data();
    bn.release();
  }

  // the incoming gradient is let go of as soon as the convolution's backward has used it
  // (kept only as the residual's gradient)
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bn.check("bn_act_conv");
    variable_list out(4);
    if (!grads[0].defined()) return out;
    const Tensor x_ = x.unpack(), weight_ = conv.weight.unpack();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [m, v] = bn.statistics();
    const Tensor h =
        op_bn_act_apply().call(x_, bn.weight, bn.bias, std::nullopt, m, v, bn.eps, bn.act, bn.act_param);
    auto [gh, gw, gb] = conv.backward(grads[0], h, weight_, task_should_compute_output(0),
                                      task_should_compute_output(1), task_should_compute_output(2));
    if (task_should_compute_output(3)) out[3] = grads[0];
    grads[0].reset();
    out[0] = std::move(gh);
    out[1] = std::move(gw);
    out[2] = std::move(gb);
    return out;
  }
};

// y = conv(h) (+ residual) with ConvOfRebuiltBackward recorded: h's graph edge is the bn_act
// node's output, and the node keeps what h is rebuilt from instead of h
Tensor conv_of_rebuilt(const Tensor& h, const Tensor& weight, const OptT& bias, const OptT& residual,
                       const HRecipe& recipe, IntList stride, IntList padding, IntList dilation, int64_t groups,
                       double eps, c10::string_view act, double act_param) {
  const Tensor b = or_undefined(bias), r = or_undefined(residual);
  auto node = make_node<ConvOfRebuiltBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(h, weight, b, r));
  Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    y = conv(h, weight, bias, stride, padding, dilation, groups, residual);
  }
  node->x = torch::autograd::SavedVariable(recipe.x, false);
  node->conv.save(weight, b, stride, padding, dilation, groups);
  node->bn.save(recipe.bn_weight, recipe.bn_bias, recipe.mean, recipe.var, recipe.training, eps, act, act_param);
  torch::autograd::set_history(y, NodePtr(node));
  return y;
}

// the Autograd-key kernel: the bn_act composite's node, then the convolution's (above)
Tensor bn_act_conv_autograd(const Tensor& x, const Tensor& bn_weight, const Tensor& bn_bias,
                            const OptT& running_mean, const OptT& running_var, const Tensor& weight,
                            const OptT& bias, const OptT& residual, IntList stride, IntList padding,
                            IntList dilation, int64_t groups, bool training, double momentum, double eps,
                            c10::string_view act, double act_param, bool rebuild) {
  const Tensor b = or_undefined(bias), r = or_undefined(residual);
  if (!any_requires_grad({&x, &bn_weight, &bn_bias, &weight, &b, &r}))
    return bn_act_conv_layer(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, residual, stride,
                             padding, dilation, groups, training, momentum, eps, act, act_param, rebuild);
  auto [h, mean, var] = bn_act_autograd(x, bn_weight, bn_bias, running_mean, running_var, std::nullopt, training,
                                        momentum, eps, act, act_param);
  if (!rebuild)  // h kept: above autograd, ATen records its convolution node (and the add)
    return conv(h, weight, bias, stride, padding, dilation, groups, residual);
  const HRecipe recipe{x, bn_weight, bn_bias, training ? mean : *running_mean, training ? var : *running_var,
                       training};
  return conv_of_rebuilt(h, weight, bias, residual, recipe, stride, padding, dilation, groups, eps, act, act_param);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // conv(act(BN(x))) + bias (+ residual), BN with nn.BatchNorm2d's semantics (see bn_act): the
  // pre-activation unit; returns the convolution's output. rebuild: the convolution's node
  // rebuilds h = act(BN(x)) in backward (else it keeps h, as unfused PyTorch: in eval, with
  // fastcnn.train --keep-activations, and in a lone unit, whose memory nothing else shares)
  m.def("bn_act_conv(Tensor x, Tensor bn_weight, Tensor bn_bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool training, float momentum, float eps, str act, float act_param, "
        "bool rebuild=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastcnn, CompositeExplicitAutograd, m) { m.impl("bn_act_conv", &bn_act_conv_layer); }
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) { m.impl("bn_act_conv", &bn_act_conv_autograd); }

}  // namespace fastcnn
