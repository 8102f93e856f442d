#!/usr/bin/env python
"""The reference study's own stack on the demo model, timed on this machine: the baseline that
ggml-probe's neuron analyses are compared against (benchmarks/README.md).

Model: the demo model as an F16 GGUF, loaded by transformers (dequantized to fp32). Prompts: BoolQ
validation questions in the paper's template. Measured, in one process:
  forward   fp32 forward per prompt at batch 1, forward hooks on the MLP act_fn output of layers
            0/14/29 copying the activations out (the paper's neuron capture)
  ig        Captum LayerIntegratedGradients (50 steps, Gauss-Legendre, all-token-0 baseline, target =
            log p of the model's own argmax answer token at the last position) on the act_fn output
            of each layer, one layer at a time; seconds per prompt per layer and in total
  peak RSS  ru_maxrss after loading, after the forward pass, after IG
Writes benchmarks/paper_stack.json and benchmarks/paper_stack.md.

    python scripts/paper_stack.py [--n-forward 20] [--n-ig 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paper_stack_common as common  # noqa: E402


def forward_with_hooks(model, ids_list, layers) -> dict:
    """The paper's capture: every prompt through the model, act outputs of `layers` copied out."""
    import torch

    store: dict[int, list] = {layer: [] for layer in layers}
    hooks = [common.act_module(model, layer).register_forward_hook(
        lambda m, i, o, layer=layer: store[layer].append(o.detach()[0].numpy().copy())) for layer in layers]
    answers = []
    with torch.no_grad():
        model(input_ids=ids_list[0], use_cache=False)  # warm-up, not counted
        for layer in layers:
            store[layer].clear()
        t0 = time.perf_counter()
        for ids in ids_list:
            answers.append(int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax()))
        seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    n_tokens = sum(int(ids.shape[1]) for ids in ids_list)
    assert all(len(store[layer]) == len(ids_list) for layer in layers)
    return {"prompts": len(ids_list), "tokens": n_tokens, "seconds": seconds,
            "ms_per_prompt": 1000 * seconds / len(ids_list), "tokens_per_s": n_tokens / seconds,
            "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-forward", type=int, default=20, help="prompts for the hooked forward pass")
    ap.add_argument("--n-ig", type=int, default=5, help="prompts for integrated gradients")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch and llama.cpp (default 1: on a shared 2-core machine 2 threads thrash)")
    ap.add_argument("--layers", default=",".join(map(str, common.PAPER_LAYERS)))
    ap.add_argument("--out", type=Path, default=common.REPO / "benchmarks")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    gguf = common.demo_f16()
    rss_start = common.peak_rss_mib()
    t0 = time.perf_counter()
    model, tokenizer = common.load_transformers(gguf, args.threads)
    load_seconds = time.perf_counter() - t0
    rss_loaded = common.peak_rss_mib()

    prompts = common.boolq_prompts(max(args.n_forward, args.n_ig))
    ids = [common.encode(tokenizer, p) for p in prompts]
    fwd = forward_with_hooks(model, ids[:args.n_forward], layers)
    rss_forward = common.peak_rss_mib()
    print(f"forward+hooks: {fwd['ms_per_prompt']:.0f} ms/prompt ({fwd['prompts']} prompts, "
          f"{fwd['tokens_per_s']:.0f} tok/s), peak {rss_forward:.0f} MiB", flush=True)

    ig_rows = []
    for k, x in enumerate(ids[:args.n_ig]):
        row = {"prompt": k, "tokens": int(x.shape[1]), "layers": {}}
        for layer in layers:
            r = common.captum_layer_ig(model, x, layer, n_steps=args.steps)
            row["target"] = r.target
            row["layers"][str(layer)] = {"seconds": r.seconds, "sum_attr": float(r.attributions.sum()),
                                         "real_change": r.real_change, "completeness_error": r.completeness_error}
        row["seconds"] = sum(v["seconds"] for v in row["layers"].values())
        ig_rows.append(row)
        print(f"IG prompt {k} ({row['tokens']} tok): {row['seconds']:.1f} s  "
              + "  ".join(f"L{l}: {v['seconds']:.1f} s, err {v['completeness_error']:+.2e}"
                          for l, v in row["layers"].items()), flush=True)
    rss_ig = common.peak_rss_mib()
    n_ig = len(ig_rows)
    if not n_ig:
        raise SystemExit("--n-ig must be at least 1")
    ig_per_layer = {str(layer): sum(r["layers"][str(layer)]["seconds"] for r in ig_rows) / n_ig for layer in layers}
    ig_per_prompt = sum(r["seconds"] for r in ig_rows) / n_ig
    per_example = fwd["seconds"] / fwd["prompts"] + ig_per_prompt

    result = {
        "benchmark": "paper_stack",
        "command": f"python scripts/paper_stack.py --n-forward {args.n_forward} --n-ig {args.n_ig} "
                   f"--steps {args.steps} --threads {args.threads}",
        "machine": common.machine(), "versions": common.versions(), "threads": args.threads,
        "model": f"demo model as F16 GGUF ({gguf.name}), transformers fp32", "layers": layers,
        "steps": args.steps, "load_seconds": load_seconds,
        "forward": fwd,
        "ig": {"prompts": n_ig, "seconds_per_prompt": ig_per_prompt, "seconds_per_prompt_per_layer": ig_per_layer,
               "mean_abs_completeness_error": {str(layer): sum(abs(r["layers"][str(layer)]["completeness_error"])
                                                               for r in ig_rows) / n_ig for layer in layers},
               "rows": ig_rows},
        "seconds_per_example": per_example,
        "peak_rss_mib": {"start": rss_start, "loaded": rss_loaded, "forward": rss_forward, "ig": rss_ig},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_stack.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# The paper's stack on the demo model (scripts/paper_stack.py)",
        "",
        f"`{result['command']}` on {m['platform']}, {m['cpu_count']} cores, {m['date']}; "
        f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}, "
        f"captum {result['versions']['captum']}.",
        f"Model: {result['model']}. Prompts: BoolQ validation, the paper's template. Load: {load_seconds:.1f} s.",
        "",
        "| measurement | prompts | per prompt | peak RSS MiB |",
        "|---|---:|---:|---:|",
        f"| fp32 forward, batch 1, hooks on act_fn of layers {args.layers} | {fwd['prompts']} | "
        f"{fwd['ms_per_prompt']:.0f} ms ({fwd['tokens_per_s']:.0f} tok/s) | {rss_forward:.0f} |",
    ]
    for layer in layers:
        lines.append(f"| Captum LayerIntegratedGradients, {args.steps} steps, layer {layer} | {n_ig} | "
                     f"{ig_per_layer[str(layer)]:.1f} s | |")
    lines += [
        f"| Captum IG, layers {args.layers} together | {n_ig} | {ig_per_prompt:.1f} s | {rss_ig:.0f} |",
        f"| **per example: forward + IG** | | **{per_example:.1f} s** | |",
        "",
        "IG completeness (mean |Σ attributions − real change of log p(answer)| when the layer's act is "
        "swapped for the baseline's): "
        + ", ".join(f"layer {l}: {v:.2e}" for l, v in result["ig"]["mean_abs_completeness_error"].items()) + " nats.",
        f"Peak RSS after imports {rss_start:.0f} MiB, after loading {rss_loaded:.0f} MiB.",
    ]
    (args.out / "paper_stack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
