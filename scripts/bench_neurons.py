#!/usr/bin/env python
"""Throughput and peak memory of a neuron pass against plain llama.cpp decoding of the same prompts.

    python scripts/bench_neurons.py [--model demo] [--n 100] [--threads 2] [--out benchmarks/neurons.json]

Each configuration runs in its own process (so its peak RSS is its own), one prompt per llama_decode
(the evaluation default), with all tokens marked as outputs for the neuron passes:
  plain        no callback, last-position logits only
  plain_all    no callback, every token an output (what a neuron pass must do)
  capture      act + down_in of layers 0,14,-1 copied into NumPy, nothing accumulated
  stats        + moments, dead counts, top-10 activations (no correlation)
  paper        + redundancy (n_ff² co-moments) at layers 0,14,-1, both definitions
  all_stats    every layer, both definitions, moments + top-10 (no correlation)
  full         every layer, both definitions, every analysis (redundancy included): the full neuron run
Prompts go through in chunks of 32 whose results are dropped, as `evaluate` does, so peak memory is
the probe's own; --memory-sizes repeats chosen configs at several prompt counts (does memory grow
with the number of examples? It must not).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "plain": None,
    "plain_all": None,
    "capture": dict(layers=(0, 14, -1)),
    "stats": dict(layers=(0, 14, -1), redundancy=False, top_k=10),
    "paper": dict(layers=(0, 14, -1), redundancy=True, top_k=10),
    "all_stats": dict(layers="all", redundancy=False, top_k=10),
    "full": dict(layers="all", redundancy=True, top_k=10),
}
CHUNK = 32


def boolq_prompts(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows]


def run_one(config: str, model: str, data: Path, n: int, threads: int) -> dict:
    from ggml_probe.engine.probes import FFNCapture, run_checked
    from ggml_probe.pipeline.neuron_stats import NeuronProbe
    from ggml_probe.engine.model import Engine
    from ggml_probe.models.store import resolve_model

    path = resolve_model(model)
    prompts = boolq_prompts(data, n)
    probe = None
    spec = CONFIGS[config]
    if config == "capture":
        probe = FFNCapture(path, lambda *a: None, layers=spec["layers"])
    elif spec is not None:
        probe = NeuronProbe(path, layers=spec["layers"], redundancy=spec["redundancy"], top_k=spec["top_k"],
                            allow_large=True)
    current = [probe]
    kwargs = {"eval_callback": lambda t, ask: current[0].eval_callback(t, ask)} if probe else {}
    with Engine(path, n_ctx=1024, n_threads=threads, hidden_states=False, **kwargs) as engine:
        tokens = [engine.tokenize(p) for p in prompts]
        # warm-up (not counted), into a throw-away probe state for the neuron passes
        warm = run_checked(engine, probe, tokens[:2]) if probe else engine.run(tokens[:2], all_outputs=config != "plain")
        del warm
        if isinstance(probe, NeuronProbe):  # start the measured pass from empty accumulators
            probe = NeuronProbe(path, layers=spec["layers"], redundancy=spec["redundancy"], top_k=spec["top_k"],
                                allow_large=True)
            current[0] = probe
        start = time.perf_counter()
        for first in range(0, len(tokens), CHUNK):  # results dropped per chunk, as evaluate() does
            chunk = tokens[first:first + CHUNK]
            if probe is None:
                engine.run(chunk, all_outputs=config == "plain_all")
            else:
                probe.prompt_offset = first
                run_checked(engine, probe, chunk)
        seconds = time.perf_counter() - start
    n_tokens = int(sum(len(t) for t in tokens))
    extra = {}
    if isinstance(probe, NeuronProbe):
        t0 = time.perf_counter()
        probe.finish().summary(clusters=config == "paper")
        extra["analysis_seconds"] = time.perf_counter() - t0
    return {"config": config, "prompts": len(tokens), "tokens": n_tokens, "seconds": seconds,
            "tokens_per_s": n_tokens / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/boolq_validation.jsonl")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--memory-sizes", default="100,1000", help="prompt counts for the memory-scaling runs ('' = none)")
    ap.add_argument("--memory-configs", default="plain_all,full")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/neurons.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.data, args.n, args.threads)))
        return
    def one(config: str, n: int) -> dict:
        cmd = [sys.executable, __file__, "--one", config, "--model", args.model, "--data", str(args.data),
               "--n", str(n), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        print(f"{config:10s} n={n:<5d} {row['tokens_per_s']:8.1f} tok/s  {row['seconds']:7.2f} s  "
              f"peak {row['peak_rss_mb']:7.0f} MB" + (f"  analyses {row['analysis_seconds']:.1f} s"
                                                      if "analysis_seconds" in row else ""), flush=True)
        return row

    results = [one(config, args.n) for config in args.configs.split(",") if config]
    sizes = [int(v) for v in args.memory_sizes.split(",") if v]
    done = {r["config"]: r for r in results}
    memory = [done[config] if n == args.n and config in done else one(config, n)
              for config in args.memory_configs.split(",") if config for n in sizes]
    base = next((r for r in results if r["config"] == "plain_all"), results[0])
    for r in results:
        r["relative_to_plain_all"] = r["tokens_per_s"] / base["tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                                    "threads": args.threads, "model": args.model, "n": args.n,
                                    "results": results, "memory_scaling": memory}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
