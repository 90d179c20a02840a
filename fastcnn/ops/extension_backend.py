"""The ``cuda`` and ``cpu`` backends: the compiled extension ``fastcnn._C``, whose ops are
registered with the dispatcher as ``torch.ops.fastcnn.*``."""
from __future__ import annotations

import importlib

#: op name -> whether the extension implements it, filled from ``fastcnn._C`` when it loads
IMPLEMENTED_OPS: tuple[str, ...] = ()


def _extension():
    try:
        return importlib.import_module("fastcnn._C"), None
    except ImportError as e:
        return None, str(e)


def unavailable_reason(op: str, device_type: str, backend: str) -> str | None:
    ext, err = _extension()
    if ext is None:
        return f"{backend}: the extension fastcnn._C is not built ({err}); run `pip install -e .`"
    if backend != device_type:
        return f"{backend}: backend {backend!r} runs on {backend} tensors, not {device_type}"
    if op not in IMPLEMENTED_OPS:
        return f"{backend}: the extension has no {op!r} op"
    return None
