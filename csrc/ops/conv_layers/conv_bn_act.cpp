// The conv_layers op family (csrc/ops/conv_layers/): the fused convolution layers as composite
// ops, conv_bn_act.cpp and conv_act.cpp, each with its schema, a CompositeExplicitAutograd
// kernel (device-generic) and an Autograd kernel (its C++ autograd). No cpu/ or cuda/ part:
// their device code is ATen's convolution and the bn_act family's ops, reached through the
// dispatcher, which picks each device's kernels.
//
// The fused post-activation layer as one op: act(BN(conv(x)) (+ residual)), the convolution
// through ATen (cuDNN / oneDNN), BN + residual + activation through the `bn_act` composite's
// code (csrc/ops/bn_act/), the running statistics updated and eval-mode BN folded inside the op.
// One dispatcher call forward, no Python in between.
//
// Autograd: two nodes, the convolution's node (ConvBackward, conv_node.h: ATen's
// convolution_backward) and the C++ BN+activation node of the `bn_act`
// composite -- not one node for both, on purpose: a single node keeps the convolution output z
// and the incoming gradient alive until the convolution's backward has finished (autograd
// frees a node's saved tensors and inputs only when the node returns), which raised the
// training step's peak memory above unfused PyTorch's; two nodes free them between the two
// halves, as the unfused layers do. (Unfused eager: three nodes, conv, BN and activation.)
//
// Returns (y, z, mean, var): z is the convolution output and mean/var the batch statistics
// (empty in eval); the Python layer uses them only to let consumers of y rebuild it instead of
// keeping it (fastcnn.recompute).
#include <torch/library.h>

#include "include/common.h"
#include "include/layer_op.h"
#include "ops/bn_act/bn_act.h"
#include "ops/conv_layers/conv_node.h"

namespace fastcnn {
namespace {

using IntList = c10::IntArrayRef;

Tensor conv(const Tensor& x, const Tensor& weight, const OptT& bias, IntList stride, IntList padding,
            IntList dilation, int64_t groups) {
  return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_act_layer(
    const Tensor& x, const Tensor& weight, const OptT& bias, const Tensor& bn_weight, const Tensor& bn_bias,
    const OptT& running_mean, const OptT& running_var, const OptT& residual, IntList stride, IntList padding,
    IntList dilation, int64_t groups, bool training, double momentum, double eps, c10::string_view act,
    double act_param) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor z = conv(x, weight, bias, stride, padding, dilation, groups);
  auto [y, mean, var] =
      bn_act_layer(z, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, eps, act, act_param);
  return {y, z, mean, var};
}

// the Autograd-key kernel: the convolution's node (conv_node.h: the weight and z saved past
// fastcnn.recompute's own hooks, which would keep them as they are), then the bn_act composite's node
std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_act_autograd(
    const Tensor& x, const Tensor& weight, const OptT& bias, const Tensor& bn_weight, const Tensor& bn_bias,
    const OptT& running_mean, const OptT& running_var, const OptT& residual, IntList stride, IntList padding,
    IntList dilation, int64_t groups, bool training, double momentum, double eps, c10::string_view act,
    double act_param) {
  const Tensor z = conv_recorded(x, weight, bias, stride, padding, dilation, groups);
  auto [y, mean, var] = bn_act_autograd_of_new(z, bn_weight, bn_bias, running_mean, running_var, residual, training,
                                               momentum, eps, act, act_param);
  return {y, z, mean, var};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // act(BN(conv(x) + bias) (+ residual)) with nn.BatchNorm2d's semantics (see bn_act);
  // returns (y, z = the convolution output, batch mean, biased batch var; eval: empty statistics)
  m.def("conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, Tensor bn_bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? residual, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool training, float momentum, float eps, str act, float act_param) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastcnn, CompositeExplicitAutograd, m) { m.impl("conv_bn_act", &conv_bn_act_layer); }
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) { m.impl("conv_bn_act", &conv_bn_act_autograd); }

}  // namespace fastcnn
