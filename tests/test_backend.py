"""Backend selection: names, scoping, and the clear error when a fused op has no backend."""
import pytest
import torch

import fastcnn
from fastcnn import ops
from fastcnn.ops import dispatch as backend


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*auto, triton, cuda, cpu, reference"):
        fastcnn.set_backend("tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with fastcnn.use_backend("fast"):
            pass


def test_use_backend_is_scoped_and_restored():
    before = fastcnn.get_backend()
    with fastcnn.use_backend("reference"):
        assert fastcnn.get_backend() == "reference"
        with fastcnn.use_backend("cpu"):
            assert fastcnn.get_backend() == "cpu"
        assert fastcnn.get_backend() == "reference"
    assert fastcnn.get_backend() == before


def test_set_backend_process_wide():
    before = fastcnn.get_backend()
    try:
        fastcnn.set_backend("reference")
        assert fastcnn.get_backend() == "reference"
    finally:
        fastcnn.set_backend(before)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    x = torch.randn(2, 3, 8, 8)
    with fastcnn.use_backend("cuda"), pytest.raises(fastcnn.BackendUnavailableError) as err:
        ops.bn_act(x, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    msg = str(err.value)
    assert "'bn_act' on cpu" in msg and "Available for this op and device:" in msg and "reference" in msg


def test_auto_never_picks_reference(monkeypatch):
    # Pretend nothing is built: a fused layer must then fail loudly, not run the reference.
    monkeypatch.setattr(backend, "unavailable_reason",
                        lambda b, op, dev: None if b == "reference" else f"{b}: not built (test)")
    layer = fastcnn.layers.ConvBnAct(3, 4, fused=True)
    with fastcnn.use_backend("auto"), pytest.raises(fastcnn.BackendUnavailableError, match="cpu: not built"):
        layer(torch.randn(1, 3, 6, 6))


def test_reference_backend_is_always_available():
    for op in ops.OPS:
        assert "reference" in backend.available_backends(op, "cpu")


# --------------------------------------------------------------------------- CUDA architectures

@pytest.mark.parametrize("arch, cap, runs", [
    ("sm_75", (7, 5), True),
    ("sm_80", (8, 6), True),   # same major, newer minor: the cubin loads
    ("sm_80", (8, 9), True),
    ("sm_86", (8, 0), False),  # newer minor than the GPU: no
    ("sm_80", (9, 0), False),  # other major: machine code never crosses majors
    ("sm_90", (7, 5), False),
    ("compute_90", (9, 0), True),   # PTX: JIT for any capability >= its own
    ("compute_90", (12, 0), True),
    ("compute_90", (8, 9), False),
    ("sm_90a", (9, 0), True),  # arch-specific: exactly 9.0
    ("sm_90a", (10, 0), False),
    ("compute_90a", (10, 0), False),
])
def test_arch_runs_on(arch, cap, runs):
    assert backend.arch_runs_on(arch, cap) is runs


def test_arch_names_are_checked():
    with pytest.raises(ValueError, match="not a CUDA architecture name: '8.6'"):
        backend.arch_runs_on("8.6", (8, 6))


def test_cuda_arch_reason_names_the_fix():
    # the old default build (sm_90 + compute_90 PTX) on a Turing and an Ampere laptop GPU
    for cap in ((7, 5), (8, 6)):
        reason = backend.cuda_arch_reason(["sm_90", "compute_90"], cap, "NVIDIA T400")
        assert reason is not None
        assert f"compute capability {cap[0]}.{cap[1]}" in reason and "sm_90, compute_90" in reason
        assert f"FASTCNN_CUDA_ARCH={cap[0]}.{cap[1]}" in reason and "NVIDIA T400" in reason
    # the default multi-arch build runs on every target
    built = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
    for cap in ((7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert backend.cuda_arch_reason(built, cap) is None
    assert backend.cuda_arch_reason([], (8, 6)) is not None


def _fake_gpu(monkeypatch, cap, archs, name="NVIDIA RTX A500 Laptop GPU"):
    """Pretend one GPU of compute capability ``cap`` is visible and the extension (with its
    CUDA kernels) holds ``archs``; the backends' own checks say yes for 'cuda' tensors."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name)
    monkeypatch.setattr(backend, "built_cuda_archs", lambda: list(archs))
    monkeypatch.setattr(backend, "_CAPS", {})
    monkeypatch.setattr(backend, "_ARCH_REASONS", {})

    class _Mod:
        conv_bn_act = bn_act = conv_act = se_block = staticmethod(lambda *a, **k: None)
        IMPLEMENTATIONS = dict.fromkeys(ops.OPS, lambda *a, **k: None)

        @staticmethod
        def unavailable_reason(op, device_type, name):
            return None if device_type == "cuda" else f"{name}: not {device_type}"

    monkeypatch.setattr(backend, "_module", lambda name: _Mod)


def test_gpu_missing_from_the_build_skips_cuda_in_auto(monkeypatch):
    _fake_gpu(monkeypatch, (8, 6), ["sm_90", "compute_90"])
    reason = backend.unavailable_reason("cuda", "bn_act", "cuda")
    assert reason.startswith("cuda:") and "FASTCNN_CUDA_ARCH=8.6" in reason
    assert backend.unavailable_reason("cuda", "bn_act", "cuda:0") == reason
    assert backend.unavailable_reason("triton", "bn_act", "cuda") is None
    for op in ops.OPS:
        assert "cuda" not in backend.available_backends(op, "cuda")
    with fastcnn.use_backend("auto"):
        assert backend.resolve("conv_bn_act", "cuda")[0] == "triton"  # cuda skipped
    with fastcnn.use_backend("cuda"), pytest.raises(fastcnn.BackendUnavailableError) as err:
        backend.resolve("conv_bn_act", "cuda")
    assert "FASTCNN_CUDA_ARCH=8.6" in str(err.value) and "Available for this op and device: triton" in str(err.value)


def test_gpu_in_the_build_keeps_cuda(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5), ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"], "NVIDIA T400")
    assert backend.unavailable_reason("cuda", "conv_bn_act", "cuda") is None
    with fastcnn.use_backend("cuda"):
        assert backend.resolve("conv_bn_act", "cuda")[0] == "cuda"


def test_extension_without_arch_record_is_unavailable_on_gpu(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0), [])
    monkeypatch.setattr(backend, "built_cuda_archs", lambda: None)
    assert "does not record its CUDA architectures" in backend.unavailable_reason("cuda", "bn_act", "cuda")


def test_extension_reports_its_cuda_archs():
    ext = pytest.importorskip("fastcnn._C")
    archs = ext.cuda_archs()
    assert isinstance(archs, list)
    if not ext.has_cuda():
        assert archs == []
    else:  # every entry a name arch_runs_on understands, at least one machine-code target
        assert archs and any(a.startswith("sm_") for a in archs)
        for a in archs:
            backend.arch_runs_on(a, (9, 0))


# --------------------------------------------------------------------------- auto order by capability

@pytest.mark.parametrize("cap, conv_first", [((7, 5), "cuda"), ((7, 0), "cuda"), ((8, 0), "triton"),
                                             ((8, 6), "triton"), ((9, 0), "triton"), (None, "triton")])
def test_auto_order_by_capability(cap, conv_first):
    for op in ("conv_bn_act", "conv_act"):
        order, why = backend.auto_entry(op, "cuda", cap)
        assert order[0] == conv_first and set(order) == {"cuda", "triton"}
        assert ("tensor core" in why) and (("below sm_80" in why) == (conv_first == "cuda"))
    for op in ("bn_act", "se_block"):  # memory-bound: no tensor cores involved, same everywhere
        order, why = backend.auto_entry(op, "cuda", cap)
        assert order == ("triton", "cuda") and "memory-bound" in why
    for op in ops.OPS:
        assert backend.auto_entry(op, "cpu")[0] == ("cpu", "triton")


def test_every_auto_entry_has_a_reason():
    for key, (order, why) in backend.AUTO_ORDER.items():
        assert order and set(order) <= set(backend.BACKENDS[1:-1]), key
        assert len(why) > 40, f"{key}: give the reason beside the entry"
    for op in ops.OPS:  # every op has an entry for every device type, CUDA from capability 0.0
        assert backend.auto_entry(op, "cuda", (0, 0))[0] and backend.auto_entry(op, "cpu")[0]


def test_auto_on_turing_puts_the_convolution_on_cuda(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5), ["sm_75"], "NVIDIA T400")
    with fastcnn.use_backend("auto"):
        assert backend.resolve("conv_bn_act", "cuda")[0] == "cuda"
        assert backend.resolve("conv_act", torch.device("cuda", 0))[0] == "cuda"
        assert backend.resolve("bn_act", "cuda")[0] == "triton"
    _fake_gpu(monkeypatch, (8, 6), ["sm_86"])
    with fastcnn.use_backend("auto"):
        assert backend.resolve("conv_bn_act", "cuda")[0] == "triton"
