// Activations of the fused kernels, shared by the CPU and CUDA code: their ids, parsing of
// the schema's `str act`, and the scalar forward / derivative in fp32 (host and device).
// The ids and names follow fastcnn/ops/names.py (checked by tests/test_op_names.py).
#pragma once

#include <cmath>
#include <string>

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

namespace fastcnn {

enum Act : int { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kElu = 3, kSilu = 4, kGelu = 5 };

inline Act parse_act(const std::string& name) {
  if (name == "identity") return kIdentity;
  if (name == "relu") return kRelu;
  if (name == "leaky_relu") return kLeakyRelu;
  if (name == "elu") return kElu;
  if (name == "silu") return kSilu;
  if (name == "gelu") return kGelu;
  TORCH_CHECK_VALUE(false, "fastcnn: unknown activation '", name,
                    "'; choose one of identity, relu, leaky_relu, elu, silu, gelu");
}

inline const char* act_name(Act a) {
  switch (a) {
    case kIdentity: return "identity";
    case kRelu: return "relu";
    case kLeakyRelu: return "leaky_relu";
    case kElu: return "elu";
    case kSilu: return "silu";
    default: return "gelu";
  }
}

// Dispatch a runtime activation id to a compile-time constant `ACT` inside the lambda body.
#define FASTCNN_DISPATCH_ACT(act_id, ...)                                   \
  [&] {                                                                     \
    switch (act_id) {                                                       \
      case ::fastcnn::kIdentity: { constexpr int ACT = 0; return __VA_ARGS__(); } \
      case ::fastcnn::kRelu: { constexpr int ACT = 1; return __VA_ARGS__(); }     \
      case ::fastcnn::kLeakyRelu: { constexpr int ACT = 2; return __VA_ARGS__(); } \
      case ::fastcnn::kElu: { constexpr int ACT = 3; return __VA_ARGS__(); }      \
      case ::fastcnn::kSilu: { constexpr int ACT = 4; return __VA_ARGS__(); }     \
      default: { constexpr int ACT = 5; return __VA_ARGS__(); }                   \
    }                                                                       \
  }()

// act(z); p is the negative slope (leaky_relu) or alpha (elu).
template <int ACT>
C10_HOST_DEVICE inline float apply_act(float z, float p) {
  if constexpr (ACT == kIdentity) {
    return z;
  } else if constexpr (ACT == kRelu) {
    return z > 0.f ? z : 0.f;
  } else if constexpr (ACT == kLeakyRelu) {
    return z > 0.f ? z : z * p;
  } else if constexpr (ACT == kElu) {
    return z > 0.f ? z : p * (::expf(z) - 1.f);
  } else if constexpr (ACT == kSilu) {
    return z / (1.f + ::expf(-z));
  } else {
    return 0.5f * z * (1.f + ::erff(z * 0.70710678118654752f));
  }
}

// d act(z) / dz, with PyTorch's convention at the kink (relu'(0) = 0).
template <int ACT>
C10_HOST_DEVICE inline float act_grad(float z, float p) {
  if constexpr (ACT == kIdentity) {
    return 1.f;
  } else if constexpr (ACT == kRelu) {
    return z > 0.f ? 1.f : 0.f;
  } else if constexpr (ACT == kLeakyRelu) {
    return z > 0.f ? 1.f : p;
  } else if constexpr (ACT == kElu) {
    return z > 0.f ? 1.f : p * ::expf(z);
  } else if constexpr (ACT == kSilu) {
    const float s = 1.f / (1.f + ::expf(-z));
    return s * (1.f + z * (1.f - s));
  } else {
    const float cdf = 0.5f * (1.f + ::erff(z * 0.70710678118654752f));
    const float pdf = 0.3989422804014327f * ::expf(-0.5f * z * z);
    return cdf + z * pdf;
  }
}

// gy * act'(z), with the masked branch giving exactly 0 (relu) or gy * p (leaky_relu) as
// eager's threshold_backward / leaky_relu_backward do: a non-finite gy at a position the
// activation cuts stays out of the gradient (inf * 0 would make it NaN).
template <int ACT>
C10_HOST_DEVICE inline float grad_through_act(float gy, float z, float p) {
  if constexpr (ACT == kRelu) {
    return z > 0.f ? gy : 0.f;
  } else if constexpr (ACT == kLeakyRelu) {
    return z > 0.f ? gy : gy * p;
  } else if constexpr (ACT == kElu) {
    return z > 0.f ? gy : gy * (p * ::expf(z));
  } else {
    return gy * act_grad<ACT>(z, p);
  }
}

}  // namespace fastcnn
