"""Backend selection: names, scoping, and the clear error when a fused op has no backend."""
import pytest
import torch

import fastcnn
from fastcnn import backend, ops


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
