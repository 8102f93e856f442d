#!/usr/bin/env python
"""Run every benchmark (or only collect their existing results) and write benchmarks/README.md.

Each benchmark writes its own benchmarks/<name>.json; this script turns them into one page where
every figure is a ratio against its baseline measured in the same run:
  eval           ggml-probe eval vs plain llama.cpp decoding (scripts/bench_eval.py)
  neurons        neuron pass vs plain llama.cpp decoding (scripts/bench_neurons.py)
  weights        streaming dequantization vs gguf-py's reader (scripts/bench_weights.py)
  paper_stack    the paper's transformers + hooks + Captum IG stack (scripts/paper_stack.py)
  fidelity       ggml-probe's attributions (ig every layer, exact last layer, dla) vs Captum (scripts/validate_attribution.py)
  imatrix_loop   Q4_0 / IQ4_NL with and without a ggml-probe imatrix, KL and accuracy vs F16 (scripts/imatrix_loop.py)
  sensitivity    static per-neuron sensitivity vs measured drift, Spearman (scripts/sensitivity_check.py)
  kld            `ggml-probe kld` vs llama-perplexity --kl-divergence, figures and speed (scripts/bench_kld.py)
plus a section comparing ggml-probe's time per example with the paper stack's.

    python scripts/bench_all.py                 # run all (tens of minutes), then write the page
    python scripts/bench_all.py --only weights  # run some, collect all
    python scripts/bench_all.py --collect       # only collect the JSON files that exist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
ORDER = ["eval", "neurons", "weights", "paper_stack", "fidelity", "imatrix_loop", "sensitivity", "kld"]
SCRIPTS = {"eval": "bench_eval.py", "neurons": "bench_neurons.py", "weights": "bench_weights.py",
           "paper_stack": "paper_stack.py", "fidelity": "validate_attribution.py", "imatrix_loop": "imatrix_loop.py",
           "sensitivity": "sensitivity_check.py", "kld": "bench_kld.py"}


# ------------------------------------------------------------------ running


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    py, s = sys.executable, REPO / "scripts"
    return {
        "eval": [py, str(s / SCRIPTS["eval"]), "--n", str(args.n_eval), "--threads", str(args.threads)],
        "neurons": [py, str(s / SCRIPTS["neurons"]), "--n", str(args.n_neurons), "--threads", str(args.threads),
                    "--out", str(BENCH / "neurons.json")],
        "weights": [py, str(s / SCRIPTS["weights"]), "--models", str(REPO / "models"), "--repeat", "3",
                    "--out", str(BENCH / "weights")],
        "paper_stack": [py, str(s / SCRIPTS["paper_stack"]), "--n-forward", str(args.n_forward),
                        "--n-ig", str(args.n_ig), "--threads", str(args.threads)],
        "fidelity": [py, str(s / SCRIPTS["fidelity"]), "--n", str(args.n_fidelity), "--threads", str(args.threads)],
        "imatrix_loop": [py, str(s / SCRIPTS["imatrix_loop"]), "--n", str(args.n_imatrix), "--calib", str(args.n_calib),
                         "--threads", str(args.threads)],
        "sensitivity": [py, str(s / SCRIPTS["sensitivity"]), "--n", str(args.n_sensitivity), "--calib",
                        str(args.n_calib), "--threads", str(args.threads)],
        "kld": [py, str(s / SCRIPTS["kld"]), "--chunks", str(args.kld_chunks), "--threads", str(args.threads)],
    }


def run_benchmarks(names: list[str], args: argparse.Namespace) -> dict[str, int]:
    if "weights" in names:  # its inputs: the demo model at F16 and Q4_0 under models/
        sys.path.insert(0, str(REPO))
        from ggml_probe.models.quantize import quantize_ladder

        quantize_ladder("demo", ["F16", "Q4_0"], out_dir=REPO / "models", allow_requantize=True, skip_existing=True)
    status = {}
    cmds = commands(args)
    for name in names:
        print(f"== {name}: {' '.join(cmds[name][1:])}", flush=True)
        t0 = time.perf_counter()
        status[name] = subprocess.run(cmds[name], cwd=REPO).returncode
        print(f"== {name}: exit {status[name]} after {time.perf_counter() - t0:.0f} s", flush=True)
    return status


# ------------------------------------------------------------------ collecting


def load(name: str) -> dict | None:
    path = BENCH / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["_mtime"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
    return data


def _f(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _speed(ratio: float) -> str:
    """baseline time / our time, said as faster or slower."""
    return f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"


def eval_section(d: dict) -> tuple[list[str], list[tuple]]:
    rows = d["rows"]
    cmd = f"python scripts/bench_eval.py --n {d['n']} --threads {d.get('threads')}"
    lines = [f"Command: `{cmd}` · {d['machine']} · {d.get('date', d['_mtime'])}", "",
             "Baseline: llama-cpp-python's `Llama.eval` on the same prompts, one at a time, same process kind.", "",
             "| level | examples | baseline ex/s | eval ex/s | **eval / baseline** | baseline peak MiB | eval peak MiB | peak ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['level']} | {r['examples']} | {r['baseline_ex_per_s']:.1f} | {r['eval_ex_per_s']:.1f} | "
                     f"**{r['ratio']:.2f}** | {r['baseline_peak_rss_mib']:.0f} | {r['eval_peak_rss_mib']:.0f} | "
                     f"{r['eval_peak_rss_mib'] / r['baseline_peak_rss_mib']:.2f} |")
    summary = [("eval", f"`ggml-probe eval` throughput, {r['level']}", f"{r['ratio']:.2f}×",
                "plain llama.cpp decoding", f"{r['eval_peak_rss_mib']:.0f} MiB") for r in rows]
    return lines, summary


def neurons_section(d: dict) -> tuple[list[str], list[tuple]]:
    res = d["results"]
    by = {r["config"]: r for r in res}
    base = by.get("plain_all", res[0])
    cmd = f"python scripts/bench_neurons.py --n {d['n']} --threads {d['threads']}"
    lines = [f"Command: `{cmd}` · {d['machine']}, {d.get('cpu_count')} cores · model {d.get('model')} · "
             f"results written {d['_mtime']}", "",
             f"Baseline: plain llama.cpp decoding of the same {base['prompts']} prompts with every token an "
             "output (`plain_all`, what a neuron pass must do), in the same run. Goal: ≥ 0.85.", "",
             "| config | tok/s | **vs plain_all** | vs plain | peak RSS MiB | analyses s |",
             "|---|---:|---:|---:|---:|---:|"]
    plain = by.get("plain")
    for r in res:
        lines.append(f"| {r['config']} | {r['tokens_per_s']:.1f} | **{r['tokens_per_s'] / base['tokens_per_s']:.2f}** | "
                     f"{_f(r['tokens_per_s'] / plain['tokens_per_s'] if plain else None)} | {r['peak_rss_mb']:.0f} | "
                     f"{_f(r.get('analysis_seconds'))} |")
    mem = d.get("memory_scaling") or []
    if mem:
        lines += ["", "Peak memory against the number of examples (each row its own process; prompts go through in "
                  "chunks of 32 whose results are dropped, as `evaluate` does). Goal: the same at 100 and 1,000.", "",
                  "| config | examples | tokens | peak RSS MiB | tok/s |", "|---|---:|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['config']} | {r['prompts']} | {r['tokens']} | {r['peak_rss_mb']:.0f} | {r['tokens_per_s']:.1f} |")
    summary = []
    for cfg in sorted({r["config"] for r in mem}):
        rows = sorted((r for r in mem if r["config"] == cfg), key=lambda r: r["prompts"])
        if len(rows) > 1:
            summary.append(("neurons", f"peak memory, `{cfg}`, {rows[-1]['prompts']} vs {rows[0]['prompts']} examples",
                            f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}×", f"the same config at {rows[0]['prompts']}",
                            f"{rows[0]['peak_rss_mb']:.0f} → {rows[-1]['peak_rss_mb']:.0f} MiB"))
    for cfg, what in (("full", "full neuron run: all layers, both definitions, every analysis"),
                      ("all_stats", "neuron pass, all layers, both definitions, no redundancy"),
                      ("paper", "neuron pass, paper layers + redundancy")):
        if cfg in by:
            summary.append(("neurons", what, f"{by[cfg]['tokens_per_s'] / base['tokens_per_s']:.2f}×",
                            "plain llama.cpp decoding (all outputs)", f"{by[cfg]['peak_rss_mb']:.0f} MiB"))
    return lines, summary


def weights_section(d: dict) -> tuple[list[str], list[tuple]]:
    meta, rows = d["meta"], d["rows"]
    cmd = f"python scripts/bench_weights.py --repeat {meta.get('repeat')}"
    lines = [f"Command: `{cmd}` · {meta['machine']} · {meta.get('date', d['_mtime'])}", "",
             "Baseline: gguf-py's `GGUFReader` + `gguf.quants.dequantize`, one whole tensor at a time, same file, "
             "same run. Speed-up = baseline seconds / method seconds; memory = extra RSS over imports.", "",
             "| file | method | s | **speed-up vs gguf-py** | + work MiB | **memory vs gguf-py** |",
             "|---|---|---:|---:|---:|---:|"]
    base = {r["file"]: r for r in rows if r["method"] == "gguf-py"}
    summary = []
    for r in rows:
        b = base.get(r["file"])
        speed = b["seconds_median"] / r["seconds_median"] if b else None
        mem = r["peak_over_baseline_mib"] / b["peak_over_baseline_mib"] if b else None
        lines.append(f"| {r['file']} | {r['method']} | {r['seconds_median']:.2f} | **{_f(speed)}{'×' if b else ''}** | "
                     f"{r['peak_over_baseline_mib']:.0f} | **{_f(mem)}{'×' if b else ''}** |")
        if r["method"] == "stream-ggml" and b:
            summary.append(("weights", f"dequantize a whole {r['file']} file (streaming)", _speed(speed),
                            "gguf-py reader", f"+{r['peak_over_baseline_mib']:.0f} MiB vs +{b['peak_over_baseline_mib']:.0f}"))
    return lines, summary


def paper_stack_section(d: dict) -> tuple[list[str], list[tuple]]:
    m, fwd, ig, rss = d["machine"], d["forward"], d["ig"], d["peak_rss_mib"]
    lines = [f"Command: `{d['command']}` · {m['platform']}, {m['cpu_count']} cores · {m['date']} · "
             f"torch {d['versions']['torch']}, transformers {d['versions']['transformers']}, captum {d['versions']['captum']}", "",
             f"The reference study's own stack on {d['model']}: the baseline of the comparison below.", "",
             "| step | prompts | per prompt | peak RSS MiB |", "|---|---:|---:|---:|",
             f"| fp32 forward, batch 1, hooks on act_fn of layers {','.join(map(str, d['layers']))} | {fwd['prompts']} | "
             f"{fwd['ms_per_prompt']:.0f} ms | {rss['forward']:.0f} |"]
    for layer, sec in ig["seconds_per_prompt_per_layer"].items():
        err = ig["mean_abs_completeness_error"][layer]
        lines.append(f"| Captum LayerIntegratedGradients ({d['steps']} steps), layer {layer} — completeness error "
                     f"{err:.2g} nats | {ig['prompts']} | {sec:.1f} s | |")
    lines.append(f"| forward + IG at all three layers | | **{d['seconds_per_example']:.1f} s** | {rss['ig']:.0f} |")
    return lines, []


def fidelity_section(d: dict) -> tuple[list[str], list[tuple]]:
    m = d["machine"]
    lines = [f"Command: `{d['command']}` · {m['platform']} · {m['date']}", "",
             "Baseline: Captum's LayerIntegratedGradients on transformers (the paper's method; the same F16 file "
             "dequantized to fp32), in the same run. `ig` = ggml-probe `--attribution ig` (torch on the GGUF's own "
             "weights); `exact` = the default closed-form last layer from llama.cpp passes; `dla` = direct effect "
             "only (not the paper's method).", "",
             "| layer | method | Spearman mean (min) | top-20 overlap | salient Jaccard | completeness error, mean abs (Captum / ig) | goal ≥ 0.99 |",
             "|---:|---|---:|---:|---:|---:|---|"]
    summary = []
    for layer, ld in d["layers"].items():
        for name in ("ig", "exact", "dla"):
            s = ld.get(name)
            if not s:
                continue
            comp = (f"{ld['captum_mean_abs_completeness']:.2g} / {ld['ig_mean_abs_completeness']:.2g} "
                    f"({ld['ig_converged']}/{s['prompts']} converged)") if name == "ig" else ""
            goal = "—" if name == "dla" else ("met" if s["goal_met"] else "**not met**")
            lines.append(f"| {layer} | {name} | **{s['spearman_mean']:.5f}** ({s['spearman_min']:.5f}) | "
                         f"{s['top20_overlap_mean']:.2f} | {s['salient_jaccard_mean']:.2f} | {comp} | {goal} |")
            if name != "dla":
                summary.append(("fidelity", f"layer {layer} `{name}` attribution, Spearman vs Captum ({s['prompts']} prompts)",
                                f"{s['spearman_mean']:.5f}", "Captum LayerIntegratedGradients", "—"))
    sec = d["seconds_per_prompt_layer"]
    lines += ["", f"Time per prompt and layer, same run: Captum {sec['captum']:.1f} s, ggml-probe ig {sec['ig']:.1f} s "
                  f"(**{sec['captum'] / sec['ig']:.1f}×**)"
              + (f", exact last layer {sec['exact_last_layer']:.2f} s per prompt" if sec.get("exact_last_layer") else "")
              + ". A layer whose completeness error is large has an unconverged integral: both stacks compute the same "
                "wrong number there, and ggml-probe flags the layer."]
    return lines, summary


def comparison_section(data: dict) -> tuple[list[str], list[tuple]]:
    """ggml-probe per example (output + neuron analyses) against the paper's stack per example."""
    ps, nr, fd = data.get("paper_stack"), data.get("neurons"), data.get("fidelity")
    if not ps:
        return ["Not available: needs paper_stack.json (and neurons.json, fidelity.json)."], []
    lines = ["Time per example on the demo model, BoolQ prompts in the paper's template. Baseline: the paper's "
             "stack (paper_stack.json). Ratio = paper stack time / ggml-probe time (higher is better for ggml-probe).", "",
             "| part | ggml-probe | paper stack | **ratio** | source |", "|---|---:|---:|---:|---|"]
    summary = []
    fwd_s = ps["forward"]["seconds"] / ps["forward"]["prompts"]
    ours_pass = None
    if nr:
        by = {r["config"]: r for r in nr["results"]}
        cfg = by.get("paper") or by.get("stats")
        if cfg:
            ours_pass = (cfg["seconds"] + cfg.get("analysis_seconds", 0.0)) / cfg["prompts"]
            lines.append(f"| output + neuron capture and statistics, layers 0/14/last (`{cfg['config']}` config) | "
                         f"{1000 * ours_pass:.0f} ms | {1000 * fwd_s:.0f} ms (forward + hooks, no statistics) | "
                         f"**{fwd_s / ours_pass:.1f}×** | neurons.json, paper_stack.json |")
            summary.append(("vs paper", "neuron pass per example", _speed(fwd_s / ours_pass),
                            "transformers fp32 forward + hooks", f"ggml-probe {cfg['peak_rss_mb']:.0f} MiB, paper {ps['peak_rss_mib']['forward']:.0f} MiB"))
    last = str(max(int(k) for k in ps["ig"]["seconds_per_prompt_per_layer"]))
    ig_last = ps["ig"]["seconds_per_prompt_per_layer"][last]
    ours_ig = None
    if fd and (fd.get("seconds_per_prompt_layer") or {}).get("exact_last_layer"):
        # the whole call over its prompts (model load and weight read included): the conservative figure
        ours_ig = fd["seconds_per_prompt_layer"]["exact_last_layer"]
        lines.append(f"| last-layer integrated gradients (exact, closed form; Captum: layer {last}) | {ours_ig:.2f} s | "
                     f"{ig_last:.1f} s | **{ig_last / ours_ig:.1f}×** | fidelity.json (whole call / prompts), paper_stack.json |")
        summary.append(("vs paper", "last-layer IG per example", _speed(ig_last / ours_ig),
                        "Captum LayerIntegratedGradients", f"paper {ps['peak_rss_mib']['ig']:.0f} MiB (ggml-probe's not measured apart)"))
    if ours_pass is not None and ours_ig is not None:
        ours_total, paper_total = ours_pass + ours_ig, fwd_s + ig_last
        lines.append(f"| **per example: outputs + neurons + last-layer IG** | **{ours_total:.2f} s** | **{paper_total:.1f} s** | "
                     f"**{paper_total / ours_total:.1f}×** | |")
        summary.append(("vs paper", "per example, outputs + neurons + last-layer IG", _speed(paper_total / ours_total),
                        "the paper's stack, same scope", "—"))
    others = {k: v for k, v in ps["ig"]["seconds_per_prompt_per_layer"].items() if k != last}
    lines += ["", "IG at the earlier layers (" + ", ".join(
        f"layer {k}: {v:.1f} s per prompt" for k, v in others.items()) +
        " with Captum) needs autograd; ggml-probe does it with `--attribution ig` (torch), left out of the rows "
        "above; its same-run ratio against Captum per layer is in the fidelity section. The paper stack's full "
        f"per-example cost, those layers included, is {ps['seconds_per_example']:.1f} s."]
    if nr and ps:
        lines.append(f"The neuron benchmark ran on `{nr.get('model')}` with {nr.get('threads')} thread(s) (results written "
                     f"{nr['_mtime']}), the paper stack on {ps['model']} with {ps.get('threads')} thread(s) "
                     f"({ps['machine']['date']}); both on this machine, whose load from other jobs varies.")
    return lines, summary


def imatrix_loop_section(d: dict) -> tuple[list[str], list[tuple]]:
    lines = [f"Command: `{d['command']}` · {d['date']} · {d['seconds']:.0f} s", "",
             f"Baseline: the same level quantized without an imatrix, both compared with F16 on the same "
             f"{d['n_eval']} BoolQ prompts; the imatrix comes from {d['n_calib']} disjoint prompts. "
             f"F16 accuracy {d['f16_accuracy'] * 100:.1f}%.", "",
             "| level | KL full, mean | KL label, mean | top-1 agree % | answer agree % | accuracy % |",
             "|---|---:|---:|---:|---:|---:|"]
    by = {r["level"]: r for r in d["rows"]}
    summary = []
    for r in d["rows"]:
        lines.append(f"| {r['level']} | {r['kl_full_mean']:.4f} | {r['kl_label_mean']:.4f} | "
                     f"{r['top1_agreement'] * 100:.1f} | {r['agreement'] * 100:.1f} | {r['accuracy'] * 100:.1f} |")
        base = by.get(r["level"].removesuffix("+imatrix"))
        if r["level"].endswith("+imatrix") and base:
            # KL alone can mislead: a level may match F16's full distribution better and still answer worse
            summary.append(("imatrix_loop", f"{base['level']} with a ggml-probe imatrix: mean KL vs F16 (accuracy)",
                            f"{r['kl_full_mean'] / base['kl_full_mean']:.2f}× ({r['kl_full_mean']:.3f} vs "
                            f"{base['kl_full_mean']:.3f}; accuracy {r['accuracy'] * 100:.1f}% vs "
                            f"{base['accuracy'] * 100:.1f}%)", f"{base['level']} without imatrix", "—"))
    return lines, summary


def sensitivity_section(d: dict) -> tuple[list[str], list[tuple]]:
    last = max(d["layers"])
    lines = [f"Command: `{d['command']}` · {d['date']} · {d['seconds']:.0f} s", "",
             f"Spearman correlation over each layer's neurons between the static sensitivity predicted from the weights "
             f"and the measured per-token RMS drift against F16 ({d['n_eval']} BoolQ prompts). Control: "
             "`scale_only`, each neuron's activation scale alone (no weight error) — what a prediction gains over it "
             "comes from the weight error.", "",
             f"| level | prediction | act: layer 0 | act: median of layers | down_in: layer 0 | down_in: layer {last} | "
             "down_in: median of layers |", "|---|---|---:|---:|---:|---:|---:|"]
    summary = []
    fmt = lambda x: "—" if x is None else f"{x:+.2f}"  # noqa: E731
    for level, e in d["levels"].items():
        for w, by in e["by_weighting"].items():
            a, di = by["act/rms"], by["down_in/rms"]
            lines.append(f"| {level} | {w} | {fmt(a['layer0'])} | {fmt(a['median'])} | {fmt(di['layer0'])} | "
                         f"{fmt(di[f'layer{last}'])} | {fmt(di['median'])} |")
        own, un = e["by_weighting"].get("imatrix_own"), e["by_weighting"].get("unweighted")
        ctl = e["by_weighting"].get("scale_only")
        if own and un and ctl:
            summary.append(("sensitivity", f"{level}: Spearman, predicted vs measured drift, act layer 0 / down_in "
                            "median of layers",
                            f"{fmt(own['act/rms']['layer0'])} / {fmt(own['down_in/rms']['median'])} (unweighted "
                            f"{fmt(un['act/rms']['layer0'])} / {fmt(un['down_in/rms']['median'])})",
                            f"activation scale alone, no weight error: {fmt(ctl['act/rms']['layer0'])} / "
                            f"{fmt(ctl['down_in/rms']['median'])}", "—"))
    return lines, summary


def kld_section(d: dict) -> tuple[list[str], list[tuple]]:
    lines = [f"Command: `{d['command']}` · {d['machine']} · {d.get('date', d['_mtime'])}", "",
             f"{d['chunks']} chunks of {d['ctx']} tokens, batch {d['batch']}, {d['threads']} threads, flash attention "
             f"{d.get('flash_attn', 'off')} on both sides; ggml-probe scored against llama-perplexity's own base file.",
             "", "| level | PPL (llama / ours) | mean KLD (llama / ours) | same top p (llama / ours) | tok/s ratio |",
             "|---|---|---|---|---:|"]
    summary = []
    for r in d["levels"]:
        t, o = r["llama_perplexity"], r["ours_llama_base"]
        ratio = o["tokens_per_second"] / r["llama_tokens_per_second"]
        lines.append(f"| {r['level']} | {t['ppl']:.4f} / {o['ppl']:.4f} | {t['kld_mean']:.6f} / {o['kld_mean']:.6f} | "
                     f"{100 * t['same_top_p']:.3f} / {100 * o['same_top_p']:.3f} | {ratio:.2f}× |")
        rel = (o["kld_mean"] - t["kld_mean"]) / t["kld_mean"]
        summary.append(("kld", f"`ggml-probe kld` {r['level']}: mean KLD vs llama-perplexity's (speed)",
                        f"{rel:+.2%} ({ratio:.2f}× tok/s)", "llama-perplexity --kl-divergence",
                        f"{o.get('peak_rss_mib', 0):.0f} MiB"))
    return lines, summary


SECTIONS = {
    "eval": ("Evaluation throughput: `ggml-probe eval` vs plain llama.cpp", eval_section),
    "neurons": ("Neuron pass vs plain llama.cpp decoding", neurons_section),
    "weights": ("Weight dequantization: streaming vs gguf-py", weights_section),
    "paper_stack": ("The paper's stack: transformers + hooks + Captum IG", paper_stack_section),
    "fidelity": ("Fidelity: attributions vs Captum at every analysed layer", fidelity_section),
    "imatrix_loop": ("The imatrix loop: quantizing with a ggml-probe imatrix", imatrix_loop_section),
    "sensitivity": ("Static neuron sensitivity vs measured drift", sensitivity_section),
    "kld": ("Quality statistics: `ggml-probe kld` vs llama-perplexity", kld_section),
}


def write_readme(status: dict[str, int] | None = None) -> Path:
    data = {name: load(name) for name in ORDER}
    missing = [n for n in ORDER if data[n] is None]
    body, summary = [], []
    for name in ORDER:
        title, render = SECTIONS[name]
        body += [f"## {title}", ""]
        if data[name] is None:
            body += [f"Not run (no benchmarks/{name}.json). Produce it with `python scripts/{SCRIPTS[name]}`.", ""]
            continue
        try:
            lines, rows = render(data[name])
        except (KeyError, TypeError, ZeroDivisionError) as exc:  # an older JSON layout: say so, keep going
            lines, rows = [f"Could not read benchmarks/{name}.json ({type(exc).__name__}: {exc})."], []
        body += lines + ["", f"Details: [{name}.md]({name}.md), raw figures: [{name}.json]({name}.json).", ""]
        summary += rows
    lines, rows = comparison_section(data)
    body += ["## ggml-probe vs the paper's stack, per example", "", *lines, ""]
    summary += rows

    head = [
        "# Benchmarks",
        "",
        "Generated by `" + " ".join(["python scripts/bench_all.py", *sys.argv[1:]]) + "` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {platform.platform()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}. Each figure is a ratio against its baseline "
        "measured in the same benchmark run; each section names the command that produced it and when. "
        "Default: 1 thread everywhere (`--threads`): on a 2-core machine shared with other jobs, 2 threads make "
        "llama.cpp's and torch's workers wait on each other and timings swing by an order of magnitude.",
        "",
    ]
    if missing:
        head += [f"Not run: {', '.join(missing)}.", ""]
    if status:
        failed = [n for n, rc in status.items() if rc != 0]
        if failed:
            head += [f"Failed in this run (older results, if any, are shown): {', '.join(failed)}.", ""]
    head += ["| benchmark | figure | ratio / value | baseline | peak memory |", "|---|---|---:|---|---|"]
    head += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in summary]
    head.append("")
    out = BENCH / "README.md"
    out.write_text("\n".join(head + body))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collect", action="store_true", help="run nothing; write the page from existing JSON files")
    ap.add_argument("--only", default=",".join(ORDER), help=f"benchmarks to run (of {','.join(ORDER)})")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch and llama.cpp (default 1: on a shared 2-core machine 2 threads thrash)")
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--n-neurons", type=int, default=100)
    ap.add_argument("--n-forward", type=int, default=20)
    ap.add_argument("--n-ig", type=int, default=5)
    ap.add_argument("--n-fidelity", type=int, default=10)
    ap.add_argument("--n-imatrix", type=int, default=150, help="imatrix loop: evaluation prompts")
    ap.add_argument("--n-calib", type=int, default=100, help="imatrix loop and sensitivity: imatrix prompts")
    ap.add_argument("--n-sensitivity", type=int, default=100)
    ap.add_argument("--kld-chunks", type=int, default=16, help="kld: chunks of 512 tokens")
    args = ap.parse_args()
    status = None
    if not args.collect:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ORDER]
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(ORDER)})")
        status = run_benchmarks(names, args)
    out = write_readme(status)
    print(f"wrote {out}")
    if status and any(status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
