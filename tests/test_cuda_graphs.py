"""``--cuda-graphs``: the training step captured in a CUDA graph and replayed
(fastcnn.train_step.CUDAGraphStep).

Without a GPU (CPU tests): the usage errors; and the step run *uncaptured* -- the same code
on static buffers with the LR read from device tensors -- computes what the plain step does,
follows the LR schedule, leaves plain float LRs in the optimizer (checkpoints unchanged), and
issues no op that reads a device value on the host (which would break capture).

With a GPU (``gpu`` marker, skipped without one): capture and replay on resnet20, with the loss
sums and the weights after several steps equal to the plain step's within fp32 tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastcnn
from fastcnn.cli import UsageError
from fastcnn.recipes import get_recipe
from fastcnn.schedules import LRScheduler, ScheduleConfig
from fastcnn.train import build_optimizer
from fastcnn.train_step import (CUDAGraphStep, TrainStep, check_cuda_graphs, graph_optimizer_kwargs,
                                load_optimizer_state)
from test_cli import one_error_line, run
from test_no_host_sync import FailOnHostSync

CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it in the CPU tests


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- usage errors

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_refuses_cuda_graphs_without_cuda(tmp_path):
    one_error_line(run("lenet5", "--cuda-graphs", "--out-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path)),
                   2, "--cuda-graphs needs a CUDA device", "cpu")
    one_error_line(run("lenet5", "--cuda-graphs", "--device", "cpu", "--out-dir", str(tmp_path / "runs"),
                       "--data-dir", str(tmp_path)), 2, "--cuda-graphs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kwargs, needles", [
    (dict(device=torch.device("cpu"), amp_name="off", world=1), ["--cuda-graphs needs a CUDA device"]),
    (dict(device=CUDA, amp_name="bf16", world=2), ["--cuda-graphs", "torchrun", "2 processes"]),
    (dict(device=CUDA, amp_name="fp16", world=1, amp_arg="fp16"), ["--cuda-graphs", "fp16", "GradScaler",
                                                                   "--amp bf16"]),
    (dict(device=CUDA, amp_name="fp16", world=1, amp_arg="auto"), ["--amp auto chose fp16"]),
    (dict(device=CUDA, amp_name="off", world=1, compile=True), ["--cuda-graphs with --compile"]),
    (dict(device=CUDA, amp_name="off", world=1, memory_budget="2GB"), ["--cuda-graphs with --memory-budget"]),
])
def test_what_cuda_graphs_refuse(kwargs, needles):
    with pytest.raises(UsageError) as err:
        check_cuda_graphs(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("amp_name", ["off", "bf16"])
def test_what_cuda_graphs_accept(amp_name):
    check_cuda_graphs(CUDA, amp_name, 1, amp_arg=amp_name)


def test_graph_ready_optimizers_take_a_tensor_lr():
    model = nn.Linear(4, 2)
    for name in ("sgd", "adam", "adamw", "adadelta"):
        rec = get_recipe("resnet20").replace(optimizer=name)
        opt = build_optimizer(model, rec, False, cuda_graphs=True)
        for k, v in graph_optimizer_kwargs(name).items():
            assert all(g[k] == v for g in opt.param_groups), (name, k)
    plain = build_optimizer(model, get_recipe("resnet20"), False)
    assert not plain.param_groups[0]["fused"]  # without --cuda-graphs: torch's default implementation


# --------------------------------------------------------------------------- the step, uncaptured on CPU

def _setup(name="resnet20", fused=False, seed=0, schedule="onecycle", steps=8):
    torch.manual_seed(seed)
    model = fastcnn.create_model(name, fused=fused)
    rec = get_recipe("resnet20").replace(lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, rec, ScheduleConfig(schedule, 1.0, warmup_epochs=0.25), steps


def _batches(n, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def _run(step_cls, model, rec, cfg, steps, batches, graph=False, **kw):
    opt = build_optimizer(model, rec, True, cuda_graphs=graph)
    sched = LRScheduler(opt, cfg, steps)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    step = step_cls(model, opt, crit, device=torch.device("cpu"), **kw)
    lrs = []
    model.train()
    step.reset()
    for x, y in batches:
        lrs.append(sched.get_last_lr()[0])
        step(x, y)
        sched.step()
    return step, opt, lrs


@pytest.mark.parametrize("fused, grad_clip, amp", [(False, 0.0, None), (True, 0.0, None), (False, 1.0, None),
                                                   (False, 0.0, torch.bfloat16)])
def test_uncaptured_graph_step_computes_the_plain_step(fused, grad_clip, amp):
    if fused and fastcnn.ops.dispatch.unavailable_reason("cpu", "conv_bn_act", "cpu") is not None:
        pytest.skip("the cpu backend (extension) is not built")
    model, rec, cfg, steps = _setup(fused=fused)
    twin = copy.deepcopy(model)
    batches = _batches(steps)
    plain, _, lrs = _run(TrainStep, model, rec, cfg, steps, batches, grad_clip=grad_clip, amp_dtype=amp)
    graph, gopt, glrs = _run(CUDAGraphStep, twin, rec, cfg, steps, batches, graph=True, grad_clip=grad_clip,
                             amp_dtype=amp, warmup_steps=3, capture=False)
    assert lrs == glrs and len(set(lrs)) == steps  # the LR changes every step
    assert graph.steps == steps and not graph.captured
    # the LR tensors held what the schedule set for the last step; the groups hold floats again
    assert graph.lrs[0].item() == pytest.approx(lrs[-1], rel=1e-6)
    assert all(isinstance(g["lr"], float) for g in gopt.param_groups)
    tol = dict(rtol=1e-5, atol=1e-6) if amp is None else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(graph.loss_sum, plain.loss_sum, **tol)
    assert int(graph.correct) == int(plain.correct)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, **tol, msg=k)  # weights and BN running statistics


def test_uncaptured_graph_step_follows_an_lr_change_without_recapture():
    """Fill the LR tensors from the param groups before every step: an LR set by hand (as a
    scheduler does) is used by the next step, and the same update as the plain step's."""
    model, rec, cfg, _ = _setup(schedule="constant")
    twin = copy.deepcopy(model)
    batches = _batches(3)
    results = []
    for m, cls, kw in ((model, TrainStep, {}), (twin, CUDAGraphStep, dict(warmup_steps=1, capture=False))):
        opt = build_optimizer(m, rec, False, cuda_graphs=cls is CUDAGraphStep)
        step = cls(m, opt, nn.CrossEntropyLoss(), device=torch.device("cpu"), **kw)
        for i, (x, y) in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = [0.1, 0.5, 0.01][i]
            step(x, y)
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_the_captured_part_never_waits_for_the_device(fused):
    """What would be captured -- forward, backward, clipping, the graph-ready optimizer step with
    a tensor LR, the epoch sums -- issues no op that reads a device value on the host."""
    if fused and fastcnn.ops.dispatch.unavailable_reason("cpu", "conv_bn_act", "cpu") is not None:
        pytest.skip("the cpu backend (extension) is not built")
    model, rec, cfg, steps = _setup(fused=fused)
    opt = build_optimizer(model, rec, True, cuda_graphs=True)
    step = CUDAGraphStep(model, opt, nn.CrossEntropyLoss(), device=torch.device("cpu"), grad_clip=1.0,
                         warmup_steps=1, capture=False)
    (x, y), (x2, y2) = _batches(2)
    step(x, y)  # warm-up: lazily created state (momentum buffers) may differ
    step.static_x.copy_(x2)
    step.static_y.copy_(y2)
    opt.zero_grad(set_to_none=True)
    with step._tensor_lr(), FailOnHostSync():
        step._captured_part()


def test_plain_optimizer_with_a_tensor_lr_would_wait_for_the_device():
    """Why the graph-ready optimizer: torch's default SGD reads a tensor LR on the host."""
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with FailOnHostSync():
            opt.step()


def test_one_shape_only():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    opt = build_optimizer(model, get_recipe("resnet20"), False, cuda_graphs=True)
    step = CUDAGraphStep(model, opt, nn.CrossEntropyLoss(), device=torch.device("cpu"), warmup_steps=1,
                         capture=False)
    (x, y), = _batches(1)
    step(x, y)
    with pytest.raises(RuntimeError, match="one shape"):
        step(x[:4], y[:4])


def test_capture_needs_cuda():
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, get_recipe("resnet20"), False, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA device"):
        CUDAGraphStep(model, opt, nn.CrossEntropyLoss(), device=torch.device("cpu"), capture=True)


def test_resume_keeps_this_runs_optimizer_implementation():
    """A checkpoint of a plain run resumes with --cuda-graphs (and back): the optimizer keeps the
    implementation it was built with, the state (momentum buffers, LR) is the checkpoint's."""
    model = nn.Linear(4, 2)
    rec = get_recipe("resnet20")
    plain = build_optimizer(model, rec, False)
    model(torch.randn(3, 4)).sum().backward()
    plain.step()
    state = copy.deepcopy(plain.state_dict())
    graph = build_optimizer(model, rec, False, cuda_graphs=True)
    load_optimizer_state(graph, state)
    assert graph.param_groups[0]["fused"] is True
    buf = graph.state[graph.param_groups[0]["params"][0]]["momentum_buffer"]
    torch.testing.assert_close(buf, plain.state[plain.param_groups[0]["params"][0]]["momentum_buffer"])
    back = build_optimizer(model, rec, False)
    load_optimizer_state(back, copy.deepcopy(graph.state_dict()))
    assert not back.param_groups[0]["fused"]
    # without a flag change it is load_state_dict exactly
    same = build_optimizer(model, rec, False)
    load_optimizer_state(same, copy.deepcopy(state))
    assert same.state_dict()["param_groups"] == state["param_groups"]


# --------------------------------------------------------------------------- GPU: capture and replay

@pytest.fixture
def _deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _gpu_compare(name, fused, optimizer, amp, steps=8, warmup=3, batch=32):
    device = torch.device("cuda")
    torch.manual_seed(0)
    base = fastcnn.create_model(name, fused=fused).to(device).to(memory_format=torch.channels_last)
    rec = get_recipe("resnet20").replace(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3)
    cfg = ScheduleConfig("onecycle", 1.0)
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [(torch.randn(batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(steps)]
    out = []
    for cls, kw in ((TrainStep, {}), (CUDAGraphStep, dict(warmup_steps=warmup))):
        model = copy.deepcopy(base)
        # the same optimizer implementation for both: the comparison is of capture and replay
        opt = build_optimizer(model, rec, True, cuda_graphs=True)
        sched = LRScheduler(opt, cfg, steps)
        step = cls(model, opt, nn.CrossEntropyLoss(), device=device, amp_dtype=amp, grad_clip=5.0, **kw)
        model.train()
        step.reset()
        for x, y in batches:
            step(x, y)
            sched.step()
        torch.cuda.synchronize()
        out.append((step, model))
    (plain, m1), (graph, m2) = out
    assert graph.captured and graph.steps == steps
    tol = dict(rtol=1e-4, atol=1e-5) if amp is None else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(graph.loss_sum, plain.loss_sum, **tol)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(b, a, **tol, msg=k)


@pytest.mark.gpu
@pytest.mark.usefixtures("_deterministic_cudnn")
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_captured_resnet20_matches_plain_step(fused):
    _gpu_compare("resnet20", fused, "sgd", None)


@pytest.mark.gpu
@pytest.mark.usefixtures("_deterministic_cudnn")
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adadelta"])
def test_gpu_captured_step_other_optimizers(optimizer):
    _gpu_compare("resnet20", False, optimizer, None)


@pytest.mark.gpu
@pytest.mark.usefixtures("_deterministic_cudnn")
def test_gpu_captured_step_bf16():
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no native bf16 on this GPU")
    _gpu_compare("resnet20", True, "sgd", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_gpu_plain_optimizer_is_fused_and_makes_no_step_temporaries(optimizer):
    """On CUDA the recipe's optimizer is the fused implementation (train.FUSED_ON_CUDA): the
    same update as torch's default one, and its step with weight decay allocates no copy of
    the parameters (the foreach implementation's weight-decay add does)."""
    from fastcnn.memory import MemoryTracker
    from fastcnn.train import FUSED_ON_CUDA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 10)).cuda()
    twin = copy.deepcopy(model)
    rec = get_recipe("resnet20").replace(optimizer=optimizer, lr=0.05, weight_decay=5e-4)
    opt = build_optimizer(model, rec, False)
    assert all(g["fused"] for g in opt.param_groups) and FUSED_ON_CUDA[optimizer] == {"fused": True}
    ref = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer](
        twin.parameters(), lr=0.05, weight_decay=5e-4, **({"momentum": rec.momentum} if optimizer == "sgd" else {}))
    x = torch.randn(8, 256, device="cuda")
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(2):
            m(x).square().mean().backward()
            if m is model and o.state:
                with MemoryTracker("cuda") as mt:
                    mt.track(m, o)
                    mt.reset_peak()
                    o.step()
                params = sum(p.numel() * p.element_size() for p in m.parameters())
                assert mt.peak - mt.live < params // 2, (mt.peak - mt.live, params)
            else:
                o.step()
            o.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    from test_train import prepared_cifar10

    return prepared_cifar10(tmp_path_factory)


@pytest.mark.gpu
def test_gpu_train_with_cuda_graphs(cifar_dir, tmp_path):
    """The command line end to end: a run with --cuda-graphs trains, saves float LRs, and
    resumes without --cuda-graphs."""
    from fastcnn.train import train

    common = ["resnet20", "--data-dir", cifar_dir, "--no-download", "--out-dir", str(tmp_path), "--no-plot",
              "--subset", "1024", "--batch-size", "64", "--fused", "--amp", "off", "--name", "g", "--epochs", "2"]
    res = train(common + ["--cuda-graphs", "--stop-after-epoch", "1"])
    assert res["epoch"] == 1 and res["train_loss"] < 3.0  # finite (NaN compares False)
    state = torch.load(tmp_path / "g" / "checkpoint_last.pt", weights_only=True)
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])
    res = train(common + ["--resume"])
    assert res["epoch"] == 2
