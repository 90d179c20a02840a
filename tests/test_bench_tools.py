"""The benchmark tooling: which suite a bare ``pytest`` collects, the report tool
(``python -m bench.report``) on synthetic results, and the GPU script's refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import host_instructions, report  # noqa: E402


def _collect(*args):
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [line for line in p.stdout.splitlines() if "::" in line]


def test_bare_pytest_collects_tests_and_benchmark_only_collects_bench():
    pytest.importorskip("pytest_benchmark")
    plain = _collect()
    bench = _collect("--benchmark-only")
    assert plain and all(line.startswith("tests/") for line in plain)
    assert bench and all(line.startswith("bench/") for line in bench)
    assert any("bench_models.py::test_model" in line for line in bench)
    assert any("bench_host_overhead.py::test_host_overhead" in line for line in bench)


def _bench_entry(extra, median):
    return {"name": "x", "stats": {"median": median}, "extra_info": extra}


def _env(**kw):
    env = dict(device="Test CPU (2 cores)", device_type="cpu", compute_capability=None, torch="2.14.1",
               triton="3.8.0", fastcnn="0.1.0", python="3.11", threads=2, dtype="fp32", date="2026-12-01",
               command="pytest --benchmark-only")
    env.update(kw)
    return env


def _write_runs(tmp_path, extra=()):
    entries = list(extra)
    for model, eager_ips in (("resnet20", 100.0), ("simplenet", 10.0)):
        for variant, factor in (("eager", 1.0), ("compile", 1.25), ("fused-cpu", 2.0)):
            for workload in ("train", "infer"):
                entries.append(_bench_entry(_env(model=model, workload=workload, variant=variant, batch=8,
                                                 images_per_s=eager_ips * factor,
                                                 peak_mem_bytes=int(2**20 * 10 / factor), compile_s=0.0), 0.1))
    for variant, us in (("eager", 50.0), ("fused-cpu", 75.0)):
        entries.append(_bench_entry(_env(layer="BnAct", mode="train", variant=variant, shape="2x8x4x4",
                                         per_call_us=us, threads=1), us * 20e-6))
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": entries}))
    results = tmp_path / "RESULTS.md"
    readme = tmp_path / "README.md"
    sections = "".join(f"<!-- BEGIN report:{n} -->\nold {n}\n<!-- END report:{n} -->\n\n"
                       for n in ("models", "host", "training", "plots", "host-instructions"))
    results.write_text("# kept text\n\n" + sections + "tail kept\n")
    readme.write_text("intro\n<!-- BEGIN report:summary -->\nold\n<!-- END report:summary -->\noutro\n")
    return path, results, readme


def test_report_regenerates_sections(tmp_path):
    run, results, readme = _write_runs(tmp_path)
    rc = report.main([str(run), "--results", str(results), "--readme", str(readme), "--plots", str(tmp_path / "plots")])
    assert rc == 0
    text = results.read_text()
    assert text.startswith("# kept text") and text.rstrip().endswith("tail kept")
    assert "old models" not in text and "old host" not in text
    # fused 2.0x eager and 1.6x compile on both models: the geometric means say so
    row = next(l for l in text.splitlines() if l.startswith("| **geometric mean**"))
    assert "2.00x" in row and "1.60x" in row and "1.25x" in row
    assert "| BnAct | train | 50 | 75 | 1.50 |" in text
    summary = readme.read_text()
    assert summary.startswith("intro") and summary.rstrip().endswith("outro")
    assert "GPU: no figures yet" in summary and "fused-cpu 2.00x" in summary
    assert "1.50-1.50x eager" in summary
    pytest.importorskip("matplotlib")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "host_overhead_cpu-test-cpu-2-cores.png", "models_cpu-test-cpu-2-cores-fp32.png"]


def test_report_host_keep_variant_only_where_timed(tmp_path):
    """Stacks in training are also timed with their outputs kept (``+keep``): a column of its
    own, a dash where the variant was not timed, and its own summary line."""
    extra = [_bench_entry(_env(layer="BnAct x8", mode="train", variant=v, shape="2x8x4x4", per_call_us=us,
                               threads=1, **({"eager_per_call_us": 60.0} if v != "eager" else {})), us * 20e-6)
             for v, us in (("eager", 60.0), ("fused-cpu", 66.0), ("fused-cpu+keep", 54.0))]
    run, results, readme = _write_runs(tmp_path, extra)
    rc = report.main([str(run), "--results", str(results), "--readme", str(readme), "--plots", str(tmp_path / "plots")])
    assert rc == 0
    text = results.read_text()
    assert "| BnAct | train | 50 | 75 | – | 1.50 | – |" in text
    assert "| BnAct x8 | train | 60 | 66 | 54 | 1.10 | 0.90 |" in text
    summary = readme.read_text()
    assert "host overhead of a fused layer (fused-cpu): 1.10-1.50x eager" in summary
    assert "outputs kept, not rebuilt (fused-cpu+keep): 0.90-0.90x eager" in summary


def test_report_refuses_without_markers_and_writes_nothing(tmp_path):
    run, results, readme = _write_runs(tmp_path)
    readme.write_text("no markers here\n")
    before = results.read_text()
    rc = report.main([str(run), "--results", str(results), "--readme", str(readme), "--plots", str(tmp_path / "p")])
    assert rc == 2
    assert results.read_text() == before


@pytest.mark.parametrize("content, needle", [("not json", "not a readable"), ("{}", "no 'benchmarks' list")])
def test_report_names_bad_input(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert report.main([str(bad)]) == 2
    assert needle in capsys.readouterr().err


def test_training_quality_table(tmp_path):
    for fused, accs in ((False, [50.0, 70.0]), (True, [51.0, 69.5])):
        d = tmp_path / f"run-{fused}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model": "resnet20", "fused": fused, "backend": "auto",
                                                   "device": "cpu", "torch": "2.14.1",
                                                   "recipe": {"schedule": "onecycle"}, "args": {"seed": 0}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "train_loss": 1.0 / (i + 1),
                                                             "test_acc": a, "epoch_time_s": 10.0}) + "\n"
                                                 for i, a in enumerate(accs)))
    text = report.training_table(report.load_training(sorted(tmp_path.iterdir())))
    assert "-0.50 points (within the 1-point target)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_without_gpu(tmp_path):
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA GPU visible" in p.stderr


def test_gpu_check_usage(tmp_path):
    p = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path), "--fast"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "usage:" in p.stderr


def _instruction_file(tmp_path, eager=1000.0, fused=900.0):
    env = {"device": "Test CPU (2 cores)", "torch": "2.x", "threads": 1, "date": "2026-12-02",
           "command": "python -m bench.host_instructions"}
    rows = [dict(layer="BnAct", mode="train", variant=v, instructions_per_call=n, rounds=[n * 20])
            for v, n in (("eager", eager), ("fused", fused))]
    path = tmp_path / "instr.json"
    path.write_text(json.dumps({"kind": "host-instructions", "environment": env, "rows": rows}))
    return path


def test_report_instruction_section(tmp_path):
    run, results, readme = _write_runs(tmp_path)
    instr = _instruction_file(tmp_path)
    rc = report.main([str(run), str(instr), "--results", str(results), "--readme", str(readme),
                      "--plots", str(tmp_path / "plots")])
    assert rc == 0
    text = results.read_text()
    assert "old host-instructions" not in text
    assert "| BnAct | train | 1,000 | 900 | 0.900 |" in text
    assert "host instructions per fused layer call (callgrind, 2026-12-02): 0.90-0.90x eager" in readme.read_text()


def test_host_instructions_reads_callgrind_dumps(tmp_path):
    for i, (desc, total) in enumerate((("BnAct|train|eager|0", 2000), ("BnAct|train|fused|0", 1800))):
        (tmp_path / f"cg.out.{i + 1}").write_text(
            f"version: 1\ndesc: Trigger: Client Request: {desc}\nevents: Ir\nsummary: {total}\ntotals: {total}\n")
    (tmp_path / "cg.out").write_text("desc: Trigger: Program termination\ntotals: 5\n")
    assert host_instructions._parse_dumps(str(tmp_path)) == {("BnAct", "train", "eager"): [2000],
                                                             ("BnAct", "train", "fused"): [1800]}


def test_host_instructions_names_unknown_layer():
    if host_instructions.missing_tools():
        pytest.skip(host_instructions.missing_tools())
    with pytest.raises(ValueError, match="unknown layer"):
        host_instructions.measure(["NoSuchLayer"])


def test_host_instructions_counts_under_callgrind():
    """The real thing on one layer: valgrind runs the benchmark's calls, rounds agree."""
    why = host_instructions.missing_tools()
    if why:
        pytest.skip(why)
    pytest.importorskip("fastcnn._C", reason="the extension fastcnn._C is not built")
    rows = host_instructions.measure(["BnAct"], rounds=2)
    assert {(r["mode"], r["variant"]) for r in rows} == {(m, v) for m in ("train", "eval") for v in ("eager", "fused")}
    for r in rows:
        assert r["instructions_per_call"] > 10_000, r
        lo, hi = min(r["rounds"]), max(r["rounds"])
        assert hi / lo < 1.02, r  # deterministic: the point of counting


def test_model_benchmark_rounds_fit_a_time_budget_on_cpu(monkeypatch):
    """A fast CPU step gets more timed rounds than a slow one, within the bounds; a GPU a fixed count."""
    from bench import bench_models, harness
    monkeypatch.setattr(harness, "CUDA", False)
    lo, hi = bench_models.CPU_ROUNDS
    assert bench_models.rounds(0.2) == 20  # resnet20's step at batch 64 on the 2-core CPU
    assert bench_models.rounds(30.0) == lo and bench_models.rounds(1e-4) == hi
    assert bench_models.rounds(0.0) == hi
    monkeypatch.setattr(harness, "CUDA", True)
    assert bench_models.rounds(0.2) == bench_models.GPU_ROUNDS


def test_step_profile_splits_both_steps_by_category(capsys):
    from bench import step_profile
    assert step_profile.main(["resnet20", "--batch", "2", "--threads", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    eager, fused = (next(line for line in out.splitlines() if line.strip().startswith(k)) for k in ("eager", "fused"))
    assert "conv backward" in eager and "BN backward" in eager and "fastcnn::" not in eager
    assert "conv backward" in fused and "fastcnn::bn_act_backward" in fused and "BN backward" not in fused
    assert "eager / fused wall:" in out
    with pytest.raises(SystemExit):
        step_profile.main(["no_such_model"])
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
