#!/usr/bin/env python
"""How far the batch layout alone moves a level's answers, beside the level's own effect against F16.

    python scripts/bench_layout_noise.py [--n 32] [--threads 2] [--out benchmarks/layout_noise.md]

The demo ladder's F16 and Q8_0 (requantized from the shipped Q4_1, as the README's study builds them) on the
first --n BoolQ questions in the paper's template. Per level, the last-position logits of the same prompts
decoded one per llama_decode (batch 1), 4 and 32 per decode, 32 per decode with the shared instruction
decoded once (share), and with FFN neurons of layers 0, 14 and the last captured (the last tokens then
decoded apart: Engine.run) — each against batch 1 as the full-vocabulary KL(P_1 ‖ P_layout) per prompt, its
mean and max, the largest logit difference and the changed argmaxes; then each level against F16 at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from ggml_probe.engine.model import Engine
from ggml_probe.engine.probes import run_checked
from ggml_probe.models.quantize import quantize_ladder
from ggml_probe.models.store import demo_model_path
from ggml_probe.pipeline.neuron_stats import NeuronProbe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paper_stack_common as common  # noqa: E402

LEVELS = ("F16", "Q8_0")


def layouts(path: Path, texts: list[str], threads: int) -> dict[str, np.ndarray]:
    """Last-position logits (n, n_vocab) float64 per layout."""
    out = {}
    for name, n_seq, share in (("batch 1", 1, False), ("batch 4", 4, False), ("batch 32", 32, False),
                               ("batch 32 share", 32, True)):
        with Engine(path, n_ctx=2048, n_threads=threads, n_seq_max=n_seq, hidden_states=False) as engine:
            tokens = [engine.tokenize(t) for t in texts]
            out[name] = np.stack([r.logits for r in engine.run(tokens, share_prefix=share)]).astype(np.float64)
    probe = NeuronProbe(path, "0,14,-1", ["act"], redundancy=False, top_k=0)
    with Engine(path, n_ctx=2048, n_threads=threads, n_seq_max=32, hidden_states=False,
                eval_callback=probe.eval_callback) as engine:
        engine.last_tokens_apart = True
        results = run_checked(engine, probe, tokens, share_prefix=True)
    out["batch 32 share, neurons (last tokens apart)"] = np.stack([r.logits for r in results]).astype(np.float64)
    return out


def against(base: np.ndarray, other: np.ndarray) -> dict[str, float]:
    lb, lo = log_softmax(base, axis=1), log_softmax(other, axis=1)
    kl = np.sum(np.exp(lb) * (lb - lo), axis=1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "max_abs_logit": float(np.abs(base - other).max()),
            "argmax_changed": int(np.sum(base.argmax(1) != other.argmax(1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "layout_noise.md")
    args = ap.parse_args()
    texts = common.boolq_prompts(args.n)
    work = Path(tempfile.mkdtemp(prefix="layout-noise-"))
    ladder = {r.quant: r.path for r in quantize_ladder(demo_model_path(), list(LEVELS), out_dir=work,
                                                         allow_requantize=True)}
    logits = {lvl: layouts(ladder[lvl], texts, args.threads) for lvl in LEVELS}
    rows = {lvl: {name: against(by["batch 1"], x) for name, x in by.items() if name != "batch 1"}
            for lvl, by in logits.items()}
    effect = {lvl: against(logits["F16"]["batch 1"], logits[lvl]["batch 1"]) for lvl in LEVELS if lvl != "F16"}
    lines = [
        "# The batch layout's own noise, per level",
        "",
        f"Command: `python scripts/bench_layout_noise.py --n {args.n} --threads {args.threads}` · "
        f"{platform.platform()}, {os.cpu_count()} cores, flash attention off, F16 KV cache.",
        "",
        f"The demo ladder (requantized from the shipped Q4_1), the first {args.n} BoolQ questions in the paper's template;"
        " last-position logits against the same prompts decoded one per llama_decode. KL(P_batch1 ‖ P_layout) over the "
        "full vocabulary, in nats.",
        "",
        "| level | layout | KL mean | KL max | max \\|Δ logit\\| | argmax changed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for lvl, by in rows.items():
        for name, r in by.items():
            lines.append(f"| {lvl} | {name} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['max_abs_logit']:.3f} | "
                         f"{r['argmax_changed']} |")
    lines += ["", "The level's own effect, against F16 (both at batch 1):", "",
              "| level | KL mean | KL max | max \\|Δ logit\\| | argmax changed |", "|---|---:|---:|---:|---:|"]
    for lvl, r in effect.items():
        lines.append(f"| {lvl} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['max_abs_logit']:.3f} | {r['argmax_changed']} |")
    lines.append("")
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({"layouts": rows, "effect": effect, "n": args.n}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
