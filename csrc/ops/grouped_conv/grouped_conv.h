// Shared argument handling of the direct grouped convolution (the kernels in
// csrc/ops/grouped_conv/cpu/grouped_conv_kernel.cpp and cuda/grouped_conv_kernel.cu): shape
// checks and the output size.
#pragma once

#include <ATen/ATen.h>

namespace fastcnn {

struct ConvShape {
  int64_t N, C, H, W, K, CG, KH, KW, OH, OW, groups;
  int64_t sh, sw, ph, pw, dh, dw;
};

inline ConvShape conv_shape(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4 && w.dim() == 4, "fastcnn: grouped_conv2d needs 4-D x and weight, got ",
                    x.sizes(), " and ", w.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "fastcnn: stride, padding and dilation must have two values each");
  TORCH_CHECK_VALUE(groups >= 1 && x.size(1) % groups == 0 && w.size(0) % groups == 0 &&
                        w.size(1) * groups == x.size(1),
                    "fastcnn: grouped_conv2d: x has ", x.size(1), " channels, weight ", w.sizes(),
                    ", groups ", groups, " do not match");
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), "fastcnn: weight has dtype ", w.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 &&
                        padding[0] >= 0 && padding[1] >= 0,
                    "fastcnn: stride and dilation must be positive and padding non-negative");
  ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(1), w.size(2), w.size(3), 0, 0,
              groups, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  s.OH = (s.H + 2 * s.ph - s.dh * (s.KH - 1) - 1) / s.sh + 1;
  s.OW = (s.W + 2 * s.pw - s.dw * (s.KW - 1) - 1) / s.sw + 1;
  TORCH_CHECK_VALUE(s.OH > 0 && s.OW > 0, "fastcnn: grouped_conv2d input ", x.sizes(),
                    " is too small for kernel ", w.sizes());
  return s;
}

}  // namespace fastcnn
