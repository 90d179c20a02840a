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

// Edges: x, weight, bias (an absent or non-differentiable one gets an invalid edge).
struct ConvBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable x, weight;
  bool has_bias = false;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;

  std::string name() const override { return "fastcnn::ConvBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    weight.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(3);
    const Tensor x_ = x.unpack(), weight_ = weight.unpack();
    if (!grads[0].defined()) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::vector<int64_t> bias_sizes{weight_.size(0)};
    const bool need_bias = has_bias && task_should_compute_output(2);
    auto [gx, gw, gb] = at::convolution_backward(
        grads[0], x_, weight_, has_bias ? c10::OptionalIntArrayRef(bias_sizes) : c10::OptionalIntArrayRef(), stride,
        padding, dilation, false, {0, 0}, groups,
        {task_should_compute_output(0), task_should_compute_output(1), need_bias});
    grads[0].reset();
    if (task_should_compute_output(0)) out[0] = std::move(gx);
    if (task_should_compute_output(1)) out[1] = std::move(gw);
    if (need_bias) out[2] = std::move(gb);
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
  {
    PastRecomputeHooks past(recompute_hooks_on_top());
    node->weight = torch::autograd::SavedVariable(weight, false);
  }
  node->has_bias = b.defined();
  node->stride = stride.vec();
  node->padding = padding.vec();
  node->dilation = dilation.vec();
  node->groups = groups;
  torch::autograd::set_history(z, NodePtr(node));
  return z;
}

}  // namespace fastcnn
