// The grouped_conv op family: direct grouped convolution (no bias) for few channels per group.
//   csrc/ops/grouped_conv/grouped_conv.cpp               this file: the schemas and the Autograd
//                                                        fallthrough of the backward op
//   csrc/ops/grouped_conv/grouped_conv.h                 shape checks shared by both devices
//   csrc/ops/grouped_conv/cpu/grouped_conv_kernel.cpp    the CPU kernels, registered for CPU
//   csrc/ops/grouped_conv/cuda/grouped_conv_kernel.cu    the CUDA kernels, registered for CUDA
//                                                        (CUDA builds)
// fastcnn/ops/extension_backend.py registers the autograd formula and the fake implementations.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // direct grouped convolution (no bias) for few channels per group
  m.def("grouped_conv2d(Tensor x, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  // -> (grad_x, grad_weight); output_mask says which to compute (the other is empty)
  m.def("grouped_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[2] output_mask) -> (Tensor, Tensor)");
}

// The backward op is not differentiable itself (no double backward): autograd passes through
// it instead of warning about a missing formula.
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) {
  m.impl("grouped_conv2d_backward", torch::CppFunction::makeFallthrough());
}
