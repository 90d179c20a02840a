"""fastcnn: the classic CIFAR-class CNNs, with fused Triton and C++/CUDA kernels.

Front door::

    import fastcnn
    model = fastcnn.create_model("simplenet", fused=True)
    fastcnn.list_models("resnet*")
    fastcnn.summary(model)
    fastcnn.info()
"""
__version__ = "0.1.0"

from .ops.dispatch import BACKENDS, BackendUnavailableError, get_backend, set_backend, use_backend
from .environment import info
from .layers import set_fused
from .registry import create_model, list_models, model_info, register_model
from .model_summary import summary

__all__ = ["create_model", "list_models", "model_info", "register_model", "summary", "info",
           "set_backend", "get_backend", "use_backend", "set_fused", "BACKENDS",
           "BackendUnavailableError", "__version__"]
