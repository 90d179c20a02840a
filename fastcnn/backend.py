"""Alias of :mod:`fastcnn.ops.dispatch`, where backend selection lives (kept so that
``from fastcnn import backend`` written before the move keeps working)."""
import sys

from .ops import dispatch as _dispatch

sys.modules[__name__] = _dispatch
