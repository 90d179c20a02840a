// BatchNorm (+ residual) + activation as a layer does it, for the composite ops (the `bn_act`
// composite in csrc/ops/bn_act/bn_act.cpp, which defines these, and `conv_bn_act` in
// csrc/ops/conv_layers/conv_bn_act.cpp): in training, batch statistics and the
// running-statistics update; in eval, BN folded from the running statistics into a per-channel
// scale and shift. One definition of those semantics for every C++ caller.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

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

}  // namespace fastcnn
