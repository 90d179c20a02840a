"""fastcnn.summary counts parameters, MACs and activations of the real forward graph."""
import torch
from torch import nn

import fastcnn
from fastcnn.layers import ConvBnAct


def test_summary_counts_small_net_exactly():
    net = nn.Sequential(ConvBnAct(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    s = fastcnn.summary(net, input_size=(3, 6, 6), print_out=False)
    assert s.trainable_params == 3 * 8 * 9 + 2 * 8 + 8 * 36 * 10 + 10
    assert s.macs == 8 * 36 * 27 + 10 * 288
    # conv out, bn out, relu out (8*36 each), flatten (288), linear (10)
    assert s.activations == 3 * 288 + 288 + 10


def test_summary_restores_fused_and_mode():
    net = nn.Sequential(ConvBnAct(3, 4, fused=True))
    net.train()
    fastcnn.summary(net, input_size=(3, 5, 5), print_out=False)
    assert net[0].fused and net.training


def test_zoo_cli_markdown_and_bad_name():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "fastcnn.zoo", "--markdown", "resnet20", "lenet5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| `resnet20` | 269,722 |" in res.stdout and "| `lenet5` | 62,006 |" in res.stdout
    res = subprocess.run([sys.executable, "-m", "fastcnn.zoo", "resnet2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown model 'resnet2'" in res.stderr and "resnet20" in res.stderr
