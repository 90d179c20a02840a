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
// ConvOfRebuiltFunction below (the convolution with h rebuilt) -- so the convolution's incoming
// gradient and the rebuilt h are freed before the BN node's backward runs (see
// csrc/ops/conv_layers/conv_bn_act.cpp for why one node for both raised the peak).
#include <torch/library.h>

#include <string>

#include "include/common.h"
#include "include/layer_op.h"
#include "ops/bn_act/bn_act.h"

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
// convolution's node (a plain struct: torch::autograd::Function gives it no edge).
struct HRecipe {
  Tensor x, bn_weight, bn_bias, mean, var;
  bool training;
};

struct ConvOfRebuiltFunction : public torch::autograd::Function<ConvOfRebuiltFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const Tensor& weight, const OptT& bias,
                        const OptT& residual, const HRecipe& recipe, IntList stride, IntList padding,
                        IntList dilation, int64_t groups, double eps, c10::string_view act, double act_param) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor y = conv(h, weight, bias, stride, padding, dilation, groups, residual);
    // x through save_for_backward (a fused model's saved-tensor hooks may keep it as a recipe
    // of its own; in-place changes are caught); in eval the running statistics too (buffers
    // others may change). The BN parameters and batch statistics as in the bn_act node.
    if (recipe.training) {
      ctx->save_for_backward({recipe.x, weight});
      ctx->saved_data["mean"] = recipe.mean;
      ctx->saved_data["var"] = recipe.var;
    } else {
      ctx->save_for_backward({recipe.x, weight, recipe.mean, recipe.var});
    }
    ctx->saved_data["bn_weight"] = recipe.bn_weight;
    ctx->saved_data["bn_bias"] = recipe.bn_bias;
    ctx->saved_data["versions"] = std::vector<int64_t>{static_cast<int64_t>(recipe.bn_weight._version()),
                                                       static_cast<int64_t>(recipe.bn_bias._version())};
    Edges e;
    e.add(h);
    e.add(weight);
    e.add(bias);
    e.add(residual);
    ctx->saved_data["edges"] = c10::IValue(e.index);
    ctx->saved_data["training"] = recipe.training;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["act_param"] = act_param;
    return y;
  }

  // grads by reference: the incoming gradient is let go of as soon as the convolution's
  // backward has used it (kept only as the residual's gradient)
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    variable_list out(12);
    if (!grads[0].defined()) return out;
    auto& d = ctx->saved_data;
    const auto saved = ctx->get_saved_variables();
    const Tensor bn_weight = d["bn_weight"].toTensor(), bn_bias = d["bn_bias"].toTensor();
    const auto versions = d["versions"].toIntVector();
    TORCH_CHECK(bn_weight._version() == static_cast<uint32_t>(versions[0]) &&
                    bn_bias._version() == static_cast<uint32_t>(versions[1]),
                "fastcnn: a BatchNorm weight or bias used by a fused bn_act_conv was modified in place between "
                "forward and backward (e.g. an optimizer step before backward); its gradient would be wrong");
    const std::vector<int64_t> edges = d["edges"].toIntVector();
    const bool training = d["training"].toBool();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor &x = saved[0], &weight = saved[1];
    const Tensor mean = training ? d["mean"].toTensor() : saved[2];
    const Tensor var = training ? d["var"].toTensor() : saved[3];
    const Tensor h = op_bn_act_apply().call(x, bn_weight, bn_bias, std::nullopt, mean, var, d["eps"].toDouble(),
                                            d["act"].toStringRef(), d["act_param"].toDouble());
    const bool has_bias = d["has_bias"].toBool();
    const std::vector<int64_t> bias_sizes{weight.size(0)};
    auto [gh, gw, gb] = at::convolution_backward(
        grads[0], h, weight, has_bias ? c10::OptionalIntArrayRef(bias_sizes) : c10::OptionalIntArrayRef(),
        d["stride"].toIntVector(), d["padding"].toIntVector(), d["dilation"].toIntVector(), false, {0, 0},
        d["groups"].toInt(), {needs_grad(ctx, edges, 0), needs_grad(ctx, edges, 1), has_bias && needs_grad(ctx, edges, 2)});
    if (needs_grad(ctx, edges, 3)) out[3] = grads[0];
    grads[0].reset();
    out[0] = gh;
    out[1] = gw;
    if (has_bias) out[2] = gb;
    return out;
  }
};

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
  return ConvOfRebuiltFunction::apply(h, weight, bias, residual, recipe, stride, padding, dilation, groups, eps,
                                      act, act_param);
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
