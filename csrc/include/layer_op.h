// What the composite layer ops (csrc/ops/conv_layers/conv_bn_act.cpp and conv_act.cpp, the
// `bn_act` and `se_block` composites in csrc/ops/bn_act/bn_act.cpp and
// csrc/ops/se_block/se_block.cpp) share: calling the primitive ops through the dispatcher, the
// BatchNorm running-statistics update, and bookkeeping for their C++ autograd (the
// torch::autograd::Function helpers of se_block; make_node for the hand-written nodes of
// bn_act, bn_act_conv and conv_act, which skip a Function's saved_data map).
//
// Why composites: a fused layer used to be several Python-level calls (convolution, the
// primitive op with a Python autograd formula, the running-statistics update, eval folding),
// and on a GPU the host work around a CIFAR layer's kernels decides its speed. A composite op
// is one dispatcher call forward and one autograd node backward, with everything else in C++.
//
// Why the primitives are called through the dispatcher (and not as plain C++ functions): so
// that FakeTensor / torch.compile tracing of a composite reaches their fake implementations
// (registered in fastcnn/ops/extension_backend.py) instead of reading a fake tensor's data.
// The calls run below autograd (at::AutoDispatchBelowADInplaceOrView), so each costs one
// dispatcher hop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include "include/common.h"

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastcnn {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A typed handle on the schema `qualified` (e.g. "fastcnn::bn_act_forward"), looked up once.
#define FASTCNN_OP_HANDLE(fn_name, qualified, ...)                                          \
  inline const c10::TypedOperatorHandle<__VA_ARGS__>& fn_name() {                          \
    static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(qualified, "").typed<__VA_ARGS__>(); \
    return h;                                                                              \
  }

using OptT = std::optional<Tensor>;

FASTCNN_OP_HANDLE(op_bn_act_forward, "fastcnn::bn_act_forward",
                  std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                     const OptT&, double, c10::string_view, double))
FASTCNN_OP_HANDLE(op_bn_act_backward, "fastcnn::bn_act_backward",
                  std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const Tensor&, const OptT&, const Tensor&,
                                                             const Tensor&, double, c10::string_view, double))
FASTCNN_OP_HANDLE(op_bn_act_apply, "fastcnn::bn_act_apply",
                  Tensor(const Tensor&, const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&,
                         double, c10::string_view, double))
FASTCNN_OP_HANDLE(op_scale_shift_act, "fastcnn::scale_shift_act",
                  Tensor(const Tensor&, const OptT&, const OptT&, const OptT&, c10::string_view, double))
FASTCNN_OP_HANDLE(op_scale_shift_act_backward, "fastcnn::scale_shift_act_backward",
                  std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptT&,
                                                             const OptT&, const OptT&, c10::string_view,
                                                             double))
FASTCNN_OP_HANDLE(op_se_block_forward, "fastcnn::se_block_forward",
                  std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptT&, const Tensor&,
                                             const OptT&, const OptT&, c10::string_view, double))
FASTCNN_OP_HANDLE(op_se_block_backward, "fastcnn::se_block_backward",
                  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
                      const Tensor&, const OptT&, const OptT&, c10::string_view, double))

// A tensor whose data this code may read directly: a real CPU tensor, not a fake, functional
// or otherwise wrapped one (those carry the Python or Functionalize dispatch keys).
inline bool plain_cpu(const Tensor& t) {
  constexpr auto wrapped = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.is_cpu() && !t.key_set().has_any(wrapped);
}

// nn.BatchNorm2d's running-statistics update, in place: running = (1 - m) * running + m * batch,
// the variance unbiased (count / (count - 1)). One loop for real fp32 CPU buffers (the two
// lerp_ calls and casts it replaces cost more than the arithmetic); ATen ops otherwise, which
// functionalization and fake tensors see.
inline void update_running_stats(const OptT& running_mean, const OptT& running_var, const Tensor& mean,
                                 const Tensor& var, int64_t count, double momentum) {
  if (!running_mean.has_value() || !running_var.has_value() || momentum == 0.0) return;
  const Tensor &rm = *running_mean, &rv = *running_var;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  if (plain_cpu(rm) && plain_cpu(rv) && plain_cpu(mean) && plain_cpu(var) &&
      rm.scalar_type() == at::kFloat && rv.scalar_type() == at::kFloat && rm.is_contiguous() &&
      rv.is_contiguous() && mean.scalar_type() == at::kFloat && var.scalar_type() == at::kFloat &&
      mean.is_contiguous() && var.is_contiguous()) {
    float *pm = rm.data_ptr<float>(), *pv = rv.data_ptr<float>();
    const float *bm = mean.const_data_ptr<float>(), *bv = var.const_data_ptr<float>();
    const float m = static_cast<float>(momentum), u = static_cast<float>(unbias);
    for (int64_t c = 0, C = rm.numel(); c < C; ++c) {
      pm[c] += m * (bm[c] - pm[c]);
      pv[c] += m * (bv[c] * u - pv[c]);
    }
    return;
  }
  at::NoGradGuard no_grad;
  rm.lerp_(cast(mean, rm.scalar_type()), momentum);
  rv.lerp_(cast(var * unbias, rv.scalar_type()), momentum);
}

inline OptT opt(const Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

// Whether an autograd Function must record a node: grad mode on and some input requires grad.
inline bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

inline Tensor or_undefined(const OptT& t) { return t.has_value() ? *t : Tensor(); }

// How autograd holds its nodes: std::shared_ptr<Node> up to torch 2.12, c10::intrusive_ptr<Node>
// since (pytorch#181782). make_node<T>() creates a hand-written node either way.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<T>();
  else
    return c10::make_intrusive<T>();
}

}  // namespace fastcnn
