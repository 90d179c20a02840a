// The fused BatchNorm + residual + activation ops and the scale/shift + activation op (the
// eval-mode BN and conv-bias epilogue), composed from the channel_act primitives
// (csrc/cpu/channel_act_kernel.cpp, csrc/cuda/channel_act_kernel.cu); registered for CPU
// and, when built with CUDA, CUDA.
//
// Training forward: one statistics pass (shifted sums, fp64 combine) and one
// normalise+residual+act pass. Backward: one reduction pass (sum dz, sum dz*(x-mean)) and one
// elementwise pass; only x (and the residual) plus the fp32 mean/var are needed.
#include <torch/library.h>

#include <cmath>

#include "bn_act.h"
#include "common.h"
#include "layer_op.h"

namespace fastcnn {
namespace {

// Per-channel fp32 vectors of BN: scale = weight / sqrt(var + eps), shift = bias - mean * scale
// (and invstd = 1 / sqrt(var + eps)). On CPU one loop computes them: the chain of tiny ATen ops
// it replaces cost more than the kernels themselves at the zoo's small shapes.
struct BnCoef {
  Tensor scale, shift, invstd;
};

BnCoef bn_coef(const Tensor& weight, const Tensor& bias, const Tensor& mean_, const Tensor& var_,
               double eps) {
  const Tensor mean = f32(mean_), var = f32(var_);
  if (!plain_cpu(mean) || !plain_cpu(var) || !plain_cpu(weight) || !plain_cpu(bias)) {
    const Tensor invstd = at::rsqrt(var + eps);
    const Tensor scale = f32(weight) * invstd;
    return {scale, f32(bias) - mean * scale, invstd};
  }
  const Tensor w = f32(weight), b = f32(bias);
  const int64_t C = mean.numel();
  BnCoef k{at::empty({C}, mean.options()), at::empty({C}, mean.options()), at::empty({C}, mean.options())};
  const float *wp = w.const_data_ptr<float>(), *bp = b.const_data_ptr<float>(),
              *mp = mean.const_data_ptr<float>(), *vp = var.const_data_ptr<float>();
  float *sp = k.scale.data_ptr<float>(), *tp = k.shift.data_ptr<float>(), *ip = k.invstd.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  for (int64_t c = 0; c < C; ++c) {
    ip[c] = 1.f / std::sqrt(vp[c] + feps);
    sp[c] = wp[c] * ip[c];
    tp[c] = bp[c] - mp[c] * sp[c];
  }
  return k;
}

// From the backward sums [2, C] (sum dz, sum dz * (x - mean)) over m values per channel:
// grad_x = scale * dz + alpha * (x - mean) + beta, and the fp32 parameter gradients.
struct BnGrad {
  Tensor alpha, beta, grad_weight, grad_bias;
};

BnGrad bn_grad(const BnCoef& k, const Tensor& sums, int64_t m) {
  const double inv_m = 1.0 / static_cast<double>(m);
  if (!plain_cpu(sums)) {
    const Tensor sum_dz = sums[0].contiguous(), sum_dzx = sums[1].contiguous();
    return {(-inv_m) * k.scale * k.invstd * k.invstd * sum_dzx, (-inv_m) * k.scale * sum_dz,
            sum_dzx * k.invstd, sum_dz.clone()};
  }
  const int64_t C = k.scale.numel();
  const auto opts = k.scale.options();
  BnGrad d{at::empty({C}, opts), at::empty({C}, opts), at::empty({C}, opts), at::empty({C}, opts)};
  const float *sp = k.scale.const_data_ptr<float>(), *ip = k.invstd.const_data_ptr<float>(),
              *dz = sums.const_data_ptr<float>(), *dzx = dz + C;
  float *ap = d.alpha.data_ptr<float>(), *bp = d.beta.data_ptr<float>(), *gw = d.grad_weight.data_ptr<float>(),
        *gb = d.grad_bias.data_ptr<float>();
  const float neg_inv_m = static_cast<float>(-inv_m);
  for (int64_t c = 0; c < C; ++c) {
    ap[c] = neg_inv_m * sp[c] * ip[c] * ip[c] * dzx[c];
    bp[c] = neg_inv_m * sp[c] * dz[c];
    gw[c] = dzx[c] * ip[c];
    gb[c] = dz[c];
  }
  return d;
}

std::tuple<Tensor, Tensor, Tensor> bn_act_forward(const Tensor& x_, const Tensor& weight,
                                                  const Tensor& bias,
                                                  const c10::optional<Tensor>& residual, double eps,
                                                  c10::string_view act, double act_param) {
  check_activation(x_, "x");
  const int64_t C = x_.size(1);
  check_vector(weight, C, x_, "weight");
  check_vector(bias, C, x_, "bias");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  TORCH_CHECK_VALUE(x_.numel() / C > 1, "fastcnn: bn_act_forward needs more than one value per channel, got x of shape ",
                    x_.sizes());
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  auto [mean, var] = FASTCNN_ON_DEVICE(x, slot_mean_var, x, g);
  const BnCoef k = bn_coef(weight, bias, mean, var, eps);
  const Tensor &scale = k.scale, &shift = k.shift;
  Tensor y = empty_in_format(x, fmt);
  FASTCNN_ON_DEVICE(x, act_forward, x, r, y, scale, shift, g, a, static_cast<float>(act_param));
  return {y, mean, var};
}

// The checks bn_act_apply and bn_act_backward share: x an activation, [C] weight, bias and
// statistics, a residual like x.
void check_bn_stats_args(const Tensor& x, const Tensor& weight, const Tensor& bias,
                         const c10::optional<Tensor>& residual, const Tensor& mean, const Tensor& var) {
  check_activation(x, "x");
  const int64_t C = x.size(1);
  check_vector(weight, C, x, "weight");
  check_vector(bias, C, x, "bias");
  check_vector(mean, C, x, "mean");
  check_vector(var, C, x, "var");
  if (residual.has_value()) check_like(*residual, x, "residual");
}

// y of bn_act_forward from its own statistics: the same coefficients (bn_coef on the same fp32
// mean and var) and the same elementwise kernel, so the result is identical bit for bit.
Tensor bn_act_apply(const Tensor& x_, const Tensor& weight, const Tensor& bias,
                    const c10::optional<Tensor>& residual, const Tensor& mean_, const Tensor& var_,
                    double eps, c10::string_view act, double act_param) {
  check_bn_stats_args(x_, weight, bias, residual, mean_, var_);
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  const BnCoef k = bn_coef(weight, bias, mean_, var_, eps);
  Tensor y = empty_in_format(x, fmt);
  FASTCNN_ON_DEVICE(x, act_forward, x, r, y, k.scale, k.shift, channel_geom(x, fmt), a,
                    static_cast<float>(act_param));
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& gy_, const Tensor& x_, const Tensor& weight, const Tensor& bias,
    const c10::optional<Tensor>& residual, const Tensor& mean_, const Tensor& var_, double eps,
    c10::string_view act, double act_param) {
  check_bn_stats_args(x_, weight, bias, residual, mean_, var_);
  check_like(gy_, x_, "grad_y");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), gy = gy_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  const Tensor mean = f32(mean_);
  const BnCoef k = bn_coef(weight, bias, mean, var_, eps);
  const Tensor sums = FASTCNN_ON_DEVICE(x, act_backward_reduce, gy, x, r, k.scale, k.shift, mean, g, a,
                                        static_cast<float>(act_param));
  const BnGrad d = bn_grad(k, sums, g.per_slot());
  Tensor gx = empty_in_format(x, fmt);
  Tensor gr = r.defined() ? empty_in_format(x, fmt) : Tensor();
  FASTCNN_ON_DEVICE(x, act_backward_apply, gy, x, r, k.scale, k.shift, mean, d.alpha, d.beta, gx, gr, g, a,
                    static_cast<float>(act_param));
  return {gx, gr.defined() ? gr : no_grad_tensor(x), d.grad_weight.to(weight.scalar_type()),
          d.grad_bias.to(bias.scalar_type())};
}

// scale / shift default to 1 / 0 when absent
std::pair<Tensor, Tensor> scale_shift(const Tensor& x, const c10::optional<Tensor>& scale,
                                      const c10::optional<Tensor>& shift) {
  const int64_t C = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  if (scale.has_value()) check_vector(*scale, C, x, "scale");
  if (shift.has_value()) check_vector(*shift, C, x, "shift");
  return {scale.has_value() ? f32(*scale) : at::ones({C}, fopts),
          shift.has_value() ? f32(*shift) : at::zeros({C}, fopts)};
}

Tensor scale_shift_act(const Tensor& x_, const c10::optional<Tensor>& scale_,
                       const c10::optional<Tensor>& shift_, const c10::optional<Tensor>& residual,
                       c10::string_view act, double act_param) {
  check_activation(x_, "x");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  auto [scale, shift] = scale_shift(x_, scale_, shift_);
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), r = in_format(residual, fmt);
  Tensor y = empty_in_format(x, fmt);
  FASTCNN_ON_DEVICE(x, act_forward, x, r, y, scale, shift, channel_geom(x, fmt), a,
                    static_cast<float>(act_param));
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scale_shift_act_backward(
    const Tensor& gy_, const Tensor& x_, const c10::optional<Tensor>& scale_,
    const c10::optional<Tensor>& shift_, const c10::optional<Tensor>& residual,
    c10::string_view act, double act_param) {
  check_activation(x_, "x");
  check_like(gy_, x_, "grad_y");
  if (residual.has_value()) check_like(*residual, x_, "residual");
  const Act a = parse_act(std::string(act));
  c10::OptionalDeviceGuard guard(at::device_of(x_));
  auto [scale, shift] = scale_shift(x_, scale_, shift_);
  const auto fmt = kernel_format(x_);
  const Tensor x = x_.contiguous(fmt), gy = gy_.contiguous(fmt), r = in_format(residual, fmt);
  const Geom g = channel_geom(x, fmt);
  const Tensor zeros = at::zeros_like(scale);
  Tensor gscale = no_grad_tensor(x), gshift = no_grad_tensor(x);
  if (scale_.has_value() || shift_.has_value()) {
    const Tensor sums = FASTCNN_ON_DEVICE(x, act_backward_reduce, gy, x, r, scale, shift, zeros, g,
                                          a, static_cast<float>(act_param));
    if (scale_.has_value()) gscale = sums[1].to(scale_->scalar_type(), false, /*copy=*/true);
    if (shift_.has_value()) gshift = sums[0].to(shift_->scalar_type(), false, /*copy=*/true);
  }
  Tensor gx = empty_in_format(x, fmt);
  Tensor gr = r.defined() ? empty_in_format(x, fmt) : Tensor();
  FASTCNN_ON_DEVICE(x, act_backward_apply, gy, x, r, scale, shift, zeros, zeros, zeros, gx, gr, g,
                    a, static_cast<float>(act_param));
  return {gx, gr.defined() ? gr : no_grad_tensor(x), gscale, gshift};
}

}  // namespace

// ----------------------------------------------------------------------- the layer semantics
BnLayerOut bn_layer_forward(const Tensor& z, const Tensor& weight, const Tensor& bias, const OptT& running_mean,
                            const OptT& running_var, const OptT& residual, bool training, double momentum,
                            double eps, c10::string_view act, double act_param) {
  if (training) {
    auto [y, mean, var] = op_bn_act_forward().call(z, weight, bias, residual, eps, act, act_param);
    update_running_stats(running_mean, running_var, mean, var, z.numel() / z.size(1), momentum);
    return {y, mean, var};
  }
  TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                    "fastcnn: bn_act in eval mode needs running_mean and running_var");
  check_activation(z, "x");
  check_vector(*running_mean, z.size(1), z, "running_mean");
  check_vector(*running_var, z.size(1), z, "running_var");
  check_vector(weight, z.size(1), z, "bn_weight");
  check_vector(bias, z.size(1), z, "bn_bias");
  const BnCoef k = bn_coef(weight, bias, *running_mean, *running_var, eps);
  return {op_scale_shift_act().call(z, k.scale, k.shift, residual, act, act_param), Tensor(), Tensor()};
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

struct BnActFunction : public torch::autograd::Function<BnActFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const OptT& running_mean, const OptT& running_var, const OptT& residual,
                               bool training, double momentum, double eps, c10::string_view act,
                               double act_param) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    BnLayerOut o = bn_layer_forward(x, weight, bias, running_mean, running_var, residual, training, momentum,
                                    eps, act, act_param);
    // the batch statistics are this node's own [C] vectors: kept in saved_data, past the
    // saved-tensor hooks (one Python call each inside a fused model) -- the running statistics
    // of eval mode are buffers others may change, so they go through save_for_backward's checks
    // The BN weight and bias (parameters) likewise, with their version counters checked in
    // backward as save_for_backward would.
    if (training) {
      ctx->save_for_backward({x, or_undefined(residual)});
      ctx->saved_data["mean"] = o.mean;
      ctx->saved_data["var"] = o.var;
    } else {
      ctx->save_for_backward({x, or_undefined(residual), *running_mean, *running_var});
    }
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["bias"] = bias;
    ctx->saved_data["versions"] = std::vector<int64_t>{static_cast<int64_t>(weight._version()),
                                                       static_cast<int64_t>(bias._version())};
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["act_param"] = act_param;
    auto [y, m, v] = bn_act_outputs(x, std::move(o));
    ctx->mark_non_differentiable({m, v});
    return {y, m, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &residual = saved[1];
    const Tensor weight = ctx->saved_data["weight"].toTensor(), bias = ctx->saved_data["bias"].toTensor();
    const auto versions = ctx->saved_data["versions"].toIntVector();
    TORCH_CHECK(weight._version() == static_cast<uint32_t>(versions[0]) &&
                    bias._version() == static_cast<uint32_t>(versions[1]),
                "fastcnn: a BatchNorm weight or bias used by a fused bn_act was modified in place between "
                "forward and backward (e.g. an optimizer step before backward); its gradient would be wrong");
    variable_list out(11);
    if (!grads[0].defined()) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::string act = ctx->saved_data["act"].toStringRef();
    const bool training = ctx->saved_data["training"].toBool();
    const Tensor mean = training ? ctx->saved_data["mean"].toTensor() : saved[2];
    const Tensor var = training ? ctx->saved_data["var"].toTensor() : saved[3];
    BnLayerGrad g = bn_layer_backward(grads[0], x, weight, bias, residual, mean, var, training,
                                      ctx->saved_data["eps"].toDouble(), act, ctx->saved_data["act_param"].toDouble());
    out[0] = g.gz;
    out[1] = g.gweight;
    out[2] = g.gbias;
    out[5] = g.gr;
    return out;
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> bn_act_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                   const OptT& running_mean, const OptT& running_var,
                                                   const OptT& residual, bool training, double momentum,
                                                   double eps, c10::string_view act, double act_param) {
  const Tensor r = or_undefined(residual);
  if (!any_requires_grad({&x, &weight, &bias, &r}))
    return bn_act_layer(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act,
                        act_param);
  auto out = BnActFunction::apply(x, weight, bias, running_mean, running_var, residual, training, momentum,
                                  eps, act, act_param);
  return {out[0], out[1], out[2]};
}

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("bn_act_apply", &bn_act_apply);
  m.impl("bn_act_backward", &bn_act_backward);
  m.impl("scale_shift_act", &scale_shift_act);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("bn_act_apply", &bn_act_apply);
  m.impl("bn_act_backward", &bn_act_backward);
  m.impl("scale_shift_act", &scale_shift_act);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward);
}
#endif

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
