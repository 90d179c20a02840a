"""What this installation can run: versions, extension kernels, GPU, backends per op.
``fastcnn.info()`` prints it; ``python -m fastcnn.info`` is the command-line form."""
from __future__ import annotations

import importlib
import os
import platform


def collect() -> dict:
    """Versions, built extension kernels, GPU and Triton mode, as a dict."""
    import torch

    from .ops import dispatch as backend
    from .ops import OPS

    out = {
        "fastcnn": importlib.import_module("fastcnn").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    out["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        ext = importlib.import_module("fastcnn._C")
        out["extension"] = {"built": True, "cpu_kernels": bool(ext.has_cpu()),
                            "cuda_kernels": bool(ext.has_cuda()),
                            "cuda_archs": list(ext.cuda_archs()) if hasattr(ext, "cuda_archs") else None}
    except ImportError as e:
        out["extension"] = {"built": False, "error": str(e)}
    if torch.cuda.is_available():
        out["gpu"] = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                      for i in range(torch.cuda.device_count())]
    else:
        out["gpu"] = []
    out["backend"] = backend.get_backend()
    devices = ["cpu"] + (["cuda"] if out["gpu"] else [])
    out["available"] = {d: {op: backend.available_backends(op, d) for op in OPS} for d in devices}
    return out


def info(print_out: bool = True) -> dict:
    """Print (and return) what is available: versions, extension, GPU, backends per op."""
    data = collect()
    if print_out:
        width = max(len(k) for k in data)
        for key, value in data.items():
            if key == "available":
                for dev, ops in value.items():
                    for op, backends in ops.items():
                        print(f"{'fused ' + op + ' on ' + dev:<{width + 20}} {', '.join(backends) or 'none'}")
            elif key == "extension":
                if value["built"]:
                    print(f"{key:<{width + 20}} built (CPU kernels: {value['cpu_kernels']}, CUDA kernels: {value['cuda_kernels']})")
                    if value["cuda_kernels"]:
                        archs = value["cuda_archs"]
                        shown = ", ".join(archs) if archs else "not recorded (rebuild to record them)"
                        print(f"{'extension CUDA archs':<{width + 20}} {shown}")
                else:
                    print(f"{key:<{width + 20}} not built: {value['error']}")
            else:
                print(f"{key:<{width + 20}} {value}")
    return data

