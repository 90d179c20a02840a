"""``--amp`` by compute capability (fastcnn.train._amp_dtype), with the GPU faked on CPU:
auto = bf16 from 8.0 (native bf16), fp16 below (Turing), off on CPU; explicit bf16 where
bf16 is only emulated is a clear error. (fp16 training pairs with a GradScaler in train();
tests/test_train.py runs --amp fp16.)"""
import contextlib

import pytest
import torch

from fastcnn import train
from fastcnn.train import UsageError, _amp_dtype


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(cap)``: CUDA calls report one GPU of compute capability ``cap`` whose native
    bf16 support follows the hardware rule (>= 8.0); emulation would say yes everywhere."""
    def install(cap, name="NVIDIA T400"):
        def is_bf16_supported(including_emulation=True):
            return True if including_emulation else cap >= (8, 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return install


@pytest.mark.parametrize("cap, auto", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                       ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_auto_by_capability(fake_gpu, cap, auto):
    fake_gpu(cap)
    name, dtype = _amp_dtype("auto", torch.device("cuda", 0))
    assert name == auto and dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[auto]


def test_auto_is_off_on_cpu():
    assert _amp_dtype("auto", torch.device("cpu")) == ("off", None)


def test_explicit_bf16_below_sm80_is_a_clear_error(fake_gpu):
    fake_gpu((7, 5), "NVIDIA GeForce GTX 1650")
    with pytest.raises(UsageError) as err:
        _amp_dtype("bf16", torch.device("cuda", 0))
    msg = str(err.value)
    assert "NVIDIA GeForce GTX 1650" in msg and "7.5" in msg and "--amp fp16" in msg and "emulated" in msg


def test_explicit_choices_kept_where_supported(fake_gpu):
    fake_gpu((8, 6))
    dev = torch.device("cuda", 0)
    assert _amp_dtype("BF16", dev) == ("bf16", torch.bfloat16)
    assert _amp_dtype("fp16", dev) == ("fp16", torch.float16)
    assert _amp_dtype("off", dev) == ("off", None)
    fake_gpu((7, 5))
    assert _amp_dtype("fp16", dev) == ("fp16", torch.float16)


def test_native_bf16_asks_without_emulation(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: calls.append(including_emulation) or False)
    assert train._native_bf16(torch.device("cuda", 0)) is False
    assert calls == [False]

