"""--memory-budget planning (fastcnn.memory_plan): block recomputation changes no result and
updates BatchNorm statistics once, the plan picks the cheapest remedy that fits, an impossible
budget is a clear error before training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn import memory_plan, recompute
from fastcnn.memory import MiB


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _grads_and_stats(model, x, y):
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    return grads, stats


@pytest.mark.parametrize("name", ["resnet20", "simplenet_310k", "densenet_bc_100_12"])
def test_recomputation_gives_the_same_gradients_and_statistics(name):
    torch.manual_seed(0)
    plain = fastcnn.create_model(name).train()
    ckpt = fastcnn.create_model(name).train()
    ckpt.load_state_dict(plain.state_dict())
    assert memory_plan.enable_recomputation(ckpt) > 0
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    g1, s1 = _grads_and_stats(plain, x, y)
    g2, s2 = _grads_and_stats(ckpt, x, y)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(s1, s2):  # running statistics and num_batches_tracked: updated once
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()


def test_recomputation_lowers_the_peak():
    model = fastcnn.create_model("resnet20")
    plain = memory_plan.fit(model, _sgd, (3, 32, 32), 10, "cpu")
    recomputed = memory_plan.fit(model, _sgd, (3, 32, 32), 10, "cpu", recompute=True)
    assert recomputed.per_image < 0.7 * plain.per_image


def test_plan_picks_the_cheapest_remedy_that_fits():
    model = fastcnn.create_model("resnet20")
    plain = memory_plan.fit(model, _sgd, (3, 32, 32), 10, "cpu")
    recomputed = memory_plan.fit(model, _sgd, (3, 32, 32), 10, "cpu", recompute=True)
    batch = 64

    def plan(budget):
        return memory_plan.plan(model, _sgd, batch, int(budget), (3, 32, 32), 10, "cpu")

    p = plan(plain.peak(batch) * 1.1)
    assert not p.recompute and p.micro_batches == 1
    p = plan((plain.peak(batch) + recomputed.peak(batch)) / 2)
    assert p.recompute and p.micro_batches == 1
    p = plan(recomputed.peak(batch // 4) * 1.02)
    assert p.micro_batches in (2, 4) and p.predicted_peak <= recomputed.peak(batch // 4) * 1.02
    with pytest.raises(memory_plan.BudgetError, match="cannot hold a training step"):
        plan(plain.fixed * 0.5)
    assert "micro-batches" in plan(recomputed.peak(batch // 4) * 1.02).describe()


def test_plan_rebuilds_a_fused_models_activations_before_recomputing_blocks():
    """A fused model that keeps its activations (train's CPU default) is planned with its
    activation rebuilds as the first remedy: they are on in the plan only when the kept step
    does not fit, and the model passed in is left as it was."""
    model = recompute.disable(fastcnn.create_model("resnet20", fused=True))
    kept = memory_plan.fit(model, _sgd, (3, 32, 32), 10, "cpu")
    rebuilt = memory_plan.fit(model, _sgd, (3, 32, 32), 10, "cpu", rebuild_activations=True)
    assert rebuilt.per_image < 0.8 * kept.per_image
    batch = 64

    def plan(budget, rebuild_remedy=True):
        return memory_plan.plan(model, _sgd, batch, int(budget), (3, 32, 32), 10, "cpu",
                                rebuild_remedy=rebuild_remedy)

    p = plan(kept.peak(batch) * 1.05)
    assert not p.rebuild_activations and not p.recompute and p.micro_batches == 1
    between = (kept.peak(batch) + rebuilt.peak(batch)) / 2
    p = plan(between)
    assert p.rebuild_activations and not p.recompute and p.micro_batches == 1
    assert "activation rebuilds" in p.describe()
    p = plan(between, rebuild_remedy=False)  # a fused model told to keep them: blocks are recomputed
    assert not p.rebuild_activations and p.recompute
    assert getattr(model, recompute._HANDLES, None) is None


def test_micro_batches_give_the_full_batch_update(tmp_path):
    """Two runs of the engine on the same data: with a budget that forces micro-batches, the
    loss curve follows the full-batch run (BN statistics per micro-batch differ a little)."""
    import json
    import os
    import subprocess
    import sys

    data = os.environ.get("FASTCNN_TEST_DATA")
    if not data:
        pytest.skip("FASTCNN_TEST_DATA (a CIFAR-10 folder) is not set")
    common = [sys.executable, "-m", "fastcnn.train", "lenet5", "--subset", "512", "--epochs", "1",
              "--device", "cpu", "--data-dir", data, "--out-dir", str(tmp_path), "--no-plot", "--seed", "0"]
    full = subprocess.run(common + ["--name", "full"], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    tight = subprocess.run(common + ["--name", "tight", "--memory-budget", "2.6MB"], capture_output=True,
                           text=True, timeout=300)
    assert tight.returncode == 0, tight.stderr
    assert "micro-batches" in tight.stdout + tight.stderr
    rows = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("full", "tight")]
    assert abs(rows[0]["train_loss"] - rows[1]["train_loss"]) < 0.05, rows


def test_impossible_budget_is_a_usage_error(tmp_path):
    import os
    import subprocess
    import sys

    data = os.environ.get("FASTCNN_TEST_DATA")
    if not data:
        pytest.skip("FASTCNN_TEST_DATA (a CIFAR-10 folder) is not set")
    p = subprocess.run([sys.executable, "-m", "fastcnn.train", "resnet20", "--subset", "256", "--epochs", "1",
                        "--device", "cpu", "--memory-budget", "100KB", "--out-dir", str(tmp_path),
                        "--data-dir", data], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "--memory-budget 100KB" in p.stderr and "cannot hold a training step" in p.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before the plan is made"
