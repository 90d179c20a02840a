"""fastcnn benchmarks (pytest-benchmark) and their report tool (``python -m bench.report``)."""
