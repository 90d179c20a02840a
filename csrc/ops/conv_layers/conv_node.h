// The convolution of the composite layer ops (conv_bn_act, conv_act) with its autograd node
// written here rather than recorded by ATen: ATen's ConvolutionBackward0 saves the input and
// the weight through the saved-tensor hooks alike, while only the input can be a rebuildable
// activation (fastcnn.recompute); this node saves the weight past fastcnn.recompute's own hooks
// (csrc/include/saved_hooks.h), one Python hook call fewer on save and one on unpack per layer
// inside a fused model. The backward is ATen's convolution_backward, as ATen's node calls it.
#pragma once

#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <string>
#include <vector>

#include "include/common.h"
#include "include/layer_op.h"
#include "include/saved_hooks.h"

namespace fastcnn {

// What a convolution's backward node keeps besides its input, and the convolution's backward:
// the weight (saved past fastcnn.recompute's own hooks: a parameter has no recipe), the
// geometry, and ATen's convolution_backward. Shared by ConvBackward below and bn_act_conv's
// ConvOfRebuiltBackward (csrc/ops/conv_layers/bn_act_conv.cpp), whose input is rebuilt.
struct SavedConv {
  torch::autograd::SavedVariable weight;
  bool has_bias = false;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;

  void save(const Tensor& weight_, const Tensor& bias, c10::IntArrayRef stride_, c10::IntArrayRef padding_,
            c10::IntArrayRef dilation_, int64_t groups_) {
    {
      PastRecomputeHooks past(recompute_hooks_on_top());
      weight = torch::autograd::SavedVariable(weight_, false);
    }
    has_bias = bias.defined();
    stride = stride_.vec();
    padding = padding_.vec();
    dilation = dilation_.vec();
    groups = groups_;
  }

  // (grad input, grad weight, grad bias) of conv(input, weight_ (+ bias)); each only if asked
  // for (the bias gradient only where there is a bias), else undefined
  std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad, const Tensor& input, const Tensor& weight_,
                                              bool need_input, bool need_weight, bool need_bias) const {
    const std::vector<int64_t> bias_sizes{weight_.size(0)};
    return at::convolution_backward(
        grad, input, weight_, has_bias ? c10::OptionalIntArrayRef(bias_sizes) : c10::OptionalIntArrayRef(), stride,
        padding, dilation, false, {0, 0}, groups, {need_input, need_weight, has_bias && need_bias});
  }
};

// Edges: x, weight, bias (an absent or non-differentiable one gets an invalid edge).
struct ConvBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable x;
  SavedConv conv;

  std::string name() const override { return "fastcnn::ConvBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    conv.weight.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(3);
    const Tensor x_ = x.unpack(), weight_ = conv.weight.unpack();
    if (!grads[0].defined()) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gx, gw, gb] = conv.backward(grads[0], x_, weight_, task_should_compute_output(0),
                                      task_should_compute_output(1), task_should_compute_output(2));
    grads[0].reset();
    out[0] = std::move(gx);
    out[1] = std::move(gw);
    out[2] = std::move(gb);
    return out;
  }
};

// at::convolution(x, weight, bias, ...) with ConvBackward recorded when autograd needs a node
// (ATen's own convolution otherwise)
inline Tensor conv_recorded(const Tensor& x, const Tensor& weight, const OptT& bias, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const Tensor b = or_undefined(bias);
  if (!any_requires_grad({&x, &weight, &b}))
    return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  auto node = make_node<ConvBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, b));
  Tensor z;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    z = at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  }
  node->x = torch::autograd::SavedVariable(x, false);
  node->conv.save(weight, b, stride, padding, dilation, groups);
  torch::autograd::set_history(z, NodePtr(node));
  return z;
}

}  // namespace fastcnn
