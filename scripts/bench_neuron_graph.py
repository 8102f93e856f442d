#!/usr/bin/env python
"""The neuron pass's llama.cpp side alone: the graph computed whole, ended early with the last tokens apart,
and ended early with no logits read, against plain evaluation — on one engine, interleaved.

    python scripts/bench_neuron_graph.py [--n 32] [--rounds 4] [--threads 2] [--out benchmarks/neuron_graph.md]

The demo F16, the first --n BoolQ questions in the paper's template, --n prompts per decode with the shared
instruction decoded once (as `eval --neurons` at --batch 32 decodes them). The probe is the neuron pass's own
(NeuronProbe at layers 0, 14 and the last, act only, no redundancy and no top tokens: the statistics' host
cost is left out, so the rows compare what llama.cpp computes). Configurations:
  whole      every token an output and the whole graph computed (the pass before graphs could end early):
             the output matrix on every row
  apart      as `eval --neurons` runs now: the rows before each last token end their graph after the last
             layer's FFN, the last tokens are decoded apart with the output matrix
  no logits  every graph ends after the last layer's FFN and no logits are read (statistics only)
  eval       plain evaluation on its own engine (no callback): last-position outputs only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from ggml_probe.engine.model import Engine
from ggml_probe.engine.probes import ProbeSet, run_checked
from ggml_probe.pipeline.neuron_stats import NeuronProbe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paper_stack_common as common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "neuron_graph.md")
    args = ap.parse_args()
    model = common.demo_f16()
    texts = common.boolq_prompts(args.n)
    probe = NeuronProbe(model, "0,14,-1", ["act"], redundancy=False, top_k=0)
    probes = ProbeSet([probe])
    names = probe.capture.tensor_names
    times: dict[str, list[float]] = {"whole": [], "apart": [], "no logits": [], "eval": []}
    with Engine(model, n_ctx=2048, n_threads=args.threads, n_seq_max=args.n, eval_callback=probes.eval_callback) as engine, \
            Engine(model, n_ctx=2048, n_threads=args.threads, n_seq_max=args.n) as plain:
        tokens = [engine.tokenize(t) for t in texts]
        for _ in range(args.rounds):
            for name in times:
                t0 = time.perf_counter()
                if name == "eval":
                    plain.run(tokens, share_prefix=True)
                else:
                    engine.last_tokens_apart = False if name == "whole" else None
                    # the whole graph: a capture that names no tensor to end after
                    probe.capture.stop_names = (lambda: ()) if name == "whole" else (lambda: names)
                    run_checked(engine, probes, tokens, share_prefix=True, logits=name != "no logits",
                                all_outputs=True)
                times[name].append(time.perf_counter() - t0)
    n_tokens = sum(len(t) for t in tokens)
    best = {k: min(v) for k, v in times.items()}
    lines = ["# The neuron pass's llama.cpp side: whole graphs against graphs that end early", "",
             f"Command: `python scripts/bench_neuron_graph.py --n {args.n} --rounds {args.rounds} --threads {args.threads}` · "
             f"{platform.platform()}, {os.cpu_count()} cores, 1-minute load average {os.getloadavg()[0]:.1f} at the end.", "",
             f"Demo F16, {args.n} BoolQ questions ({n_tokens} tokens) in one group with the instruction shared, "
             "flash attention off; the capture without host-side statistics (see the script's docstring). Best of "
             f"{args.rounds}, interleaved.", "",
             "| configuration | seconds (best) | all rounds | × whole | × eval |", "|---|---:|---|---:|---:|"]
    for k, v in times.items():
        lines.append(f"| {k} | {best[k]:.3f} | {', '.join(f'{t:.3f}' for t in v)} | {best[k] / best['whole']:.2f} | "
                     f"{best[k] / best['eval']:.2f} |")
    lines.append("")
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({"times": times, "n_tokens": n_tokens}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
