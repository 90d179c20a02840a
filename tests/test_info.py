"""fastcnn.info() reports versions, extension, GPU and backends, in-process and as a CLI."""
import subprocess
import sys

import torch

import fastcnn


def test_info_collects_everything(capsys):
    data = fastcnn.info()
    out = capsys.readouterr().out
    assert data["torch"] == torch.__version__
    assert set(data) >= {"fastcnn", "triton", "triton_interpret", "extension", "gpu", "backend", "available"}
    assert "extension" in out and "fused conv_bn_act on cpu" in out
    assert "reference" in data["available"]["cpu"]["conv_bn_act"]


def test_info_cli():
    res = subprocess.run([sys.executable, "-m", "fastcnn.info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "extension" in res.stdout
