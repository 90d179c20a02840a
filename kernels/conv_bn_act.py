"""``conv_bn_act``: ``act(BN(conv(x, w) + bias) [+ residual])`` -- the post-activation layer
of SimpleNet, VGG, NIN, ResNet, ResNeXt (grouped), in train and eval mode.

Design
------
* **Eval**: one launch. The implicit-GEMM kernel of :mod:`.conv_gemm` folds BN from the
  running statistics into its epilogue (``scale = gamma/sqrt(var+eps)``, ``shift = beta -
  mean*scale``), adds the residual, applies the activation and writes ``y`` once. When a
  gradient is needed it also writes the conv output ``z`` in the same launch.
* **Train**: three launches. (1) the conv kernel writes ``z`` (input dtype) and, from its
  fp32 accumulator tile, per-tile per-channel count / mean / centred sum of squares;
  (2) :func:`.bn_act.bn_finalize` merges them (Chan's formula), writes mean / invstd and the
  folded scale / shift and updates ``running_mean`` / ``running_var`` in place
  (``nn.BatchNorm2d`` semantics, unbiased running variance); (3) one elementwise pass
  ``y = act(z*scale + shift [+ residual])``.
* **Saved for backward**: ``x`` (NHWC; a view when the input is channels_last), the weight,
  ``z`` in the compute dtype, fp32 per-channel mean / invstd, and a reference to the
  residual only when a non-identity activation follows it. The normalised and activated
  values are never stored. In training the forward hands its caller a recipe that rebuilds
  ``y`` from ``z``/scale/shift and the residual (``rebuild=``); the ops layer marks ``y``
  rebuildable with it (:mod:`fastcnn.recompute`; the residual held as its own recipe where
  it has one): inside a fused model the next
  layer's saved ``x`` is then a recipe, not a tensor, so a chain of these layers keeps one
  activation (``z``) per layer; ``y`` is rebuilt by the same ``bn_apply`` launch in backward.
  (The alternative -- applying the previous layer's BN+act in this conv's A-tile prologue --
  would also avoid writing ``y`` in forward, but needs the BN statistics of a whole batch
  before the consumer conv starts, i.e. the same two passes.)
* **Backward**: the fused act + BN backward of :mod:`.bn_act` (one reduction pass giving
  dgamma / dbeta, one elementwise pass giving dz and dresidual); the conv bias gradient is
  ``sum(dz)``, which BN's mean subtraction makes exactly 0 in training (eval:
  ``gamma*invstd*sum(du)``); then the Triton input-grad and weight-grad implicit GEMMs of
  :mod:`.conv_gemm`. No cuDNN call anywhere.
"""
from __future__ import annotations

import torch

from .bn_act import bn_act_backward, bn_apply, bn_finalize, check_batch
from .conv_gemm import conv_dgrad, conv_fwd, conv_geom, conv_wgrad
from .utils import from_nhwc, nchw_output, rebuild_nchw_res, to_nhwc


class _ConvBnActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, cfg, rebuild):
        stride, padding, dilation, groups, training, momentum, eps, act, act_param = cfg
        gm = conv_geom(x.shape, weight.shape, stride, padding, dilation, groups)
        check_batch(gm.m, gm.cout, training)
        xh = to_nhwc(x)
        rh = to_nhwc(residual)
        # autograd runs forward with grad mode off; needs_input_grad tells whether it records
        need_grad = any(ctx.needs_input_grad[:8])
        if training:
            out = conv_fwd(xh, weight, bias, gm, store_y=False, stats=True)
            z = out.z
            mean, invstd, scale, shift = bn_finalize(
                out.pmean, out.pm2, out.block_m, gm.m, bn_weight, bn_bias, running_mean, running_var,
                training=True, momentum=momentum, eps=eps, device=x.device)
            y = nchw_output(bn_apply(z, scale, shift, rh, act, act_param))
            if rebuild is not None:  # consumers keep a recipe, not y (fastcnn.recompute)
                rebuild.extend((rebuild_nchw_res, bn_apply, z, (scale, shift), residual, act, act_param))
        else:
            out = conv_fwd(xh, weight, bias, gm, residual=rh, act=act, act_param=act_param,
                           bn_eval=(running_mean, running_var, bn_weight, bn_bias, eps), store_z=need_grad)
            y, z = nchw_output(out.y), out.z
            if need_grad:
                mean = running_mean.to(torch.float32, copy=True)
                invstd = torch.rsqrt(running_var.to(torch.float32) + eps)
        ctx.cfg, ctx.geom = cfg, gm
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if need_grad:
            ctx.save_for_backward(xh, weight, z, mean, invstd, bn_weight, bn_bias,
                                  rh if act != "identity" else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xh, weight, z, mean, invstd, bn_weight, bn_bias, rh = ctx.saved_tensors
        _, _, _, _, training, _, _, act, act_param = ctx.cfg
        gm = ctx.geom
        need_x, need_w, need_b, need_g, need_beta, _, _, need_r = ctx.needs_input_grad[:8]
        dyh = to_nhwc(dy.to(xh.dtype))
        dz, s_du, s_dux, dres = bn_act_backward(
            dyh, z, mean, invstd, bn_weight, bn_bias, rh, act, act_param, training=training,
            need_dx=need_x or need_w, need_dres=need_r)
        dx = from_nhwc(conv_dgrad(dz, weight, gm)) if need_x else None
        dw = conv_wgrad(xh, dz, gm, weight.dtype) if need_w else None
        db = None
        if need_b:
            db = torch.zeros_like(s_du) if training else bn_weight.float() * invstd * s_du
            db = db.to(ctx.bias_dtype)
        return (dx, dw, db,
                s_dux.to(bn_weight.dtype) if need_g else None,
                s_du.to(bn_bias.dtype) if need_beta else None,
                None, None,
                from_nhwc(dres) if dres is not None else None,
                None, None)


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                stride=1, padding=0, dilation=1, groups=1, training=True, momentum=0.1,
                eps=1e-5, act="relu", act_param=0.0, residual=None, rebuild=None):
    """Same signature and result as :func:`fastcnn.ops.reference.conv_bn_act`. ``rebuild``: a
    list that, in training, receives ``(fn, *args)`` with ``fn(*args)`` recomputing the output
    bit for bit (for :func:`fastcnn.recompute.mark_rebuildable`, which the ops layer calls)."""
    cfg = (tuple(stride), tuple(padding), tuple(dilation), int(groups), bool(training), float(momentum),
           float(eps), act, float(act_param))
    return _ConvBnActFn.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, cfg,
                              rebuild)
