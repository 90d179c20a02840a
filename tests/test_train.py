"""The training engine end to end on real CIFAR-10 (a subset made by the shared
``make_cifar10.py``, or the prepared folder named by ``FASTCNN_TEST_DATA``): LeNet-5 learns,
resume is bit-identical, NaN stops the run, run folders are protected, --fused and AMP run;
plus the schedules, recipes, evaluation and BN folding as units."""
import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastcnn
from fastcnn import recipes
from fastcnn.evaluate import evaluate
from fastcnn.export import check_equivalent, fold_batchnorm, onnx_unavailable_reason
from fastcnn.schedules import LRScheduler, ScheduleConfig, lr_factor
from fastcnn import recompute
from fastcnn.train import NonFiniteLossError, UsageError, build_optimizer, param_groups, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKER = os.path.join(os.environ.get("FASTCNN_SHARED_DATA", os.path.join(REPO, "..", "shared", "data")),
                     "make_cifar10.py")


def prepared_cifar10(tmp_path_factory, train_per_class=500, test_per_class=100) -> str:
    """A real CIFAR-10 subset in the standard layout: ``$FASTCNN_TEST_DATA`` if set (CI prepares
    it once), else made once per session under pytest's temporary folder."""
    env = os.environ.get("FASTCNN_TEST_DATA")
    if env:
        if not os.path.isfile(os.path.join(env, "cifar-10-batches-py", "test_batch")):
            pytest.fail(f"FASTCNN_TEST_DATA={env} has no cifar-10-batches-py/test_batch")
        return env
    out = tmp_path_factory.getbasetemp() / f"cifar10-{train_per_class}-{test_per_class}"
    if not (out / "cifar-10-batches-py" / "test_batch").exists():
        if not os.path.isfile(MAKER):
            pytest.skip(f"no real CIFAR-10: {MAKER} is missing; set FASTCNN_TEST_DATA to a prepared folder")
        subprocess.run([sys.executable, MAKER, str(out), "--train-per-class", str(train_per_class),
                        "--test-per-class", str(test_per_class)], check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    return prepared_cifar10(tmp_path_factory)


pytestmark = pytest.mark.usefixtures("one_thread")


def _common(cifar_dir, out, *extra):
    return ["--data-dir", cifar_dir, "--no-download", "--out-dir", str(out), "--no-plot", *extra]


# --------------------------------------------------------------------------- end to end

def test_lenet_learns_real_cifar10(cifar_dir, tmp_path, capsys):
    """10 epochs on 5,000 real images: 45.6-49.6% over seeds 0-5 when measured; chance is 10%."""
    res = train(["lenet5", *_common(cifar_dir, tmp_path), "--subset", "5000", "--epochs", "10",
                 "--batch-size", "64", "--lr", "0.03", "--schedule", "onecycle", "--seed", "0"])
    assert res["test_acc"] >= 35.0, res
    run = res["run_dir"]
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["images_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert {"config.json", "checkpoint_last.pt", "checkpoint_best.pt"} <= set(os.listdir(run))
    out = capsys.readouterr().out
    assert "epoch  10/10" in out and "done: test accuracy" in out
    # a CPU run keeps freed memory in the process (fastcnn.cpu_memory) and says so
    assert ("malloc keeps freed memory" in out) == (platform.libc_ver()[0] == "glibc"), out

    # the evaluator rebuilds the model and normalisation from the checkpoint: same number
    from fastcnn.evaluate import main as evaluate_main

    assert evaluate_main([os.path.join(run, "checkpoint_last.pt"), "--json", str(tmp_path / "e.json")]) == 0
    report = json.load(open(tmp_path / "e.json"))
    assert report["acc"] == pytest.approx(res["test_acc"], abs=1e-9)
    assert sum(map(sum, report["confusion"])) == report["total"]
    assert evaluate_main([os.path.join(run, "checkpoint_best.pt"), "--tta"]) == 0
    assert "per-class accuracy" in capsys.readouterr().out


def test_resume_is_bit_identical(cifar_dir, tmp_path):
    args = ["lenet5", *_common(cifar_dir, tmp_path), "--subset", "640", "--epochs", "3", "--batch-size", "64",
            "--lr", "0.02", "--schedule", "cosine", "--seed", "7"]
    full = train(args + ["--name", "full"])
    part = train(args + ["--name", "part", "--stop-after-epoch", "1"])
    assert part["epoch"] == 1
    resumed = train(args + ["--name", "part", "--resume"])
    a = torch.load(os.path.join(full["run_dir"], "checkpoint_last.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed["run_dir"], "checkpoint_last.pt"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    drop = ("epoch_time_s", "images_per_s", "peak_mem_mb")
    rows = lambda r: [{k: v for k, v in json.loads(l).items() if k not in drop}
                      for l in open(os.path.join(r["run_dir"], "metrics.jsonl"))]
    assert rows(full) == rows(resumed)


def test_nan_loss_stops_the_run(cifar_dir, tmp_path):
    with pytest.raises(NonFiniteLossError, match="NaN/inf"):
        train(["lenet5", *_common(cifar_dir, tmp_path), "--subset", "640", "--epochs", "2", "--lr", "1e12",
               "--batch-size", "64", "--log-interval", "2", "--name", "nan"])
    assert not os.path.exists(tmp_path / "nan" / "checkpoint_last.pt")


def test_run_folders_are_never_overwritten_unasked(cifar_dir, tmp_path):
    base = ["lenet5", *_common(cifar_dir, tmp_path), "--subset", "128", "--epochs", "1", "--batch-size", "64"]
    first = train(base)
    second = train(base)
    assert first["run_dir"].endswith("lenet5-cifar10") and second["run_dir"].endswith("lenet5-cifar10-2")
    before = open(os.path.join(first["run_dir"], "checkpoint_last.pt"), "rb").read()
    with pytest.raises(UsageError, match="already holds a run"):
        train(base + ["--name", "lenet5-cifar10"])
    assert open(os.path.join(first["run_dir"], "checkpoint_last.pt"), "rb").read() == before
    again = train(base + ["--name", "lenet5-cifar10", "--overwrite", "--metrics-format", "csv"])
    assert again["run_dir"] == first["run_dir"]
    assert not os.path.exists(os.path.join(first["run_dir"], "metrics.jsonl"))
    assert open(os.path.join(first["run_dir"], "metrics.csv")).readline().startswith("epoch,lr,")


def test_fused_reference_backend_trains_like_unfused(cifar_dir, tmp_path):
    """--fused routes LeNet's conv+bias+ReLU through fastcnn.ops; with the reference backend
    the numbers must match the plain path."""
    base = ["lenet5", *_common(cifar_dir, tmp_path), "--subset", "256", "--epochs", "1", "--batch-size", "64",
            "--lr", "0.02"]
    plain = train(base + ["--name", "plain"])
    fused = train(base + ["--name", "fused", "--fused", "--backend", "reference"])
    fastcnn.set_backend("auto")
    for (k, a), b in zip(plain["model"].state_dict().items(), fused["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_activations_kept_on_cpu_by_default_and_rebuilt_on_request(cifar_dir, tmp_path, capsys):
    """--fused keeps each layer's activation on CPU unless --rebuild-activations turns the
    rebuild hooks (fastcnn.recompute) on: the same weights after a step either way (the
    rebuilds are bit for bit), the choice in config.json and the run's first line; either
    option without --fused, or both together, is a usage error."""
    base = ["resnet20", *_common(cifar_dir, tmp_path), "--subset", "128", "--epochs", "1", "--batch-size", "32",
            "--fused", "--backend", "reference", "--seed", "0"]
    rebuilt = train(base + ["--name", "rebuilt", "--rebuild-activations"])
    capsys.readouterr()
    kept = train(base + ["--name", "kept"])
    kept_out = capsys.readouterr()
    explicit = train(base + ["--name", "explicit", "--keep-activations"])
    fastcnn.set_backend("auto")
    assert getattr(kept["model"], recompute._HANDLES, None) is None
    assert getattr(explicit["model"], recompute._HANDLES, None) is None
    assert getattr(rebuilt["model"], recompute._HANDLES, None) is not None
    for (k, a), b in zip(rebuilt["model"].state_dict().items(), kept["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for run, keeps in ((kept, True), (rebuilt, False)):
        assert json.load(open(os.path.join(run["run_dir"], "config.json")))["keep_activations"] is keeps
    assert "activations kept (the cpu default)" in kept_out.out + kept_out.err
    for flag in ("--keep-activations", "--rebuild-activations"):
        with pytest.raises(UsageError, match=f"{flag} is an option of --fused"):
            train(["resnet20", *_common(cifar_dir, tmp_path), flag])
    with pytest.raises(SystemExit):
        train(base + ["--keep-activations", "--rebuild-activations"])


def test_memory_budget_turns_a_cpu_runs_activation_rebuilds_on_when_kept_ones_do_not_fit(cifar_dir, tmp_path,
                                                                                           capsys):
    """With a --memory-budget between the kept and the rebuilt step's peak, a fused CPU run
    (which keeps its activations by default) is planned with its rebuilds on, says so, and
    records it; --keep-activations forbids that remedy, so blocks are recomputed instead."""
    from fastcnn import memory_plan
    model = recompute.disable(fastcnn.create_model("resnet20", fused=True))

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    batch = 32
    kept = memory_plan.fit(model, sgd, (3, 32, 32), 10, "cpu").peak(batch)
    rebuilt = memory_plan.fit(model, sgd, (3, 32, 32), 10, "cpu", rebuild_activations=True).peak(batch)
    budget = f"{(kept + rebuilt) / 2 / 2**20:.2f}MiB"
    base = ["resnet20", *_common(cifar_dir, tmp_path), "--subset", "64", "--epochs", "1", "--batch-size",
            str(batch), "--fused", "--memory-budget", budget]
    capsys.readouterr()
    planned = train(base + ["--name", "planned"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "memory plan: activation rebuilds (fastcnn.recompute);" in text, text
    assert "activations rebuilt (the memory plan's choice)" in text, text
    assert getattr(planned["model"], recompute._HANDLES, None) is not None
    assert json.load(open(os.path.join(planned["run_dir"], "config.json")))["keep_activations"] is False
    told = train(base + ["--name", "told", "--keep-activations"])
    out = capsys.readouterr()
    assert "memory plan: block recomputation" in out.out + out.err
    assert getattr(told["model"], recompute._HANDLES, None) is None


def test_bf16_autocast_and_label_smoothing_run(cifar_dir, tmp_path):
    res = train(["lenet5", *_common(cifar_dir, tmp_path), "--subset", "256", "--epochs", "1",
                 "--batch-size", "64", "--amp", "bf16", "--label-smoothing", "0.1", "--no-decay-bn-bias",
                 "--optimizer", "adamw", "--lr", "1e-3", "--warmup-epochs", "0.5", "--cutout", "8"])
    assert math.isfinite(res["train_loss"])
    cfg = json.load(open(os.path.join(res["run_dir"], "config.json")))
    assert cfg["amp"] == "bf16" and cfg["recipe"]["label_smoothing"] == 0.1 and cfg["recipe"]["cutout"] == 8


# --------------------------------------------------------------------------- schedules

def test_multistep_and_warmup():
    cfg = ScheduleConfig("multistep", 10, milestones=(3, 6), gamma=0.1, warmup_epochs=2)
    assert lr_factor(cfg, 0) == 0 and lr_factor(cfg, 1) == pytest.approx(0.5)
    assert lr_factor(cfg, 2.5) == 1 and lr_factor(cfg, 3) == pytest.approx(0.1)
    assert lr_factor(cfg, 9.99) == pytest.approx(0.01)


def test_cosine_onecycle_htd_shapes():
    cos = ScheduleConfig("cosine", 10, min_lr_ratio=0.1)
    assert lr_factor(cos, 0) == 1 and lr_factor(cos, 5) == pytest.approx(0.55) and lr_factor(cos, 10) == pytest.approx(0.1)
    oc = ScheduleConfig("onecycle", 10, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    assert lr_factor(oc, 0) == pytest.approx(1 / 25) and lr_factor(oc, 3) == pytest.approx(1.0)
    assert lr_factor(oc, 10) == pytest.approx(1 / 25 / 1e4)
    htd = ScheduleConfig("htd", 100)
    # lr(t) = lr0/2 (1 - tanh(L + (U - L) t / T)), L = -6, U = 3
    for t in (0, 10, 66.7, 100):
        assert lr_factor(htd, t) == pytest.approx(0.5 * (1 - math.tanh(-6 + 9 * t / 100)))
    with pytest.raises(ValueError, match="unknown schedule"):
        ScheduleConfig("linear", 10)


def test_scheduler_state_roundtrip():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    s = LRScheduler(opt, ScheduleConfig("cosine", 2), steps_per_epoch=5)
    for _ in range(3):
        s.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    s2 = LRScheduler(opt2, ScheduleConfig("cosine", 2), steps_per_epoch=5)
    s2.load_state_dict(s.state_dict())
    assert s2.get_last_lr() == s.get_last_lr() == [pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.3)))]
    with pytest.raises(ValueError, match="steps per epoch"):
        LRScheduler(opt2, ScheduleConfig("cosine", 2), steps_per_epoch=6).load_state_dict(s.state_dict())


# --------------------------------------------------------------------------- recipes and optimiser

def test_every_model_has_a_sourced_recipe():
    for name in fastcnn.list_models():
        r = recipes.get_recipe(name)
        assert r.source and r.epochs > 0 and r.batch_size > 0, name
        assert r.source != recipes.DEFAULT.source, f"{name} falls back to the default recipe"


def test_seed_values():
    r = recipes.get_recipe("lenet5")  # LeNet_dp_da_wd_keras.py: 0.05 -> x0.1 @81, @122, batch 128, 200 ep
    assert (r.lr, r.milestones, r.gamma, r.batch_size, r.epochs, r.nesterov) == (0.05, (81, 122), 0.1, 128, 200, True)
    r = recipes.get_recipe("wrn28_10")
    assert (r.milestones, r.gamma, r.weight_decay) == ((60, 120, 160), 0.2, 5e-4)
    r = recipes.get_recipe("densenet_bc_100_12")
    assert (r.batch_size, r.epochs) == (64, 250)
    assert recipes.get_recipe("se_resnext29_4x64d").batch_size == 120
    assert recipes.get_recipe("simplenet").optimizer == "adadelta"
    assert recipes.get_recipe("allcnn_c").milestones == (200, 250, 300)


def test_print_recipe_shows_overrides(capsys):
    assert train(["lenet5", "--print-recipe", "--lr", "0.2", "--epochs", "5", "--dataset", "mnist"]) == {}
    out = capsys.readouterr().out
    assert "recipe for lenet5 on mnist" in out and "lr" in out and "0.2" in out
    assert "flip             False" in out  # mirrored digits are not digits
    assert "LeNet_dp_da_wd_keras.py" in out


def test_no_decay_for_bn_and_bias():
    model = fastcnn.create_model("resnet20")
    groups = param_groups(model, 5e-4, True)
    assert groups[1]["weight_decay"] == 0 and all(p.ndim <= 1 for p in groups[1]["params"])
    assert all(p.ndim > 1 for p in groups[0]["params"])
    n_bn = sum(2 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(groups[1]["params"]) == n_bn + 1  # BN weight+bias, and the classifier bias
    opt = build_optimizer(model, recipes.get_recipe("resnet20"), True)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[1]["weight_decay"] == 0


# --------------------------------------------------------------------------- evaluation and export

class _Fixed(nn.Module):
    """Predicts class (label + shift) % k by construction."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, :self.k, 0, 0]


def test_evaluate_confusion_and_per_class():
    from fastcnn.data import GpuLoader

    k, n = 3, 30
    y = torch.arange(n) % k
    pred = torch.where(torch.arange(n) % 5 == 0, (y + 1) % k, y)
    x = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    x[torch.arange(n), pred, 0, 0] = 255
    loader = GpuLoader(x, y, 7, train=False, mean=[0, 0, 0], std=[1, 1, 1])
    r = evaluate(_Fixed(k), loader, k)
    assert r["total"] == n and r["correct"] == int((pred == y).sum())
    conf = torch.tensor(r["confusion"])
    for t in range(k):
        for p in range(k):
            assert conf[t, p] == int(((y == t) & (pred == p)).sum())
    assert r["per_class_acc"][0] == pytest.approx(100 * conf[0, 0].item() / 10)


@pytest.mark.parametrize("name", ["resnet20", "nin", "lenet5"])
def test_batchnorm_folding_keeps_outputs(name):
    model = fastcnn.create_model(name)
    for m in model.modules():  # trained-looking statistics, so folding really does something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.2, 0.2)
    folded, n_folded, n_left = fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_folded + n_left == n_bn and (n_bn == 0 or n_folded > 0)
    assert check_equivalent(model, folded, (3, 32, 32)) < 1e-4
    assert model.training  # the original is left as it was


def test_export_without_onnx_says_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    from fastcnn import export

    real = importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else real(n, *a))
    assert "pip install onnx" in onnx_unavailable_reason()
    assert export.main([str(tmp_path / "x.pt"), "--onnx"]) == 1
    assert "pip install onnx" in capsys.readouterr().err


def test_export_onnx_when_available(cifar_dir, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export is optional; tested where onnx is installed")
    res = train(["resnet20", *_common(cifar_dir, tmp_path), "--subset", "64", "--epochs", "1", "--batch-size", "32"])
    from fastcnn.export import main as export_main

    out = tmp_path / "m.onnx"
    assert export_main([os.path.join(res["run_dir"], "checkpoint_last.pt"), "--onnx", str(out)]) == 0
    assert out.stat().st_size > 100_000


def test_fp16_scaler_channels_last_and_budget_note(cifar_dir, tmp_path, capsys):
    res = train(["lenet5", *_common(cifar_dir, tmp_path), "--subset", "128", "--epochs", "1", "--batch-size", "64",
                 "--amp", "fp16", "--channels-last", "--memory-budget", "2GB", "--lr", "0.01"])
    state = torch.load(os.path.join(res["run_dir"], "checkpoint_last.pt"), weights_only=True)
    assert state["scaler"] and state["scaler"]["scale"] > 0  # the GradScaler is saved for --resume
    assert "enforced on CUDA only" in capsys.readouterr().out


def test_progress_bar_on_terminal_plain_lines_otherwise():
    import io

    from fastcnn.train import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress(True, stream)
        p.update(2, 10, 50, 100, 1.2345, 56.7, 12345.0, 75.0)
        p.line("epoch   2/10 ...")
    assert "\repoch 2/10 [" in tty.getvalue() and "12,345 img/s" in tty.getvalue() and "ETA 1:15" in tty.getvalue()
    assert pipe.getvalue() == "epoch   2/10 ...\n"  # no bar, no carriage returns
