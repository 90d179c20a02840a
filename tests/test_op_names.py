"""One list of fused ops and one of activations (fastcnn/ops/names.py): every other place that
names them derives from those tuples or is checked against them here -- the backends' op
tables (plus the composed ops of fastcnn/ops/composed.py a backend has as one), the layers' activation table, the Triton kernels' activation codes (kernels/ imports
nothing from the package, so it keeps its own table) and the C++ ``Act`` enum and its parser
(csrc/include/act.h)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastcnn.layers.activations import FUSED_ACTIVATIONS
from fastcnn.ops import dispatch, reference
from fastcnn.ops.composed import COMPOSED
from fastcnn.ops.names import ACTIVATIONS, OPS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_every_backend_table_lists_exactly_the_ops(backend):
    try:
        mod = dispatch._module(backend)
    except ImportError as e:
        pytest.skip(f"backend {backend} cannot be imported here: {e}")
    # every op; besides them only composed ops (fastcnn/ops/composed.py) a backend has as one
    assert tuple(mod.IMPLEMENTATIONS)[:len(OPS)] == OPS
    assert set(tuple(mod.IMPLEMENTATIONS)[len(OPS):]) <= set(COMPOSED)


def test_dispatch_and_reference_use_the_one_list():
    assert dispatch.OPS is OPS and reference.OPS is OPS
    assert tuple(FUSED_ACTIVATIONS) == ACTIVATIONS


def test_triton_activation_codes_follow_the_list():
    acts = pytest.importorskip("fastcnn.kernels.activations", reason="Triton is not installed")
    assert list(acts.ACT_CODES) == list(ACTIVATIONS)
    assert list(acts.ACT_CODES.values()) == list(range(len(ACTIVATIONS)))


def test_cpp_activation_enum_and_parser_follow_the_list():
    found = sorted((ROOT / "csrc").rglob("act.h"))
    assert len(found) == 1, f"expected one csrc/**/act.h, found {found}"
    header = found[0].read_text()
    enum = re.search(r"enum Act : int \{([^}]*)\}", header).group(1)
    codes = [int(v) for v in re.findall(r"= (\d+)", enum)]
    assert codes == list(range(len(ACTIVATIONS))), enum
    parsed = re.findall(r'if \(name == "(\w+)"\) return (\w+);', header)
    assert [name for name, _ in parsed] == list(ACTIVATIONS)
    named = re.findall(r'case (\w+): return "(\w+)";', header)
    assert [n for _, n in named] == list(ACTIVATIONS[:-1])  # the last one is the default branch
    assert 'default: return "%s";' % ACTIVATIONS[-1] in header
    message = re.search(r"choose one of ([\w, ]+)\"", header).group(1)
    assert message.split(", ") == list(ACTIVATIONS)
