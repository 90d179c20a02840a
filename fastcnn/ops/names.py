"""The names every part of fastcnn agrees on: the fused ops and the activations their kernels
implement. Everything else derives from these tuples or is tested against them: the backends'
``IMPLEMENTATIONS`` tables, the activation table of the layers (``fastcnn.layers.activations``),
the Triton kernels' activation ids (``kernels/activations.py``, which imports nothing from the
package) and the C++ ``Act`` enum (``csrc/include/act.h``) -- tests/test_op_names.py checks the last two.
"""
from __future__ import annotations

#: the fused ops, in the order the docs list them
OPS: tuple[str, ...] = ("conv_bn_act", "bn_act", "conv_act", "se_block")

#: the activations the kernels implement, in the order of their ids in kernels/ and csrc/include/act.h
ACTIVATIONS: tuple[str, ...] = ("identity", "relu", "leaky_relu", "elu", "silu", "gelu")
