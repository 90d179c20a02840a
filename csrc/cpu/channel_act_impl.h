// The CPU per-channel affine + activation kernels (see csrc/channel_act.h), written once and
// compiled once per CPU capability, as ATen compiles its own kernels:
//   csrc/cpu/channel_act_kernel.cpp       CPU_CAPABILITY=DEFAULT (baseline x86-64 / any CPU):
//                                         plain loops, vectorised by the compiler where it can
//   csrc/cpu/avx2/channel_act_kernel.cpp  CPU_CAPABILITY=AVX2, built with -mavx2 -mfma -mf16c:
//                                         explicit at::vec::Vectorized<float> (8 lanes) loops
// Each copy lives in its own namespace fastcnn::cpu::<CPU_CAPABILITY> (and ATen's vec types
// in at::vec::<CPU_CAPABILITY>), so the two builds never share a symbol; csrc/cpu/dispatch.cpp
// picks one at run time (csrc/cpu/capability.h).
//
// Layouts (Geom): I > 1 is a contiguous run of I elements with one parameter slot (NCHW);
// I == 1 is rows of G elements with one slot per lane (channels_last). Every pass is
// at::parallel_for over runs or row chunks; reductions keep fixed chunks with their own
// partial sums (fp32 within a chunk, fp64 across chunks), so results do not depend on the
// thread count. fp16 / bf16 are converted to fp32 on load and back on store.
//
// This file is included by exactly one translation unit per capability (no include guard
// on purpose: CPU_CAPABILITY must be defined before it is included).
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT or AVX2) before including channel_act_impl.h"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "channel_act.h"
#include "cpu/channel_act_cpu.h"

namespace fastcnn {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using VF = at::vec::Vectorized<float>;
constexpr int64_t kV = VF::size();
constexpr int64_t kW = 2 * kV;       // elements per vector step: two float vectors, one 16-bit vector
constexpr int64_t kGrain = 32768;    // elements per parallel task, at least (ATen's GRAIN_SIZE)
constexpr int64_t kBlock = 4096;     // elements of a run summed in fp32 before the fp64 combine
constexpr int64_t kChunkRows = 256;  // channels_last rows summed in fp32 before the fp64 combine
#if defined(CPU_CAPABILITY_AVX2)
// explicit vector loops: the AVX2 specialisation of Vectorized<float> is real SIMD
constexpr bool kVec = true;
#else
// the generic Vectorized<float> is an array with per-lane loops (its compare / blend measured
// 10x slower than plain loops), so the DEFAULT build runs the scalar loops below only
constexpr bool kVec = false;
#endif

// the storage dtypes of the ops (fp32, fp16, bf16; csrc/common.h rejects the rest)
#define FASTCNN_DISPATCH_STORAGE(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// --------------------------------------------------------------------------- load / store
template <typename T>
inline void load2(const T* p, VF& a, VF& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = VF::loadu(p);
    b = VF::loadu(p + kV);
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kW, "16-bit vector must hold two float vectors");
    auto ab = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
}

template <typename T>
inline void store2(T* p, const VF& a, const VF& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kV);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

inline float hsum(const VF& v) {
  float buf[kV];
  v.store(buf);
  float s = 0.f;
  for (int64_t k = 0; k < kV; ++k) s += buf[k];
  return s;
}

// --------------------------------------------------------------------------- activations
// Vector twins of apply_act / act_grad (csrc/act.h), same conventions: relu'(0) = 0, and the
// comparison z > 0 is false for NaN exactly as in the scalar code.
template <int ACT>
inline VF act_v(const VF& z, float p) {
  const VF zero(0.f), one(1.f);
  if constexpr (ACT == kIdentity) {
    return z;
  } else if constexpr (ACT == kRelu) {
    return z & (z > zero);
  } else if constexpr (ACT == kLeakyRelu) {
    return VF::blendv(z * VF(p), z, z > zero);
  } else if constexpr (ACT == kElu) {
    return VF::blendv(VF(p) * (z.exp() - one), z, z > zero);
  } else if constexpr (ACT == kSilu) {
    return z / (one + z.neg().exp());
  } else {
    return VF(0.5f) * z * (one + (z * VF(0.70710678118654752f)).erf());
  }
}

// gy * act'(z)
template <int ACT>
inline VF dact_v(const VF& gy, const VF& z, float p) {
  const VF zero(0.f), one(1.f);
  if constexpr (ACT == kIdentity) {
    return gy;
  } else if constexpr (ACT == kRelu) {
    return gy & (z > zero);
  } else if constexpr (ACT == kLeakyRelu) {
    return VF::blendv(gy * VF(p), gy, z > zero);
  } else if constexpr (ACT == kElu) {
    return VF::blendv(gy * (VF(p) * z.exp()), gy, z > zero);
  } else if constexpr (ACT == kSilu) {
    const VF s = one / (one + z.neg().exp());
    return gy * (s * (one + z * (one - s)));
  } else {
    const VF cdf = VF(0.5f) * (one + (z * VF(0.70710678118654752f)).erf());
    const VF pdf = VF(0.3989422804014327f) * (VF(-0.5f) * z * z).exp();
    return gy * (cdf + z * pdf);
  }
}

// --------------------------------------------------------------------------- parameters
template <typename F>
inline void bool_dispatch(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// A per-slot fp32 parameter at lane offset i: one value broadcast over a run (LANE false,
// NCHW) or one value per lane of a channels_last row (LANE true).
template <bool LANE>
struct Param {
  const float* p;
  float c;  // the broadcast value, held locally so that stores cannot alias it
  VF v;
  explicit Param(const float* ptr) : p(ptr), c(LANE ? 0.f : *ptr), v(LANE ? 0.f : *ptr) {}
  inline VF vec(int64_t i) const {
    if constexpr (LANE) return VF::loadu(p + i); else return v;
  }
  inline float at(int64_t i) const {
    if constexpr (LANE) return p[i]; else return c;
  }
};

// --------------------------------------------------------------------------- drivers
// Runs `f(offset, len, slot)` over the tensor in parallel: runs of I elements with slot
// b * G + g (I > 1), or whole rows of G elements whose lane k has slot `slot + k` (I == 1).
template <typename F>
void for_each_run(const Geom& g, F&& f) {
  if (g.I > 1) {
    const int64_t runs = g.B * g.O * g.G;
    at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / g.I), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t gi = r % g.G, b = r / (g.O * g.G);
        f(r * g.I, g.I, b * g.G + gi);
      }
    });
  } else {
    const int64_t rows = g.B * g.O;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / g.G), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) f(r * g.G, g.G, (r / g.O) * g.G);
    });
  }
}

// Per-slot sums of two per-element quantities (a, b), fp64 [2, P]. The element functor E
// is built per run / per row chunk as E(slot) and accumulates the contributions of
//   e.vec(offset, lane, a0, a1, b0, b1)  kW elements (two float vectors) at `offset`
//   e.one(offset, lane, a, b)            one element
// where `lane` indexes its per-lane parameters (channels_last; 0-based within the row).
template <typename MakeE>
std::vector<double> reduce_slots(const Geom& g, MakeE&& make) {
  const int64_t P = g.slots();
  std::vector<double> out(2 * P, 0.0);
  if (g.I > 1) {
    // NCHW: one task per run, four independent vector accumulators, fp32 per block
    const int64_t runs = g.B * g.O * g.G;
    std::vector<double> part(2 * runs);
    at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / g.I), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t gi = r % g.G, b = r / (g.O * g.G);
        auto e = make(b * g.G + gi);
        double sa = 0.0, sb = 0.0;
        for (int64_t s0 = 0; s0 < g.I; s0 += kBlock) {
          const int64_t n = std::min(kBlock, g.I - s0), off = r * g.I + s0;
          float fa = 0.f, fb = 0.f;
          int64_t i = 0;
          if constexpr (kVec) {
            VF a0(0.f), a1(0.f), b0(0.f), b1(0.f);
            for (; i + kW <= n; i += kW) e.vec(off + i, 0, a0, a1, b0, b1);
            fa = hsum(a0 + a1);
            fb = hsum(b0 + b1);
          }
          for (; i < n; ++i) e.one(off + i, 0, fa, fb);
          sa += fa;
          sb += fb;
        }
        part[2 * r] = sa;
        part[2 * r + 1] = sb;
      }
    });
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t slot = (r / (g.O * g.G)) * g.G + r % g.G;
      out[slot] += part[2 * r];
      out[P + slot] += part[2 * r + 1];
    }
    return out;
  }
  // channels_last: chunks of rows of one b; per lane fp32 sums per chunk. Four rows are
  // summed in registers before they touch the per-lane buffer.
  const int64_t G = g.G;
  const int64_t nchunk = (g.O + kChunkRows - 1) / kChunkRows;
  const int64_t tasks = g.B * nchunk;
  std::vector<double> part(2 * tasks * G);
  at::parallel_for(0, tasks, std::max<int64_t>(1, kGrain / (kChunkRows * G)), [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(2 * G);
    float* fa = buf.data();
    float* fb = buf.data() + G;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, o0 = (t % nchunk) * kChunkRows, o1 = std::min(g.O, o0 + kChunkRows);
      std::fill(buf.begin(), buf.end(), 0.f);
      auto e = make(b * G);
      const int64_t base = b * g.O * G;
      int64_t o = o0;
      if constexpr (kVec) {
        for (; o + 4 <= o1; o += 4) {
          const int64_t row = base + o * G;
          int64_t c = 0;
          for (; c + kW <= G; c += kW) {
            VF a0(0.f), a1(0.f), b0(0.f), b1(0.f);
            e.vec(row + c, c, a0, a1, b0, b1);
            e.vec(row + G + c, c, a0, a1, b0, b1);
            e.vec(row + 2 * G + c, c, a0, a1, b0, b1);
            e.vec(row + 3 * G + c, c, a0, a1, b0, b1);
            (VF::loadu(fa + c) + a0).store(fa + c);
            (VF::loadu(fa + c + kV) + a1).store(fa + c + kV);
            (VF::loadu(fb + c) + b0).store(fb + c);
            (VF::loadu(fb + c + kV) + b1).store(fb + c + kV);
          }
          for (; c < G; ++c)
            for (int64_t u = 0; u < 4; ++u) e.one(row + u * G + c, c, fa[c], fb[c]);
        }
      }
      for (; o < o1; ++o) {
        const int64_t row = base + o * G;
        for (int64_t c = 0; c < G; ++c) e.one(row + c, c, fa[c], fb[c]);
      }
      double* pa = part.data() + 2 * t * G;
      for (int64_t c = 0; c < G; ++c) {
        pa[c] = fa[c];
        pa[G + c] = fb[c];
      }
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / nchunk;
    const double* pa = part.data() + 2 * t * G;
    for (int64_t c = 0; c < G; ++c) {
      out[b * G + c] += pa[c];
      out[P + b * G + c] += pa[G + c];
    }
  }
  return out;
}

// --------------------------------------------------------------------------- element functors
// statistics: a = x - k, b = (x - k)^2 with k a per-slot shift (the slot's first element)
template <typename T, bool LANE>
struct StatsE {
  const T* x;
  Param<LANE> k;
  inline void vec(int64_t off, int64_t l, VF& a0, VF& a1, VF& b0, VF& b1) const {
    VF x0, x1;
    load2(x + off, x0, x1);
    const VF d0 = x0 - k.vec(l), d1 = x1 - k.vec(l + kV);
    a0 = a0 + d0;
    a1 = a1 + d1;
    b0 = at::vec::fmadd(d0, d0, b0);
    b1 = at::vec::fmadd(d1, d1, b1);
  }
  inline void one(int64_t off, int64_t l, float& a, float& b) const {
    const float d = static_cast<float>(x[off]) - k.at(l);
    a += d;
    b += d * d;
  }
};

// backward: dz = gy * act'(x * s + t (+ r)); a = dz, b = dz * (x - c)
template <typename T, int ACT, bool LANE, bool RES>
struct GradE {
  const T *gy, *x, *r;
  Param<LANE> s, t, c;
  float p;
  inline void vec(int64_t off, int64_t l, VF& a0, VF& a1, VF& b0, VF& b1) const {
    VF x0, x1, d0, d1;
    load2(x + off, x0, x1);
    load2(gy + off, d0, d1);
    if constexpr (ACT != kIdentity) {
      VF z0 = at::vec::fmadd(x0, s.vec(l), t.vec(l));
      VF z1 = at::vec::fmadd(x1, s.vec(l + kV), t.vec(l + kV));
      if constexpr (RES) {
        VF r0, r1;
        load2(r + off, r0, r1);
        z0 = z0 + r0;
        z1 = z1 + r1;
      }
      d0 = dact_v<ACT>(d0, z0, p);
      d1 = dact_v<ACT>(d1, z1, p);
    }
    a0 = a0 + d0;
    a1 = a1 + d1;
    b0 = at::vec::fmadd(d0, x0 - c.vec(l), b0);
    b1 = at::vec::fmadd(d1, x1 - c.vec(l + kV), b1);
  }
  inline void one(int64_t off, int64_t l, float& a, float& b) const {
    const float xv = static_cast<float>(x[off]);
    float z = xv * s.at(l) + t.at(l);
    if constexpr (RES) z += static_cast<float>(r[off]);
    const float dz = static_cast<float>(gy[off]) * act_grad<ACT>(z, p);
    a += dz;
    b += dz * (xv - c.at(l));
  }
};

inline const float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

}  // namespace

// --------------------------------------------------------------------------- entry points
std::tuple<at::Tensor, at::Tensor> slot_mean_var(const at::Tensor& x, Geom g) {
  const int64_t P = g.slots();
  std::vector<float> pilot(P);
  std::vector<double> sums;
  FASTCNN_DISPATCH_STORAGE(x.scalar_type(), "fastcnn_slot_mean_var", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // shift each slot by its first element: no cancellation when |mean| >> std
    for (int64_t p = 0; p < P; ++p) {
      const int64_t b = p / g.G, gi = p % g.G;
      pilot[p] = static_cast<float>(xp[(b * g.O * g.G + gi) * g.I]);
    }
    const float* kp = pilot.data();
    bool_dispatch(g.I == 1, [&](auto lane_c) {
      constexpr bool LANE = decltype(lane_c)::value;
      sums = reduce_slots(g, [&](int64_t slot) { return StatsE<scalar_t, LANE>{xp, Param<LANE>(kp + slot)}; });
    });
  });
  auto mean = at::empty({P}, x.options().dtype(at::kFloat));
  auto var = at::empty({P}, x.options().dtype(at::kFloat));
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  const double m = static_cast<double>(g.per_slot());
  for (int64_t p = 0; p < P; ++p) {
    const double d = sums[p] / m;
    mp[p] = static_cast<float>(pilot[p] + d);
    vp[p] = static_cast<float>(std::max(sums[P + p] / m - d * d, 0.0));
  }
  return {mean, var};
}

void act_forward(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& shift, Geom g, Act act, float act_param) {
  FASTCNN_DISPATCH_STORAGE(x.scalar_type(), "fastcnn_act_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float *sp = fptr(scale), *tp = fptr(shift);
    const float p = act_param;
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value;
          for_each_run(g, [&](int64_t off, int64_t n, int64_t slot) {
            const scalar_t* __restrict__ xs = xp + off;
            const scalar_t* __restrict__ rs = RES ? rp + off : nullptr;
            scalar_t* __restrict__ ys = yp + off;
            const Param<LANE> s(sp + slot), t(tp + slot);
            int64_t i = 0;
            if constexpr (kVec) {
              for (; i + kW <= n; i += kW) {
                VF x0, x1;
                load2(xs + i, x0, x1);
                VF z0 = at::vec::fmadd(x0, s.vec(i), t.vec(i));
                VF z1 = at::vec::fmadd(x1, s.vec(i + kV), t.vec(i + kV));
                if constexpr (RES) {
                  VF r0, r1;
                  load2(rs + i, r0, r1);
                  z0 = z0 + r0;
                  z1 = z1 + r1;
                }
                store2(ys + i, act_v<ACT>(z0, p), act_v<ACT>(z1, p));
              }
            }
            for (; i < n; ++i) {
              float z = static_cast<float>(xs[i]) * s.at(i) + t.at(i);
              if constexpr (RES) z += static_cast<float>(rs[i]);
              ys[i] = static_cast<scalar_t>(apply_act<ACT>(z, p));
            }
          });
        });
      });
    });
  });
}

at::Tensor act_backward_reduce(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& center, Geom g, Act act, float act_param) {
  std::vector<double> sums;
  FASTCNN_DISPATCH_STORAGE(x.scalar_type(), "fastcnn_act_backward_reduce", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    const float *sp = fptr(scale), *tp = fptr(shift), *cp = fptr(center);
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value;
          sums = reduce_slots(g, [&](int64_t slot) {
            return GradE<scalar_t, ACT, LANE, RES>{gp, xp, rp, Param<LANE>(sp + slot), Param<LANE>(tp + slot),
                                                   Param<LANE>(cp + slot), act_param};
          });
        });
      });
    });
  });
  const int64_t P = g.slots();
  auto out = at::empty({2, P}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  for (int64_t k = 0; k < 2 * P; ++k) op[k] = static_cast<float>(sums[k]);
  return out;
}

void act_backward_apply(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                        const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& center,
                        const at::Tensor& alpha, const at::Tensor& beta, at::Tensor& gx,
                        at::Tensor& gr, Geom g, Act act, float act_param) {
  FASTCNN_DISPATCH_STORAGE(x.scalar_type(), "fastcnn_act_backward_apply", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* grp = gr.defined() ? gr.data_ptr<scalar_t>() : nullptr;
    const float *sp = fptr(scale), *tp = fptr(shift), *cp = fptr(center), *ap = fptr(alpha),
                *bp = fptr(beta);
    const float p = act_param;
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          bool_dispatch(grp != nullptr, [&](auto gr_c) {
            constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value,
                           GR = decltype(gr_c)::value;
            for_each_run(g, [&](int64_t off, int64_t n, int64_t slot) {
              const scalar_t* __restrict__ xs = xp + off;
              const scalar_t* __restrict__ gs = gp + off;
              const scalar_t* __restrict__ rs = RES ? rp + off : nullptr;
              scalar_t* __restrict__ gxs = gxp + off;
              scalar_t* __restrict__ grs = GR ? grp + off : nullptr;
              const Param<LANE> s(sp + slot), t(tp + slot), c(cp + slot), a(ap + slot), b(bp + slot);
              int64_t i = 0;
              if constexpr (kVec) {
                for (; i + kW <= n; i += kW) {
                  VF x0, x1, d0, d1;
                  load2(xs + i, x0, x1);
                  load2(gs + i, d0, d1);
                  if constexpr (ACT != kIdentity) {
                    VF z0 = at::vec::fmadd(x0, s.vec(i), t.vec(i));
                    VF z1 = at::vec::fmadd(x1, s.vec(i + kV), t.vec(i + kV));
                    if constexpr (RES) {
                      VF r0, r1;
                      load2(rs + i, r0, r1);
                      z0 = z0 + r0;
                      z1 = z1 + r1;
                    }
                    d0 = dact_v<ACT>(d0, z0, p);
                    d1 = dact_v<ACT>(d1, z1, p);
                  }
                  const VF g0 = at::vec::fmadd(s.vec(i), d0, at::vec::fmadd(a.vec(i), x0 - c.vec(i), b.vec(i)));
                  const VF g1 = at::vec::fmadd(s.vec(i + kV), d1,
                                               at::vec::fmadd(a.vec(i + kV), x1 - c.vec(i + kV), b.vec(i + kV)));
                  store2(gxs + i, g0, g1);
                  if constexpr (GR) store2(grs + i, d0, d1);
                }
              }
              for (; i < n; ++i) {
                const float xv = static_cast<float>(xs[i]);
                float z = xv * s.at(i) + t.at(i);
                if constexpr (RES) z += static_cast<float>(rs[i]);
                const float dz = static_cast<float>(gs[i]) * act_grad<ACT>(z, p);
                gxs[i] = static_cast<scalar_t>(s.at(i) * dz + a.at(i) * (xv - c.at(i)) + b.at(i));
                if constexpr (GR) grs[i] = static_cast<scalar_t>(dz);
              }
            });
          });
        });
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastcnn
