// The CPU per-channel affine + activation kernels (see csrc/channel_act/channel_act.h), written
// once and compiled once per CPU capability, as ATen compiles its own kernels (paths under
// csrc/channel_act/cpu/):
//   channel_act_kernel.cpp       CPU_CAPABILITY=DEFAULT (baseline x86-64 / any CPU):
//                                plain loops, vectorised by the compiler where it can
//   avx2/channel_act_kernel.cpp  CPU_CAPABILITY=AVX2, built with -mavx2 -mfma -mf16c:
//                                explicit at::vec::Vectorized<float> (8 lanes) loops
// Each copy lives in its own namespace fastcnn::cpu::<CPU_CAPABILITY> (and ATen's vec types
// in at::vec::<CPU_CAPABILITY>), so the two builds never share a symbol; dispatch.cpp picks
// one at run time (the capability interface is in channel_act_cpu.h).
//
// Layouts (Geom): I > 1 is a contiguous run of I elements with one parameter slot (NCHW);
// I == 1 is rows of G elements with one slot per lane (channels_last). The AVX2 build steps
// kW = 16 elements at a time and ends a run or a row that is not a multiple of 16 with one
// partial step (masked loads and stores, Part below) rather than with scalar loops, so that
// DenseNet's 24 + 12k channels run as vectors throughout; the DEFAULT build ends them with
// scalar loops. Every pass is
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

#include "channel_act/channel_act.h"
#include "channel_act/cpu/channel_act_cpu.h"

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

// the storage dtypes of the ops (fp32, fp16, bf16; csrc/include/common.h rejects the rest)
#define FASTCNN_DISPATCH_STORAGE(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// --------------------------------------------------------------------------- load / store
// A vector step over all kW elements (Full) or over the first n of them, 0 < n < kW (Part:
// loads read n elements and zero the other lanes, stores write n, reductions drop the other
// lanes with the masks).
struct Full {};
struct Part {
  int64_t n, n0, n1;  // elements in all, in the low vector, in the high vector
  VF m0, m1;          // all bits set in the lanes that hold elements
  explicit Part(int64_t n_) : n(n_), n0(std::min(n_, kV)), n1(std::max<int64_t>(n_ - kV, 0)) {
    const VF zero(0.f), ones = zero == zero;
    m0 = VF::set(zero, ones, n0);
    m1 = VF::set(zero, ones, n1);
  }
};

template <typename T>
inline void load2(const T* p, VF& a, VF& b, Full = {}) {
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
inline void store2(T* p, const VF& a, const VF& b, Full = {}) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kV);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

template <typename T>
inline void load2(const T* p, VF& a, VF& b, const Part& s) {
  if constexpr (std::is_same_v<T, float>) {
    a = VF::loadu(p, s.n0);
    b = s.n1 > 0 ? VF::loadu(p + kV, s.n1) : VF(0.f);
  } else {
    auto ab = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, s.n));
    a = std::get<0>(ab);
    b = std::get<1>(ab);
  }
}

template <typename T>
inline void store2(T* p, const VF& a, const VF& b, const Part& s) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p, s.n0);
    if (s.n1 > 0) b.store(p + kV, s.n1);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p, s.n);
  }
}

// the partial step that ends every run or row of n elements (its masks built once per task;
// meaningful only when n % kW != 0)
inline Part tail_of(int64_t n) { return Part(std::max<int64_t>(n % kW, 1)); }

// the lanes of a reduction's contribution that hold elements
inline void keep(VF&, VF&, Full) {}
inline void keep(VF& a, VF& b, const Part& s) {
  a = a & s.m0;
  b = b & s.m1;
}

// f[0, step) += (a, b)
template <typename S>
inline void add_lanes(float* f, const VF& a, const VF& b, const S& step) {
  VF fa, fb;
  load2(f, fa, fb, step);
  store2(f, fa + a, fb + b, step);
}

inline float hsum(const VF& v) {
  float buf[kV];
  v.store(buf);
  float s = 0.f;
  for (int64_t k = 0; k < kV; ++k) s += buf[k];
  return s;
}

// --------------------------------------------------------------------------- activations
// Vector twins of apply_act / act_grad (csrc/include/act.h), same conventions: relu'(0) = 0, and the
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

// the values of one parameter for a vector step: lanes [l, l + kV) and [l + kV, l + kW)
struct PV {
  VF lo, hi;
};

// A per-slot fp32 parameter at lane offset l: one value broadcast over a run (LANE false,
// NCHW) or one value per lane of a channels_last row (LANE true).
template <bool LANE>
struct Param {
  const float* p;
  float c;  // the broadcast value, held locally so that stores cannot alias it
  explicit Param(const float* ptr) : p(ptr), c(LANE ? 0.f : *ptr) {}
  template <typename S>
  inline PV vec(int64_t l, const S& step) const {
    PV v{VF(c), VF(c)};
    if constexpr (LANE) load2(p + l, v.lo, v.hi, step);
    return v;
  }
  inline float at(int64_t l) const {
    if constexpr (LANE) return p[l]; else return c;
  }
};

// --------------------------------------------------------------------------- drivers
// Element-wise pass. The functor, built per run / per block of rows as make(slot), has
//   op.load(l, S)     the parameters of the vector step at lane offset l (any type)
//   op.vec(off, P, S) the step's elements at offset off with those parameters
//   op.one(off, l)    one element at offset off, lane l
// with S Full (kW elements) or Part (fewer).
// NCHW (I > 1): runs of I elements, parameters loaded once per run. channels_last (I == 1):
// blocks of up to kRows rows of one b (short rows; one row at a time otherwise); each
// vector step's parameters are loaded once for the block. No divisions in the inner
// loops: indices advance incrementally.
constexpr int64_t kRows = 16;
constexpr int64_t kShortRowBytes = 256;  // rows up to this long are processed in blocks

template <typename MakeOp>
void elementwise(const Geom& g, MakeOp&& make) {
  if (g.I > 1) {
    const int64_t runs = g.B * g.O * g.G;
    at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / g.I), [&](int64_t r0, int64_t r1) {
      int64_t gi = r0 % g.G, b = r0 / (g.O * g.G), o = (r0 / g.G) % g.O;
      const Part tail = tail_of(g.I);
      for (int64_t r = r0; r < r1; ++r) {
        const auto op = make(b * g.G + gi);
        const int64_t off = r * g.I, n = g.I;
        if constexpr (kVec) {
          const auto P = op.load(0, Full{});
          int64_t i = 0;
          for (; i + kW <= n; i += kW) op.vec(off + i, P, Full{});
          if (i < n) op.vec(off + i, P, tail);
        } else {
          for (int64_t i = 0; i < n; ++i) op.one(off + i, 0);
        }
        if (++gi == g.G) {
          gi = 0;
          if (++o == g.O) { o = 0; ++b; }
        }
      }
    });
    return;
  }
  const int64_t G = g.G, rows = g.B * g.O;
  // Blocks of rows only for short rows: rows a multiple of 1-4 KiB apart fall into the same
  // L1 sets, and kRows of them per tensor evict each other (measured 2.5x slower at C=1024).
  using Op = decltype(make(int64_t{0}));
  const int64_t block = G * Op::kElemSize <= kShortRowBytes ? kRows : 1;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / G), [&](int64_t r0, int64_t r1) {
    const Part tail = tail_of(G);
    int64_t r = r0;
    while (r < r1) {
      const int64_t b = r / g.O;
      const int64_t end = std::min({r1, (b + 1) * g.O, r + block});  // rows of one b
      const auto op = make(b * G);
      const int64_t base = r * G, nr = end - r;
      if constexpr (kVec) {
        // the rows of the block at lanes [c, c + step), with one parameter load
        auto rows_at = [&](int64_t c, const auto& step) {
          const auto P = op.load(c, step);
          for (int64_t k = 0; k < nr; ++k) op.vec(base + k * G + c, P, step);
        };
        int64_t c = 0;
        for (; c + kW <= G; c += kW) rows_at(c, Full{});
        if (c < G) rows_at(c, tail);
      } else {
        for (int64_t c = 0; c < G; ++c)
          for (int64_t k = 0; k < nr; ++k) op.one(base + k * G + c, c);
      }
      r = end;
    }
  });
}

// Per-slot sums of two per-element quantities (a, b), fp64 [2, P]. The element functor,
// built per run / row chunk as make(slot), has
//   e.load(l, S)                       parameters of the vector step at lane offset l
//   e.vec(off, P, a0, a1, b0, b1, S)   adds the contributions of the step's elements at off
//   e.one(off, l, a, b)                adds the contribution of one element
// with S Full (kW elements) or Part (fewer).
template <typename MakeE>
std::vector<double> reduce_slots(const Geom& g, MakeE&& make) {
  const int64_t P = g.slots();
  std::vector<double> out(2 * P, 0.0);
  if (g.I > 1) {
    // NCHW: one partial per run; four vector accumulators, fp32 per block
    const int64_t runs = g.B * g.O * g.G;
    std::vector<double> part(2 * runs);
    at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / g.I), [&](int64_t r0, int64_t r1) {
      int64_t gi = r0 % g.G, b = r0 / (g.O * g.G), o = (r0 / g.G) % g.O;
      const Part tail = tail_of(g.I);  // kBlock is a multiple of kW: every block ends like the run
      for (int64_t r = r0; r < r1; ++r) {
        const auto e = make(b * g.G + gi);
        double sa = 0.0, sb = 0.0;
        for (int64_t s0 = 0; s0 < g.I; s0 += kBlock) {
          const int64_t n = std::min(kBlock, g.I - s0), off = r * g.I + s0;
          float fa = 0.f, fb = 0.f;
          if constexpr (kVec) {
            const auto Pm = e.load(0, Full{});
            VF a0(0.f), a1(0.f), b0(0.f), b1(0.f);
            int64_t i = 0;
            for (; i + kW <= n; i += kW) e.vec(off + i, Pm, a0, a1, b0, b1, Full{});
            if (i < n) e.vec(off + i, Pm, a0, a1, b0, b1, tail);
            fa = hsum(a0 + a1);
            fb = hsum(b0 + b1);
          } else {
            for (int64_t i = 0; i < n; ++i) e.one(off + i, 0, fa, fb);
          }
          sa += fa;
          sb += fb;
        }
        part[2 * r] = sa;
        part[2 * r + 1] = sb;
        if (++gi == g.G) {
          gi = 0;
          if (++o == g.O) { o = 0; ++b; }
        }
      }
    });
    int64_t gi = 0, o = 0, b = 0;
    for (int64_t r = 0; r < runs; ++r) {
      out[b * g.G + gi] += part[2 * r];
      out[P + b * g.G + gi] += part[2 * r + 1];
      if (++gi == g.G) {
        gi = 0;
        if (++o == g.O) { o = 0; ++b; }
      }
    }
    return out;
  }
  // channels_last: chunks of kChunkRows rows of one b, per-lane fp32 sums per chunk; four
  // rows are summed in registers (one parameter load) before they touch the lane buffer.
  const int64_t G = g.G;
  using E = decltype(make(int64_t{0}));
  const int64_t nchunk = (g.O + kChunkRows - 1) / kChunkRows;
  const int64_t tasks = g.B * nchunk;
  std::vector<double> part(2 * tasks * G);
  at::parallel_for(0, tasks, std::max<int64_t>(1, kGrain / (kChunkRows * G)), [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(2 * G);
    const Part tail = tail_of(G);
    float* fa = buf.data();
    float* fb = buf.data() + G;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunk, o0 = (t % nchunk) * kChunkRows, o1 = std::min(g.O, o0 + kChunkRows);
      std::fill(buf.begin(), buf.end(), 0.f);
      const auto e = make(b * G);
      const int64_t base = b * g.O * G;
      if constexpr (kVec) {
        // U rows at lanes [c, c + step): their contributions summed in registers (one
        // parameter load), then added to the lane buffer
        auto rows_at = [&](int64_t row, auto rows_c, int64_t c, const auto& step) {
          constexpr int64_t U = decltype(rows_c)::value;
          const auto Pm = e.load(c, step);
          VF a0(0.f), a1(0.f), b0(0.f), b1(0.f);
          for (int64_t u = 0; u < U; ++u) e.vec(row + u * G + c, Pm, a0, a1, b0, b1, step);
          add_lanes(fa + c, a0, a1, step);
          add_lanes(fb + c, b0, b1, step);
        };
        auto rows = [&](int64_t row, auto rows_c) {
          int64_t c = 0;
          for (; c + kW <= G; c += kW) rows_at(row, rows_c, c, Full{});
          if (c < G) rows_at(row, rows_c, c, tail);
        };
        // four rows at a time unless they are a multiple of 2-4 KiB apart (same L1 sets)
        const int64_t o4 = G * E::kElemSize < 2048 ? o1 : o0;
        int64_t o = o0;
        for (; o + 4 <= o4; o += 4) rows(base + o * G, std::integral_constant<int64_t, 4>{});
        for (; o < o1; ++o) rows(base + o * G, std::integral_constant<int64_t, 1>{});
      } else {
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t row = base + o * G;
          for (int64_t c = 0; c < G; ++c) e.one(row + c, c, fa[c], fb[c]);
        }
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
  static constexpr int64_t kElemSize = sizeof(T);
  const T* x;
  Param<LANE> k;
  template <typename S>
  inline PV load(int64_t l, const S& s) const { return k.vec(l, s); }
  template <typename S>
  inline void vec(int64_t off, const PV& kv, VF& a0, VF& a1, VF& b0, VF& b1, const S& s) const {
    VF x0, x1;
    load2(x + off, x0, x1, s);
    VF d0 = x0 - kv.lo, d1 = x1 - kv.hi;
    keep(d0, d1, s);
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

// z = x * s + t (+ r) for a vector step
template <bool RES, typename T, typename S>
inline void pre_act(const T* r, int64_t off, const VF& x0, const VF& x1, const PV& s, const PV& t, VF& z0,
                    VF& z1, const S& step) {
  z0 = at::vec::fmadd(x0, s.lo, t.lo);
  z1 = at::vec::fmadd(x1, s.hi, t.hi);
  if constexpr (RES) {
    VF r0, r1;
    load2(r + off, r0, r1, step);
    z0 = z0 + r0;
    z1 = z1 + r1;
  }
}

// backward: dz = gy * act'(x * s + t (+ r)); a = dz, b = dz * (x - c); STORE: dz also written
// to dz_out (a residual's gradient, which the apply then reads back: DzApplyOp)
template <typename T, int ACT, bool LANE, bool RES, bool STORE = false>
struct GradE {
  static constexpr int64_t kElemSize = sizeof(T);
  const T *gy, *x, *r;
  T* dz_out;
  Param<LANE> s, t, c;
  float p;
  struct Loaded {
    PV s, t, c;
  };
  template <typename S>
  inline Loaded load(int64_t l, const S& st) const { return {s.vec(l, st), t.vec(l, st), c.vec(l, st)}; }
  template <typename S>
  inline void vec(int64_t off, const Loaded& P, VF& a0, VF& a1, VF& b0, VF& b1, const S& st) const {
    VF x0, x1, d0, d1;
    load2(x + off, x0, x1, st);
    load2(gy + off, d0, d1, st);
    if constexpr (ACT != kIdentity) {
      VF z0, z1;
      pre_act<RES>(r, off, x0, x1, P.s, P.t, z0, z1, st);
      d0 = dact_v<ACT>(d0, z0, p);
      d1 = dact_v<ACT>(d1, z1, p);
    }
    if constexpr (STORE) store2(dz_out + off, d0, d1, st);
    keep(d0, d1, st);
    a0 = a0 + d0;
    a1 = a1 + d1;
    b0 = at::vec::fmadd(d0, x0 - P.c.lo, b0);
    b1 = at::vec::fmadd(d1, x1 - P.c.hi, b1);
  }
  inline void one(int64_t off, int64_t l, float& a, float& b) const {
    const float xv = static_cast<float>(x[off]);
    float z = xv * s.at(l) + t.at(l);
    if constexpr (RES) z += static_cast<float>(r[off]);
    const float dz = grad_through_act<ACT>(static_cast<float>(gy[off]), z, p);
    if constexpr (STORE) dz_out[off] = static_cast<T>(dz);
    a += dz;
    b += dz * (xv - c.at(l));
  }
};

// forward: y = act(x * s + t (+ r))
template <typename T, int ACT, bool LANE, bool RES>
struct ForwardOp {
  static constexpr int64_t kElemSize = sizeof(T);
  const T* x;
  const T* r;
  T* y;
  Param<LANE> s, t;
  float p;
  struct Loaded {
    PV s, t;
  };
  template <typename S>
  inline Loaded load(int64_t l, const S& st) const { return {s.vec(l, st), t.vec(l, st)}; }
  template <typename S>
  inline void vec(int64_t off, const Loaded& P, const S& st) const {
    VF x0, x1, z0, z1;
    load2(x + off, x0, x1, st);
    pre_act<RES>(r, off, x0, x1, P.s, P.t, z0, z1, st);
    store2(y + off, act_v<ACT>(z0, p), act_v<ACT>(z1, p), st);
  }
  inline void one(int64_t off, int64_t l) const {
    float z = static_cast<float>(x[off]) * s.at(l) + t.at(l);
    if constexpr (RES) z += static_cast<float>(r[off]);
    y[off] = static_cast<T>(apply_act<ACT>(z, p));
  }
};

// backward: dz as in GradE; gx = s * dz + a * (x - c) + b; gr = dz (with a residual)
template <typename T, int ACT, bool LANE, bool RES>
struct BackwardOp {
  static constexpr int64_t kElemSize = sizeof(T);
  const T *gy, *x, *r;
  T *gx, *gr;
  Param<LANE> s, t, c, a, b;
  float p;
  struct Loaded {
    PV s, t, c, a, b;
  };
  template <typename S>
  inline Loaded load(int64_t l, const S& st) const {
    return {s.vec(l, st), t.vec(l, st), c.vec(l, st), a.vec(l, st), b.vec(l, st)};
  }
  template <typename S>
  inline void vec(int64_t off, const Loaded& P, const S& st) const {
    VF x0, x1, d0, d1;
    load2(x + off, x0, x1, st);
    load2(gy + off, d0, d1, st);
    if constexpr (ACT != kIdentity) {
      VF z0, z1;
      pre_act<RES>(r, off, x0, x1, P.s, P.t, z0, z1, st);
      d0 = dact_v<ACT>(d0, z0, p);
      d1 = dact_v<ACT>(d1, z1, p);
    }
    const VF g0 = at::vec::fmadd(P.s.lo, d0, at::vec::fmadd(P.a.lo, x0 - P.c.lo, P.b.lo));
    const VF g1 = at::vec::fmadd(P.s.hi, d1, at::vec::fmadd(P.a.hi, x1 - P.c.hi, P.b.hi));
    store2(gx + off, g0, g1, st);
    if constexpr (RES) store2(gr + off, d0, d1, st);
  }
  inline void one(int64_t off, int64_t l) const {
    const float xv = static_cast<float>(x[off]);
    float z = xv * s.at(l) + t.at(l);
    if constexpr (RES) z += static_cast<float>(r[off]);
    const float dz = grad_through_act<ACT>(static_cast<float>(gy[off]), z, p);
    gx[off] = static_cast<T>(s.at(l) * dz + a.at(l) * (xv - c.at(l)) + b.at(l));
    if constexpr (RES) gr[off] = static_cast<T>(dz);
  }
};

// backward from a stored dz (a residual layer's, written by the reduction):
// gx = s * dz + a * (x - c) + b -- reads dz and x, not gy, x and r again
template <typename T, bool LANE>
struct DzApplyOp {
  static constexpr int64_t kElemSize = sizeof(T);
  const T *dz, *x;
  T* gx;
  Param<LANE> s, c, a, b;
  struct Loaded {
    PV s, c, a, b;
  };
  template <typename S>
  inline Loaded load(int64_t l, const S& st) const {
    return {s.vec(l, st), c.vec(l, st), a.vec(l, st), b.vec(l, st)};
  }
  template <typename S>
  inline void vec(int64_t off, const Loaded& P, const S& st) const {
    VF x0, x1, d0, d1;
    load2(x + off, x0, x1, st);
    load2(dz + off, d0, d1, st);
    const VF g0 = at::vec::fmadd(P.s.lo, d0, at::vec::fmadd(P.a.lo, x0 - P.c.lo, P.b.lo));
    const VF g1 = at::vec::fmadd(P.s.hi, d1, at::vec::fmadd(P.a.hi, x1 - P.c.hi, P.b.hi));
    store2(gx + off, g0, g1, st);
  }
  inline void one(int64_t off, int64_t l) const {
    const float xv = static_cast<float>(x[off]);
    gx[off] = static_cast<T>(s.at(l) * static_cast<float>(dz[off]) + a.at(l) * (xv - c.at(l)) + b.at(l));
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
    for (int64_t p = 0; p < P && g.per_slot() > 0; ++p) {  // an empty slot has no first element
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
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value;
          elementwise(g, [&](int64_t slot) {
            return ForwardOp<scalar_t, ACT, LANE, RES>{xp, rp, yp, Param<LANE>(sp + slot), Param<LANE>(tp + slot),
                                                       act_param};
          });
        });
      });
    });
  });
}

namespace {

// act_backward_reduce, and with dz_out defined (a residual layer) act_backward_reduce_dz
at::Tensor reduce_grad(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r, const at::Tensor& scale,
                       const at::Tensor& shift, const at::Tensor& center, at::Tensor* dz_out, Geom g, Act act,
                       float act_param) {
  std::vector<double> sums;
  FASTCNN_DISPATCH_STORAGE(x.scalar_type(), "fastcnn_act_backward_reduce", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dzp = dz_out != nullptr ? dz_out->data_ptr<scalar_t>() : nullptr;
    const float *sp = fptr(scale), *tp = fptr(shift), *cp = fptr(center);
    FASTCNN_DISPATCH_ACT(act, [&] {
      bool_dispatch(g.I == 1, [&](auto lane_c) {
        bool_dispatch(rp != nullptr, [&](auto res_c) {
          constexpr bool LANE = decltype(lane_c)::value, RES = decltype(res_c)::value;
          auto grad = [&](auto store_c) {
            constexpr bool STORE = decltype(store_c)::value;
            sums = reduce_slots(g, [&](int64_t slot) {
              return GradE<scalar_t, ACT, LANE, RES, STORE>{gp, xp, rp, dzp, Param<LANE>(sp + slot),
                                                            Param<LANE>(tp + slot), Param<LANE>(cp + slot),
                                                            act_param};
            });
          };
          if constexpr (RES) {
            bool_dispatch(dzp != nullptr, grad);
          } else {
            grad(std::false_type{});
          }
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

}  // namespace

at::Tensor act_backward_reduce(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& center, Geom g, Act act, float act_param) {
  return reduce_grad(gy, x, r, scale, shift, center, nullptr, g, act, act_param);
}

at::Tensor act_backward_reduce_dz(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                                  const at::Tensor& scale, const at::Tensor& shift,
                                  const at::Tensor& center, at::Tensor& dz, Geom g, Act act,
                                  float act_param) {
  TORCH_CHECK(r.defined() && dz.defined(), "fastcnn: act_backward_reduce_dz: writes a residual's dz");
  return reduce_grad(gy, x, r, scale, shift, center, &dz, g, act, act_param);
}

void dz_backward_apply(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& scale,
                       const at::Tensor& center, const at::Tensor& alpha, const at::Tensor& beta,
                       at::Tensor& gx, Geom g) {
  FASTCNN_DISPATCH_STORAGE(x.scalar_type(), "fastcnn_dz_backward_apply", [&] {
    const scalar_t* dp = dz.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const float *sp = fptr(scale), *cp = fptr(center), *ap = fptr(alpha), *bp = fptr(beta);
    bool_dispatch(g.I == 1, [&](auto lane_c) {
      constexpr bool LANE = decltype(lane_c)::value;
      elementwise(g, [&](int64_t slot) {
        return DzApplyOp<scalar_t, LANE>{dp, xp, gxp, Param<LANE>(sp + slot), Param<LANE>(cp + slot),
                                         Param<LANE>(ap + slot), Param<LANE>(bp + slot)};
      });
    });
  });
}

void act_backward_apply(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& r,
                        const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& center,
                        const at::Tensor& alpha, const at::Tensor& beta, at::Tensor& gx,
                        at::Tensor& gr, Geom g, Act act, float act_param) {
  // the residual's gradient is dz itself, computed exactly when there is a residual
  TORCH_CHECK(gr.defined() == r.defined(), "fastcnn: act_backward_apply: grad_residual goes with residual");
  FASTCNN_DISPATCH_STORAGE(x.scalar_type(), "fastcnn_act_backward_apply", [&] {
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
          elementwise(g, [&](int64_t slot) {
            return BackwardOp<scalar_t, ACT, LANE, RES>{gp, xp, rp, gxp, grp, Param<LANE>(sp + slot),
                                                        Param<LANE>(tp + slot), Param<LANE>(cp + slot),
                                                        Param<LANE>(ap + slot), Param<LANE>(bp + slot),
                                                        act_param};
          });
        });
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastcnn
