// Direct grouped convolution on CUDA (forward, input gradient, weight gradient) for few
// channels per group (depthwise-like shapes): one thread per output / input element looping
// over its group's channels and taps (gather form, no atomics), and one block per weight
// element reducing over batch and space with a warp-shuffle block reduction. fp32 math on
// NCHW copies; fp16/bf16 storage. conv_bn_act uses cuDNN by default (see
// fastcnn/ops/extension_backend.py); this op is the GPU twin of
// csrc/ops/grouped_conv/cpu/grouped_conv_kernel.cpp. Registered for the CUDA dispatch key here;
// the schemas are in csrc/ops/grouped_conv/grouped_conv.cpp.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "include/common.h"
#include "ops/grouped_conv/grouped_conv.h"

namespace fastcnn {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 16)));
}

template <typename T>
__global__ void gconv_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                     ConvShape s) {
  const int64_t total = s.N * s.K * s.OH * s.OW, KG = s.K / s.groups;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ow = e % s.OW, oh = (e / s.OW) % s.OH, k = (e / (s.OW * s.OH)) % s.K, n = e / (s.OW * s.OH * s.K);
    const int64_t g = k / KG;
    float acc = 0.f;
    for (int64_t c = 0; c < s.CG; ++c) {
      const T* xc = x + (n * s.C + g * s.CG + c) * s.H * s.W;
      const T* wc = w + (k * s.CG + c) * s.KH * s.KW;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
        if (ih < 0 || ih >= s.H) continue;
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t iw = ow * s.sw - s.pw + kw * s.dw;
          if (iw < 0 || iw >= s.W) continue;
          acc += static_cast<float>(xc[ih * s.W + iw]) * static_cast<float>(wc[kh * s.KW + kw]);
        }
      }
    }
    y[e] = static_cast<T>(acc);
  }
}

template <typename T>
__global__ void gconv_input_grad_kernel(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                                        ConvShape s) {
  const int64_t total = s.N * s.C * s.H * s.W, KG = s.K / s.groups;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t iw = e % s.W, ih = (e / s.W) % s.H, ci = (e / (s.W * s.H)) % s.C, n = e / (s.W * s.H * s.C);
    const int64_t g = ci / s.CG, c = ci % s.CG;
    float acc = 0.f;
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      const int64_t th = ih + s.ph - kh * s.dh;
      if (th < 0 || th % s.sh) continue;
      const int64_t oh = th / s.sh;
      if (oh >= s.OH) continue;
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        const int64_t tw = iw + s.pw - kw * s.dw;
        if (tw < 0 || tw % s.sw) continue;
        const int64_t ow = tw / s.sw;
        if (ow >= s.OW) continue;
        for (int64_t k = g * KG; k < (g + 1) * KG; ++k)
          acc += static_cast<float>(gy[((n * s.K + k) * s.OH + oh) * s.OW + ow]) *
                 static_cast<float>(w[((k * s.CG + c) * s.KH + kh) * s.KW + kw]);
      }
    }
    gx[e] = static_cast<T>(acc);
  }
}

template <typename T>
__global__ void gconv_weight_grad_kernel(const T* __restrict__ gy, const T* __restrict__ x, float* __restrict__ gw,
                                         ConvShape s) {
  const int64_t idx = blockIdx.x;  // (k, c, kh, kw)
  const int64_t kw = idx % s.KW, kh = (idx / s.KW) % s.KH, c = (idx / (s.KW * s.KH)) % s.CG,
                k = idx / (s.KW * s.KH * s.CG);
  const int64_t g = k / (s.K / s.groups);
  const int64_t total = s.N * s.OH * s.OW;
  float acc = 0.f;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t ow = e % s.OW, oh = (e / s.OW) % s.OH, n = e / (s.OW * s.OH);
    const int64_t ih = oh * s.sh - s.ph + kh * s.dh, iw = ow * s.sw - s.pw + kw * s.dw;
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
    acc += static_cast<float>(gy[((n * s.K + k) * s.OH + oh) * s.OW + ow]) *
           static_cast<float>(x[((n * s.C + g * s.CG + c) * s.H + ih) * s.W + iw]);
  }
  __shared__ float sh[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (threadIdx.x == 0) gw[idx] = acc;
  }
}

Tensor grouped_conv2d_cuda(const Tensor& x_, const Tensor& w_, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = conv_shape(x_, w_, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  Tensor y = at::empty({s.N, s.K, s.OH, s.OW}, x.options());
  if (y.numel() == 0) return y.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_grouped_conv2d_cuda", [&] {
    gconv_forward_kernel<scalar_t><<<blocks_for(y.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y.contiguous(fmt);
}

std::tuple<Tensor, Tensor> grouped_conv2d_backward_cuda(const Tensor& gy_, const Tensor& x_, const Tensor& w_,
                                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                                        at::IntArrayRef dilation, int64_t groups,
                                                        std::array<bool, 2> mask) {
  const ConvShape s = conv_shape(x_, w_, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(gy_.dim() == 4 && gy_.size(0) == s.N && gy_.size(1) == s.K && gy_.size(2) == s.OH &&
                        gy_.size(3) == s.OW,
                    "fastcnn: grad_y has shape ", gy_.sizes(), ", expected [", s.N, ", ", s.K, ", ", s.OH, ", ",
                    s.OW, "]");
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(), w = w_.contiguous(), gy = gy_.to(x_.scalar_type()).contiguous();
  Tensor gx = no_grad_tensor(x_), gw = no_grad_tensor(w_);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_grouped_conv2d_backward_cuda", [&] {
    if (mask[0]) {
      Tensor gxc = at::empty({s.N, s.C, s.H, s.W}, x.options());
      if (gxc.numel() > 0) {
        gconv_input_grad_kernel<scalar_t><<<blocks_for(gxc.numel()), kThreads, 0, stream>>>(
            gy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), gxc.data_ptr<scalar_t>(), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      gx = gxc.contiguous(fmt);
    }
    if (mask[1]) {
      Tensor gwf = at::empty({s.K, s.CG, s.KH, s.KW}, x.options().dtype(at::kFloat));
      if (gwf.numel() > 0) {
        gconv_weight_grad_kernel<scalar_t><<<gwf.numel(), kThreads, 0, stream>>>(
            gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gwf.data_ptr<float>(), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      gw = gwf.to(w_.scalar_type());
    }
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("grouped_conv2d", &grouped_conv2d_cuda);
  m.impl("grouped_conv2d_backward", &grouped_conv2d_backward_cuda);
}

}  // namespace fastcnn
