"""The command lines as users meet them (subprocesses): bad arguments end with one clear
``error:`` line and a non-zero status, never a traceback, and never touch an existing run."""
import os
import subprocess
import sys

import pytest

from test_train import prepared_cifar10  # noqa: F401  (shared helper: real CIFAR-10 subset)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return prepared_cifar10(tmp_path_factory)


def run(*args, module="fastcnn.train", cwd=None, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FASTCNN_DATA", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def one_error_line(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0], p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_unknown_model_suggests_close_names(tmp_path):
    one_error_line(run("resnet2", "--out-dir", str(tmp_path)), 2, "unknown model 'resnet2'", "resnet20")


@pytest.mark.parametrize("args, needles", [
    (["--amp", "fp8"], ["--amp 'fp8'", "bf16, fp16 or off"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),
    (["--batch-size", "many"], ["--batch-size", "invalid int value"]),
    (["--optimizer", "lamb"], ["--optimizer 'lamb'", "sgd, adam, adamw"]),
    (["--schedule", "linear"], ["--schedule 'linear'", "htd"]),
    (["--dataset", "imagenet"], ["--dataset 'imagenet'"]),
    (["--memory-budget", "3XB"], ["--memory-budget '3XB'"]),
    (["--backend", "opencl"], ["--backend", "unknown backend 'opencl'"]),
    (["--label-smoothing", "1.5"], ["--label-smoothing"]),
    (["--resume", "--overwrite"], ["contradict"]),
    (["--resume", "nowhere/at/all"], ["no checkpoint at nowhere/at/all"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
])
def test_bad_arguments(tmp_path, args, needles):
    one_error_line(run("lenet5", "--out-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path), *args),
                   2, *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path):
    one_error_line(run("lenet5", "--device", "cuda", "--out-dir", str(tmp_path)), 2, "CUDA is not available")


def test_missing_data_says_where_to_put_it(tmp_path):
    line = one_error_line(run("lenet5", "--data-dir", str(tmp_path / "nodata"), "--no-download",
                              "--out-dir", str(tmp_path / "runs")), 1)
    assert str(tmp_path / "nodata" / "cifar-10-batches-py") in line and "--data-dir" in line and "FASTCNN_DATA" in line


def test_offline_download_message(tmp_path):
    # a dead local proxy: the download fails at once and no request leaves this machine
    dead = "http://127.0.0.1:9"
    line = one_error_line(run("lenet5", "--dataset", "mnist", "--out-dir", str(tmp_path / "runs"),
                              env_extra={"FASTCNN_DATA": str(tmp_path / "d"), "http_proxy": dead,
                                         "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
                                         "no_proxy": "", "NO_PROXY": ""}), 1,
                          "could not be downloaded", "FASTCNN_DATA")
    assert str(tmp_path / "d" / "mnist") in line


def test_existing_run_is_not_touched(cifar_dir, tmp_path):
    base = ["lenet5", "--data-dir", cifar_dir, "--no-download", "--out-dir", str(tmp_path), "--subset", "128",
            "--epochs", "1", "--batch-size", "64", "--name", "mine"]
    p = run(*base)
    assert p.returncode == 0, p.stderr
    assert "done: test accuracy" in p.stdout and "\r" not in p.stdout  # plain lines when not a terminal
    ck = tmp_path / "mine" / "checkpoint_last.pt"
    stamp = (ck.stat().st_mtime_ns, ck.read_bytes())
    one_error_line(run(*base), 2, "already holds a run", "--resume", "--overwrite")
    assert (ck.stat().st_mtime_ns, ck.read_bytes()) == stamp

    # a damaged checkpoint is reported on --resume, not trained from
    ck.write_bytes(ck.read_bytes()[:2000])
    one_error_line(run(*base, "--resume"), 1, "corrupt or truncated")
    one_error_line(run(str(ck), module="fastcnn.evaluate"), 1, "corrupt or truncated")


def test_nan_loss_is_one_clear_error(cifar_dir, tmp_path):
    one_error_line(run("lenet5", "--data-dir", cifar_dir, "--no-download", "--out-dir", str(tmp_path),
                       "--subset", "256", "--batch-size", "64", "--lr", "1e12", "--log-interval", "1"),
                   1, "NaN/inf", "lower --lr")


def test_help_and_print_recipe():
    p = run("--help")
    assert p.returncode == 0 and "default recipes" in p.stdout and "lenet*" in p.stdout
    p = run("simplenet", "--print-recipe")
    assert p.returncode == 0 and "adadelta" in p.stdout and "SimpleNet_Pytorch" in p.stdout


def test_evaluate_and_export_bad_input(tmp_path):
    one_error_line(run(str(tmp_path / "none.pt"), module="fastcnn.evaluate"), 1, "does not exist")
    one_error_line(run(str(tmp_path / "none.pt"), module="fastcnn.export"), 2, "--onnx")


def test_tensorboard_missing_is_explained(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here; the missing-package message cannot be shown")
    one_error_line(run("lenet5", "--tensorboard", "--device", "cpu", "--out-dir", str(tmp_path)), 2,
                   "pip install tensorboard")


def test_memory_report_compares_peak_and_kept_bytes():
    p = run("resnet20", "--batch", "2", module="fastcnn.memory")
    assert p.returncode == 0, p.stderr
    row = [l for l in p.stdout.splitlines() if "`resnet20`" in l]
    assert len(row) == 1
    cells = row[0].strip(" |").split("|")
    peak_ratio, kept_ratio = float(cells[3]), float(cells[-1])
    assert 0.5 < kept_ratio < 0.9, row  # measured 0.75: the fused model keeps less
    assert peak_ratio <= 1.0, row


@pytest.mark.parametrize("args, needles", [
    (["resnet2"], ["unknown model 'resnet2'"]),
    (["resnet20", "--backend", "gpu"], ["unknown backend 'gpu'"]),
    (["resnet20", "--batch", "1"], ["--batch must be at least 2"]),
    (["resnet20", "--fit", "128", "--budget", "lots"], ["--budget", "not a size"]),
    (["resnet20", "--fit", "0"], ["--fit must be a positive batch size"]),
])
def test_memory_report_bad_arguments(args, needles):
    one_error_line(run(*args, module="fastcnn.memory"), 2, *needles)


# --------------------------------------------------------------------------- packaging: console scripts, version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_console_scripts_resolve_to_callables():
    import importlib

    scripts = _pyproject()["project"]["scripts"]
    assert {"fastcnn-train", "fastcnn-eval", "fastcnn-export", "fastcnn-info", "fastcnn-memory"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        assert callable(fn), (name, target)
    # every `python -m fastcnn.X` tool with a main() has its script
    targets = {t.partition(":")[0] for t in scripts.values()}
    pkg = os.path.join(REPO, "fastcnn")
    for f in sorted(os.listdir(pkg)):
        if f.endswith(".py") and "\ndef main(" in open(os.path.join(pkg, f)).read():
            assert f"fastcnn.{f[:-3]}" in targets, f"fastcnn/{f} has a main() but no console script"


def test_console_script_names_itself(monkeypatch, capsys):
    from fastcnn.cli import build_parser, info_main

    monkeypatch.setattr(sys, "argv", ["/venv/bin/fastcnn-train", "--help"])
    assert build_parser().prog == "fastcnn-train"
    monkeypatch.setattr(sys, "argv", ["/repo/fastcnn/train.py"])
    assert build_parser().prog == "python -m fastcnn.train"
    assert info_main([]) == 0  # a console script's exit status: 0, not the dict info() returns
    assert "torch" in capsys.readouterr().out


def test_version_is_written_in_one_place():
    """``fastcnn/__init__.py`` holds the version as a plain string (setuptools reads it there
    without importing the package); pyproject.toml and setup.py only point at it."""
    import ast

    import fastcnn

    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastcnn.__version__"}
    assert "version=" not in open(os.path.join(REPO, "setup.py")).read().replace(" ", "")
    tree = ast.parse(open(os.path.join(REPO, "fastcnn", "__init__.py")).read())
    found = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "__version__" for t in n.targets)
             and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
    assert found == [fastcnn.__version__]
    init = os.path.join(REPO, "fastcnn", "__init__.py")
    for root, _, files in os.walk(os.path.join(REPO, "fastcnn")):
        for path in (os.path.join(root, f) for f in files if f.endswith(".py")):
            if path != init:
                assert "__version__ =" not in open(path).read(), path


def test_every_subpackage_is_installed():
    setup_cfg = _pyproject()["tool"]["setuptools"]
    listed = set(setup_cfg["packages"])
    assert setup_cfg["package-dir"] == {"fastcnn.kernels": "kernels"}
    on_disk = {"fastcnn.kernels"}
    for root, dirs, files in os.walk(os.path.join(REPO, "fastcnn")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            on_disk.add(os.path.relpath(root, REPO).replace(os.sep, "."))
    assert listed == on_disk
    # torch is installed first, by hand (see the comment in pyproject.toml): never a dependency
    assert not any(d.lower().startswith("torch") for d in _pyproject()["project"]["dependencies"])
