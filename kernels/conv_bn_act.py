"""``conv_bn_act``: ``act(BN(conv(x, w) + bias) [+ residual])`` -- the post-activation layer
of SimpleNet, VGG, NIN, ResNet, ResNeXt (grouped), in train and eval mode.

Design
------
* **Eval**: one launch. The implicit-GEMM kernel of :mod:`.conv_gemm` folds BN from the
  running statistics into its epilogue (``scale = gamma/sqrt(var+eps)``, ``shift = beta -
  mean*scale``), adds the residual, applies the activation and writes ``y`` once. When a
  gradient is needed it also writes the conv output ``z`` in the same launch (and the
  per-channel stats block for backward comes from the finalize kernel's eval branch).
* **Train**: three launches. (1) the conv kernel writes ``z`` (input dtype) and, from its
  fp32 accumulator tile, per-tile per-channel mean / centred sum of squares; (2)
  :func:`.bn_act.bn_finalize` merges them (Chan's formula; in parallel first when there are
  many tiles), writes the ``[4, C]`` stats block (mean, invstd, folded scale / shift) and
  updates ``running_mean`` / ``running_var`` in place (``nn.BatchNorm2d`` semantics, unbiased
  running variance); (3) one elementwise pass ``y = act(z*scale + shift [+ residual])``.
* **Saved for backward**: ``x`` (channels_last: the input itself when it already is), the
  weight, ``z`` in the compute dtype, the ``[4, C]`` fp32 stats block, and a reference to the
  residual only when a non-identity activation follows it. The normalised and activated
  values are never stored. In training the forward hands its caller a recipe that rebuilds
  ``y`` from ``z``, the stats block and the residual (``rebuild=``); the ops layer marks ``y``
  rebuildable with it (:mod:`fastcnn.recompute`; the residual held as its own recipe where
  it has one): inside a fused model the next layer's saved ``x`` is then a recipe, not a
  tensor, so a chain of these layers keeps one activation (``z``) per layer; ``y`` is rebuilt
  by the same ``bn_apply`` launch in backward. (The alternative -- applying the previous
  layer's BN+act in this conv's A-tile prologue -- would also avoid writing ``y`` in forward,
  but needs the BN statistics of a whole batch before the consumer conv starts, i.e. the
  same two passes.)
* **Backward**: the fused act + BN backward of :mod:`.bn_act` (one reduction pass giving
  dgamma / dbeta, one elementwise pass giving dz and dresidual); the conv bias gradient is
  ``sum(dz)``, which BN's mean subtraction makes exactly 0 in training (eval:
  ``gamma*invstd*sum(du)``); then the Triton input-grad and weight-grad implicit GEMMs of
  :mod:`.conv_gemm`. No cuDNN call anywhere.

Design notes: launches and passes over memory (activation-sized tensors; weights, the
``[tiles, 2, C]`` partials and ``[4, C]`` vectors are small)
-----------------------------------------------------------------------------------------
* forward, training: 3 launches (4 when the conv has more than
  :data:`.bn_act.DIRECT_ROWS` output tiles: the parallel merge of the statistics partials) --
  conv (reads x, writes z + partials), [merge], finalize, apply (reads z [+ residual], writes
  y): reads x once (the KxK re-reads hit the cache), writes z and y, reads z once more.
* forward, eval: 1 launch (reads x [+ residual], writes y; and z when autograd records,
  plus the finalize launch that derives the stats block for backward).
* backward: 4 launches + ATen ``sum``\\ s of partials -- BN reduce (reads dy, z [+ residual]),
  BN apply (reads dy, z [+ residual], writes dz [and dresidual]), input-grad GEMM (reads dz,
  writes dx; at stride > 1 only the taps each input pixel takes), weight-grad GEMM (reads x,
  dz; fp32 partials per split, summed). A rebuilt ``y`` costs one apply launch (reads z [+
  residual], writes y) in the consumer's backward.
* weight: read in place when channels_last (or 1x1 / depthwise); an NCHW KxK weight is
  packed once per weight version and the pack shared by forward and backward
  (:func:`.conv_gemm.weight_operand`).
* host: the statistics partials live in a reused scratch buffer, launch parameters and
  autotuner choices come from per-shape caches (:class:`.utils.PlanCache`).
"""
from __future__ import annotations

import torch

from .bn_act import bn_act_backward, bn_apply, bn_finalize, check_batch, stats_scratch_numel
from .conv_gemm import conv_dgrad, conv_fwd, conv_geom, conv_wgrad, stats_rows
from .utils import as_cl, rebuild_apply, scratch


class _ConvBnActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, cfg, rebuild):
        stride, padding, dilation, groups, training, momentum, eps, act, act_param, records = cfg
        gm = conv_geom(x.shape, weight.shape, stride, padding, dilation, groups)
        check_batch(gm.m, gm.cout, training)
        xc = as_cl(x)
        rc = as_cl(residual)
        # autograd runs forward with grad mode off: records tells whether it records
        need_grad = records and any(ctx.needs_input_grad[:8])
        if training:
            part = scratch(stats_scratch_numel(stats_rows(gm.m), gm.cout), x.device)
            _, z, tiles, block_m = conv_fwd(xc, weight, bias, gm, store_y=False, part=part,
                                            backward_follows=need_grad and ctx.needs_input_grad[0])
            stats = bn_finalize(part, tiles, block_m, gm.m, gm.cout, bn_weight, bn_bias, running_mean,
                                running_var, training=True, momentum=momentum, eps=eps, device=x.device)
            y = bn_apply(z, stats, rc, act, act_param)
            if rebuild is not None:  # consumers keep a recipe, not y (fastcnn.recompute)
                rebuild.extend((rebuild_apply, bn_apply, z, (stats,), residual, act, act_param))
        else:
            y, z, _, _ = conv_fwd(xc, weight, bias, gm, residual=rc, act=act, act_param=act_param,
                                  bn_eval=(running_mean, running_var, bn_weight, bn_bias, eps), store_z=need_grad,
                                  backward_follows=need_grad and ctx.needs_input_grad[0])
            if need_grad:
                stats = bn_finalize(None, 0, 1, gm.m, gm.cout, bn_weight, bn_bias, running_mean, running_var,
                                    training=False, momentum=0.0, eps=eps, device=x.device)
        if need_grad:
            ctx.cfg, ctx.geom = cfg, gm
            ctx.bias_dtype = bias.dtype if bias is not None else None
            ctx.save_for_backward(xc, weight, z, stats, bn_weight, bn_bias, rc if act != "identity" else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, weight, z, stats, bn_weight, bn_bias, rc = ctx.saved_tensors
        training, act, act_param = ctx.cfg[4], ctx.cfg[7], ctx.cfg[8]
        gm = ctx.geom
        need_x, need_w, need_b, need_g, need_beta, _, _, need_r = ctx.needs_input_grad[:8]
        dyc = as_cl(dy.to(z.dtype))
        dz, sums, dres = bn_act_backward(dyc, z, stats, bn_weight, bn_bias, rc, act, act_param,
                                         training=training, need_dx=need_x or need_w, need_dres=need_r)
        dx = conv_dgrad(dz, weight, gm) if need_x else None
        dw = conv_wgrad(xc, dz, gm, weight) if need_w else None
        db = None
        if need_b:
            db = torch.zeros_like(sums[0]) if training else bn_weight.float() * stats[1] * sums[0]
            db = db.to(ctx.bias_dtype)
        return (dx, dw, db,
                sums[1].to(bn_weight.dtype) if need_g else None,
                sums[0].to(bn_bias.dtype) if need_beta else None,
                None, None, dres, None, None)


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                stride=1, padding=0, dilation=1, groups=1, training=True, momentum=0.1,
                eps=1e-5, act="relu", act_param=0.0, residual=None, rebuild=None):
    """Same signature and result as :func:`fastcnn.ops.reference.conv_bn_act`. ``rebuild``: a
    list that, in training, receives ``(fn, *args)`` with ``fn(*args)`` recomputing the output
    bit for bit (for :func:`fastcnn.recompute.mark_rebuildable`, which the ops layer calls)."""
    cfg = (tuple(stride), tuple(padding), tuple(dilation), int(groups), bool(training), float(momentum),
           float(eps), act, float(act_param), torch.is_grad_enabled())
    return _ConvBnActFn.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, cfg,
                              rebuild)
