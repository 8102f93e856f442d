#!/usr/bin/env python
"""`ggml-probe trace`: memory flat in the number of tokens, and its cost against plain decoding.

Each setting runs in a fresh Python process (its peak RSS is the process's own ru_maxrss): the trace of a
level against the reference on the BoolQ passages at 1, 4 and 8 chunks of --ctx tokens, without and with
the KL attribution; and, as the baseline measured in the same run, plain llama.cpp decoding of the same
chunks by both models (Engine.logits_from, no callback). Writes benchmarks/trace.json and trace.md.

    python scripts/bench_trace.py --model models/SmolLM2-135M-Instruct-Q4_K_M.gguf \
        --ref models/SmolLM2-135M-Instruct-F16.gguf --data ../shared/data/boolq_validation.jsonl
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

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from ggml_probe.pipeline.pick import task_text
from ggml_probe.pipeline.trace import TraceSettings, run_trace, trace_chunks, _engine
args = json.loads(sys.argv[1])
text = task_text("boolq", args["data"], limit=200)[0]
s = TraceSettings(ctx=args["ctx"], tokens=args["tokens"], layers=args["layers"], kl=args["kl"], threads=args["threads"])
t0 = time.perf_counter()
if args["mode"] == "trace":
    r = run_trace(Path(args["model"]), Path(args["ref"]), text, s)
    extra = {"kl_full": r["kl"]["full"], "chunks": r["chunks"]}
else:  # the baseline: the same chunks decoded by both models, every position's logits, no callback
    extra = {}
    for path in (args["ref"], args["model"]):
        with _engine(Path(path), s, None) as engine:
            chunks = trace_chunks(engine.tokenize(text, add_special=True), s, engine.add_bos, engine.bos)
            for c in chunks:
                engine.logits_from([c], 0)
    extra["chunks"] = len(chunks)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def run_child(settings: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--data", required=True, help="BoolQ jsonl (its passages are the text)")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", default="1,4,8")
    ap.add_argument("--kl-layers", default="0,14,-1", help="blocks patched in the KL runs")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rows = []
    base = {"model": a.model, "ref": a.ref, "data": a.data, "ctx": a.ctx, "threads": a.threads}
    for n in [int(x) for x in a.chunks.split(",")]:
        tokens = n * a.ctx
        plain = run_child({**base, "mode": "plain", "tokens": tokens, "layers": None, "kl": False})
        no_kl = run_child({**base, "mode": "trace", "tokens": tokens, "layers": None, "kl": False})
        with_kl = run_child({**base, "mode": "trace", "tokens": tokens, "layers": a.kl_layers, "kl": True})
        rows.append({"chunks": n, "tokens": tokens, "plain": plain, "trace_no_kl": no_kl, "trace_kl": with_kl})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "python scripts/bench_trace.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "platform": platform.platform(), "cpus": os.cpu_count(), "kl_layers": a.kl_layers, "ctx": a.ctx,
            "load_average_at_end": os.getloadavg()}
    BENCH.mkdir(exist_ok=True)
    (BENCH / "trace.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# `ggml-probe trace`: memory and cost", "",
             f"`{meta['command']}` · {meta['date']} · {meta['platform']} · {meta['cpus']} CPUs (shared with other jobs: "
             "times are noisy, compare the ratios within a row)", "",
             f"Text: the BoolQ passages, chunks of {a.ctx} tokens. Each cell runs in its own process; peak RSS is that "
             "process's. Baseline: the same chunks decoded by both models without a callback (Engine.logits_from).",
             f"'trace' compares every block's four tensors (--no-kl); 'trace + KL' also patches the residual stream "
             f"after blocks {a.kl_layers} and the embedding (one more reference decode each per chunk).", "",
             f"Load average at the end: {meta['load_average_at_end'][0]:.1f} on {meta['cpus']} CPUs.", "",
             "| chunks | tokens | baseline s | trace s (× baseline) | trace + KL s (× baseline) | peak RSS MiB: baseline / trace / trace + KL |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        p, t, k = r["plain"], r["trace_no_kl"], r["trace_kl"]
        lines.append(f"| {r['chunks']} | {r['tokens']} | {p['seconds']:.1f} | {t['seconds']:.1f} (×{t['seconds'] / p['seconds']:.2f}) | "
                     f"{k['seconds']:.1f} (×{k['seconds'] / p['seconds']:.2f}) | {p['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} / "
                     f"{k['peak_rss_mib']:.0f} |")
    first, last = rows[0], rows[-1]
    growth = last["trace_kl"]["peak_rss_mib"] / first["trace_kl"]["peak_rss_mib"]
    lines += ["", f"Peak RSS of trace + KL at {last['tokens']} tokens is ×{growth:.3f} that at {first['tokens']} tokens: "
              "memory is flat in the number of tokens (one chunk's tensors of both models at a time)."]
    (BENCH / "trace.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
