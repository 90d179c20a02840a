// BatchNorm (+ residual) + activation as a layer does it, for the composite ops (the `bn_act`
// composite in csrc/ops/bn_act/bn_act.cpp, which defines these, and `conv_bn_act` in
// csrc/ops/conv_layers/conv_bn_act.cpp): in training, batch statistics and the
// running-statistics update; in eval, BN folded from the running statistics into a per-channel
// scale and shift. One definition of those semantics for every C++ caller.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace fastcnn {

struct BnLayerOut {
  at::Tensor y;
  at::Tensor mean, var;  // training: the batch mean and biased variance (fp32 [C]); eval: undefined
};

// y = act(BN(z) (+ residual)); training updates running_mean/var in place with `momentum`
// (already resolved: 0 leaves them alone) and needs more than one value per channel; eval
// needs both running statistics.
BnLayerOut bn_layer_forward(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& residual, bool training, double momentum,
                            double eps, c10::string_view act, double act_param);

struct BnLayerGrad {
  at::Tensor gz, gr, gweight, gbias;  // gr: undefined without a residual
};

// Gradients of bn_layer_forward; `mean`/`var` are the batch statistics it returned (training)
// or the running statistics (eval).
BnLayerGrad bn_layer_backward(const at::Tensor& gy, const at::Tensor& z, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& residual, const at::Tensor& mean,
                              const at::Tensor& var, bool training, double eps, c10::string_view act,
                              double act_param);

// What a hand-written backward node keeps of a BN+activation forward to differentiate it
// (BnActBackward) or to rebuild its output (bn_act_conv's convolution node): the BN parameters
// -- leaves, kept as they are with their versions checked in backward, past the saved-tensor
// hooks -- and the statistics the forward used: in training the batch statistics (the node's
// own [C] vectors, plain members), in eval the running statistics (buffers others may change:
// SavedVariables, with autograd's in-place check).
struct SavedBn {
  at::Tensor weight, bias, batch_mean, batch_var;
  torch::autograd::SavedVariable running_mean, running_var;
  uint32_t weight_version = 0, bias_version = 0;
  bool training = true;
  double eps = 0.0, act_param = 0.0;
  std::string act;

  // mean/var: the batch statistics in training, the running statistics in eval
  void save(const at::Tensor& w, const at::Tensor& b, const at::Tensor& mean, const at::Tensor& var, bool train,
            double eps_, c10::string_view act_, double act_param_) {
    weight = w;
    bias = b;
    weight_version = w._version();
    bias_version = b._version();
    training = train;
    if (train) {
      batch_mean = mean;
      batch_var = var;
    } else {
      running_mean = torch::autograd::SavedVariable(mean, false);
      running_var = torch::autograd::SavedVariable(var, false);
    }
    eps = eps_;
    act = std::string(act_);
    act_param = act_param_;
  }

  void release() {
    weight.reset();
    bias.reset();
    batch_mean.reset();
    batch_var.reset();
    running_mean.reset_data();
    running_var.reset_data();
  }

  // in backward, before anything is computed: released (a second backward) or the parameters
  // changed in place since forward are errors naming the fused op
  void check(const char* op) const {
    TORCH_CHECK(weight.defined(), "fastcnn: trying to backward through a fused ", op,
                " a second time (or after its saved tensors were freed); specify retain_graph=True if you need "
                "to backward twice");
    TORCH_CHECK(weight._version() == weight_version && bias._version() == bias_version,
                "fastcnn: a BatchNorm weight or bias used by a fused ", op,
                " was modified in place between forward and backward (e.g. an optimizer step before backward); "
                "its gradient would be wrong");
  }

  // (mean, var) as the forward used them
  std::pair<at::Tensor, at::Tensor> statistics() {
    if (training) return {batch_mean, batch_var};
    return {running_mean.unpack(), running_var.unpack()};
  }
};

// The `bn_act` composite op: (y, batch mean, batch var; eval: empty statistics).
// bn_act_layer computes it below autograd; bn_act_autograd records one autograd node (the
// Autograd-key kernel, also the BN+activation node of the conv_bn_act composite).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_layer(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double momentum, double eps, c10::string_view act,
    double act_param);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double momentum, double eps, c10::string_view act,
    double act_param);
// bn_act_autograd for an x the caller has just created (conv_bn_act's convolution output): no
// rebuild recipe can exist for it, so its node saves it past fastcnn.recompute's own hooks
// (csrc/include/saved_hooks.h)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_autograd_of_new(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double momentum, double eps, c10::string_view act,
    double act_param);

}  // namespace fastcnn
