// The se_block op family: the fused squeeze-and-excitation block tail,
// act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) (+ residual)).
//   csrc/ops/se_block/se_block.cpp              this file: every schema of the family, the
//                                               Autograd fallthrough of its backward op, and the
//                                               `se_block` composite (its C++ autograd)
//   csrc/ops/se_block/se_block_kernel.h         the primitive ops' code, written once as
//                                               templates over the device
//   csrc/ops/se_block/cpu/se_block_cpu.cpp      registers the primitives for CPU
//   csrc/ops/se_block/cuda/se_block_cuda.cpp    registers the primitives for CUDA (CUDA builds)
// The primitives run on the channel_act kernels (csrc/channel_act/); conventions of every
// fastcnn op: csrc/fastcnn.cpp.
#include <torch/library.h>

#include <string>

#include "include/common.h"
#include "include/layer_op.h"

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) (+ residual)); returns (y, pooled fp32 [N, C])
  m.def("se_block_forward(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
        "Tensor? fc2_bias, Tensor? residual, str act, float act_param) -> (Tensor, Tensor)");
  // -> (grad_x, grad_residual, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias)
  m.def("se_block_backward(Tensor grad_y, Tensor x, Tensor pooled, Tensor fc1_weight, "
        "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? residual, str act, "
        "float act_param) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The backward op is not differentiable itself (no double backward): autograd passes through
// it instead of warning about a missing formula.
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) {
  m.impl("se_block_backward", torch::CppFunction::makeFallthrough());
}

namespace fastcnn {
namespace {

// ------------------------------------------------------------------- the se_block composite
Tensor se_block_layer(const Tensor& x, const Tensor& w1, const OptT& b1, const Tensor& w2, const OptT& b2,
                      const OptT& residual, c10::string_view act, double act_param) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return std::get<0>(op_se_block_forward().call(x, w1, b1, w2, b2, residual, act, act_param));
}

struct SeBlockFunction : public torch::autograd::Function<SeBlockFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const OptT& b1, const Tensor& w2,
                        const OptT& b2, const OptT& residual, c10::string_view act, double act_param) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, pooled] = op_se_block_forward().call(x, w1, b1, w2, b2, residual, act, act_param);
    ctx->save_for_backward({x, pooled, w1, or_undefined(b1), w2, or_undefined(b2), or_undefined(residual)});
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["act_param"] = act_param;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::string act = ctx->saved_data["act"].toStringRef();
    auto [gx, gr, gw1, gb1, gw2, gb2] = op_se_block_backward().call(
        grads[0], s[0], s[1], s[2], opt(s[3]), s[4], opt(s[5]), opt(s[6]), act, ctx->saved_data["act_param"].toDouble());
    out[0] = gx;
    out[1] = gw1;
    if (s[3].defined()) out[2] = gb1;
    out[3] = gw2;
    if (s[5].defined()) out[4] = gb2;
    if (s[6].defined()) out[5] = gr;
    return out;
  }
};

Tensor se_block_autograd(const Tensor& x, const Tensor& w1, const OptT& b1, const Tensor& w2, const OptT& b2,
                         const OptT& residual, c10::string_view act, double act_param) {
  const Tensor b1_ = or_undefined(b1), b2_ = or_undefined(b2), r = or_undefined(residual);
  if (!any_requires_grad({&x, &w1, &b1_, &w2, &b2_, &r}))
    return se_block_layer(x, w1, b1, w2, b2, residual, act, act_param);
  return SeBlockFunction::apply(x, w1, b1, w2, b2, residual, act, act_param);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // the SE block as one op with its autograd in C++: se_block_forward's y
  m.def("se_block(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "Tensor? residual, str act, float act_param) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastcnn, CompositeExplicitAutograd, m) { m.impl("se_block", &se_block_layer); }
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) { m.impl("se_block", &se_block_autograd); }

}  // namespace fastcnn
