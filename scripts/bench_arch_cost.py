#!/usr/bin/env python
"""What a 262,144-token vocabulary does to a neuron pass: its time against plain evaluation.

    python scripts/bench_arch_cost.py [--n 16] [--repeats 3] [--threads 2] [--out benchmarks/arch_cost.md]

The model: tests/real_vocab_tiny.py's tiny random llama (F32, 2 layers, n_embd 64, n_ff 96, tied
embeddings) carrying Gemma's real 262,144-token tokenizer (../shared/data/vocab/ggml-vocab-gemma-4.gguf),
so the output matrix (262,144 × 64) dwarfs the rest, as in Gemma 3 270M. Prompts: the first --n BoolQ
passages + questions. --batch prompts per llama_decode (default 1). Configurations, timed in the same
run, interleaved (a, b, c, …), best of --repeats:
  eval            plain evaluation: last-position logits only, no callback
  outputs_all     every token marked as an output, no callback: the lm_head on every token
  neurons_whole   the neuron pass as it ran before: FFNCapture (act + down_in, every layer), every token an
                  output (so that the last layer's FFN covers every token), the whole graph computed, so
                  the lm_head ran on every token
  neurons         the neuron pass as `eval --neurons` runs it now: the same capture and last-position logits,
                  each prompt's last token decoded apart (Engine.run), the graph of the rows before it ended
                  after the last layer's FFN: the lm_head runs on one row per prompt
  neurons_stats   the statistics-only pass (no logits read: collect_neuron_stats): every graph ends after the
                  last layer's FFN
  neurons_last    FFNCapture of layer 0 with last-position outputs only: the capture without the lm_head on
                  every token (the last layer's FFN then holds only the output rows: llama.cpp prunes rows
                  via inp_out_ids before it, so the last layer cannot be captured this way)
"""

from __future__ import annotations

import argparse
import os
import json
import platform
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny-model writer the tests use

from ggml_probe.engine.model import Engine  # noqa: E402
from ggml_probe.engine.probes import FFNCapture, run_checked  # noqa: E402


def prompts(n: int) -> list[str]:
    path = REPO.parent / "shared" / "data" / "boolq_validation.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:" for r in rows]


def time_config(model: Path, tokens, name: str, threads: int, batch: int) -> float:
    capture = None
    if name.startswith("neurons"):  # the last layer holds only the output rows in neurons_last: layer 0
        capture = FFNCapture(model, lambda *a: None, layers=[0] if name == "neurons_last" else "all")
    with Engine(model, n_ctx=4096, n_threads=threads, n_seq_max=batch, hidden_states=False,
                eval_callback=capture.eval_callback if capture else None) as engine:
        t0 = time.perf_counter()
        if capture is None:
            engine.run(tokens, all_outputs=name == "outputs_all")
        elif name == "neurons_whole":
            engine.last_tokens_apart = False
            capture.stop_names = lambda: ()  # the graph computed whole, as before graphs could end early
            run_checked(engine, capture, tokens)
        else:
            run_checked(engine, capture, tokens, logits=name != "neurons_stats")
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="prompts per decode")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "arch_cost.md")
    ap.add_argument("--work", type=Path, default=Path("/tmp/arch_cost"))
    args = ap.parse_args()

    import real_vocab_tiny

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "tiny-gemma-vocab.gguf"
    if not model.exists():
        real_vocab_tiny.N_LAYER = 2  # a layer before the last, whose FFN covers every token in any pass
        real_vocab_tiny.write_tiny_model(model, real_vocab_tiny.vocab_path("gemma-4"))
    with Engine(model, n_ctx=1024, n_threads=args.threads, hidden_states=False) as engine:
        tokens = [engine.tokenize(p) for p in prompts(args.n)]
        n_vocab = engine.n_vocab if hasattr(engine, "n_vocab") else None
    n_tokens = int(sum(len(t) for t in tokens))
    configs = ("eval", "outputs_all", "neurons_whole", "neurons", "neurons_stats", "neurons_last")
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            times[c].append(time_config(model, tokens, c, args.threads, args.batch))
            print(f"{c}: {times[c][-1]:.3f} s", flush=True)
    best = {c: min(v) for c, v in times.items()}
    lines = [
        "# Neuron pass vs evaluation with a 262,144-token vocabulary",
        "",
        f"Command: `python scripts/bench_arch_cost.py --n {args.n} --repeats {args.repeats} --threads {args.threads} "
        f"--batch {args.batch}`",
        "",
        f"Model: tests/real_vocab_tiny.py's tiny llama (F32, 2 layers, n_embd 64, n_ff 96, tied embeddings) with "
        f"Gemma's tokenizer (ggml-vocab-gemma-4.gguf{f', {n_vocab} tokens' if n_vocab else ''}). "
        f"{args.n} BoolQ prompts, {n_tokens} tokens, {args.batch} prompt(s) per decode, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}. Best of {args.repeats}, configurations interleaved in one run "
        f"(1-minute load average {os.getloadavg()[0]:.1f} at the end: the ratios are the figures, not the seconds).",
        "",
        "| configuration | seconds (best) | all runs | × eval |",
        "|---|---|---|---|",
    ]
    for c in configs:
        lines.append(f"| {c} | {best[c]:.3f} | {', '.join(f'{t:.3f}' for t in times[c])} | {best[c] / best['eval']:.2f} |")
    lines += ["", "(see the docstring of scripts/bench_arch_cost.py for what each configuration runs)", ""]
    args.out.write_text("\n".join(lines))
    (args.out.with_suffix(".json")).write_text(json.dumps({"times": times, "n_tokens": n_tokens, "n": args.n}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
