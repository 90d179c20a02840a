// Per-channel affine + activation primitives, the building blocks of the fused BN+act,
// scale/shift+act and SE ops (csrc/bn_act.cpp, csrc/se_block.cpp), with one CPU
// implementation (csrc/cpu/channel_act_kernel.cpp) and one CUDA implementation
// (csrc/cuda/channel_act_kernel.cu).
//
// Every tensor is viewed as [B, O, G, I] (contiguous, in its own memory format); the
// per-slot parameters are fp32 vectors of length P = B * G indexed by p = b * G + g:
//   * per channel (BN):       NCHW -> {1, N, C, HW}     channels_last -> {1, N*HW, C, 1}
//   * per (sample, channel):  NCHW -> {1, 1, N*C, HW}   channels_last -> {N, HW, C, 1}
// so a kernel only ever sees contiguous runs of I elements sharing one slot (I > 1) or rows
// of G elements with one slot per lane (I == 1).
#pragma once

#include <ATen/ATen.h>

#include "act.h"

namespace fastcnn {

struct Geom {
  int64_t B, O, G, I;
  int64_t slots() const { return B * G; }
  int64_t per_slot() const { return O * I; }
};

// Memory format the kernels use for x: channels_last when x is laid out that way (and not
// also plain contiguous), else NCHW. The fake (meta) implementations mirror this rule.
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// Reduction over everything but the channel: BN statistics.
inline Geom channel_geom(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) return {1, N * HW, C, 1};
  return {1, N, C, HW};
}

// Reduction over the spatial plane only: SE squeeze / gate.
inline Geom plane_geom(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) return {N, HW, C, 1};
  return {1, 1, N * C, HW};
}

#define FASTCNN_DECLARE_CHANNEL_ACT(ns)                                                       \
  namespace ns {                                                                              \
  /* mean and biased variance of each slot, fp32 [P] each (shifted sums, fp64 combine) */     \
  std::tuple<at::Tensor, at::Tensor> slot_mean_var(const at::Tensor& x, Geom g);              \
  /* y = act(x * scale[p] + shift[p] (+ r)) */                                                \
  void act_forward(const at::Tensor& x, const at::Tensor& r, at::Tensor& y,                   \
                   const at::Tensor& scale, const at::Tensor& shift, Geom g, Act act,         \
                   float act_param);                                                          \
  /* dz = gy * act'(x*scale+shift(+r)); returns fp32 [2, P]: sum dz, sum dz*(x-center[p]) */  \
  at::Tensor act_backward_reduce(const at::Tensor& gy, const at::Tensor& x,                   \
                                 const at::Tensor& r, const at::Tensor& scale,                \
                                 const at::Tensor& shift, const at::Tensor& center, Geom g,   \
                                 Act act, float act_param);                                   \
  /* gx = scale*dz + alpha*(x-center) + beta; gr = dz when gr is defined */                   \
  void act_backward_apply(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,     \
                          const at::Tensor& scale, const at::Tensor& shift,                   \
                          const at::Tensor& center, const at::Tensor& alpha,                  \
                          const at::Tensor& beta, at::Tensor& gx, at::Tensor& gr, Geom g,     \
                          Act act, float act_param);                                          \
  }

FASTCNN_DECLARE_CHANNEL_ACT(cpu)
#ifdef WITH_CUDA
FASTCNN_DECLARE_CHANNEL_ACT(cuda)
#endif

// Device switch: the op code in csrc/*.cpp is written once and runs on either device.
#ifdef WITH_CUDA
#define FASTCNN_ON_DEVICE(t, fn, ...) ((t).is_cuda() ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define FASTCNN_ON_DEVICE(t, fn, ...) (cpu::fn(__VA_ARGS__))
#endif

}  // namespace fastcnn
