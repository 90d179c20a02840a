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

// Reduction over everything but the channel: BN statistics. An empty plane (H * W == 0) has
// no rows either (O = 0): with I == 0 the kernels would otherwise take the row layout and read
// N rows of an empty tensor.
inline Geom channel_geom(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) return {1, N * HW, C, 1};
  return {1, HW ? N : 0, C, HW};
}

// Reduction over the spatial plane only: SE squeeze / gate (an empty plane: no rows, as above).
inline Geom plane_geom(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) return {N, HW, C, 1};
  return {1, HW ? 1 : 0, N * C, HW};
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

// CPU only (ChannelAct<CPU>::kDzPass): a residual layer's backward in 7 passes over memory
// instead of 8. The reduction also writes dz -- the residual's gradient -- into dz, and the
// apply reads it back rather than recomputing it from gy, x and r.
#define FASTCNN_DECLARE_CHANNEL_ACT_DZ(ns)                                                    \
  namespace ns {                                                                              \
  /* act_backward_reduce, writing dz = gy * act'(x*scale+shift+r) into dz (r defined) */      \
  at::Tensor act_backward_reduce_dz(const at::Tensor& gy, const at::Tensor& x,                \
                                    const at::Tensor& r, const at::Tensor& scale,             \
                                    const at::Tensor& shift, const at::Tensor& center,        \
                                    at::Tensor& dz, Geom g, Act act, float act_param);        \
  /* gx = scale*dz + alpha*(x-center) + beta, from that stored dz */                          \
  void dz_backward_apply(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& scale,  \
                         const at::Tensor& center, const at::Tensor& alpha,                   \
                         const at::Tensor& beta, at::Tensor& gx, Geom g);                     \
  }

FASTCNN_DECLARE_CHANNEL_ACT(cpu)
FASTCNN_DECLARE_CHANNEL_ACT_DZ(cpu)
#ifdef WITH_CUDA
FASTCNN_DECLARE_CHANNEL_ACT(cuda)
#endif

// BatchNorm's parameters for the fused BN passes: weight and bias of any floating dtype and
// stride (read as fp32 in the kernels, never cast or copied), and eps.
struct BnParams {
  const at::Tensor& weight;
  const at::Tensor& bias;
  double eps;
};

// The running statistics a training forward updates in place, nn.BatchNorm2d's way
// (running += momentum * (batch - running), the variance unbiased); none when either is
// undefined or momentum is 0.
struct BnRunning {
  at::Tensor mean, var;
  double momentum = 0.0;
};

#ifdef WITH_CUDA
// The fused BatchNorm passes (CUDA; per-channel geometry, B == 1). Every per-channel step --
// the fp64 combine, mean/var, the coefficients, the running statistics, the backward's alpha,
// beta and parameter gradients -- runs in the finalize of its reduction, which the
// reduction's last block to finish does in the same launch (up to 2048 channels; a finalize
// kernel above), so that each is a fixed, small number of launches: forward 2, backward 2,
// apply 1 (listed in csrc/channel_act/cuda/channel_act_kernel.cu).
namespace cuda {
// y = act(BN(x) (+ r)) with the batch statistics, written into mean and var (fp32 [P])
void bn_forward(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const BnParams& bn, at::Tensor& mean,
                at::Tensor& var, const BnRunning& running, Geom g, Act act, float act_param);
// gx (and gr = dz when defined); grad_weight / grad_bias in their own dtypes
void bn_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r, const BnParams& bn,
                 const at::Tensor& mean, const at::Tensor& var, at::Tensor& gx, at::Tensor& gr,
                 at::Tensor& grad_weight, at::Tensor& grad_bias, Geom g, Act act, float act_param);
// y = act(BN(x) (+ r)) from given fp32 statistics: bn_forward's y bit for bit from its own
// mean and var (the same coefficient code), in one launch
void bn_apply(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const BnParams& bn, const at::Tensor& mean,
              const at::Tensor& var, Geom g, Act act, float act_param);
}  // namespace cuda
#endif

// One device's kernels as a type, so that op code written once (a template over `K`, calling
// K::slot_mean_var etc.) is instantiated per device by that device's registration file:
// ChannelAct<c10::DeviceType::CPU> forwards to cpu::*, ChannelAct<c10::DeviceType::CUDA> (CUDA
// builds only) to cuda::*, which also has the fused BatchNorm passes (kFusedBn). No run-time
// device branch: the dispatcher picks the instantiation.
template <c10::DeviceType D>
struct ChannelAct;

// a static member forwarding to ns::fn
#define FASTCNN_KERNEL_FN(ns, fn)                                                             \
  template <class... A>                                                                       \
  static decltype(auto) fn(A&&... a) {                                                        \
    return ns::fn(std::forward<A>(a)...);                                                     \
  }

#define FASTCNN_CHANNEL_ACT_KERNELS(ns)                                                       \
  FASTCNN_KERNEL_FN(ns, slot_mean_var)                                                        \
  FASTCNN_KERNEL_FN(ns, act_forward)                                                          \
  FASTCNN_KERNEL_FN(ns, act_backward_reduce)                                                  \
  FASTCNN_KERNEL_FN(ns, act_backward_apply)

template <>
struct ChannelAct<c10::DeviceType::CPU> {
  static constexpr bool kFusedBn = false;
  static constexpr bool kDzPass = true;
  FASTCNN_CHANNEL_ACT_KERNELS(cpu)
  FASTCNN_KERNEL_FN(cpu, act_backward_reduce_dz)
  FASTCNN_KERNEL_FN(cpu, dz_backward_apply)
};

#ifdef WITH_CUDA
template <>
struct ChannelAct<c10::DeviceType::CUDA> {
  static constexpr bool kFusedBn = true;
  static constexpr bool kDzPass = false;
  FASTCNN_CHANNEL_ACT_KERNELS(cuda)
  FASTCNN_KERNEL_FN(cuda, bn_forward)
  FASTCNN_KERNEL_FN(cuda, bn_backward)
  FASTCNN_KERNEL_FN(cuda, bn_apply)
};
#endif

// The backward of y = act(x * scale + shift (+ r)) as the op families run it, on device D: the
// reduction pass (sums, fp32 [2, P]: sum dz, sum dz * (x - center)); then coef(sums), which
// returns the (alpha, beta) of the apply pass, gx = scale * dz + alpha * (x - center) + beta,
// with gr = dz where there is a residual. With a residual on the CPU (kDzPass) the reduction
// writes dz into gr and the apply reads it back: 7 passes over memory instead of 8.
template <c10::DeviceType D, typename Coef>
void act_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r, const at::Tensor& scale,
                  const at::Tensor& shift, const at::Tensor& center, at::Tensor& gx, at::Tensor& gr, Geom g,
                  Act act, float act_param, Coef&& coef) {
  if constexpr (ChannelAct<D>::kDzPass) {
    if (r.defined()) {
      const at::Tensor sums = ChannelAct<D>::act_backward_reduce_dz(gy, x, r, scale, shift, center, gr, g, act,
                                                                    act_param);
      const auto [alpha, beta] = coef(sums);
      ChannelAct<D>::dz_backward_apply(gr, x, scale, center, alpha, beta, gx, g);
      return;
    }
  }
  const at::Tensor sums = ChannelAct<D>::act_backward_reduce(gy, x, r, scale, shift, center, g, act, act_param);
  const auto [alpha, beta] = coef(sums);
  ChannelAct<D>::act_backward_apply(gy, x, r, scale, shift, center, alpha, beta, gx, gr, g, act, act_param);
}

}  // namespace fastcnn
