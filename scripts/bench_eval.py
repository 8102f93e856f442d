#!/usr/bin/env python3
"""Benchmark: `eval` throughput against plain llama.cpp decoding of the same prompts.

For each level (F16, Q8_0, Q4_0 of the demo model) and the same BoolQ questions:
  baseline  llama-cpp-python's own Llama.eval, one prompt at a time, nothing read back but the logits
  eval      ggml-probe's full eval (tokenize, decode, logits + hidden state, scoring, checkpoints,
            final tables, metrics with bootstrap intervals, plot)
Each measurement runs in a fresh subprocess so its peak RSS is its own. The figure is the ratio
eval / baseline (examples per second). Results go to benchmarks/eval.md and benchmarks/eval.json.

    python scripts/bench_eval.py --n 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ggml_probe.engine.llama_lib import default_threads

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared")) / "data"


def _child(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line."""
    from ggml_probe.tasks import load_examples

    data = load_examples("boolq", data_path=str(SHARED / "boolq_validation.jsonl"), limit=args.n)
    prompts = [ex.prompt for ex in data.examples]
    if args.mode == "baseline":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=args.model, n_ctx=2048, n_batch=2048, n_threads=args.threads,
                              n_threads_batch=args.threads, logits_all=False, verbose=False, flash_attn=False)
        toks = [llm.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
        t0 = time.perf_counter()
        for t in toks:
            llm.reset()
            llm.eval(t)
        seconds = time.perf_counter() - t0
        n_tokens = sum(map(len, toks))
    else:
        from ggml_probe.pipeline.evaluation import EvalConfig, evaluate

        out = Path(tempfile.mkdtemp()) / "run"
        t0 = time.perf_counter()
        summary = evaluate(args.model, EvalConfig(task="boolq", data_path=str(SHARED / "boolq_validation.jsonl"),
                                                  limit=args.n, threads=args.threads,
                                                  batch_prompts=1), out)  # one prompt per decode, as the baseline
        seconds = time.perf_counter() - t0
        import pandas as pd

        n_tokens = int(pd.read_parquet(out / "predictions.parquet")["n_tokens"].sum())
        assert summary.n_examples == args.n
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "examples": len(prompts), "tokens": n_tokens, "peak_rss": rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="BoolQ questions (default 300)")
    ap.add_argument("--levels", default="F16,Q8_0,Q4_0")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best of each is kept")
    ap.add_argument("--child", choices=["baseline", "eval"], dest="mode")
    ap.add_argument("--model")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = ap.parse_args()
    if args.mode:
        _child(args)
        return

    from ggml_probe.models.quantize import quantize_ladder

    ladder_dir = Path(tempfile.mkdtemp())
    files = {r.quant: r.path for r in quantize_ladder("demo", args.levels.split(","), out_dir=ladder_dir,
                                                      allow_requantize=True)}
    rows = []
    for level, path in files.items():
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for mode in ("baseline", "eval"):  # alternate so machine noise hits both alike
                cmd = [sys.executable, __file__, "--child", mode, "--model", str(path), "--n", str(args.n),
                       "--threads", str(args.threads)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                if mode not in best or res["seconds"] < best[mode]["seconds"]:
                    best[mode] = res
        b, e = best["baseline"], best["eval"]
        rows.append({
            "level": level,
            "examples": e["examples"],
            "baseline_ex_per_s": b["examples"] / b["seconds"],
            "baseline_tok_per_s": b["tokens"] / b["seconds"],
            "eval_ex_per_s": e["examples"] / e["seconds"],
            "eval_tok_per_s": e["tokens"] / e["seconds"],
            "ratio": (e["examples"] / e["seconds"]) / (b["examples"] / b["seconds"]),
            "baseline_peak_rss_mib": b["peak_rss"] / 2**20,
            "eval_peak_rss_mib": e["peak_rss"] / 2**20,
        })
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps({"machine": machine, "n": args.n, "threads": args.threads,
                                                    "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    lines = [
        "# eval benchmark",
        "",
        f"`python scripts/bench_eval.py {' '.join(sys.argv[1:])}` on {machine}, {args.threads} thread(s), "
        f"{time.strftime('%Y-%m-%d')}.",
        "Baseline: llama-cpp-python's `Llama.eval` on the same prompts, one at a time. eval: the whole",
        "`ggml-probe eval` (decode, logits + hidden state, scoring, checkpoints, tables, metrics with",
        "1,000 bootstrap resamples, plot), model load included. Best of "
        f"{args.repeats} alternating runs each; peak RSS of each process.",
        "",
        "| level | examples | baseline ex/s | baseline tok/s | eval ex/s | eval tok/s | eval / baseline | baseline peak MiB | eval peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['level']} | {r['examples']} | {r['baseline_ex_per_s']:.1f} | {r['baseline_tok_per_s']:.0f} | "
                     f"{r['eval_ex_per_s']:.1f} | {r['eval_tok_per_s']:.0f} | {r['ratio']:.2f} | "
                     f"{r['baseline_peak_rss_mib']:.0f} | {r['eval_peak_rss_mib']:.0f} |")
    (args.out / "eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
