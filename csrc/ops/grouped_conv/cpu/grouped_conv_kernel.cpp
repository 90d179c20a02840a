// Direct grouped convolution on CPU (forward, input gradient, weight gradient) for few
// channels per group (depthwise-like shapes), where im2col + GEMM wastes most of its work.
// Computes in fp32 on NCHW copies, parallel over (n, out-channel), (n, in-channel) and
// out-channel respectively; the innermost loops run over contiguous output/input rows.
// conv_bn_act does not use it by default: see GROUPED_CONV_NOTE in
// fastcnn/ops/extension_backend.py for the measurement against oneDNN. Registered for the CPU
// dispatch key here; the schemas are in csrc/ops/grouped_conv/grouped_conv.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "include/common.h"
#include "ops/grouped_conv/grouped_conv.h"

namespace fastcnn {
namespace {

using at::Tensor;

// output columns ow whose input column ow*s - p + kw*d lies in [0, W)
inline void col_range(int64_t OW, int64_t W, int64_t s, int64_t off, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = W - off <= 0 ? 0 : std::min<int64_t>(OW, (W - off + s - 1) / s);
  if (hi < lo) hi = lo;
}

Tensor grouped_conv2d_cpu(const Tensor& x_, const Tensor& w_, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = conv_shape(x_, w_, stride, padding, dilation, groups);
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.to(at::kFloat).contiguous(), w = w_.to(at::kFloat).contiguous();
  Tensor y = at::zeros({s.N, s.K, s.OH, s.OW}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t KG = s.K / s.groups;
  at::parallel_for(0, s.N * s.K, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nk = b0; nk < b1; ++nk) {
      const int64_t n = nk / s.K, k = nk % s.K, g = k / KG;
      float* yk = yp + nk * s.OH * s.OW;
      for (int64_t c = 0; c < s.CG; ++c) {
        const float* xc = xp + (n * s.C + g * s.CG + c) * s.H * s.W;
        for (int64_t kh = 0; kh < s.KH; ++kh) {
          for (int64_t kw = 0; kw < s.KW; ++kw) {
            const float wv = wp[((k * s.CG + c) * s.KH + kh) * s.KW + kw];
            const int64_t off = kw * s.dw - s.pw;
            int64_t lo, hi;
            col_range(s.OW, s.W, s.sw, off, lo, hi);
            for (int64_t oh = 0; oh < s.OH; ++oh) {
              const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
              if (ih < 0 || ih >= s.H) continue;
              const float* xr = xc + ih * s.W + off;
              float* yr = yk + oh * s.OW;
              if (s.sw == 1) {
                for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow];
              } else {
                for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * s.sw];
              }
            }
          }
        }
      }
    }
  });
  return y.to(x_.scalar_type()).contiguous(fmt);
}

std::tuple<Tensor, Tensor> grouped_conv2d_backward_cpu(const Tensor& gy_, const Tensor& x_, const Tensor& w_,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups,
                                                       std::array<bool, 2> mask) {
  const ConvShape s = conv_shape(x_, w_, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(gy_.dim() == 4 && gy_.size(0) == s.N && gy_.size(1) == s.K && gy_.size(2) == s.OH &&
                        gy_.size(3) == s.OW,
                    "fastcnn: grad_y has shape ", gy_.sizes(), ", expected [", s.N, ", ", s.K, ", ", s.OH, ", ",
                    s.OW, "]");
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.to(at::kFloat).contiguous(), w = w_.to(at::kFloat).contiguous();
  const Tensor gy = gy_.to(at::kFloat).contiguous();
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *gp = gy.data_ptr<float>();
  const int64_t KG = s.K / s.groups;
  Tensor gx = no_grad_tensor(x_), gw = no_grad_tensor(w_);
  if (mask[0]) {
    Tensor gxf = at::zeros({s.N, s.C, s.H, s.W}, x.options());
    float* gxp = gxf.data_ptr<float>();
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t nc = b0; nc < b1; ++nc) {
        const int64_t n = nc / s.C, ci = nc % s.C, g = ci / s.CG, c = ci % s.CG;
        float* gxc = gxp + nc * s.H * s.W;
        for (int64_t k = g * KG; k < (g + 1) * KG; ++k) {
          const float* gk = gp + (n * s.K + k) * s.OH * s.OW;
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const float wv = wp[((k * s.CG + c) * s.KH + kh) * s.KW + kw];
              const int64_t off = kw * s.dw - s.pw;
              int64_t lo, hi;
              col_range(s.OW, s.W, s.sw, off, lo, hi);
              for (int64_t oh = 0; oh < s.OH; ++oh) {
                const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
                if (ih < 0 || ih >= s.H) continue;
                float* xr = gxc + ih * s.W + off;
                const float* gr = gk + oh * s.OW;
                if (s.sw == 1) {
                  for (int64_t ow = lo; ow < hi; ++ow) xr[ow] += wv * gr[ow];
                } else {
                  for (int64_t ow = lo; ow < hi; ++ow) xr[ow * s.sw] += wv * gr[ow];
                }
              }
            }
          }
        }
      }
    });
    gx = gxf.to(x_.scalar_type()).contiguous(fmt);
  }
  if (mask[1]) {
    Tensor gwf = at::zeros({s.K, s.CG, s.KH, s.KW}, w.options());
    float* gwp = gwf.data_ptr<float>();
    at::parallel_for(0, s.K * s.CG, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t kc = b0; kc < b1; ++kc) {
        const int64_t k = kc / s.CG, c = kc % s.CG, g = k / KG;
        for (int64_t kh = 0; kh < s.KH; ++kh) {
          for (int64_t kw = 0; kw < s.KW; ++kw) {
            const int64_t off = kw * s.dw - s.pw;
            int64_t lo, hi;
            col_range(s.OW, s.W, s.sw, off, lo, hi);
            double acc = 0.0;
            for (int64_t n = 0; n < s.N; ++n) {
              const float* xc = xp + (n * s.C + g * s.CG + c) * s.H * s.W;
              const float* gk = gp + (n * s.K + k) * s.OH * s.OW;
              for (int64_t oh = 0; oh < s.OH; ++oh) {
                const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
                if (ih < 0 || ih >= s.H) continue;
                const float* xr = xc + ih * s.W + off;
                const float* gr = gk + oh * s.OW;
                float a = 0.f;
                for (int64_t ow = lo; ow < hi; ++ow) a += gr[ow] * xr[ow * s.sw];
                acc += a;
              }
            }
            gwp[(kc * s.KH + kh) * s.KW + kw] = static_cast<float>(acc);
          }
        }
      }
    });
    gw = gwf.to(w_.scalar_type());
  }
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("grouped_conv2d", &grouped_conv2d_cpu);
  m.impl("grouped_conv2d_backward", &grouped_conv2d_backward_cpu);
}

}  // namespace fastcnn
