// The bn_act op family: fused BatchNorm (+ residual) + activation.
//   csrc/ops/bn_act/bn_act.cpp            this file: every schema of the family, the Autograd
//                                         fallthroughs of its backward ops, and the `bn_act`
//                                         composite (BN semantics of a layer, its C++ autograd)
//   csrc/ops/bn_act/bn_act.h              the composite's C++ interface (used by conv_bn_act)
//   csrc/ops/bn_act/bn_act_kernel.h       the primitive ops' code, written once as templates
//                                         over the device
//   csrc/ops/bn_act/cpu/bn_act_cpu.cpp    registers the primitives for CPU
//   csrc/ops/bn_act/cuda/bn_act_cuda.cpp  registers the primitives for CUDA (CUDA builds)
// The primitives run on the channel_act kernels (csrc/channel_act/); fastcnn/ops/
// extension_backend.py registers their autograd formulas and every op's fake implementation.
// The conventions every fastcnn op follows (dtypes, memory formats, gradients of absent
// inputs) are in csrc/fastcnn.cpp.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>

#include "include/common.h"
#include "include/layer_op.h"
#include "include/saved_hooks.h"
#include "ops/bn_act/bn_act.h"
#include "ops/bn_act/bn_act_kernel.h"

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // training-mode BatchNorm (batch statistics) + residual + activation; returns
  // (y, batch mean, biased batch variance), both statistics fp32 [C]
  m.def("bn_act_forward(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, "
        "str act, float act_param) -> (Tensor, Tensor, Tensor)");
  // act(BN(x) (+ residual)) from given batch statistics (mean, biased var: bn_act_forward's
  // own outputs) -- bit for bit bn_act_forward's y, without its statistics pass: how a
  // rebuilt activation is recomputed in backward
  m.def("bn_act_apply(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor mean, "
        "Tensor var, float eps, str act, float act_param) -> Tensor");
  // -> (grad_x, grad_residual, grad_weight, grad_bias)
  m.def("bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
        "Tensor mean, Tensor var, float eps, str act, float act_param) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // act(x * scale[c] + shift[c] (+ residual)): eval-mode BN (folded) and conv bias + act
  m.def("scale_shift_act(Tensor x, Tensor? scale, Tensor? shift, Tensor? residual, str act, "
        "float act_param) -> Tensor");
  // -> (grad_x, grad_residual, grad_scale, grad_shift)
  m.def("scale_shift_act_backward(Tensor grad_y, Tensor x, Tensor? scale, Tensor? shift, "
        "Tensor? residual, str act, float act_param) -> (Tensor, Tensor, Tensor, Tensor)");
}

// The backward ops are not differentiable themselves (no double backward): autograd passes
// through them instead of warning about a missing formula.
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) {
  for (const char* name : {"bn_act_backward", "scale_shift_act_backward"})
    m.impl(name, torch::CppFunction::makeFallthrough());
}

namespace fastcnn {

// ----------------------------------------------------------------------- the layer semantics
namespace {

// Whether the layer may run the primitive's code directly instead of calling it through the
// dispatcher: real tensors, all on x's device (not fake, functional or vmap-batched
// wrappers), and no Python dispatch mode or functorch transform active -- the cases the
// dispatcher calls exist for (csrc/include/layer_op.h). It saves a dispatcher hop and lets
// the training forward pass the running statistics to the kernels (the primitive's schema,
// which the autograd and fake registrations in Python share, has none).
bool direct_call_ok(const Tensor& x, std::initializer_list<const Tensor*> others) {
  constexpr auto wrapped = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                                c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                                c10::DispatchKey::FuncTorchGradWrapper});
  for (auto key : {c10::DispatchKey::Python, c10::DispatchKey::PythonDispatcher, c10::DispatchKey::PreDispatch,
                   c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::Functionalize})
    if (c10::impl::tls_is_dispatch_key_included(key)) return false;
  if (!(x.is_cpu() || x.is_cuda()) || x.key_set().has_any(wrapped)) return false;
  for (const Tensor* t : others)
    if (t->defined() && (t->device() != x.device() || t->key_set().has_any(wrapped))) return false;
  return true;
}

// training: (y, batch mean, batch var) with the running statistics updated
std::tuple<Tensor, Tensor, Tensor> bn_train_layer(const Tensor& z, const Tensor& weight, const Tensor& bias,
                                                  const OptT& running_mean, const OptT& running_var,
                                                  const OptT& residual, double momentum, double eps,
                                                  c10::string_view act, double act_param) {
  const Tensor rm = or_undefined(running_mean), rv = or_undefined(running_var), r = or_undefined(residual);
  if (direct_call_ok(z, {&weight, &bias, &rm, &rv, &r})) {
#ifdef WITH_CUDA
    if (z.is_cuda())
      return bn_train_forward<c10::kCUDA>(z, weight, bias, residual, eps, act, act_param, running_mean, running_var,
                                          momentum);
#endif
    if (z.is_cpu())
      return bn_train_forward<c10::kCPU>(z, weight, bias, residual, eps, act, act_param, running_mean, running_var,
                                         momentum);
  }
  auto out = op_bn_act_forward().call(z, weight, bias, residual, eps, act, act_param);
  update_running_stats(running_mean, running_var, std::get<1>(out), std::get<2>(out), z.numel() / z.size(1),
                       momentum);
  return out;
}

}  // namespace

BnLayerOut bn_layer_forward(const Tensor& z, const Tensor& weight, const Tensor& bias, const OptT& running_mean,
                            const OptT& running_var, const OptT& residual, bool training, double momentum,
                            double eps, c10::string_view act, double act_param) {
  if (training) {
    auto [y, mean, var] =
        bn_train_layer(z, weight, bias, running_mean, running_var, residual, momentum, eps, act, act_param);
    return {y, mean, var};
  }
  TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                    "fastcnn: bn_act in eval mode needs running_mean and running_var");
  check_activation(z, "x");
  check_vector(*running_mean, z.size(1), z, "running_mean");
  check_vector(*running_var, z.size(1), z, "running_var");
  check_vector(weight, z.size(1), z, "bn_weight");
  check_vector(bias, z.size(1), z, "bn_bias");
  // BN folded from the running statistics: bn_act_apply's coefficients (bn_coef's on the CPU; on
  // CUDA computed inside its one kernel)
  return {op_bn_act_apply().call(z, weight, bias, residual, *running_mean, *running_var, eps, act, act_param),
          Tensor(), Tensor()};
}

BnLayerGrad bn_layer_backward(const Tensor& gy, const Tensor& z, const Tensor& weight, const Tensor& bias,
                              const Tensor& residual, const Tensor& mean, const Tensor& var, bool training,
                              double eps, c10::string_view act, double act_param) {
  if (training) {
    auto [gz, gr, gw, gb] = op_bn_act_backward().call(gy, z, weight, bias, opt(residual), mean, var, eps, act,
                                                      act_param);
    return {gz, residual.defined() ? gr : Tensor(), gw, gb};
  }
  const BnCoef k = bn_coef(weight, bias, mean, var, eps);
  auto [gz, gr, gscale, gshift] =
      op_scale_shift_act_backward().call(gy, z, k.scale, k.shift, opt(residual), act, act_param);
  // scale = weight * invstd and shift = bias - mean * scale both depend on the weight
  return {gz, residual.defined() ? gr : Tensor(), cast((gscale - f32(mean) * gshift) * k.invstd, weight.scalar_type()),
          cast(gshift, bias.scalar_type())};
}

namespace {

// --------------------------------------------------------------------- the bn_act composite
// (y, batch mean, batch var); eval returns empty statistics
std::tuple<Tensor, Tensor, Tensor> bn_act_outputs(const Tensor& x, BnLayerOut o) {
  if (!o.mean.defined()) {  // two tensors: outputs must not alias each other
    o.mean = at::empty({0}, x.options().dtype(at::kFloat));
    o.var = at::empty({0}, x.options().dtype(at::kFloat));
  }
  return {o.y, o.mean, o.var};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> bn_act_layer(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                const OptT& running_mean, const OptT& running_var,
                                                const OptT& residual, bool training, double momentum, double eps,
                                                c10::string_view act, double act_param) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return bn_act_outputs(x, bn_layer_forward(x, weight, bias, running_mean, running_var, residual, training,
                                            momentum, eps, act, act_param));
}

namespace {

// The op's backward node, written as ATen's generated nodes are (a torch::autograd::Node with
// plain members) rather than as a torch::autograd::Function: a Function keeps its constants
// in saved_data, a string-keyed hash map of IValues, and records per-input metadata to
// materialize absent gradients -- allocations and hashing on every training call that cost
// about as many instructions as the BN kernels themselves at CIFAR sizes (counted:
// bench/host_instructions.py). Edges: x, weight, bias, residual (an absent one gets an
// invalid edge, which the engine skips).
struct BnActBackward final : public torch::autograd::Node {
  // x (and the residual) through SavedVariable: autograd's in-place check, and the saved-tensor
  // hooks of a fused model (fastcnn.recompute) see them; the BN parameters and statistics as
  // SavedBn keeps them (csrc/ops/bn_act/bn_act.h)
  torch::autograd::SavedVariable x, residual;
  SavedBn bn;

  std::string name() const override { return "fastcnn::BnActBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    residual.reset_data();
    bn.release();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bn.check("bn_act");
    const Tensor x_ = x.unpack(), r_ = residual.unpack();
    variable_list out(4);
    if (!grads[0].defined()) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [m, v] = bn.statistics();
    BnLayerGrad g = bn_layer_backward(grads[0], x_, bn.weight, bn.bias, r_, m, v, bn.training, bn.eps, bn.act,
                                      bn.act_param);
    out[0] = std::move(g.gz);
    out[1] = std::move(g.gweight);
    out[2] = std::move(g.gbias);
    out[3] = std::move(g.gr);
    return out;
  }
};

// The Autograd-key path: y with this op's node recorded when some input requires grad, else
// the op below autograd. x_is_new: x is a tensor the caller has just created, which no recipe
// can exist for: saved past fastcnn.recompute's own hooks (csrc/include/saved_hooks.h).
std::tuple<Tensor, Tensor, Tensor> bn_act_recorded(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                   const OptT& running_mean, const OptT& running_var,
                                                   const OptT& residual, bool training, double momentum, double eps,
                                                   c10::string_view act, double act_param, bool x_is_new) {
  const Tensor r = or_undefined(residual);
  if (!any_requires_grad({&x, &weight, &bias, &r}))
    return bn_act_layer(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act,
                        act_param);
  auto node = make_node<BnActBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, r));
  BnLayerOut o;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    o = bn_layer_forward(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act,
                         act_param);
  }
  {
    PastRecomputeHooks past(x_is_new && recompute_hooks_on_top());
    node->x = torch::autograd::SavedVariable(x, false);
  }
  node->residual = torch::autograd::SavedVariable(r, false);
  node->bn.save(weight, bias, training ? o.mean : *running_mean, training ? o.var : *running_var, training, eps, act,
                act_param);
  auto [y, m, v] = bn_act_outputs(x, std::move(o));
  torch::autograd::set_history(y, NodePtr(node));  // the batch statistics stay outside the graph
  return {y, m, v};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> bn_act_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                   const OptT& running_mean, const OptT& running_var,
                                                   const OptT& residual, bool training, double momentum,
                                                   double eps, c10::string_view act, double act_param) {
  return bn_act_recorded(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act,
                         act_param, false);
}

std::tuple<Tensor, Tensor, Tensor> bn_act_autograd_of_new(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                          const OptT& running_mean, const OptT& running_var,
                                                          const OptT& residual, bool training, double momentum,
                                                          double eps, c10::string_view act, double act_param) {
  return bn_act_recorded(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act,
                         act_param, true);
}

// the composite layer op: one dispatcher call forward, one autograd node backward
TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  // act(BN(x) (+ residual)) as nn.BatchNorm2d + activation: training uses batch statistics and
  // updates running_mean/var in place with `momentum` (resolved factor; 0: no update); eval folds
  // the running statistics. Returns (y, batch mean, biased batch var); eval: empty statistics.
  m.def("bn_act(Tensor x, Tensor weight, Tensor bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor? residual, bool training, float momentum, float eps, str act, float act_param) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastcnn, CompositeExplicitAutograd, m) { m.impl("bn_act", &bn_act_layer); }
TORCH_LIBRARY_IMPL(fastcnn, Autograd, m) { m.impl("bn_act", &bn_act_autograd); }

}  // namespace fastcnn
