"""Regenerate the measured sections of bench/RESULTS.md and README.md, and the charts in
bench/plots/, from benchmark runs -- so no figure there is typed by hand.

    python -m bench.report bench/runs/*.json [--training RUN_DIR ...]

Inputs: pytest-benchmark JSON files (``--benchmark-json``) of bench/bench_models.py and
bench/bench_host_overhead.py (other benchmarks in them are ignored), the instruction counts of
bench/host_instructions.py (``--json``), and training run folders
(``metrics.jsonl`` + ``config.json`` of ``python -m fastcnn.train``) for the training-quality
comparison. Results are grouped by device and dtype; within a group the latest run of a case
wins. Each generated section sits between ``<!-- BEGIN report:NAME -->`` and
``<!-- END report:NAME -->`` markers and is replaced whole; the text around it is kept. A
section for which no run was given says so (for instance: no GPU figures yet).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
README = ROOT / "README.md"
PLOTS = ROOT / "bench" / "plots"
BUDGET = 3e9  # the small-GPU goal: a training step at batch 128 within 3 GB
MiB = 2**20


class ReportError(Exception):
    """An input the report cannot use, named with the reason."""


# --------------------------------------------------------------------------- loading

def load_benchmarks(paths):
    """``(models, host)``: lists of result dicts (extra_info + median seconds + source file)."""
    models, host = {}, {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: not a readable pytest-benchmark JSON file ({e})") from e
        if data.get("kind") == "host-instructions":
            continue  # bench/host_instructions.py's counts: load_instructions
        if "benchmarks" not in data:
            raise ReportError(f"{path}: no 'benchmarks' list (is it a --benchmark-json file?)")
        for b in data["benchmarks"]:
            info = dict(b.get("extra_info", {}))
            if "variant" not in info or "device" not in info:
                continue  # a kernel-level benchmark: not part of these sections
            info["median_s"] = b["stats"]["median"]
            info["source"] = Path(path).name
            info.setdefault("command", data.get("command", ""))
            if "model" in info:
                models[(info["device"], info["dtype"], info["model"], info["workload"], info["variant"])] = info
            elif "layer" in info:
                host[(info["device"], info["layer"], info["mode"], info["variant"])] = info
    return list(models.values()), list(host.values())


def load_instructions(paths):
    """Rows of bench/host_instructions.py files (``"kind": "host-instructions"``), each with its
    run's environment; within a device the latest file given wins."""
    rows = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: not a readable JSON file ({e})") from e
        if data.get("kind") != "host-instructions":
            continue
        env = data["environment"]
        for r in data["rows"]:
            rows[(env["device"], r["layer"], r["mode"], r["variant"])] = dict(r, **env, source=Path(path).name)
    return list(rows.values())


def load_training(run_dirs):
    runs = []
    for d in run_dirs:
        d = Path(d)
        metrics, config = d / "metrics.jsonl", d / "config.json"
        if not metrics.is_file() or not config.is_file():
            raise ReportError(f"{d}: not a training run folder (needs metrics.jsonl and config.json)")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if not rows:
            raise ReportError(f"{metrics}: no epochs recorded")
        runs.append({"dir": d, "name": d.name, "rows": rows, "config": json.loads(config.read_text())})
    return runs


# --------------------------------------------------------------------------- helpers

def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}x"


def fmt_ips(v):
    return "–" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:,.1f}")


def fmt_mib(b):
    if b is None:
        return "–"
    return f"{b / MiB:,.0f} MiB" if b >= 100 * MiB else f"{b / MiB:,.1f} MiB"


def variant_order(variants):
    rank = {"eager": 0, "compile": 1}
    return sorted(variants, key=lambda v: (rank.get(v, 2), v.endswith("+compile"), v))


def stamp(group):
    """One line naming where and when a group of results was measured."""
    first = group[0]
    bits = [first["device"], f"torch {first['torch']}"]
    if first.get("triton"):
        bits.append(f"Triton {first['triton']}")
    bits.append(f"{first['threads']} thread{'s' if first['threads'] != 1 else ''}")
    if first.get("malloc"):
        bits.append(first["malloc"])
    dates = sorted({r["date"] for r in group})
    bits.append(dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")
    return ", ".join(bits)


def commands(group):
    return sorted({r.get("command", "") for r in group if r.get("command")})


def grouped(results, *keys):
    """``(key values, results)`` pairs, sorted, of the results grouped by ``keys``."""
    groups = defaultdict(list)
    for r in results:
        groups[tuple(r[k] for k in keys)].append(r)
    return sorted(groups.items())


# --------------------------------------------------------------------------- model section

def model_tables(results):
    """Markdown for the whole-model benchmarks, one block per (device, dtype)."""
    if not results:
        return "No whole-model benchmark run recorded yet (`pytest --benchmark-only bench/bench_models.py`).\n"
    out = []
    for (device, dtype), group in grouped(results, "device", "dtype"):
        out.append(f"#### {device}, {dtype}\n")
        out.append(f"Measured: {stamp(group)}. Command: " + "; ".join(f"`{c}`" for c in commands(group)) + "\n")
        if any(r["variant"].endswith("+keep") for r in group):
            out.append("`fused-<backend>` rebuilds each layer's activation in backward, `fused-<backend>+keep` "
                       "keeps it; `python -m fastcnn.train --fused` keeps them on CPU and rebuilds them on CUDA "
                       "(`--keep-activations` / `--rebuild-activations` choose).\n")
        if any(r.get("eager_images_per_s") for r in group):
            out.append("Side by side: each \"/ eager\" ratio compares a variant with the same model eager, run "
                       "alternately in the same test. The images/s columns and the \"/ compile\" ratios come "
                       "from separate tests, and on a shared machine they move with its load: read the "
                       "\"/ eager\" ratios.\n")
        for workload, title in (("train", "Training step (forward, backward, SGD-momentum)"),
                                ("infer", "Inference (eval, no grad)")):
            rows = [r for r in group if r["workload"] == workload]
            if not rows:
                continue
            variants = variant_order({r["variant"] for r in rows})
            table = {(r["model"], r["variant"]): r for r in rows}
            models = sorted({r["model"] for r in rows})
            out.append(f"**{title}**: images/s (batch), and speed-up of each variant over eager "
                       "/ over `torch.compile`.\n")
            head = ["model", "batch"] + [f"{v} img/s" for v in variants]
            others = [v for v in variants if v != "eager"]
            head += [f"{v} / eager" for v in others]
            head += [f"{v} / compile" for v in others if v.startswith("fused")]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
            speedups = defaultdict(list)
            for m in models:
                eager = table.get((m, "eager"))
                comp = table.get((m, "compile"))
                batch = next(r["batch"] for r in rows if r["model"] == m)
                cells = [f"`{m}`", str(batch)]
                cells += [fmt_ips(table[(m, v)]["images_per_s"]) if (m, v) in table else "–" for v in variants]
                for v in others:
                    r = _ratio(table.get((m, v)), eager)
                    speedups[(v, "eager")].append(r)
                    cells.append(fmt_ratio(r))
                for v in others:
                    if v.startswith("fused"):
                        r = _ratio(table.get((m, v)), comp)
                        speedups[(v, "compile")].append(r)
                        cells.append(fmt_ratio(r))
                out.append("| " + " | ".join(cells) + " |")
            cells = ["**geometric mean**", ""] + [""] * len(variants)
            cells += [fmt_ratio(geomean(speedups[(v, "eager")])) for v in others]
            cells += [fmt_ratio(geomean(speedups[(v, "compile")])) for v in others if v.startswith("fused")]
            out.append("| " + " | ".join(cells) + " |\n")
        out.append(memory_table(group))
        compiled = [r for r in group if r.get("compile_s")]
        if compiled:
            parts = [f"{r['model']} {r['workload']} {r['variant']}: {r['compile_s']:.0f} s" for r in
                     sorted(compiled, key=lambda r: (r["model"], r["workload"], r["variant"]))]
            out.append("Compile time (first step minus a warm step; not in the timings): " + "; ".join(parts) + ".\n")
    return "\n".join(out)


def _ratio(a, b):
    """a's speed over b's; over eager, from the eager twin timed side by side in a's own test
    when the run recorded it (``eager_images_per_s``: CPU runs)."""
    if not a or not b:
        return None
    if b.get("variant") == "eager" and a.get("eager_images_per_s"):
        return a["images_per_s"] / a["eager_images_per_s"]
    return a["images_per_s"] / b["images_per_s"]


def memory_table(group):
    rows = [r for r in group if r["workload"] == "train" and r.get("peak_mem_bytes")]
    if not rows:
        return ""
    gpu = group[0]["device_type"] == "cuda"
    variants = variant_order({r["variant"] for r in rows})
    table = {(r["model"], r["variant"]): r for r in rows}
    how = ("`torch.cuda.max_memory_allocated` over the timed steps" if gpu else
           "peak of live tensor bytes in one step, `fastcnn.memory.MemoryTracker` (compiled "
           "variants: not measurable this way)")
    lines = [f"**Peak memory of a training step** ({how}; parameters, gradients and optimizer "
             f"state included). The small-GPU goal is a batch-128 step under 3 GB"
             + (":" if gpu else "; these CPU batches are smaller, so only the ratios carry over:") + "\n",
             "| model | batch | " + " | ".join(variants) + " | fused / eager |",
             "|" + "|".join(["---", "---:"] + ["---:"] * (len(variants) + 1)) + "|"]
    for m in sorted({r["model"] for r in rows}):
        batch = next(r["batch"] for r in rows if r["model"] == m)
        cells = [f"`{m}`", str(batch)]
        for v in variants:
            r = table.get((m, v))
            mark = " **(over 3 GB)**" if gpu and r and r["peak_mem_bytes"] > BUDGET else ""
            cells.append(fmt_mib(r["peak_mem_bytes"]) + mark if r else "–")
        eager = table.get((m, "eager"))
        fused = [table[(m, v)] for v in variants if v.startswith("fused") and not v.endswith("+compile") and (m, v) in table]
        cells.append(", ".join(f"{f['peak_mem_bytes'] / eager['peak_mem_bytes']:.2f}" for f in fused)
                     if eager and fused else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- host section

def host_ratio(r, eager_table_us):
    """fused / eager for one host result: against the eager time measured side by side in the
    same test when the run recorded it (``eager_per_call_us``), else the eager test's."""
    return r["per_call_us"] / r.get("eager_per_call_us", eager_table_us)


def host_table(results):
    if not results:
        return "No host-overhead run recorded yet (`pytest --benchmark-only bench/bench_host_overhead.py`).\n"
    out = []
    for (device,), group in grouped(results, "device"):
        variants = variant_order({r["variant"] for r in group})
        fused = [v for v in variants if v != "eager"]
        table = {(r["layer"], r["mode"], r["variant"]): r for r in group}
        out.append(f"#### {device}\n")
        side = any("eager_per_call_us" in r for r in group)
        out.append(f"Measured: {stamp(group)}; tensors {group[0]['shape']}, time per layer call "
                   f"(median of rounds of 20 calls; clock: {group[0].get('timer', 'perf_counter')}); "
                   "\"x8\" rows: a stack of 8 such layers in an nn.Sequential, time per layer, where each "
                   "fused output is kept as a recipe and rebuilt in backward (\"+keep\": kept as a tensor "
                   "instead, `fastcnn.recompute.disable`, as `train --fused` on CPU). "
                   + ("Ratios: each fused variant against eager timed side by side in the same test. " if side else "")
                   + "Target: fused / eager <= 1.00. Command: "
                   + "; ".join(f"`{c}`" for c in commands(group)) + "\n")
        head = ["layer", "mode"] + [f"{v} (us)" for v in variants] + \
            [f"{v} / eager" + (" (same test)" if side else "") for v in fused]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
        for layer in sorted({r["layer"] for r in group}):
            for mode in ("train", "eval"):
                if (layer, mode, "eager") not in table:
                    continue
                eager = table[(layer, mode, "eager")]["per_call_us"]
                cells = [layer, mode]
                cells += [f"{table[(layer, mode, v)]['per_call_us']:,.0f}" if (layer, mode, v) in table else "–"
                          for v in variants]
                for v in fused:
                    r = table.get((layer, mode, v))
                    cells.append(f"{host_ratio(r, eager):.2f}" if r else "–")
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def instructions_table(rows):
    if not rows:
        return ("No instruction count recorded yet (`python -m bench.host_instructions --json "
                "bench/runs/host-instr-cpu.json`).\n")
    out = []
    for (device,), group in grouped(rows, "device"):
        table = {(r["layer"], r["mode"], r["variant"]): r["instructions_per_call"] for r in group}
        g = group[0]
        out.append(f"#### {device}\n")
        out.append(f"Counted: {device}, torch {g['torch']}, {g['threads']} thread, valgrind callgrind, {g['date']}; "
                   "the layers and calls of the host-overhead benchmark (tensors 2x8x4x4), user-space "
                   "instructions per layer call, median of the measured rounds of 20 calls (rounds agree "
                   "to 0.1%). Not time: cache misses and page faults are not in it. Command: "
                   f"`{g['command']}`\n")
        out.append("| layer | mode | eager (instructions) | fused (instructions) | fused / eager |")
        out.append("|---|---|---:|---:|---:|")
        for layer in sorted({r["layer"] for r in group}):
            for mode in ("train", "eval"):
                e, f = table.get((layer, mode, "eager")), table.get((layer, mode, "fused"))
                if e and f:
                    out.append(f"| {layer} | {mode} | {e:,.0f} | {f:,.0f} | {f / e:.3f} |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- training section

def training_table(runs):
    if not runs:
        return "No training-quality run recorded yet.\n"
    lines = [f"Measured: {_training_stamp(runs)}.\n", "| run | model | fused | backend | epochs | schedule | seed | final test acc | best test acc | "
             "mean epoch time |", "|---|---|---|---|---:|---|---:|---:|---:|---:|"]
    for run in runs:
        a, rows = _cfg(run), run["rows"]
        final, best = rows[-1]["test_acc"], max(r["test_acc"] for r in rows)
        times = [r["epoch_time_s"] for r in rows if r.get("epoch_time_s")]
        lines.append(f"| {run['name']} | {a.get('model', '?')} | {a.get('fused', '?')} | {a.get('backend', '?')} | "
                     f"{len(rows)} | {a.get('schedule', '?')} | {a.get('seed', '?')} | {final:.2f}% | {best:.2f}% | "
                     + (f"{sum(times) / len(times):,.0f} s |" if times else "– |"))
    fused = [r for r in runs if _cfg(r).get("fused")]
    plain = [r for r in runs if not _cfg(r).get("fused")]
    if fused and plain:
        d = fused[0]["rows"][-1]["test_acc"] - plain[0]["rows"][-1]["test_acc"]
        verdict = "within" if abs(d) <= 1.0 else "NOT within"
        lines.append(f"\nFinal test accuracy, fused minus unfused: {d:+.2f} points ({verdict} the 1-point target).")
    return "\n".join(lines) + "\n"


def _cfg(run):
    """The run's settings: its command-line arguments, overridden by the resolved values
    (model, fused, backend, device, torch) and the recipe (schedule, epochs...)."""
    cfg = run["config"]
    return {**cfg.get("args", {}), **cfg.get("recipe", {}),
            **{k: v for k, v in cfg.items() if not isinstance(v, dict)}}


# --------------------------------------------------------------------------- charts

def charts(models, host, training, plots_dir: Path):
    """Write the PNG charts; returns the list of files (empty if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; tables written, charts skipped "
              "(pip install matplotlib)", file=sys.stderr)
        return []
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (device, dtype), group in grouped(models, "device", "dtype"):
        slug = _slug(f"{group[0]['device_type']}-{device}-{dtype}")
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
        for ax, workload in zip(axes[:2], ("train", "infer")):
            rows = [r for r in group if r["workload"] == workload]
            eager = {r["model"]: r for r in rows if r["variant"] == "eager"}
            variants = [v for v in variant_order({r["variant"] for r in rows}) if v != "eager"]
            mods = sorted(eager)
            _bars(ax, mods, {v: [_ratio(next((r for r in rows if (r["model"], r["variant"]) == (m, v)), None),
                                        eager[m]) or float("nan") for m in mods]
                             for v in variants})
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_ylabel("images/s relative to eager")
            ax.set_title(f"{'training step' if workload == 'train' else 'inference'}: speed-up over eager")
            ax.legend(fontsize=7)
        ax = axes[2]
        rows = [r for r in group if r["workload"] == "train" and r.get("peak_mem_bytes")]
        mods = sorted({r["model"] for r in rows})
        _bars(ax, mods, {v: [_value(rows, "peak_mem_bytes", model=m, variant=v) / MiB for m in mods]
                         for v in variant_order({r["variant"] for r in rows})})
        if group[0]["device_type"] == "cuda":
            ax.axhline(BUDGET / MiB, color="red", ls="--", lw=1, label="3 GB")
        ax.set_ylabel("MiB")
        ax.set_title("peak memory of a training step")
        ax.legend(fontsize=7)
        written.append(_save(fig, group, plots_dir / f"models_{slug}.png"))
    for (device,), group in grouped(host, "device"):
        fig, ax = plt.subplots(figsize=(10, 5))
        eager = {(r["layer"], r["mode"]): r["per_call_us"] for r in group if r["variant"] == "eager"}
        keys = sorted(eager)
        variants = [v for v in variant_order({r["variant"] for r in group}) if v != "eager"]
        table = {(r["layer"], r["mode"], r["variant"]): r for r in group}
        _bars(ax, [f"{l}\n{m}" for l, m in keys],
              {v: [host_ratio(table[(l, m, v)], eager[(l, m)]) if (l, m, v) in table else float("nan")
                   for l, m in keys]
               for v in variants})
        ax.axhline(1.0, color="red", ls="--", lw=1, label="eager (target)")
        ax.set_ylabel("host time per call, relative to eager")
        ax.set_title("host overhead per layer (tiny tensors)")
        ax.legend(fontsize=8)
        written.append(_save(fig, group, plots_dir / f"host_overhead_{_slug(group[0]['device_type'] + '-' + device)}.png"))
    if training:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for run in training:
            ep = [r["epoch"] for r in run["rows"]]
            label = f"{run['name']} ({'fused' if _cfg(run).get('fused') else 'unfused'})"
            a1.plot(ep, [r["train_loss"] for r in run["rows"]], marker="o", label=label)
            a2.plot(ep, [r["test_acc"] for r in run["rows"]], marker="o", label=label)
        a1.set_xlabel("epoch"), a1.set_ylabel("train loss"), a1.legend(fontsize=8)
        a2.set_xlabel("epoch"), a2.set_ylabel("test accuracy (%)"), a2.legend(fontsize=8)
        fig.suptitle("training quality: fused vs unfused, same seed and recipe")
        fig.text(0.01, 0.01, _training_stamp(training), fontsize=7, color="gray")
        fig.tight_layout(rect=(0, 0.04, 1, 0.95))
        path = plots_dir / "training_quality.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _value(rows, field, **match) -> float:
    """``field`` of the result matching every ``key=value`` (0 where there is none)."""
    return next((r[field] for r in rows if all(r.get(k) == v for k, v in match.items())), 0) or 0


def _bars(ax, categories, series: dict) -> None:
    """Grouped bars: one group per category, one bar per series (label -> values)."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(categories))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))], categories, rotation=30, ha="right",
                  fontsize=7)


def _training_stamp(runs):
    """Device, torch and date of each run (the date is that of its last recorded epoch)."""
    import datetime

    parts = []
    for r in runs:
        a = _cfg(r)
        date = datetime.date.fromtimestamp((r["dir"] / "metrics.jsonl").stat().st_mtime).isoformat()
        parts.append(f"{r['name']}: {a.get('device', '?')}, torch {a.get('torch', '?')}, "
                     f"{a.get('threads') or 'default'} thread(s), {date}")
    return "; ".join(parts)


def _save(fig, group, path: Path) -> Path:
    """Stamp the figure with where, when and how its results were measured; write it."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.01, f"{stamp(group)}; " + " ; ".join(commands(group)), fontsize=7, color="gray", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


# --------------------------------------------------------------------------- summary for README

def summary(models, host, training, instructions=()):
    lines = []
    gpu = [r for r in models if r["device_type"] == "cuda"]
    if not gpu:
        lines.append("- **GPU: no figures yet.** No kernel of this project has run on a GPU; "
                     "`bash bench/gpu_check.sh OUT` produces them on one.")
    for (device, dtype), group in grouped(models, "device", "dtype"):
        for workload in ("train", "infer"):
            rows = [r for r in group if r["workload"] == workload]
            eager = {r["model"]: r for r in rows if r["variant"] == "eager"}
            comp = {r["model"]: r for r in rows if r["variant"] == "compile"}
            parts = []
            for v in variant_order({r["variant"] for r in rows}):
                if v == "eager":
                    continue
                ratios = [_ratio(r, eager.get(r["model"])) for r in rows if r["variant"] == v]
                text = f"{v} {fmt_ratio(geomean(ratios))}"
                if v.startswith("fused") and comp:
                    text += f" (vs compile {fmt_ratio(geomean([_ratio(r, comp.get(r['model'])) for r in rows if r['variant'] == v]))})"
                parts.append(text)
            if parts:
                models_list = ", ".join(sorted(eager))
                lines.append(f"- {device}, {dtype}, {'training step' if workload == 'train' else 'inference'} "
                             f"({models_list}), geometric mean over eager: " + "; ".join(parts) + ".")
    for (device,), group in grouped(host, "device"):
        eager = {(r["layer"], r["mode"]): r["per_call_us"] for r in group if r["variant"] == "eager"}
        for v in variant_order({r["variant"] for r in group}):
            if v == "eager":
                continue
            ratios = {(r["layer"], r["mode"]): host_ratio(r, eager[(r["layer"], r["mode"])])
                      for r in group if r["variant"] == v and (r["layer"], r["mode"]) in eager}
            if ratios:
                worst = max(ratios, key=ratios.get)
                what = ("a fused stack in training with its outputs kept, not rebuilt" if v.endswith("+keep")
                        else "a fused layer")
                lines.append(f"- {device}, host overhead of {what} ({v}): "
                             f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f}x eager "
                             f"(worst: {worst[0]} {worst[1]}; target <= 1.00x).")
    for (device,), group in grouped(list(instructions), "device"):
        table = {(r["layer"], r["mode"], r["variant"]): r["instructions_per_call"] for r in group}
        ratios = {(layer, mode): f / table[(layer, mode, "eager")] for (layer, mode, v), f in table.items()
                  if v == "fused" and (layer, mode, "eager") in table}
        if ratios:
            worst = max(ratios, key=ratios.get)
            lines.append(f"- {device}, host instructions per fused layer call (callgrind, {group[0]['date']}): "
                         f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f}x eager "
                         f"(highest: {worst[0]} {worst[1]}).")
    fused = [r for r in training if _cfg(r).get("fused")]
    plain = [r for r in training if not _cfg(r).get("fused")]
    if fused and plain:
        f, p = fused[0], plain[0]
        lines.append(f"- Training quality ({_cfg(f).get('model')}, {len(f['rows'])} epochs, same seed and recipe): "
                     f"fused {f['rows'][-1]['test_acc']:.2f}% vs unfused {p['rows'][-1]['test_acc']:.2f}% test accuracy.")
    lines.append("\nDetails, dates and commands: [bench/RESULTS.md](bench/RESULTS.md) (generated by "
                 "`python -m bench.report`).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing

def replace_section(text: str, name: str, body: str, path: Path) -> str:
    begin, end = f"<!-- BEGIN report:{name} -->", f"<!-- END report:{name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ReportError(f"{path}: no '{begin}' ... '{end}' markers; add them where the section goes")
    return pattern.sub(lambda _: f"{begin}\n{body.rstrip()}\n{end}", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="pytest-benchmark JSON files")
    parser.add_argument("--training", nargs="*", default=[], help="training run folders (fused and unfused)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--plots", type=Path, default=PLOTS)
    parser.add_argument("--print", action="store_true", help="print the sections instead of writing files")
    args = parser.parse_args(argv)
    try:
        models, host = load_benchmarks(args.runs)
        training = load_training(args.training)
        instructions = load_instructions(args.runs)
        if not (models or host or training or instructions):
            raise ReportError("nothing to report: the inputs hold no bench_models / bench_host_overhead "
                              "result and no training run")
        sections = {"models": model_tables(models), "host": host_table(host), "training": training_table(training),
                    "host-instructions": instructions_table(instructions)}
        if args.print:
            for name, body in sections.items():
                print(f"## {name}\n\n{body}")
            print(summary(models, host, training, instructions))
            return 0
        plots = charts(models, host, training, args.plots)
        if plots:
            sections["plots"] = "\n".join(f"![{p.stem}]({Path(os.path.relpath(p, args.results.parent)).as_posix()})"
                                          for p in plots) + "\n"
        text = args.results.read_text()
        for name, body in sections.items():
            text = replace_section(text, name, body, args.results)
        readme = replace_section(args.readme.read_text(), "summary", summary(models, host, training, instructions), args.readme)
        args.results.write_text(text)  # both checked before either is written
        args.readme.write_text(readme)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: wrote {args.results} and {args.readme}" + (f", {len(plots)} chart(s) in {args.plots}" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
