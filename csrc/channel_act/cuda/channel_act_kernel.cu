// CUDA implementation of the per-channel affine + activation primitives and of the fused
// BatchNorm + activation passes (see csrc/channel_act/channel_act.h).
//
// Kernels:
//   * elementwise passes (act_forward_kernel, act_backward_apply_kernel): grid-stride loops
//     over 16-byte packs (4 fp32 or 8 fp16/bf16 values) when the layout and alignment allow,
//     grid sized from the SM count;
//   * reductions (reduce_plane_kernel for I > 1, reduce_rows_kernel for I == 1): per-slot
//     partial sums of a pair of values, split across blocks so that the grid fills the GPU,
//     written as fp32 partials [splits, P];
//   * the finalize of each reduction, with an epilogue: combines the partials in fp64 and
//     computes everything per slot that follows from the sums -- the moments, BatchNorm's
//     coefficients, the running-statistics update, the backward's alpha, beta and parameter
//     gradients -- so that no chain of small ATen ops runs between passes. Up to kFoldSlots
//     (2048) slots it runs in the reduction's own launch, in its last block to finish
//     (finalize_if_last: the threadFenceReduction pattern, a self-resetting per-stream ticket
//     counter, see launch_ticket); above, in a finalize kernel of its own (finalize_kernel).
// All math in fp32 (fp64 for the combine, in an order fixed by the shape: the same bits run
// to run); every launch on the current stream and checked.
//
// BatchNorm's coefficients (scale = weight / sqrt(var + eps), shift = bias - mean * scale) are
// computed by one device function, bn_coef_of, in explicitly rounded fp32 intrinsics: every
// kernel that computes them (the forward's finalize, the backward's reduction and finalize,
// the rebuild's prologue) gets the same bits from the same fp32 mean and var, so a rebuilt
// activation equals the forward's bit for bit.
//
// Launches per op (CUDA, B == 1 BatchNorm geometry, C <= 2048 channels -- one more above,
// the separate finalize; a layout or dtype conversion of an input, when one is needed, adds
// its copy):
//   bn_forward   (bn_act_forward; the bn_act layer in training, running statistics included)
//                2: statistics (its last block: mean, var, scale/shift, running stats), apply
//   bn_backward  (bn_act_backward)   2: dz sums (its last block: alpha, beta, grad_weight,
//                grad_bias, scale/shift), apply
//   bn_apply     (bn_act_apply: a rebuilt activation; the bn_act layer in eval)
//                1: the apply kernel computes the coefficients from the saved statistics in a
//                shared-memory prologue (2 -- a coefficient kernel, then the apply -- above
//                kCoefSmemSlots = 2048 channels)
//   slot_mean_var 1, act_backward_reduce 1 (2 each above 2048 slots), act_forward 1,
//   act_backward_apply 1.
// Only while a stream captures a CUDA graph does a reduction add a memset (its own zeroed
// ticket counter, a memset node in the graph).
// Against eager BatchNorm2d + ReLU (by reading ATen, not yet measured): cuDNN (fp32, fp16
// with fp32 parameters) is one BN kernel each way, so ReLU (1) + threshold_backward (1) make
// 4; ATen's own BN (bf16) about 3 forward and 2-3 backward, so 7-8. Fused: 4. Both sides add
// num_batches_tracked's add. tests/test_cuda_bn_act_launches.py counts them on a GPU.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "channel_act/channel_act.h"

namespace fastcnn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// rebuild (bn_apply): channels whose coefficients its prologue keeps in shared memory (16 KiB:
// four 256-thread blocks still fit an sm_75 SM's 64 KiB)
constexpr int64_t kCoefSmemSlots = 2048;

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<float>(pk.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// sum of a and b over the block (any multiple of 32 threads); result valid in thread 0
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[32], sb[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarp ? sa[lane] : 0.f;
    b = lane < nwarp ? sb[lane] : 0.f;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

struct Dims {
  int64_t B, O, G, I;
};

// slot of flat element e
__device__ __forceinline__ int64_t slot_of(int64_t e, const Dims& d) {
  if (d.I > 1) return (e / (d.O * d.G * d.I)) * d.G + (e / d.I) % d.G;
  return (e / (d.O * d.G)) * d.G + e % d.G;
}

// the first element of slot s (the pilot of the shifted sums); 0 for an empty slot
template <typename T>
__device__ __forceinline__ float slot_pilot(const T* x, const Dims& d, int64_t s) {
  if (d.O * d.I == 0) return 0.f;
  return static_cast<float>(x[((s / d.G) * d.O * d.G + s % d.G) * d.I]);
}

// ------------------------------------------------------------------ BatchNorm parameters
// A per-channel vector of any floating dtype and stride (BN weight and bias, running
// statistics, parameter gradients), read and written as fp32: the kernels take the module's
// own tensors, no casts or copies.
struct ParamVec {
  void* p = nullptr;
  int64_t stride = 1;
  int kind = 0;  // 0 fp32, 1 fp16, 2 bf16, 3 fp64
  __device__ float get(int64_t i) const {
    const int64_t j = i * stride;
    switch (kind) {
      case 1: return static_cast<float>(static_cast<const c10::Half*>(p)[j]);
      case 2: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[j]);
      case 3: return static_cast<float>(static_cast<const double*>(p)[j]);
      default: return static_cast<const float*>(p)[j];
    }
  }
  __device__ void set(int64_t i, float v) const {
    const int64_t j = i * stride;
    switch (kind) {
      case 1: static_cast<c10::Half*>(p)[j] = c10::Half(v); break;
      case 2: static_cast<c10::BFloat16*>(p)[j] = c10::BFloat16(v); break;
      case 3: static_cast<double*>(p)[j] = static_cast<double>(v); break;
      default: static_cast<float*>(p)[j] = v;
    }
  }
};

ParamVec param_vec(const at::Tensor& t, const char* name) {
  int kind;
  switch (t.scalar_type()) {
    case at::kFloat: kind = 0; break;
    case at::kHalf: kind = 1; break;
    case at::kBFloat16: kind = 2; break;
    case at::kDouble: kind = 3; break;
    default: TORCH_CHECK_TYPE(false, "fastcnn: ", name, " must be float32, float16, bfloat16 or float64, got ",
                              t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.is_cuda() && t.dim() == 1, "fastcnn: ", name, " must be a 1-D CUDA tensor");
  return {t.data_ptr(), t.stride(0), kind};
}

struct Coef {
  float invstd, scale, shift;
};

// BatchNorm's coefficients, identical bits wherever computed (explicitly rounded intrinsics:
// no contraction into FMA, no fast-math approximation)
__device__ __forceinline__ Coef bn_coef_of(float w, float b, float mean, float var, float eps) {
  const float invstd = __frsqrt_rn(__fadd_rn(var, eps));
  const float scale = __fmul_rn(w, invstd);
  return {invstd, scale, __fmaf_rn(-mean, scale, b)};
}

// weight, bias and the fp32 statistics of the slots (B == 1: slot = channel)
struct BnSrc {
  ParamVec w, b;
  const float* mean = nullptr;
  const float* var = nullptr;
  float eps = 0.f;
  __device__ Coef at(int64_t s) const { return bn_coef_of(w.get(s), b.get(s), mean[s], var[s], eps); }
};

BnSrc bn_src(const BnParams& bn, const at::Tensor& mean, const at::Tensor& var) {
  return {param_vec(bn.weight, "bn weight"), param_vec(bn.bias, "bn bias"),
          mean.defined() ? mean.const_data_ptr<float>() : nullptr,
          var.defined() ? var.const_data_ptr<float>() : nullptr, static_cast<float>(bn.eps)};
}

// ------------------------------------------------------------------ elementwise passes
// scale/shift per slot from global arrays, or (scale == nullptr) computed by the block's
// prologue from `bn` into dynamic shared memory (P * sizeof(float2) bytes)
template <typename T, int ACT, bool RES, int V>
__global__ void act_forward_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                                   const float* __restrict__ scale, const float* __restrict__ shift, BnSrc bn,
                                   Dims d, int64_t n, float p) {
  extern __shared__ float2 coef_sh[];
  const bool from_bn = scale == nullptr;  // uniform over the grid
  if (from_bn) {
    for (int64_t s = threadIdx.x; s < d.B * d.G; s += blockDim.x) {
      const Coef k = bn.at(s);
      coef_sh[s] = make_float2(k.scale, k.shift);
    }
    __syncthreads();
  }
  const int64_t nvec = n / V;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < nvec; v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = v * V;
    const int64_t s0 = slot_of(e, d);
    float xv[V], rv[V], out[V];
    load_pack<T, V>(x + e, xv);
    if (RES) load_pack<T, V>(r + e, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t s = d.I > 1 ? s0 : s0 + k;  // a pack never straddles slots (I > 1) or rows
      float sc, sh;
      if (from_bn) {
        const float2 c = coef_sh[s];
        sc = c.x;
        sh = c.y;
      } else {
        sc = __ldg(scale + s);
        sh = __ldg(shift + s);
      }
      float z = fmaf(xv[k], sc, sh);
      if (RES) z += rv[k];
      out[k] = apply_act<ACT>(z, p);
    }
    store_pack<T, V>(y + e, out);
  }
}

template <typename T, int ACT, bool RES, int V>
__global__ void act_backward_apply_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                                          const T* __restrict__ r, const float* __restrict__ scale,
                                          const float* __restrict__ shift, const float* __restrict__ center,
                                          const float* __restrict__ alpha, const float* __restrict__ beta,
                                          T* __restrict__ gx, T* __restrict__ gr, Dims d, int64_t n, float p) {
  const int64_t nvec = n / V;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < nvec; v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = v * V;
    const int64_t s0 = slot_of(e, d);
    float xv[V], gv[V], rv[V], gxo[V], dzo[V];
    load_pack<T, V>(x + e, xv);
    load_pack<T, V>(gy + e, gv);
    if (RES) load_pack<T, V>(r + e, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t s = d.I > 1 ? s0 : s0 + k;
      const float sc = __ldg(scale + s);
      float z = fmaf(xv[k], sc, __ldg(shift + s));
      if (RES) z += rv[k];
      const float dz = grad_through_act<ACT>(gv[k], z, p);
      dzo[k] = dz;
      gxo[k] = fmaf(sc, dz, fmaf(__ldg(alpha + s), xv[k] - __ldg(center + s), __ldg(beta + s)));
    }
    store_pack<T, V>(gx + e, gxo);
    if (gr != nullptr) store_pack<T, V>(gr + e, dzo);
  }
}

// (scale, shift) of BatchNorm into coef [2, P] (the rebuild above kCoefSmemSlots channels)
__global__ void bn_coef_kernel(BnSrc bn, int64_t P, float* __restrict__ coef) {
  for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < P; s += (int64_t)gridDim.x * blockDim.x) {
    const Coef k = bn.at(s);
    coef[s] = k.scale;
    coef[P + s] = k.shift;
  }
}

// ------------------------------------------------------------------ finalize
// partials [splits, P] -> fp64 sums per slot, handed to the epilogue. Above kFoldSlots slots,
// its own launch (a grid of blocks, one slot per thread, the rows in order).
template <typename Epi>
__global__ void finalize_kernel(const float2* __restrict__ partial, int splits, int64_t P, Epi epi) {
  for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < P; s += (int64_t)gridDim.x * blockDim.x) {
    double a = 0.0, b = 0.0;
    for (int k = 0; k < splits; ++k) {
      const float2 t = partial[(int64_t)k * P + s];
      a += t.x;
      b += t.y;
    }
    epi(s, a, b);
  }
}

// The same, by one block (the reduction's last, below): all P slots, blockDim.x / J at a time
// (the loop over slots when P exceeds that). J lanes per slot (a power of two, 1..32: as many
// as the rows and the block allow, so that a few slots with many rows still use the whole
// block) sum the rows j, j + J, ... in order in fp64, then combine by an xor butterfly. The
// order is a function of (P, splits, blockDim.x) only: the sums are the same bits run to run.
// The loop's trip count is uniform over the block and every lane of a warp takes part in the
// shuffles (blockDim.x: a multiple of 32). Partials read through L2 (__ldcg), where the other
// blocks' fenced writes are, never through a possibly stale L1 line.
template <typename Epi>
__device__ __forceinline__ void finalize_block(const float2* partial, int splits, int64_t P, const Epi& epi) {
  int J = 1;
  while (J < 32 && 2 * J <= splits && 2 * J * P <= (int64_t)blockDim.x) J *= 2;
  const int lane = threadIdx.x & (J - 1);
  const int64_t per_round = blockDim.x / J, off = threadIdx.x / J;
  for (int64_t s0 = 0; s0 < P; s0 += per_round) {
    const int64_t s = s0 + off;
    double a = 0.0, b = 0.0;
    if (s < P) {
#pragma unroll 4
      for (int k = lane; k < splits; k += J) {
        const float2 t = __ldcg(partial + (int64_t)k * P + s);
        a += t.x;
        b += t.y;
      }
    }
    for (int o = J / 2; o > 0; o >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, o);
      b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if (lane == 0 && s < P) epi(s, a, b);
  }
}

// The last-block finalize (the CUDA programming guide's threadFenceReduction pattern), called
// by every thread of every block after the block's partial writes, in uniform control flow:
//   1. each thread fences its own partial writes (visible device-wide before the ticket);
//   2. barrier: the whole block has written and fenced;
//   3. thread 0 draws a ticket: atomicInc(ticket, blocks - 1) returns blocks - 1 to exactly
//      one block, the last to arrive, and wraps the counter back to 0 for it -- so the counter
//      is 0 again when the launch ends (the next launch on the stream, and a CUDA-graph
//      replay, start from 0: no reset store, no memset);
//   4. the flag goes through shared memory and a barrier to the whole block, which leaves or
//      finalizes as one (no barrier inside finalize_block);
//   5. the last block fences (acquire: every other block's partials, ordered before its
//      ticket, are now visible) and reads all partials through L2.
// The ticket counter must not be shared with a concurrently running launch: see
// launch_ticket.
template <typename Epi>
__device__ __forceinline__ void finalize_if_last(const float2* partial, int splits, int64_t P, const Epi& epi,
                                                 unsigned int* ticket) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
    last = atomicInc(ticket, blocks - 1) == blocks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  finalize_block(partial, splits, P, epi);
}

// ------------------------------------------------------------------ reductions
// A reduction functor: per-slot parameters loaded once, then a pair of values per element.
template <typename T>
struct MomentsOp {  // (x - K, (x - K)^2), K = the slot's first element
  const T* x;
  Dims d;
  struct P { float k; };
  __device__ P load(int64_t s) const { return {slot_pilot(x, d, s)}; }
  __device__ void pair(const P& q, float xv, float, float, float& a, float& b) const {
    const float t = xv - q.k;
    a += t;
    b += t * t;
  }
};

// (dz, dz * (x - center)), dz = gy * act'(x * scale + shift (+ r)); the per-slot scale, shift
// and center from arrays, or (scale == nullptr) BatchNorm's coefficients and mean from `bn`
template <int ACT, bool RES>
struct DzOp {
  const float *scale, *shift, *center;
  BnSrc bn;
  float p;
  struct P { float s, t, c; };
  __device__ P load(int64_t s) const {
    if (scale == nullptr) {
      const Coef k = bn.at(s);
      return {k.scale, k.shift, bn.mean[s]};
    }
    return {__ldg(scale + s), __ldg(shift + s), __ldg(center + s)};
  }
  __device__ void pair(const P& q, float xv, float gv, float rv, float& a, float& b) const {
    float z = fmaf(xv, q.s, q.t);
    if (RES) z += rv;
    const float dz = grad_through_act<ACT>(gv, z, p);
    a += dz;
    b += dz * (xv - q.c);
  }
};

// I > 1: block (slot, split) sums its share of the slot's O runs of I elements.
template <typename T, int V, typename Op, typename Epi>
__global__ void reduce_plane_kernel(const T* __restrict__ x, const T* __restrict__ gy, const T* __restrict__ r,
                                    Op op, Dims d, int splits, float2* __restrict__ partial, Epi epi,
                                    unsigned int* ticket) {
  const int64_t s = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t b = s / d.G, g = s % d.G;
  const auto q = op.load(s);
  const int64_t o0 = d.O * split / splits, o1 = d.O * (split + 1) / splits;
  const int64_t per = d.I / V;
  float a = 0.f, c = 0.f;
  for (int64_t w = threadIdx.x; w < (o1 - o0) * per; w += blockDim.x) {
    const int64_t o = o0 + w / per, i = (w % per) * V;
    const int64_t e = ((b * d.O + o) * d.G + g) * d.I + i;
    float xv[V], gv[V], rv[V];
    load_pack<T, V>(x + e, xv);
    if (gy) load_pack<T, V>(gy + e, gv);
    if (r) load_pack<T, V>(r + e, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) op.pair(q, xv[k], gy ? gv[k] : 0.f, r ? rv[k] : 0.f, a, c);
  }
  block_sum2(a, c);
  if (threadIdx.x == 0) partial[(int64_t)split * d.B * d.G + s] = make_float2(a, c);
  if (ticket != nullptr) finalize_if_last(partial, splits, d.B * d.G, epi, ticket);  // uniform
}

// I == 1: rows of G slots (channels_last). The block's 256 threads cover a tile of L * V
// slots of each row: lane l of a warp reads the V slots of pack column l % L in row l / L, so
// a warp reads 32 / L rows at once and every lane loads even when G is small (G = 16 fp32:
// L = 4, eight rows per warp). The rows stride by 256 / L; the L-lane groups of a warp
// combine by shuffle, the warps through shared memory.
constexpr int kRowThreads = 256;
template <typename T, int V, typename Op, typename Epi>
__global__ void __launch_bounds__(kRowThreads)
    reduce_rows_kernel(const T* __restrict__ x, const T* __restrict__ gy, const T* __restrict__ r, Op op,
                       Dims d, int L, int splits, float2* __restrict__ partial, Epi epi, unsigned int* ticket) {
  constexpr int kWarps = kRowThreads / 32;
  __shared__ float2 sh[kWarps][32 * V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = lane & (L - 1);  // L: a power of two, 1..32
  const int64_t g0 = ((int64_t)blockIdx.x * L + col) * V;
  const int split = blockIdx.y;
  const int64_t b = blockIdx.z;
  const bool active = g0 < d.G;  // G % V == 0: the whole pack is in the row
  const int64_t o0 = d.O * split / splits, o1 = d.O * (split + 1) / splits;
  float a[V], c[V];
  typename Op::P q[V] = {};
#pragma unroll
  for (int k = 0; k < V; ++k) {
    a[k] = 0.f;
    c[k] = 0.f;
    if (active) q[k] = op.load(b * d.G + g0 + k);
  }
  if (active) {
    for (int64_t o = o0 + threadIdx.x / L; o < o1; o += kRowThreads / L) {
      const int64_t e = (b * d.O + o) * d.G + g0;
      float xv[V], gv[V], rv[V];
      load_pack<T, V>(x + e, xv);
      if (gy) load_pack<T, V>(gy + e, gv);
      if (r) load_pack<T, V>(r + e, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) op.pair(q[k], xv[k], gy ? gv[k] : 0.f, r ? rv[k] : 0.f, a[k], c[k]);
    }
  }
  // lanes of one column differ in the bits >= L of the lane index (all lanes take part)
  for (int off = 16; off >= L; off >>= 1) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a[k] += __shfl_xor_sync(0xffffffffu, a[k], off);
      c[k] += __shfl_xor_sync(0xffffffffu, c[k], off);
    }
  }
  if (lane < L) {
#pragma unroll
    for (int k = 0; k < V; ++k) sh[warp][lane * V + k] = make_float2(a[k], c[k]);
  }
  __syncthreads();
  // L * V <= 32 * V <= kRowThreads entries: one per thread
  const int t = threadIdx.x;
  const int64_t gs = (int64_t)blockIdx.x * L * V + t;
  if (t < L * V && gs < d.G) {
    float2 sum = sh[0][t];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      sum.x += sh[w][t].x;
      sum.y += sh[w][t].y;
    }
    partial[(int64_t)split * d.B * d.G + b * d.G + gs] = sum;
  }
  if (ticket != nullptr) finalize_if_last(partial, splits, d.B * d.G, epi, ticket);  // uniform
}

// ------------------------------------------------------------------ epilogues
// What the finalize computes per slot from the fp64 sums (a, b). One epilogue type per
// reduction functor, whatever the op (a null pointer selects the op's work at run time,
// uniformly), so each reduction kernel is instantiated once. Every load first, then the math,
// then the stores: the loads of a slot are issued together (the last block's finalize is a
// serial tail of the reduction launch).

// the shifted sums of MomentsOp -> mean and biased variance, fp32 as stored
__device__ __forceinline__ void moments_of(float pilot, double a, double b, double count, float& mean, float& var) {
  const double m = a / count;
  mean = static_cast<float>(static_cast<double>(pilot) + m);
  const double v = b / count - m * m;  // not fmax: it would turn a NaN variance into 0 (CPU and eager keep NaN)
  var = static_cast<float>(v < 0.0 ? 0.0 : v);
}

// MomentsOp's sums -> mean and biased variance (slot_mean_var); with scale != nullptr
// (bn_forward) also BatchNorm's coefficients and, with run_mean.p != nullptr, the running
// statistics
template <typename T>
struct StatsEpi {
  const T* x;
  Dims d;
  double count;
  float *mean, *var;
  BnSrc bn;  // weight, bias, eps (its mean/var: the outputs above)
  float *scale, *shift;
  ParamVec run_mean, run_var;
  float momentum, unbias;
  __device__ void operator()(int64_t s, double a, double b) const {
    const float pilot = slot_pilot(x, d, s);
    const bool coef = scale != nullptr, update = coef && run_mean.p != nullptr;
    const float w = coef ? bn.w.get(s) : 0.f, bb = coef ? bn.b.get(s) : 0.f;
    const float rm = update ? run_mean.get(s) : 0.f, rv = update ? run_var.get(s) : 0.f;
    float m, v;
    moments_of(pilot, a, b, count, m, v);
    mean[s] = m;
    var[s] = v;
    if (coef) {
      const Coef k = bn_coef_of(w, bb, m, v, bn.eps);  // as BnSrc::at on the stored m, v
      scale[s] = k.scale;
      shift[s] = k.shift;
    }
    if (update) {  // nn.BatchNorm2d: running += momentum * (batch - running), var unbiased
      run_mean.set(s, rm + momentum * (m - rm));
      run_var.set(s, rv + momentum * (v * unbias - rv));
    }
  }
};

// DzOp's sums (dz, dz * (x - center)) -> the sums themselves into alpha and beta
// (act_backward_reduce, scale == nullptr); or (bn_backward) the apply's coefficients
// scale/shift/alpha/beta and the parameter gradients in their own dtype
struct DzEpi {
  float *scale, *shift, *alpha, *beta;
  BnSrc bn;
  double count;
  ParamVec grad_w, grad_b;
  __device__ void operator()(int64_t s, double a, double b) const {
    if (scale == nullptr) {
      alpha[s] = static_cast<float>(a);
      beta[s] = static_cast<float>(b);
      return;
    }
    const Coef k = bn.at(s);
    const double sc = k.scale, is = k.invstd;
    scale[s] = k.scale;
    shift[s] = k.shift;
    alpha[s] = static_cast<float>(-sc * is * is * b / count);
    beta[s] = static_cast<float>(-sc * a / count);
    grad_w.set(s, static_cast<float>(b * is));
    grad_b.set(s, static_cast<float>(a));
  }
};

template <typename T>
constexpr int pack_width() { return 16 / sizeof(T); }

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// whether packs of V elements stay within one slot run (I > 1) or one row (I == 1)
bool packable(const Dims& d, int V) { return (d.I > 1 ? d.I : d.G) % V == 0; }

int grid_for(int64_t work, int per_sm) {
  const int64_t want = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, (int64_t)sm_count() * per_sm)));
}

template <typename F>
void bool_dispatch(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// f(act_c, res_c, v_c): the activation, whether there is a residual and the pack width
// (pack_width<T>() when vec, else 1) as compile-time constants (::value)
template <typename T, typename F>
void dispatch_elementwise(Act act, bool res, bool vec, F&& f) {
  FASTCNN_DISPATCH_ACT(act, [&] {
    bool_dispatch(res, [&](auto res_c) {
      bool_dispatch(vec, [&](auto v_c) {
        f(std::integral_constant<int, ACT>{}, res_c,
          std::integral_constant<int, decltype(v_c)::value ? pack_width<T>() : 1>{});
      });
    });
  });
}

Dims dims(const Geom& g) { return {g.B, g.O, g.G, g.I}; }

// ------------------------------------------------------------------ tickets
// The counter a folded reduction's blocks draw their tickets from (finalize_if_last). It is 0
// before and after every launch (the last ticket wraps it), so it needs no reset or memset per
// call: one persistent, zero-initialised counter per (device, stream), owned by the extension
// and never freed (4 bytes per stream that ever ran a reduction; slots handed out of 1 KiB
// cudaMalloc slabs, outside PyTorch's allocator and its statistics).
//
// Why one counter per stream is safe: a launch uses its counter from its first block's ticket
// to its last block's, i.e. while it runs, and kernels on one stream run one after another --
// so no two launches share a counter at once. (Not so if a kernel were launched on one stream
// with programmatic dependent launch or by another process on the same handle: neither
// happens here.) cudaStreamPerThread names a different stream on each host thread: keyed by
// the thread as well.
//
// CUDA graphs: a launch captured into a graph must not use the capture stream's counter --
// replays of two graphs captured on one stream may run concurrently on different streams, and
// a replay concurrently with eager work on the capture stream. While the stream captures, each
// launch gets its own counter instead: an int from PyTorch's allocator (the graph's private
// pool, freed with the graph), zeroed by a cudaMemsetAsync that the capture records as a
// memset node before the kernel. Every replay zeroes it again, and the kernel leaves it at 0.
// No cudaMalloc or synchronisation happens while capturing. (A stream destroyed with work
// still queued and a new one created at once under the same handle would share a counter
// with that work; PyTorch's pooled streams are never destroyed.)
constexpr int kTicketSlab = 256;

class TicketRegistry {
 public:
  unsigned int* get(const at::cuda::CUDAStream& stream) {
    const cudaStream_t h = stream.stream();
    const Key key{stream.device_index(), reinterpret_cast<uintptr_t>(h),
                  h == cudaStreamPerThread ? std::this_thread::get_id() : std::thread::id()};
    std::lock_guard<std::mutex> lock(mu_);
    auto it = of_stream_.find(key);
    if (it != of_stream_.end()) return it->second;
    Slab& slab = slabs_[stream.device_index()];
    if (slab.p == nullptr || slab.used == kTicketSlab) slab = {new_slab(h), 0};
    unsigned int* t = slab.p + slab.used++;
    of_stream_.emplace(key, t);
    return t;
  }

 private:
  using Key = std::tuple<int, uintptr_t, std::thread::id>;
  struct Slab {
    unsigned int* p = nullptr;
    int used = 0;
  };
  // zeroed before any stream can use a slot of it (the stream synchronised once, here); the
  // caller's stream does not capture; relaxed mode lets cudaMalloc through while another
  // thread captures
  static unsigned int* new_slab(cudaStream_t h) {
    c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    void* p = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&p, kTicketSlab * sizeof(unsigned int)));
    C10_CUDA_CHECK(cudaMemsetAsync(p, 0, kTicketSlab * sizeof(unsigned int), h));
    C10_CUDA_CHECK(cudaStreamSynchronize(h));
    return static_cast<unsigned int*>(p);
  }
  std::mutex mu_;
  std::map<Key, unsigned int*> of_stream_;
  std::map<int, Slab> slabs_;  // the device's slab slots are handed out of (full ones stay in use)
};

// The ticket counter for a launch on the current stream (whose device is the current one);
// `keep` holds a captured launch's own counter until the launch is enqueued.
unsigned int* launch_ticket(const at::Tensor& like, at::Tensor& keep) {
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus status;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  if (status != cudaStreamCaptureStatusNone) {
    keep = at::empty({1}, like.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(keep.data_ptr<int>(), 0, sizeof(int), stream.stream()));  // captured
    return reinterpret_cast<unsigned int*>(keep.data_ptr<int>());
  }
  static TicketRegistry* registry = new TicketRegistry();  // never destroyed: outlives CUDA teardown
  return registry->get(stream);
}

// Up to kFoldSlots slots the reduction's last block finalizes, in at most kFoldRounds slots per
// thread (the I > 1 reduction's blocks get at least P / kFoldRounds threads then); above, a
// finalize kernel spreads the slots over a grid (the last block's serial tail would cost more
// than the launch).
constexpr int kFoldRounds = 8;
constexpr int64_t kFoldSlots = (int64_t)kThreads * kFoldRounds;  // 2048
static_assert(kRowThreads == kThreads, "the I == 1 reduction's last block: kThreads threads");

// Runs `op` over the slots (P > 0) into fp32 partials [splits, P], then the finalize with
// `epi`: one launch (the last block finalizes) up to kFoldSlots slots, two above.
template <typename T, typename Op, typename Epi>
void reduce_finalize(const at::Tensor& x, const T* xp, const T* gp, const T* rp, Op op, const Geom& geom,
                     const Epi& epi) {
  const Dims d = dims(geom);
  const int64_t P = geom.slots();
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int VW = pack_width<T>();
  const bool vec = packable(d, VW) && aligned16(xp) && aligned16(gp) && aligned16(rp);
  const int64_t target = (int64_t)sm_count() * 4;
  at::Tensor keep;
  unsigned int* ticket = P <= kFoldSlots ? launch_ticket(x, keep) : nullptr;
  int splits = 1;
  at::Tensor buf;
  auto launch = [&](auto v_c) {
    constexpr int V = decltype(v_c)::value ? VW : 1;
    if (d.I > 1) {
      splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(d.O, (target + P - 1) / P)));
      buf = at::empty({splits, P, 2}, x.options().dtype(at::kFloat));
      const int64_t work = (d.O / splits + 1) * d.I / V;
      int64_t want = work;
      if (ticket != nullptr) want = std::max<int64_t>(want, (P + kFoldRounds - 1) / kFoldRounds);
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (want + 31) / 32 * 32)));
      reduce_plane_kernel<T, V, Op, Epi><<<dim3(P, splits), threads, 0, stream>>>(
          xp, gp, rp, op, d, splits, reinterpret_cast<float2*>(buf.data_ptr<float>()), epi, ticket);
    } else {
      // L lanes per row tile: the pack columns of a row, rounded up to a power of two, at most 32
      const int64_t cols = (d.G + V - 1) / V;
      int L = 1;
      while (L < 32 && L < cols) L *= 2;
      const int64_t gtiles = (cols + L - 1) / L, rows_per_block = kRowThreads / L;
      splits = static_cast<int>(std::max<int64_t>(
          1, std::min<int64_t>((d.O + rows_per_block - 1) / rows_per_block,
                               (target + gtiles * d.B - 1) / (gtiles * d.B))));
      // d.B > 1 only for per-sample slots (the SE block's squeeze, channels_last): the grid's z
      TORCH_CHECK_VALUE(d.B <= 65535, "fastcnn: the channels_last per-sample reduction (SE block) takes at most "
                        "65535 samples per call on CUDA, got ", d.B, "; split the batch");
      buf = at::empty({splits, P, 2}, x.options().dtype(at::kFloat));
      reduce_rows_kernel<T, V, Op, Epi><<<dim3(gtiles, splits, d.B), kRowThreads, 0, stream>>>(
          xp, gp, rp, op, d, L, splits, reinterpret_cast<float2*>(buf.data_ptr<float>()), epi, ticket);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  bool_dispatch(vec, launch);
  if (ticket == nullptr) {
    const int blocks = static_cast<int>(std::min<int64_t>((P + kThreads - 1) / kThreads, 1024));
    finalize_kernel<Epi><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const float2*>(buf.const_data_ptr<float>()),
                                                          splits, P, epi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

const float* fptr(const at::Tensor& t) { return t.const_data_ptr<float>(); }

// y = act(x * scale + shift (+ r)): scale/shift arrays, or (scale == nullptr) BatchNorm's
// coefficients from `bn`, computed in shared memory (P <= kCoefSmemSlots). One launch.
template <typename T>
void launch_act_forward(const T* xp, const T* rp, T* yp, const float* scale, const float* shift, const BnSrc& bn,
                        const Geom& g, int64_t n, Act act, float act_param) {
  if (n == 0) return;
  constexpr int VW = pack_width<T>();
  const Dims d = dims(g);
  const bool vec = packable(d, VW) && aligned16(xp) && aligned16(rp) && aligned16(yp);
  const size_t smem = scale == nullptr ? static_cast<size_t>(g.slots()) * sizeof(float2) : 0;
  dispatch_elementwise<T>(act, rp != nullptr, vec, [&](auto act_c, auto res_c, auto v_c) {
    constexpr int V = decltype(v_c)::value;
    act_forward_kernel<T, decltype(act_c)::value, decltype(res_c)::value, V>
        <<<grid_for(n / V, 8), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(xp, rp, yp, scale, shift, bn, d,
                                                                                   n, act_param);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_act_backward_apply(const T* gp, const T* xp, const T* rp, const float* scale, const float* shift,
                               const float* center, const float* alpha, const float* beta, T* gxp, T* grp,
                               const Geom& g, int64_t n, Act act, float act_param) {
  if (n == 0) return;
  constexpr int VW = pack_width<T>();
  const Dims d = dims(g);
  const bool vec = packable(d, VW) && aligned16(xp) && aligned16(gp) && aligned16(rp) && aligned16(gxp) &&
                   aligned16(grp);
  dispatch_elementwise<T>(act, rp != nullptr, vec, [&](auto act_c, auto res_c, auto v_c) {
    constexpr int V = decltype(v_c)::value;
    act_backward_apply_kernel<T, decltype(act_c)::value, decltype(res_c)::value, V>
        <<<grid_for(n / V, 8), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(gp, xp, rp, scale, shift, center,
                                                                                alpha, beta, gxp, grp, d, n,
                                                                                act_param);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* opt_mut_ptr(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// the sums (dz, dz * (x - center)) of DzOp (P > 0), finalized by `epi`: reduce_finalize's launches
template <typename T>
void dz_reduce(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r, const float* scale,
               const float* shift, const float* center, const BnSrc& bn, const Geom& g, Act act, float act_param,
               const DzEpi& epi) {
  FASTCNN_DISPATCH_ACT(act, [&] {
    bool_dispatch(r.defined(), [&](auto res_c) {
      constexpr bool RES = decltype(res_c)::value;
      reduce_finalize<T>(x, x.const_data_ptr<T>(), gy.const_data_ptr<T>(), opt_ptr<T>(r),
                         DzOp<ACT, RES>{scale, shift, center, bn, act_param}, g, epi);
    });
  });
}

void check_bn_geom(const Geom& g) {
  TORCH_CHECK(g.B == 1, "fastcnn: the BatchNorm kernels take the per-channel geometry (B == 1), got B = ", g.B);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> slot_mean_var(const at::Tensor& x, Geom g) {
  const int64_t P = g.slots();
  at::Tensor mean = at::empty({P}, x.options().dtype(at::kFloat)), var = at::empty({P}, x.options().dtype(at::kFloat));
  if (P == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_slot_mean_var_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Dims d = dims(g);
    StatsEpi<scalar_t> epi{};
    epi.x = xp;
    epi.d = d;
    epi.count = static_cast<double>(g.per_slot());
    epi.mean = mean.data_ptr<float>();
    epi.var = var.data_ptr<float>();  // scale == nullptr: the statistics only
    reduce_finalize<scalar_t>(x, xp, nullptr, nullptr, MomentsOp<scalar_t>{xp, d}, g, epi);
  });
  return {mean, var};
}

void act_forward(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& shift, Geom g, Act act, float act_param) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_forward_cuda", [&] {
    launch_act_forward<scalar_t>(x.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(r), y.data_ptr<scalar_t>(),
                                 fptr(scale), fptr(shift), BnSrc{}, g, x.numel(), act, act_param);
  });
}

at::Tensor act_backward_reduce(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& center, Geom g, Act act, float act_param) {
  const int64_t P = g.slots();
  at::Tensor out = at::empty({2, P}, x.options().dtype(at::kFloat));
  if (P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_backward_reduce_cuda", [&] {
    DzEpi epi{};  // scale == nullptr: the sums themselves, into alpha and beta
    epi.alpha = out.data_ptr<float>();
    epi.beta = out.data_ptr<float>() + P;
    dz_reduce<scalar_t>(gy, x, r, fptr(scale), fptr(shift), fptr(center), BnSrc{}, g, act, act_param, epi);
  });
  return out;
}

void act_backward_apply(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                        const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& center,
                        const at::Tensor& alpha, const at::Tensor& beta, at::Tensor& gx, at::Tensor& gr,
                        Geom g, Act act, float act_param) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_backward_apply_cuda", [&] {
    launch_act_backward_apply<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        opt_ptr<scalar_t>(r), fptr(scale), fptr(shift), fptr(center), fptr(alpha),
                                        fptr(beta), gx.data_ptr<scalar_t>(), opt_mut_ptr<scalar_t>(gr), g,
                                        x.numel(), act, act_param);
  });
}

void bn_forward(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const BnParams& bn, at::Tensor& mean,
                at::Tensor& var, const BnRunning& running, Geom g, Act act, float act_param) {
  check_bn_geom(g);
  const int64_t P = g.slots();
  if (P == 0) return;
  const bool update = running.mean.defined() && running.var.defined() && running.momentum != 0.0;
  const double count = static_cast<double>(g.per_slot());
  at::Tensor coef = at::empty({2, P}, x.options().dtype(at::kFloat));  // scale, shift
  float* cp = coef.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_bn_forward_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Dims d = dims(g);
    StatsEpi<scalar_t> epi{};
    epi.x = xp;
    epi.d = d;
    epi.count = count;
    epi.mean = mean.data_ptr<float>();
    epi.var = var.data_ptr<float>();
    epi.bn = bn_src(bn, at::Tensor(), at::Tensor());
    epi.scale = cp;
    epi.shift = cp + P;
    if (update) {  // run_mean.p == nullptr: no update
      epi.run_mean = param_vec(running.mean, "running_mean");
      epi.run_var = param_vec(running.var, "running_var");
    }
    epi.momentum = static_cast<float>(running.momentum);
    epi.unbias = static_cast<float>(count / (count - 1.0));
    reduce_finalize<scalar_t>(x, xp, nullptr, nullptr, MomentsOp<scalar_t>{xp, d}, g, epi);
    launch_act_forward<scalar_t>(xp, opt_ptr<scalar_t>(r), y.data_ptr<scalar_t>(), cp, cp + P, BnSrc{}, g,
                                 x.numel(), act, act_param);
  });
}

void bn_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r, const BnParams& bn,
                 const at::Tensor& mean, const at::Tensor& var, at::Tensor& gx, at::Tensor& gr,
                 at::Tensor& grad_weight, at::Tensor& grad_bias, Geom g, Act act, float act_param) {
  check_bn_geom(g);
  const int64_t P = g.slots();
  if (P == 0) return;
  at::Tensor coef = at::empty({4, P}, x.options().dtype(at::kFloat));  // scale, shift, alpha, beta
  float* cp = coef.data_ptr<float>();
  const BnSrc src = bn_src(bn, mean, var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_bn_backward_cuda", [&] {
    const DzEpi epi{cp, cp + P, cp + 2 * P, cp + 3 * P, src, static_cast<double>(g.per_slot()),
                    param_vec(grad_weight, "grad_weight"), param_vec(grad_bias, "grad_bias")};
    dz_reduce<scalar_t>(gy, x, r, nullptr, nullptr, nullptr, src, g, act, act_param, epi);
    launch_act_backward_apply<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        opt_ptr<scalar_t>(r), cp, cp + P, fptr(mean), cp + 2 * P, cp + 3 * P,
                                        gx.data_ptr<scalar_t>(), opt_mut_ptr<scalar_t>(gr), g, x.numel(), act,
                                        act_param);
  });
}

void bn_apply(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const BnParams& bn, const at::Tensor& mean,
              const at::Tensor& var, Geom g, Act act, float act_param) {
  check_bn_geom(g);
  const int64_t P = g.slots(), n = x.numel();
  if (n == 0) return;
  const BnSrc src = bn_src(bn, mean, var);
  at::Tensor coef;
  const float* cp = nullptr;  // null: the apply kernel's prologue computes the coefficients
  if (P > kCoefSmemSlots) {
    coef = at::empty({2, P}, x.options().dtype(at::kFloat));
    bn_coef_kernel<<<grid_for(P, 4), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(src, P, coef.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cp = coef.const_data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_bn_apply_cuda", [&] {
    launch_act_forward<scalar_t>(x.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(r), y.data_ptr<scalar_t>(), cp,
                                 cp == nullptr ? nullptr : cp + P, src, g, n, act, act_param);
  });
}

}  // namespace cuda
}  // namespace fastcnn
