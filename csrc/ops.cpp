// Schemas of the fastcnn ops (torch.ops.fastcnn.*), declared once; each op family registers
// its CPU and CUDA implementations in its own file, and fastcnn/ops/extension_backend.py
// registers autograd formulas and fake (meta) implementations for torch.compile.
//
// Conventions: x and the returned activations share x's dtype (fp32, fp16 or bf16) and memory
// format (NCHW or channels_last); statistics and per-channel vectors are fp32; parameter
// gradients come back in the parameter's dtype; a gradient for an absent optional input
// (residual) is an empty tensor.
#include <torch/library.h>

TORCH_LIBRARY(fastcnn, m) {
  // training-mode BatchNorm (batch statistics) + residual + activation; returns
  // (y, batch mean, biased batch variance), both statistics fp32 [C]
  m.def("bn_act_forward(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, "
        "str act, float act_param) -> (Tensor, Tensor, Tensor)");
  // act(BN(x) (+ residual)) from given batch statistics (mean, biased var: bn_act_forward's
  // own outputs) -- bit for bit bn_act_forward's y, without its statistics pass: how a
  // rebuilt activation is recomputed in backward
  m.def("bn_act_apply(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor mean, "
        "Tensor var, float eps, str act, float act_param) -> Tensor");
  // -> (grad_x, grad_residual, grad_weight, grad_bias)
  m.def("bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
        "Tensor mean, Tensor var, float eps, str act, float act_param) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // act(x * scale[c] + shift[c] (+ residual)): eval-mode BN (folded) and conv bias + act
  m.def("scale_shift_act(Tensor x, Tensor? scale, Tensor? shift, Tensor? residual, str act, "
        "float act_param) -> Tensor");
  // -> (grad_x, grad_residual, grad_scale, grad_shift)
  m.def("scale_shift_act_backward(Tensor grad_y, Tensor x, Tensor? scale, Tensor? shift, "
        "Tensor? residual, str act, float act_param) -> (Tensor, Tensor, Tensor, Tensor)");
  // act(x * sigmoid(fc2(relu(fc1(mean_hw(x))))) (+ residual)); returns (y, pooled fp32 [N, C])
  m.def("se_block_forward(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
        "Tensor? fc2_bias, Tensor? residual, str act, float act_param) -> (Tensor, Tensor)");
  // -> (grad_x, grad_residual, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias)
  m.def("se_block_backward(Tensor grad_y, Tensor x, Tensor pooled, Tensor fc1_weight, "
        "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? residual, str act, "
        "float act_param) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // direct grouped convolution (no bias) for few channels per group
  m.def("grouped_conv2d(Tensor x, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  // -> (grad_x, grad_weight); output_mask says which to compute (the other is empty)
  m.def("grouped_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[2] output_mask) -> (Tensor, Tensor)");
}

// The backward ops are not differentiable themselves (no double backward): autograd passes
// through them instead of warning about a missing formula.
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) {
  for (const char* name : {"bn_act_backward", "scale_shift_act_backward", "se_block_backward",
                           "grouped_conv2d_backward"})
    m.impl(name, torch::CppFunction::makeFallthrough());
}
