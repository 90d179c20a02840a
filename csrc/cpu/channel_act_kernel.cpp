// CPU implementation of the per-channel affine + activation primitives (see
// csrc/channel_act.h): at::parallel_for over contiguous runs, at::vec::Vectorized<float>
// inner loops, fp16/bf16 storage converted to fp32 for the math.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <vector>

#include "channel_act.h"

namespace fastcnn {
namespace cpu {
namespace {

using VF = at::vec::Vectorized<float>;
constexpr int64_t kV = VF::size();
constexpr int64_t kGrain = 16384;  // elements per parallel task, at least
constexpr int64_t kBlock = 2048;   // elements summed in fp32 before moving to fp64
// Reductions accumulate in Vectorized<float> lanes (a plain float sum would stay scalar:
// no reassociation without -ffast-math). Elementwise passes are plain loops over the run,
// which the compiler vectorises better than the generic (non-AVX build) Vectorized
// compare/blend/exp: measured 10x faster for relu on the benchmark machine.
constexpr bool kVecReduce = true;
constexpr bool kVecElementwise = false;

template <typename T>
inline VF load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return VF::loadu(p);
  } else {
    float buf[kV];
    for (int64_t k = 0; k < kV; ++k) buf[k] = static_cast<float>(p[k]);
    return VF::loadu(buf);
  }
}

template <typename T>
inline void store_f(T* p, const VF& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    float buf[kV];
    v.store(buf);
    for (int64_t k = 0; k < kV; ++k) p[k] = static_cast<T>(buf[k]);
  }
}

inline float hsum(const VF& v) {
  float buf[kV];
  v.store(buf);
  float s = 0.f;
  for (int64_t k = 0; k < kV; ++k) s += buf[k];
  return s;
}

// Activation of a vector of pre-activations, lane by lane through the scalar definitions
// of csrc/act.h: the compiler vectorises these short fixed-length loops (max / select for
// relu-like activations), which the generic Vectorized compare+blendv path does not.
template <int ACT>
inline VF act_vec(const VF& z, float p) {
  if constexpr (ACT == kIdentity) {
    return z;
  } else {
    float buf[kV];
    z.store(buf);
    for (int64_t k = 0; k < kV; ++k) buf[k] = apply_act<ACT>(buf[k], p);
    return VF::loadu(buf);
  }
}

// gy * act'(z), lane by lane (see act_vec)
template <int ACT>
inline VF dact_mul(const VF& gy, const VF& z, float p) {
  if constexpr (ACT == kIdentity) {
    return gy;
  } else {
    float g[kV], zb[kV];
    gy.store(g);
    z.store(zb);
    for (int64_t k = 0; k < kV; ++k) g[k] *= act_grad<ACT>(zb[k], p);
    return VF::loadu(g);
  }
}

template <typename F>
inline void bool_dispatch(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// Per-slot parameter at offset i of a run: one value broadcast (I > 1) or one per lane (I == 1).
template <bool LANE>
struct Param {
  const float* p;
  float c;  // the broadcast value, held locally so stores cannot alias it
  VF v;
  explicit Param(const float* ptr) : p(ptr), c(*ptr), v(LANE ? VF(0.f) : VF(*ptr)) {}
  inline VF vec(int64_t i) const { return LANE ? VF::loadu(p + i) : v; }
  inline float at(int64_t i) const { return LANE ? p[i] : c; }
};

// Runs `f(offset, len, slot)` over the tensor: runs of I elements of one slot (I > 1), or
// rows of G elements whose lane g has slot slot + g (I == 1). Parallel over runs.
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

// Sums two per-element quantities `pair(offset, len, slot, acc_a, acc_b)` into fp64 per
// slot. I > 1: each run adds to its slot; I == 1: chunks of rows accumulate per lane.
// Returns fp64 [2, P]. Deterministic for a given thread count.
template <typename F>
std::vector<double> reduce_runs(const Geom& g, F&& pair) {
  const int64_t P = g.slots();
  std::vector<double> out(2 * P, 0.0);
  if (g.I > 1) {
    const int64_t runs = g.B * g.O * g.G;
    std::vector<double> part(2 * runs);
    at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / g.I), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t gi = r % g.G, b = r / (g.O * g.G);
        double a = 0.0, c = 0.0;
        for (int64_t s = 0; s < g.I; s += kBlock) {
          float fa = 0.f, fc = 0.f;
          pair(r * g.I + s, std::min(kBlock, g.I - s), b * g.G + gi, &fa, &fc);
          a += fa;
          c += fc;
        }
        part[2 * r] = a;
        part[2 * r + 1] = c;
      }
    });
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t gi = r % g.G, b = r / (g.O * g.G);
      out[b * g.G + gi] += part[2 * r];
      out[P + b * g.G + gi] += part[2 * r + 1];
    }
  } else {
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(256, kGrain / g.G + 1));
    const int64_t nchunk = (g.O + chunk - 1) / chunk;
    const int64_t tasks = g.B * nchunk;
    std::vector<double> part(2 * tasks * g.G);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> fa(g.G), fc(g.G);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nchunk, o0 = (t % nchunk) * chunk, o1 = std::min(g.O, o0 + chunk);
        std::fill(fa.begin(), fa.end(), 0.f);
        std::fill(fc.begin(), fc.end(), 0.f);
        for (int64_t o = o0; o < o1; ++o) pair((b * g.O + o) * g.G, g.G, b * g.G, fa.data(), fc.data());
        for (int64_t gi = 0; gi < g.G; ++gi) {
          part[(2 * t) * g.G + gi] = fa[gi];
          part[(2 * t + 1) * g.G + gi] = fc[gi];
        }
      }
    });
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / nchunk;
      for (int64_t gi = 0; gi < g.G; ++gi) {
        out[b * g.G + gi] += part[(2 * t) * g.G + gi];
        out[P + b * g.G + gi] += part[(2 * t + 1) * g.G + gi];
      }
    }
  }
  return out;
}

// acc_a += sum(a), acc_b += sum(b) over a run: scalar accumulators (I > 1) or per lane.
template <bool LANE>
struct Acc {
  float* a;
  float* b;
  VF va{0.f}, vb{0.f};
  float sa = 0.f, sb = 0.f;
  Acc(float* a_, float* b_) : a(a_), b(b_) {}
  inline void add(int64_t i, const VF& x, const VF& y) {
    if (LANE) {
      (VF::loadu(a + i) + x).store(a + i);
      (VF::loadu(b + i) + y).store(b + i);
    } else {
      va = va + x;
      vb = vb + y;
    }
  }
  inline void add1(int64_t i, float x, float y) {
    if (LANE) { a[i] += x; b[i] += y; } else { sa += x; sb += y; }
  }
  inline void finish() {
    if (!LANE) { *a += hsum(va) + sa; *b += hsum(vb) + sb; }
  }
};

inline const float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> slot_mean_var(const at::Tensor& x, Geom g) {
  const int64_t P = g.slots();
  std::vector<float> pilot(P);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_slot_mean_var", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // shift each slot by its first element: no cancellation when |mean| >> std
    for (int64_t p = 0; p < P; ++p) {
      const int64_t b = p / g.G, gi = p % g.G;
      pilot[p] = static_cast<float>(xp[(b * g.O * g.G + gi) * g.I]);
    }
    const float* kp = pilot.data();
    bool_dispatch(g.I == 1, [&](auto lane_c) {
      constexpr bool LANE = decltype(lane_c)::value;
      sums = reduce_runs(g, [&](int64_t off, int64_t n, int64_t slot, float* fa, float* fb) {
        const scalar_t* xs = xp + off;
        Param<LANE> k(kp + slot);
        Acc<LANE> acc(fa, fb);
        int64_t i = 0;
        for (; kVecReduce && i + kV <= n; i += kV) {
          const VF d = load_f(xs + i) - k.vec(i);
          acc.add(i, d, d * d);
        }
        for (; i < n; ++i) {
          const float d = static_cast<float>(xs[i]) - k.at(i);
          acc.add1(i, d, d * d);
        }
        acc.finish();
      });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float *sp = fptr(scale), *tp = fptr(shift);
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value;
          for_each_run(g, [&](int64_t off, int64_t n, int64_t slot) {
            const scalar_t* __restrict__ xs = xp + off;
            const scalar_t* __restrict__ rs = RES ? rp + off : nullptr;
            scalar_t* __restrict__ ys = yp + off;
            Param<LANE> s(sp + slot), t(tp + slot);
            int64_t i = 0;
            for (; kVecElementwise && i + kV <= n; i += kV) {
              VF z = at::vec::fmadd(load_f(xs + i), s.vec(i), t.vec(i));
              if (RES) z = z + load_f(rs + i);
              store_f(ys + i, act_vec<ACT>(z, act_param));
            }
            for (; i < n; ++i) {
              float z = static_cast<float>(xs[i]) * s.at(i) + t.at(i);
              if (RES) z += static_cast<float>(rs[i]);
              ys[i] = static_cast<scalar_t>(apply_act<ACT>(z, act_param));
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_backward_reduce", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    const float *sp = fptr(scale), *tp = fptr(shift), *cp = fptr(center);
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value;
          sums = reduce_runs(g, [&](int64_t off, int64_t n, int64_t slot, float* fa, float* fb) {
            const scalar_t *xs = xp + off, *gs = gp + off, *rs = RES ? rp + off : nullptr;
            Param<LANE> s(sp + slot), t(tp + slot), c(cp + slot);
            Acc<LANE> acc(fa, fb);
            int64_t i = 0;
            for (; kVecReduce && i + kV <= n; i += kV) {
              const VF xv = load_f(xs + i);
              VF dz = load_f(gs + i);
              if (ACT != kIdentity) {
                VF z = at::vec::fmadd(xv, s.vec(i), t.vec(i));
                if (RES) z = z + load_f(rs + i);
                dz = dact_mul<ACT>(dz, z, act_param);
              }
              acc.add(i, dz, dz * (xv - c.vec(i)));
            }
            for (; i < n; ++i) {
              const float xv = static_cast<float>(xs[i]);
              float z = xv * s.at(i) + t.at(i);
              if (RES) z += static_cast<float>(rs[i]);
              const float dz = static_cast<float>(gs[i]) * act_grad<ACT>(z, act_param);
              acc.add1(i, dz, dz * (xv - c.at(i)));
            }
            acc.finish();
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastcnn_act_backward_apply", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* grp = gr.defined() ? gr.data_ptr<scalar_t>() : nullptr;
    const float *sp = fptr(scale), *tp = fptr(shift), *cp = fptr(center), *ap = fptr(alpha),
                *bp = fptr(beta);
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value;
          for_each_run(g, [&](int64_t off, int64_t n, int64_t slot) {
            const scalar_t* __restrict__ xs = xp + off;
            const scalar_t* __restrict__ gs = gp + off;
            const scalar_t* __restrict__ rs = RES ? rp + off : nullptr;
            scalar_t* __restrict__ gxs = gxp + off;
            scalar_t* __restrict__ grs = grp ? grp + off : nullptr;
            Param<LANE> s(sp + slot), t(tp + slot), c(cp + slot), a(ap + slot), b(bp + slot);
            int64_t i = 0;
            for (; kVecElementwise && i + kV <= n; i += kV) {
              const VF xv = load_f(xs + i);
              VF dz = load_f(gs + i);
              if (ACT != kIdentity) {
                VF z = at::vec::fmadd(xv, s.vec(i), t.vec(i));
                if (RES) z = z + load_f(rs + i);
                dz = dact_mul<ACT>(dz, z, act_param);
              }
              store_f(gxs + i, at::vec::fmadd(s.vec(i), dz, at::vec::fmadd(a.vec(i), xv - c.vec(i), b.vec(i))));
              if (grs) store_f(grs + i, dz);
            }
            for (; i < n; ++i) {
              const float xv = static_cast<float>(xs[i]);
              float z = xv * s.at(i) + t.at(i);
              if (RES) z += static_cast<float>(rs[i]);
              const float dz = static_cast<float>(gs[i]) * act_grad<ACT>(z, act_param);
              gxs[i] = static_cast<scalar_t>(s.at(i) * dz + a.at(i) * (xv - c.at(i)) + b.at(i));
            }
            if (grs) {  // the residual gradient dz, in its own loop so the one above stays branch-free
              for (int64_t j = 0; j < n; ++j) {
                float z = static_cast<float>(xs[j]) * s.at(j) + t.at(j);
                if (RES) z += static_cast<float>(rs[j]);
                grs[j] = static_cast<scalar_t>(static_cast<float>(gs[j]) * act_grad<ACT>(z, act_param));
              }
            }
          });
        });
      });
    });
  });
}

}  // namespace cpu
}  // namespace fastcnn
