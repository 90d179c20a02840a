// The channel_act kernel library: per-channel affine + activation primitives, the building
// blocks of the fused BN+act, scale/shift+act and SE ops (csrc/ops/bn_act/, csrc/ops/se_block/).
// It is not an op family: it registers nothing with the dispatcher, the op families call it.
//   csrc/channel_act/channel_act.h             this file: the geometry and the kernels' interface
//   csrc/channel_act/cpu/                      the CPU kernels, built once per CPU capability
//                                              (channel_act_impl.h, compiled as DEFAULT by
//                                              channel_act_kernel.cpp and as AVX2 by
//                                              avx2/channel_act_kernel.cpp), and dispatch.cpp,
//                                              which picks one at run time
//   csrc/channel_act/cuda/channel_act_kernel.cu  the CUDA kernels (CUDA builds only)
// Op code is written once as a template over ChannelAct<device> (below) and instantiated
// and registered by each device's own file (csrc/ops/<family>/cpu/, csrc/ops/<family>/cuda/).
//
// Every tensor is viewed as [B, O, G, I] (contiguous, in its own memory format, see
// kernel_format in csrc/include/common.h); the per-slot parameters are fp32 vectors of length
// P = B * G indexed by p = b * G + g:
//   * per channel (BN):       NCHW -> {1, N, C, HW}     channels_last -> {1, N*HW, C, 1}
//   * per (sample, channel):  NCHW -> {1, 1, N*C, HW}   channels_last -> {N, HW, C, 1}
// so a kernel only ever sees contiguous runs of I elements sharing one slot (I > 1) or rows
// of G elements with one slot per lane (I == 1).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include <tuple>
#include <utility>

#include "include/act.h"

namespace fastcnn {

struct Geom {
  int64_t B, O, G, I;
  int64_t slots() const { return B * G; }
  int64_t per_slot() const { return O * I; }
};

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

// One device's kernels as a type, so that op code written once (a template over `K`, calling
// K::slot_mean_var etc.) is instantiated per device by that device's registration file:
// ChannelAct<c10::DeviceType::CPU> forwards to cpu::*, ChannelAct<c10::DeviceType::CUDA> (CUDA
// builds only) to cuda::*. No run-time device branch: the dispatcher picks the instantiation.
template <c10::DeviceType D>
struct ChannelAct;

#define FASTCNN_CHANNEL_ACT_KERNELS(device, ns)                                                \
  template <>                                                                                 \
  struct ChannelAct<device> {                                                                 \
    template <class... A>                                                                     \
    static decltype(auto) slot_mean_var(A&&... a) { return ns::slot_mean_var(std::forward<A>(a)...); } \
    template <class... A>                                                                     \
    static decltype(auto) act_forward(A&&... a) { return ns::act_forward(std::forward<A>(a)...); } \
    template <class... A>                                                                     \
    static decltype(auto) act_backward_reduce(A&&... a) {                                     \
      return ns::act_backward_reduce(std::forward<A>(a)...);                                  \
    }                                                                                         \
    template <class... A>                                                                     \
    static decltype(auto) act_backward_apply(A&&... a) {                                      \
      return ns::act_backward_apply(std::forward<A>(a)...);                                   \
    }                                                                                         \
  };

FASTCNN_CHANNEL_ACT_KERNELS(c10::DeviceType::CPU, cpu)
#ifdef WITH_CUDA
FASTCNN_CHANNEL_ACT_KERNELS(c10::DeviceType::CUDA, cuda)
#endif

}  // namespace fastcnn
