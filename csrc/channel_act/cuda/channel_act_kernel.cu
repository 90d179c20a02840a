// CUDA implementation of the per-channel affine + activation primitives (see
// csrc/channel_act/channel_act.h). Elementwise passes: grid-stride loops over 16-byte packs (4 fp32 or
// 8 fp16/bf16 values) when the layout and alignment allow, grid sized from the SM count.
// Reductions: per-slot partial sums with warp-shuffle block reductions, split across blocks
// so the grid fills the GPU, then one small kernel combining the partials in fp64. All math
// in fp32; every launch on the current stream and checked.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include "channel_act/channel_act.h"

namespace fastcnn {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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

// ------------------------------------------------------------------ elementwise passes
template <typename T, int ACT, bool RES, int V>
__global__ void act_forward_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                                   const float* __restrict__ scale, const float* __restrict__ shift,
                                   Dims d, int64_t n, float p) {
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
      float z = fmaf(xv[k], __ldg(scale + s), __ldg(shift + s));
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
      const float dz = gv[k] * act_grad<ACT>(z, p);
      dzo[k] = dz;
      gxo[k] = fmaf(sc, dz, fmaf(__ldg(alpha + s), xv[k] - __ldg(center + s), __ldg(beta + s)));
    }
    store_pack<T, V>(gx + e, gxo);
    if (gr != nullptr) store_pack<T, V>(gr + e, dzo);
  }
}

// ------------------------------------------------------------------ reductions
// A reduction functor: per-slot parameters loaded once, then a pair of values per element.
template <typename T>
struct MomentsOp {  // (x - K, (x - K)^2), K = the slot's first element
  const T* x;
  Dims d;
  struct P { float k; };
  __device__ P load(int64_t s) const {
    const int64_t b = s / d.G, g = s % d.G;
    return {static_cast<float>(x[(b * d.O * d.G + g) * d.I])};
  }
  __device__ void pair(const P& q, float xv, float, float, float& a, float& b) const {
    const float t = xv - q.k;
    a += t;
    b += t * t;
  }
};

template <int ACT, bool RES>
struct DzOp {  // (dz, dz * (x - center)), dz = gy * act'(x * scale + shift (+ r))
  const float *scale, *shift, *center;
  float p;
  struct P { float s, t, c; };
  __device__ P load(int64_t s) const { return {__ldg(scale + s), __ldg(shift + s), __ldg(center + s)}; }
  __device__ void pair(const P& q, float xv, float gv, float rv, float& a, float& b) const {
    float z = fmaf(xv, q.s, q.t);
    if (RES) z += rv;
    const float dz = gv * act_grad<ACT>(z, p);
    a += dz;
    b += dz * (xv - q.c);
  }
};

// I > 1: block (slot, split) sums its share of the slot's O runs of I elements.
template <typename T, int V, typename Op>
__global__ void reduce_plane_kernel(const T* __restrict__ x, const T* __restrict__ gy, const T* __restrict__ r,
                                    Op op, Dims d, int splits, float2* __restrict__ partial) {
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
}

// I == 1: rows of G slots; threadIdx.x covers V consecutive slots, threadIdx.y strides rows.
constexpr int kRowsY = 8;
template <typename T, int V, typename Op>
__global__ void reduce_rows_kernel(const T* __restrict__ x, const T* __restrict__ gy, const T* __restrict__ r,
                                   Op op, Dims d, int splits, float2* __restrict__ partial) {
  __shared__ float2 sh[kRowsY][32 * V];
  const int64_t g0 = ((int64_t)blockIdx.x * 32 + threadIdx.x) * V;
  const int split = blockIdx.y;
  const int64_t b = blockIdx.z;
  const bool active = g0 < d.G;
  const int64_t o0 = d.O * split / splits, o1 = d.O * (split + 1) / splits;
  float a[V], c[V];
  typename Op::P q[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    a[k] = 0.f;
    c[k] = 0.f;
    if (active) q[k] = op.load(b * d.G + g0 + k);
  }
  if (active) {
    for (int64_t o = o0 + threadIdx.y; o < o1; o += kRowsY) {
      const int64_t e = (b * d.O + o) * d.G + g0;
      float xv[V], gv[V], rv[V];
      load_pack<T, V>(x + e, xv);
      if (gy) load_pack<T, V>(gy + e, gv);
      if (r) load_pack<T, V>(r + e, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) op.pair(q[k], xv[k], gy ? gv[k] : 0.f, r ? rv[k] : 0.f, a[k], c[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) sh[threadIdx.y][threadIdx.x * V + k] = make_float2(a[k], c[k]);
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float2 t = sh[0][threadIdx.x * V + k];
      for (int y = 1; y < kRowsY; ++y) {
        t.x += sh[y][threadIdx.x * V + k].x;
        t.y += sh[y][threadIdx.x * V + k].y;
      }
      partial[(int64_t)split * d.B * d.G + b * d.G + g0 + k] = t;
    }
  }
}

// partials [splits, P] -> fp64 sums; moments: (mean, var) using the pilot K; else the sums
template <typename T>
__global__ void combine_kernel(const float2* __restrict__ partial, int splits, int64_t P, const T* x,
                               Dims d, bool moments, double count, float* __restrict__ out_a,
                               float* __restrict__ out_b) {
  for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < P; s += (int64_t)gridDim.x * blockDim.x) {
    double a = 0.0, b = 0.0;
    for (int k = 0; k < splits; ++k) {
      const float2 t = partial[(int64_t)k * P + s];
      a += t.x;
      b += t.y;
    }
    if (moments) {
      const int64_t bb = s / d.G, g = s % d.G;
      const double kk = static_cast<float>(x[(bb * d.O * d.G + g) * d.I]);
      const double m = a / count;
      out_a[s] = static_cast<float>(kk + m);
      out_b[s] = static_cast<float>(fmax(b / count - m * m, 0.0));
    } else {
      out_a[s] = static_cast<float>(a);
      out_b[s] = static_cast<float>(b);
    }
  }
}

template <typename T>
constexpr int pack_width() { return 16 / sizeof(T); }

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// whether packs of V elements stay within one slot run (I > 1) or one row (I == 1)
bool packable(const Dims& d, int V) { return (d.I > 1 ? d.I : d.G) % V == 0; }

int elementwise_blocks(int64_t work) {
  const int64_t want = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, (int64_t)sm_count() * 8)));
}

template <typename F>
void bool_dispatch(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

Dims dims(const Geom& g) { return {g.B, g.O, g.G, g.I}; }

// Runs `op` over the slots and returns fp32 [2, P]: sums, or (mean, var) when moments.
template <typename T, typename Op>
at::Tensor reduce(const at::Tensor& x, const T* xp, const T* gp, const T* rp, Op op, const Geom& geom,
                  bool moments) {
  const Dims d = dims(geom);
  const int64_t P = geom.slots();
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int VW = pack_width<T>();
  const bool vec = packable(d, VW) && aligned16(xp) && aligned16(gp) && aligned16(rp);
  const int target = sm_count() * 4;
  int splits;
  at::Tensor partial;
  auto launch = [&](auto v_c) {
    constexpr int V = decltype(v_c)::value ? VW : 1;
    if (d.I > 1) {
      splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(d.O, (target + P - 1) / P)));
      partial = at::empty({splits, P, 2}, x.options().dtype(at::kFloat));
      const int64_t work = (d.O / splits + 1) * d.I / V;
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (work + 31) / 32 * 32)));
      reduce_plane_kernel<T, V, Op><<<dim3(P, splits), threads, 0, stream>>>(
          xp, gp, rp, op, d, splits, reinterpret_cast<float2*>(partial.data_ptr<float>()));
    } else {
      const int64_t gtiles = (d.G + 32 * V - 1) / (32 * V);
      splits = static_cast<int>(std::max<int64_t>(
          1, std::min<int64_t>((d.O + kRowsY - 1) / kRowsY, (target + gtiles * d.B - 1) / (gtiles * d.B))));
      partial = at::empty({splits, P, 2}, x.options().dtype(at::kFloat));
      reduce_rows_kernel<T, V, Op><<<dim3(gtiles, splits, d.B), dim3(32, kRowsY), 0, stream>>>(
          xp, gp, rp, op, d, splits, reinterpret_cast<float2*>(partial.data_ptr<float>()));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  bool_dispatch(vec, launch);
  auto out = at::empty({2, P}, x.options().dtype(at::kFloat));
  const int blocks = static_cast<int>(std::min<int64_t>((P + kThreads - 1) / kThreads, 1024));
  combine_kernel<T><<<blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const float2*>(partial.data_ptr<float>()), splits, P, xp, d, moments,
      static_cast<double>(geom.per_slot()), out.data_ptr<float>(), out.data_ptr<float>() + P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

const float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> slot_mean_var(const at::Tensor& x, Geom g) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_slot_mean_var_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    out = reduce<scalar_t>(x, xp, nullptr, nullptr, MomentsOp<scalar_t>{xp, dims(g)}, g, true);
  });
  return {out[0].clone(), out[1].clone()};  // separate tensors: they are op outputs
}

void act_forward(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& shift, Geom g, Act act, float act_param) {
  const int64_t n = x.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_forward_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    constexpr int VW = pack_width<scalar_t>();
    const Dims d = dims(g);
    const bool vec = packable(d, VW) && aligned16(xp) && aligned16(rp) && aligned16(yp);
    auto stream = at::cuda::getCurrentCUDAStream();
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(rp != nullptr, [&](auto res_c) {
        bool_dispatch(vec, [&](auto v_c) {
          constexpr bool RES = decltype(res_c)::value;
          constexpr int V = decltype(v_c)::value ? VW : 1;
          act_forward_kernel<scalar_t, ACT, RES, V><<<elementwise_blocks(n / V), kThreads, 0, stream>>>(
              xp, rp, yp, fptr(scale), fptr(shift), d, n, act_param);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

at::Tensor act_backward_reduce(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& center, Geom g, Act act, float act_param) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_backward_reduce_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(rp != nullptr, [&](auto res_c) {
        constexpr bool RES = decltype(res_c)::value;
        out = reduce<scalar_t>(x, xp, gp, rp, DzOp<ACT, RES>{fptr(scale), fptr(shift), fptr(center), act_param},
                               g, false);
      });
    });
  });
  return out;
}

void act_backward_apply(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                        const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& center,
                        const at::Tensor& alpha, const at::Tensor& beta, at::Tensor& gx, at::Tensor& gr,
                        Geom g, Act act, float act_param) {
  const int64_t n = x.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_backward_apply_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* grp = gr.defined() ? gr.data_ptr<scalar_t>() : nullptr;
    constexpr int VW = pack_width<scalar_t>();
    const Dims d = dims(g);
    const bool vec = packable(d, VW) && aligned16(xp) && aligned16(gp) && aligned16(rp) && aligned16(gxp) &&
                     aligned16(grp);
    auto stream = at::cuda::getCurrentCUDAStream();
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(rp != nullptr, [&](auto res_c) {
        bool_dispatch(vec, [&](auto v_c) {
          constexpr bool RES = decltype(res_c)::value;
          constexpr int V = decltype(v_c)::value ? VW : 1;
          act_backward_apply_kernel<scalar_t, ACT, RES, V><<<elementwise_blocks(n / V), kThreads, 0, stream>>>(
              gp, xp, rp, fptr(scale), fptr(shift), fptr(center), fptr(alpha), fptr(beta), gxp, grp, d, n,
              act_param);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace fastcnn
