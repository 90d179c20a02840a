"""Ahead-of-time compile check of every Triton kernel in ``kernels/`` for the GPUs the project
targets (sm_90: H100/H200; sm_75: Turing and sm_86: Ampere laptop cards for the tiled GEMMs;
sm_80: A100 in the slow sweep), without a GPU.

Why: on this project's CPU-only machines the kernels only ever run in the Triton interpreter
(``TRITON_INTERPRET=1``), which does not apply the real compiler's rules (``tl.dot`` operand
shapes and dtypes, constexpr misuse, type promotion, shared-memory and register budgets).
``triton.compile`` can target a GPU with none present, so this module compiles each kernel
exactly as the Python wrappers would launch it on a GPU and checks that

* compilation succeeds (Triton -> PTX -> cubin through ``ptxas``);
* the dynamic shared memory of one program fits the target (H100: 227 KiB = 232448 bytes,
  A100: 163 KiB = 166912 bytes, sm_86: 99 KiB = 101376 bytes, sm_75: 64 KiB = 65536 bytes);
  for the autotuned GEMMs the configs are first pruned as the ops prune them on such a GPU
  (``early_config_prune`` with that GPU's limit), so every config that can launch there must
  compile within the limit;
* the registers fit the block (``regs * 32 * num_warps <= 65536``) and nothing spills to
  local memory (``LOCAL`` / ``STACK`` of ``cuobjdump -res-usage``; spills fail the test
  unless the kernel and config are listed in :data:`KNOWN_SPILLS` with a reason).

How the launches are found (so the test follows the kernels when they change): each op's
public function (``conv_act``, ``conv_bn_act``, ``bn_act``, ``se_block``) is called forward and
backward on small CPU tensors with every kernel object (``@triton.jit`` functions and their
``triton.autotune`` wrappers) replaced by a recorder, and with the wrappers' "interpreter?"
switch forced to the GPU branch (132 SMs assumed, an H100 SXM). The recorder keeps the real
argument list and constexprs of each launch; Triton's own binder then derives the signature
and the integer/pointer specialisation (``== 1`` -> constexpr, divisibility by 16) from those
values, exactly as ``JITFunction.run`` would, and every config of an autotuned kernel is
compiled. A coverage test fails if a ``@triton.jit`` function in ``kernels/`` is neither
launched by some op nor called from a launched kernel.

The compiling runs in a child process with ``TRITON_INTERPRET=0``: ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before Triton is imported, and then the ``@triton.jit`` functions of
``triton.language`` itself (``tl.cdiv``, the combine functions behind ``tl.sum`` ...) are
interpreter objects, which the compiler rejects -- in-process compiling only works for
kernels that call none of them.

Cost: the default (fast) sweep is ~220 compiles, measured at about 2.5 CPU-minutes from a
cold Triton cache on this project's 2-core CPU machine (two compile processes; set
``FASTCNN_AOT_JOBS``), and ~10 s when Triton's cache (``~/.triton/cache``) already holds
them. The small-GPU check (sm_75 and sm_86: the GEMM scenarios at 128 channels, every kept
config) adds ~100 compiles. The full sweep (``-m slow``) is ~2100 compiles (sm_90 and sm_80).

Figures reported (shared memory, registers, spills) are compile-time properties of the
cubin, NOT timings: nothing here runs on a GPU. Run this file as a script to print them:
``python tests/test_triton_compile.py [--sweep fast|full] [--json OUT]``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

if __name__ == "__main__":  # the compiling child: real JIT functions, not interpreter ones
    os.environ["TRITON_INTERPRET"] = "0"

triton = pytest.importorskip("triton")

#: dynamic shared memory available to one block, bytes (CUDA occupancy tables)
SMEM_LIMIT = {75: 65536, 80: 166912, 86: 101376, 90: 232448}
#: registers per SM (= per block at most) on sm_75 / sm_80 / sm_86 / sm_90
REGS_PER_SM = 65536
#: (kernel name, config label) -> why a spill is accepted. Empty: no kernel spills today.
KNOWN_SPILLS: dict[tuple[str, str], str] = {}

ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("leaky_relu", -0.5),
        ("elu", 1.0), ("silu", 0.0), ("gelu", 0.0)]


# =========================================================================== child: capture

def _kernel_modules():
    import importlib
    import pkgutil

    import fastcnn.kernels as pkg
    return {m.name: importlib.import_module(f"fastcnn.kernels.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)}


def _jit_objects(mods):
    """{name: JITFunction} of every @triton.jit function defined in ``kernels/``, and
    {name: configs} of the autotuned ones (from their ``triton.autotune`` wrappers)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jits, configs = {}, {}
    for mod in mods.values():
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                jits[obj.fn.__name__] = obj
            elif isinstance(obj, Autotuner) and obj.fn.fn.__module__ == mod.__name__:
                configs[obj.fn.fn.__name__] = list(obj.configs)
    return jits, configs


class _Recorder:
    """Stands in for a kernel (or its autotuner) during capture: ``k[grid](*a, **kw)`` records."""

    def __init__(self, name, log, tuner=None):
        self.name, self.log, self.tuner = name, log, tuner
        self.best_config = tuner.configs[0] if tuner is not None else None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, args, kwargs, self.tuner))
        return launch


def _limits(arch):
    """What ``device_limits`` answers on a GPU of compute capability ``arch`` (e.g. 86)."""
    return SMEM_LIMIT[arch], (arch // 10, arch % 10)


class _target:
    """Context: the kernels' ``device_limits`` answers for ``arch`` (shared memory, compute
    capability), so the autotuners' pruning keeps what it would keep on that GPU."""

    def __init__(self, mods, arch):
        self.mods, self.arch, self.saved = mods, arch, []

    def __enter__(self):
        for mod in self.mods.values():
            if "device_limits" in vars(mod):
                self.saved.append((mod, mod.device_limits))
                mod.device_limits = lambda device, lim=_limits(self.arch): lim
        return self

    def __exit__(self, *exc):
        for mod, fn in self.saved:
            mod.device_limits = fn


class _capture:
    """Context: every kernel object of ``kernels/`` replaced by a :class:`_Recorder`, the
    interpreter switch and deterministic mode off, 132 SMs, H100 shared memory; restores
    everything on exit."""

    def __init__(self, mods, log):
        self.mods, self.log, self.saved = mods, log, []

    def _set(self, obj, attr, value):
        self.saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def __enter__(self):
        import torch
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        class _Props:
            multi_processor_count = 132

        self._set(torch.cuda, "get_device_properties", lambda *a, **k: _Props())
        for mod in self.mods.values():
            for attr, obj in list(vars(mod).items()):
                if attr == "interpreting":
                    self._set(mod, attr, lambda: False)
                elif attr == "num_sms":
                    self._set(mod, attr, lambda device: 132)
                elif attr == "deterministic":
                    self._set(mod, attr, lambda: False)
                elif attr == "device_limits":
                    self._set(mod, attr, lambda device: _limits(90))
                elif isinstance(obj, JITFunction):
                    self._set(mod, attr, _Recorder(obj.fn.__name__, self.log))
                elif isinstance(obj, Autotuner):
                    self._set(mod, attr, _Recorder(obj.fn.fn.__name__, self.log, obj))
        return self

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self.saved):
            setattr(obj, attr, value)


def _scenarios(sweep):
    """(label, all_configs, thunk) triples; each thunk calls one op forward and backward as
    the layers do. ``all_configs``: True, or the names of the kernels whose every autotune
    config (kept by the autotuner's own pruning) is compiled; otherwise only the first kept
    config is. The full sweep expands every config everywhere."""
    import torch

    mods = _kernel_modules()
    full = sweep == "full"
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    dtypes = (f32, f16, bf16)

    def t(*shape, dtype=f32, grad=True):
        return torch.empty(shape, dtype=dtype).normal_().requires_grad_(grad)

    def bn_params(c, dtype):
        return t(c, dtype=dtype), t(c, dtype=dtype), torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)

    def backward(y):
        y.backward(torch.ones_like(y))

    def conv_bn_act(dtype, pdtype, *, cin=64, cout=64, hw=8, k=3, s=1, g=1, training=True, act="relu",
                    ap=0.0, res=True, bias=False, cl_weight=False):
        def run():
            x = t(2, cin, hw, hw, dtype=dtype)
            oh = (hw + 2 * (k // 2) - k) // s + 1
            w = t(cout, cin // g, k, k, dtype=dtype, grad=False)
            w = (w.contiguous(memory_format=torch.channels_last) if cl_weight else w).requires_grad_()
            y = mods["conv_bn_act"].conv_bn_act(
                x, w, t(cout, dtype=pdtype) if bias else None,
                *bn_params(cout, pdtype), stride=(s, s), padding=(k // 2, k // 2), dilation=(1, 1), groups=g,
                training=training, momentum=0.1, eps=1e-5, act=act, act_param=ap,
                residual=t(2, cout, oh, oh, dtype=dtype) if res else None)
            backward(y)
        return run

    def conv_act(dtype, *, cin=64, cout=64, hw=8, k=3, s=1, d=1, g=1, act="relu", ap=0.0, res=True,
                 bias=True, x_grad=True):
        def run():
            p = d * (k // 2)
            oh = (hw + 2 * p - d * (k - 1) - 1) // s + 1
            y = mods["conv_act"].conv_act(
                t(2, cin, hw, hw, dtype=dtype, grad=x_grad), t(cout, cin // g, k, k, dtype=dtype),
                t(cout, dtype=dtype) if bias else None, stride=(s, s), padding=(p, p), dilation=(d, d),
                groups=g, act=act, act_param=ap, residual=t(2, cout, oh, oh, dtype=dtype) if res else None)
            backward(y)
        return run

    def bn_act(dtype, pdtype, *, training=True, act="relu", ap=0.0, res=True, c=64, hw=8):
        def run():
            y = mods["bn_act"].bn_act(t(2, c, hw, hw, dtype=dtype), *bn_params(c, pdtype), training=training,
                                      momentum=0.1, eps=1e-5, act=act, act_param=ap,
                                      residual=t(2, c, hw, hw, dtype=dtype) if res else None)
            backward(y)
        return run

    def se_block(dtype, *, c=256, hid=16, act="relu", ap=0.0, res=True, biases=True):
        def run():
            y = mods["se_block"].se_block(
                t(2, c, 8, 8, dtype=dtype), t(hid, c, dtype=dtype), t(hid, dtype=dtype) if biases else None,
                t(c, hid, dtype=dtype), t(c, dtype=dtype) if biases else None,
                residual=t(2, c, 8, 8, dtype=dtype) if res else None, act=act, act_param=ap)
            backward(y)
        return run

    def name(dt):
        return str(dt).replace("torch.", "")

    out = []
    gemms = {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"}
    # every autotune config, at 128 channels where the autotuner prunes none: the zoo's main
    # layer (3x3, BN in training, residual) forward and backward; the eval-BN epilogue; the
    # conv_act epilogue with z stored for a silu backward
    for dt in dtypes if full else (f32, bf16):
        out.append((f"conv_bn_act train 3x3 c128 {name(dt)}", gemms,
                    conv_bn_act(dt, f32 if dt != f32 else dt, cin=128, cout=128)))
    for dt in dtypes if full else (bf16,):  # gelu: the longest epilogue (eval BN, residual, z and y)
        out.append((f"conv_bn_act eval 3x3 c128 gelu {name(dt)}", {"_conv_fwd_kernel"},
                    conv_bn_act(dt, f32, cin=128, cout=128, training=False, bias=True, act="gelu")))
    for dt in dtypes if full else (f16,):
        out.append((f"conv_act 3x3 c128 silu {name(dt)}", {"_conv_fwd_kernel"} if not full else gemms,
                    conv_act(dt, cin=128, cout=128, act="silu")))
    # a channels_last weight: read in place, its gradient written channels_last, every config
    for dt in dtypes if full else (bf16,):
        out.append((f"conv_bn_act train 3x3 c128 cl-weight {name(dt)}", gemms,
                    conv_bn_act(dt, f32, cin=128, cout=128, cl_weight=True)))
    # the input gradient's sub-pixel phases (stride 2) in every config
    for dt in dtypes if full else (f32, bf16):
        out.append((f"conv_bn_act train 3x3 s2 c128 {name(dt)}", {"_conv_dgrad_kernel"},
                    conv_bn_act(dt, f32 if dt != f32 else dt, cin=128, cout=128, s=2, res=False)))
    # many statistics partials: the parallel merge before the finalize (> DIRECT_ROWS rows)
    for dt in dtypes if full else (bf16,):
        out.append((f"bn_act train many-partials {name(dt)}", full, bn_act(dt, f32, c=64, hw=72)))
    # the other conv geometries: 1x1 stride 2 shortcut, grouped 3x3 (ResNeXt-29 8x64d: 64 channels
    # per group; 32 groups of 8), 5x5, the stem (3 input channels)
    geoms = {
        "1x1 s2": dict(k=1, s=2, cin=64, cout=128),
        "3x3 g8": dict(k=3, g=8, cin=512, cout=512),
        "3x3 g32 s2": dict(k=3, g=32, s=2, cin=256, cout=256),
        "5x5": dict(k=5, cin=32, cout=64),
        "stem 3x3": dict(k=3, cin=3, cout=64, res=False),
    }
    for gname, geo in geoms.items():
        for dt in dtypes if full else (bf16,):
            out.append((f"conv_bn_act train {gname} {name(dt)}", full, conv_bn_act(dt, dt, **geo)))
            if full or gname == "3x3 g8":
                out.append((f"conv_bn_act eval {gname} {name(dt)}", full,
                            conv_bn_act(dt, f32, training=False, bias=True, **geo)))
    # every activation code through each epilogue / elementwise kernel (fast: fp16, relu in all
    # dtypes; conv_bn_act train and bn_act eval launch the same bn kernels as bn_act train)
    for act, ap in ACTS:
        for dt in dtypes if full else ((f16,) if act != "relu" else dtypes):
            for res in (True, False) if full else (act != "gelu",):
                tag = f"{act}({ap}) {name(dt)}{' res' if res else ''}"
                out.append((f"conv_bn_act eval 1x1 s2 {tag}", full,
                            conv_bn_act(dt, f32, training=False, k=1, s=2, act=act, ap=ap, res=res)))
                if full or act == "relu":
                    out.append((f"conv_bn_act train {tag}", full, conv_bn_act(dt, dt, act=act, ap=ap, res=res)))
                out.append((f"conv_act 3x3 g4 {tag}", full, conv_act(dt, g=4, act=act, ap=ap, res=res)))
                for training in (True, False) if full or act == "relu" else (True,):
                    out.append((f"bn_act {'train' if training else 'eval'} {tag}", full,
                                bn_act(dt, f32 if dt != f32 else dt, training=training, act=act, ap=ap, res=res)))
                out.append((f"se_block {tag}", full, se_block(dt, act=act, ap=ap, res=res)))
    # conv_act specials: stem without input grad, dilation 2 without bias, the widest SE (1024 ch)
    for dt in dtypes if full else (f32,):
        out.append((f"conv_act stem 5x5 no-xgrad {name(dt)}", full,
                    conv_act(dt, cin=3, k=5, res=False, bias=False, x_grad=False)))
        out.append((f"conv_act 3x3 d2 identity no-bias {name(dt)}", full,
                    conv_act(dt, d=2, act="identity", res=False, bias=False)))
        out.append((f"se_block 1024/64 no-bias {name(dt)}", full, se_block(dt, c=1024, hid=64, biases=False)))
    return out


def _pack(fn, backend, kw, bound, spec, opts):
    """(options, signature, constexprs, attrs) of a bound launch, as ``JITFunction.run`` derives
    them (Triton 3.8: ``_pack_args``; older releases inline the same steps in ``run``)."""
    if hasattr(fn, "_pack_args"):
        return fn._pack_args(backend, kw, bound, spec, opts)
    from triton.runtime.jit import find_paths_if, get_iterable_path
    options = backend.parse_options(kw)
    sigvals = [x[0] for x in spec]
    signature = dict(zip([p.name for p in fn.params], sigvals))
    constexprs = {p: get_iterable_path(list(bound.values()), p)
                  for p in find_paths_if(sigvals, lambda _, v: v == "constexpr")}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in spec]
    attrs = {p: backend.parse_attr(get_iterable_path(attrvals, p))
             for p in find_paths_if(attrvals, lambda _, v: isinstance(v, str))}
    return options, signature, constexprs, attrs


def _config_label(cfg):
    if cfg is None:
        return "-"
    kw = cfg.kwargs
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}"


def _jobs(sweep, archs, only=None):
    """Unique compile jobs: (kernel, config label, scenario, arch, signature, constexprs,
    attrs, options) -- the values Triton's launcher would derive from the captured launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    mods = _kernel_modules()
    jits, tuned = _jit_objects(mods)
    jobs, seen, launched = [], set(), set()
    for label, all_configs, thunk in _scenarios(sweep):
        if only and only not in label:
            continue
        log = []
        with _capture(mods, log):
            thunk()
        assert log, f"scenario {label!r} launched no kernel"
        for kname, args, kwargs, tuner in log:
            launched.add(kname)
            fn = jits[kname]
            for arch in archs:
                cfgs = [None]
                if tuner is not None:  # the configs this launch's autotuner would benchmark on arch
                    cfgs = list(tuner.configs)
                    if tuner.early_config_prune is not None:
                        with _target(mods, arch):
                            cfgs = tuner.early_config_prune(cfgs, dict(zip(fn.arg_names, args)), **kwargs)
                    every = sweep == "full" or all_configs is True or (all_configs and kname in all_configs)
                    cfgs = cfgs if every else cfgs[:1]
                backend = make_backend(GPUTarget("cuda", arch, 32))
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                for cfg in cfgs:
                    kw = dict(kwargs, debug=False)
                    if cfg is not None:
                        kw.update(cfg.all_kwargs())
                    bound, spec, opts = binder(*args, **kw)
                    options, signature, constexprs, attrs = _pack(fn, backend, kw, bound, spec, opts)
                    key = (kname, arch, repr(signature), repr(sorted(constexprs.items())),
                           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    consts = {fn.params[p[0]].name: v for p, v in constexprs.items() if len(p) == 1}
                    jobs.append(dict(kernel=kname, module=fn.fn.__module__, config=_config_label(cfg),
                                     scenario=label, arch=arch, signature=signature, constexprs=constexprs,
                                     attrs=attrs, options=options.__dict__, consts=consts))
    configs = {k: [_config_label(c) for c in cs] for k, cs in tuned.items()}
    return jobs, sorted(launched), {k: j.src for k, j in jits.items()}, configs


def _cuobjdump():
    import shutil
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _resources(cubin, kernel):
    """REG / STACK / LOCAL of ``kernel`` in a cubin, from ``cuobjdump -res-usage``."""
    import re
    import tempfile
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", out)
    if not m:
        return {}
    vals = dict(re.findall(r"(\w+):(\d+)", m.group(1)))
    return {"regs": int(vals["REG"]), "stack": int(vals.get("STACK", 0)), "local": int(vals.get("LOCAL", 0))}


def _compile(job):
    import importlib
    import time

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    rec = {k: job[k] for k in ("kernel", "config", "scenario", "arch")}
    rec["consts"] = {k: v for k, v in job["consts"].items() if not k.startswith("BLOCK")}
    rec["signature"] = ", ".join(v for v in job["signature"].values() if v != "constexpr")
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        c = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as e:  # noqa: BLE001 - every compiler error is a finding to report
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
    else:
        rec.update(ok=True, shared=c.metadata.shared, num_warps=c.metadata.num_warps,
                   **_resources(c.asm["cubin"], job["kernel"]))
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def run_sweep(sweep="fast", archs=(90,), jobs_n=None, only=None):
    """Compile every job of the sweep; returns the records, the launched kernels, the source of
    every jit function and the autotune config labels of each autotuned kernel."""
    import multiprocessing as mp
    jobs, launched, src, configs = _jobs(sweep, archs, only)
    n = jobs_n or int(os.environ.get("FASTCNN_AOT_JOBS", min(2, os.cpu_count() or 1)))
    if n > 1:
        with mp.get_context("fork").Pool(n) as pool:
            records = pool.map(_compile, jobs, chunksize=1)
    else:
        records = [_compile(j) for j in jobs]
    return {"records": records, "launched": launched, "jit_src": src, "configs": configs}


def format_table(records):
    rows = ["| kernel | arch | config | constexprs | signature | shared B | regs | spill (local+stack B) | ok |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["kernel"], r["arch"], r["config"], str(r["consts"]))):
        consts = " ".join(f"{k}={v}" for k, v in r["consts"].items())
        spill = "-" if "local" not in r else r["local"] + r["stack"]
        rows.append(f"| {r['kernel']} | sm_{r['arch']} | {r['config']} | {consts} | {r['signature'][:60]} | "
                    f"{r.get('shared', '-')} | {r.get('regs', '-')} | {spill} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(rows)


# =========================================================================== parent: tests

def _run_child(sweep, archs, timeout, only=None):
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--sweep", sweep, "--archs", ",".join(map(str, archs)),
           "--json", "-"] + (["--only", only] if only else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"compile child failed (rc {p.returncode}):\n{p.stderr[-5000:]}"
    return json.loads(p.stdout)


def _problems(records):
    """Human-readable failures: compile errors, shared memory / registers over budget, spills."""
    bad = []
    for r in records:
        where = f"{r['kernel']} [sm_{r['arch']} {r['config']} {r['consts']}] ({r['scenario']})"
        if not r["ok"]:
            bad.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["shared"] > SMEM_LIMIT[r["arch"]]:
            bad.append(f"{where}: {r['shared']} B shared memory > {SMEM_LIMIT[r['arch']]} B")
        if "regs" in r:
            if r["regs"] * 32 * r["num_warps"] > REGS_PER_SM:
                bad.append(f"{where}: {r['regs']} registers x {32 * r['num_warps']} threads > {REGS_PER_SM}")
            if r["local"] + r["stack"] > 0 and (r["kernel"], r["config"]) not in KNOWN_SPILLS:
                bad.append(f"{where}: spills ({r['local']} B local, {r['stack']} B stack per thread)")
    return bad


@pytest.fixture(scope="module")
def fast_sweep():
    return _run_child("fast", (90,), timeout=900)


def _kernel_names():
    """Names of the @triton.jit functions of ``kernels/`` (parsed, so that collection needs
    neither the interpreter nor a compiler)."""
    import ast
    import glob
    kdir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    names = []
    for path in sorted(glob.glob(os.path.join(kdir, "*.py"))):
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.append(node.name)
    return names


KERNELS = _kernel_names()


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_for_sm90(fast_sweep, kernel):
    """Each kernel as launched by the ops (fast sweep: every autotune config in fp32, fp16 and
    bf16, every activation code and epilogue variant once) compiles for sm_90 and fits."""
    recs = [r for r in fast_sweep["records"] if r["kernel"] == kernel]
    if not recs:  # a device function: compiled inside the kernels that call it
        callers = [k for k in fast_sweep["launched"] if f"{kernel}(" in fast_sweep["jit_src"][k]]
        assert callers or any(f"{kernel}(" in s for k, s in fast_sweep["jit_src"].items() if k != kernel), (
            f"@triton.jit {kernel} is neither launched by any op nor called by a kernel")
        return
    bad = _problems(recs)
    assert not bad, "\n".join(bad)


def test_every_kernel_is_launched_or_called(fast_sweep):
    """The capture found every kernel: a jit function no op launches must be a device
    function called by another jit function (else the sweep misses it)."""
    assert set(fast_sweep["jit_src"]) == set(KERNELS)
    src = fast_sweep["jit_src"]
    orphans = [k for k in KERNELS if k not in fast_sweep["launched"]
               and not any(f"{k}(" in s for other, s in src.items() if other != k)]
    assert not orphans, f"jit functions neither launched nor called: {orphans}"


def test_every_autotune_config_compiled(fast_sweep):
    """Each config of each ``triton.autotune`` list was compiled (and checked) in every dtype
    the all-config scenarios use, so a config added to a list is covered automatically."""
    for kernel, labels in fast_sweep["configs"].items():
        for sig_dtype in ("fp32", "bf16"):
            done = {r["config"] for r in fast_sweep["records"]
                    if r["kernel"] == kernel and r["signature"].startswith(f"*{sig_dtype}")}
            missing = [c for c in labels if c not in done]
            assert not missing, f"{kernel}: configs {missing} never compiled with *{sig_dtype} operands"


@pytest.fixture(scope="module")
def small_gpu_sweep():
    # the scenarios that compile every autotune config of the GEMMs (fp32, fp16, bf16 operands)
    return _run_child("fast", (75, 86), timeout=900, only="c128")


def test_small_gpus_every_launchable_config_fits(small_gpu_sweep):
    """On sm_75 (64 KiB shared memory per block; tl.dot on FMA units) and sm_86 (99 KiB),
    every GEMM config the autotuners keep after pruning for that GPU compiles, fits its shared
    memory and registers, and does not spill; the configs pruned away are never launched there."""
    recs = small_gpu_sweep["records"]
    assert {r["arch"] for r in recs} == {75, 86}
    bad = _problems(recs)
    assert not bad, "\n".join(bad)


def test_small_gpus_prune_what_does_not_fit(small_gpu_sweep, fast_sweep):
    """The pruning is real: on sm_75 the big fp32 tiles (e.g. 128x64x64, 3 stages: ~147 KiB)
    are not among the compiled (= launchable) configs, while on sm_90 they are."""
    def fp32_fwd_configs(records, arch):
        return {r["config"] for r in records if r["kernel"] == "_conv_fwd_kernel" and r["arch"] == arch
                and r["signature"].startswith("*fp32")}
    sm75, sm90 = fp32_fwd_configs(small_gpu_sweep["records"], 75), fp32_fwd_configs(fast_sweep["records"], 90)
    assert "128x64x64 w8 s3" in sm90 and "128x64x64 w8 s3" not in sm75
    assert sm75 and sm75 < sm90


@pytest.mark.slow
def test_full_sweep_sm90_sm80():
    """Every scenario x every autotune config x every dtype, for sm_90 and sm_80 (long)."""
    res = _run_child("full", (90, 80), timeout=6 * 3600)
    bad = _problems(res["records"])
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:50])


# =========================================================================== script entry

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", choices=("fast", "full"), default="fast")
    ap.add_argument("--archs", default="90", help="comma-separated compute capabilities, e.g. 90,80")
    ap.add_argument("--json", help="write the records as JSON to this file ('-' = stdout)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--only", help="only the scenarios whose label contains this text")
    a = ap.parse_args()
    result = run_sweep(a.sweep, tuple(int(x) for x in a.archs.split(",")), a.jobs, a.only)
    if a.json == "-":
        json.dump(result, sys.stdout)
    else:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
        print(format_table(result["records"]))
        probs = _problems(result["records"])
        print(f"\n{len(result['records'])} compiles, {len(probs)} problems", *probs, sep="\n")
