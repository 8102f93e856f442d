#!/usr/bin/env python
"""Fidelity of ggml-probe's attributions against the paper's method, at every analysed layer.

Reference: Captum's LayerIntegratedGradients on transformers, the F16 GGUF dequantized to fp32
(50 steps, Gauss-Legendre, all-token-0 baseline, target = log p(answer) at the last position).
ggml-probe:
  ig     `--attribution ig`: integrated gradients in torch on a model built from the same GGUF file's
         dequantized weights (ggml_probe.attribution), every layer;
  exact  the default: the last layer in closed form from two llama.cpp passes (no torch);
  dla    `--attribution dla`: activation × direct path to the answer (direct effect only), every layer.
All get the same token ids and the same target token (the transformers model's argmax).

Per prompt and layer: Spearman rank correlation with Captum, overlap of the top-20 neurons by
|attribution|, Jaccard of the salient sets (|a| / max |a| > 0.7, the paper's), and each side's
completeness error (Σ attributions − the real change of the target log-prob when the layer's act is
swapped for the baseline's). Writes benchmarks/fidelity.{json,md}.

    python scripts/validate_attribution.py [--n 8] [--layers 0,14,29] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paper_stack_common as common  # noqa: E402

TOP_K = 20
THRESHOLD = 0.7
GOAL = 0.99


def salient_set(attr: np.ndarray, threshold: float = THRESHOLD) -> set[int]:
    a = np.abs(attr)
    return set(np.flatnonzero(a / a.max() > threshold).tolist()) if a.max() > 0 else set()


def top_set(attr: np.ndarray, k: int = TOP_K) -> set[int]:
    return set(np.argsort(-np.abs(attr), kind="stable")[:k].tolist())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    return {"spearman": float(spearmanr(ours, ref).statistic),
            "top20_overlap": len(top_set(ours) & top_set(ref)) / TOP_K,
            "salient_jaccard": jaccard(salient_set(ours), salient_set(ref)),
            "salient_sizes": [len(salient_set(ours)), len(salient_set(ref))]}


def summarise(rows: list[dict]) -> dict:
    sp = [r["spearman"] for r in rows]
    return {"prompts": len(rows), "spearman_mean": float(np.mean(sp)), "spearman_min": float(np.min(sp)),
            "top20_overlap_mean": float(np.mean([r["top20_overlap"] for r in rows])),
            "salient_jaccard_mean": float(np.mean([r["salient_jaccard"] for r in rows])),
            "goal_met": bool(np.min(sp) >= GOAL)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="BoolQ prompts")
    ap.add_argument("--layers", default="0,14,29")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch and llama.cpp (default 1: on a shared 2-core machine 2 threads thrash)")
    ap.add_argument("--out", type=Path, default=common.REPO / "benchmarks")
    args = ap.parse_args()

    from ggml_probe.attribution.ig import integrated_gradients
    from ggml_probe.attribution.torch_model import TorchModel
    from ggml_probe.attribution.dla import direct_effect_attribution
    from ggml_probe.attribution.exact import last_layer_attribution

    gguf = common.demo_f16()
    model, tokenizer = common.load_transformers(gguf, args.threads)
    last = model.config.num_hidden_layers - 1
    layers = [int(v) for v in args.layers.split(",") if v]
    prompts = common.boolq_prompts(args.n)
    ids = [common.encode(tokenizer, p) for p in prompts]
    token_arrays = [x[0].numpy().astype(np.int32) for x in ids]

    captum: dict[int, list] = {L: [] for L in layers}
    for k, x in enumerate(ids):
        for L in layers:
            captum[L].append(common.captum_layer_ig(model, x, L, n_steps=args.steps))
            print(f"captum L{L} prompt {k}: {captum[L][-1].seconds:.1f} s, completeness "
                  f"{captum[L][-1].completeness_error:+.2e}", flush=True)
    targets = [r.target for r in captum[layers[0]]]
    captum_seconds = float(np.mean([r.seconds for L in layers for r in captum[L]]))

    t0 = time.perf_counter()
    tm = TorchModel(gguf)
    load_seconds = time.perf_counter() - t0
    ig = integrated_gradients(gguf, token_arrays, layers, targets=targets, n_points=args.steps,
                              threads=args.threads, model=tm)
    t1 = time.perf_counter()
    exact = last_layer_attribution(gguf, token_arrays, targets=targets, n_points=args.steps,
                                   n_threads=args.threads) if last in layers else None
    exact_seconds = time.perf_counter() - t1
    dla = direct_effect_attribution(gguf, token_arrays, layers, targets=targets, n_threads=args.threads)

    per_layer, rows = {}, []
    for L in layers:
        lrows = {"ig": [], "exact": [], "dla": []}
        for k, r in enumerate(captum[L]):
            row = {"layer": L, "prompt": k, "tokens": int(ids[k].shape[1]), "target": r.target,
                   "captum_completeness": r.completeness_error, "captum_real_change": r.real_change,
                   "ig_completeness": float(ig.layers[L].completeness_error[k]),
                   "ig_real_change": float(ig.layers[L].real_change[k])}
            for name, attr in (("ig", ig.layers[L].attributions[k]),
                               ("exact", exact.attributions[k] if exact is not None and L == last else None),
                               ("dla", dla.layers[L].attributions[k])):
                if attr is not None:
                    a = agreement(attr, r.attributions)
                    lrows[name].append(a)
                    row.update({f"{name}_{key}": v for key, v in a.items()})
            rows.append(row)
        per_layer[str(L)] = {
            "captum_mean_abs_completeness": float(np.mean([abs(r.completeness_error) for r in captum[L]])),
            "ig_mean_abs_completeness": float(np.mean(np.abs(ig.layers[L].completeness_error))),
            "ig_converged": int(ig.layers[L].converged.sum()),
            **{name: summarise(v) for name, v in lrows.items() if v},
        }
        print(f"layer {L}: " + ", ".join(f"{n} Spearman {s['spearman_mean']:.5f} (min {s['spearman_min']:.5f})"
                                         for n, s in per_layer[str(L)].items() if isinstance(s, dict)), flush=True)

    result = {
        "benchmark": "fidelity",
        "command": f"python scripts/validate_attribution.py --n {args.n} --layers {args.layers} "
                   f"--steps {args.steps} --threads {args.threads}",
        "machine": common.machine(), "versions": common.versions(), "threads": args.threads,
        "model": f"demo model as F16 GGUF ({gguf.name})", "steps": args.steps, "goal_spearman": GOAL,
        "layers": per_layer, "rows": rows,
        "seconds_per_prompt_layer": {"captum": captum_seconds, "ig": ig.seconds / (len(ids) * len(layers)),
                                     "ig_model_load": load_seconds,
                                     "exact_last_layer": exact_seconds / len(ids) if exact is not None else None},
        "peak_rss_mib": common.peak_rss_mib(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        "# Attribution fidelity against Captum, every analysed layer (scripts/validate_attribution.py)",
        "",
        f"`{result['command']}` on {result['machine']['platform']}, {result['machine']['date']}; "
        f"captum {result['versions']['captum']}, transformers {result['versions']['transformers']}, "
        f"torch {result['versions']['torch']}.",
        f"Model: {result['model']}. Captum runs transformers on the file dequantized to fp32; `ig` runs "
        f"ggml-probe's torch model on the same file's weights (dequantized by ggml); `exact` is the closed-form "
        f"last layer from llama.cpp passes; `dla` is the direct-effect attribution. BoolQ prompts in the paper's "
        f"template; target = log p(the transformers model's argmax token); baseline = all token ids 0; "
        f"{args.steps}-point Gauss-Legendre.",
        "",
        "| layer | method | prompts | Spearman mean | Spearman min | top-20 overlap | salient Jaccard | goal ≥ 0.99 |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for L, d in per_layer.items():
        for name in ("ig", "exact", "dla"):
            if name in d:
                s = d[name]
                goal = ("met" if s["goal_met"] else "NOT met") if name != "dla" else "(not the paper's method)"
                lines.append(f"| {L} | {name} | {s['prompts']} | {s['spearman_mean']:.5f} | {s['spearman_min']:.5f} | "
                             f"{s['top20_overlap_mean']:.2f} | {s['salient_jaccard_mean']:.2f} | {goal} |")
    lines += [
        "",
        "## Convergence of the 50-step integral (completeness error, nats)",
        "",
        "Σ attributions − (log p(target) − log p(target | this layer's act := the baseline's)), per prompt.",
        "",
        "| layer | Captum mean abs | ggml-probe ig mean abs | ig converged | per prompt: Captum / ig |",
        "|---:|---:|---:|---:|---|",
    ]
    for L, d in per_layer.items():
        pairs = ", ".join(f"{r['captum_completeness']:+.2g} / {r['ig_completeness']:+.2g}"
                          for r in rows if r["layer"] == int(L))
        lines.append(f"| {L} | {d['captum_mean_abs_completeness']:.3g} | {d['ig_mean_abs_completeness']:.3g} | "
                     f"{d['ig_converged']} / {len(ids)} | {pairs} |")
    sec = result["seconds_per_prompt_layer"]
    lines += [
        "",
        f"Time per prompt and layer: Captum {sec['captum']:.1f} s, ggml-probe ig {sec['ig']:.1f} s "
        f"(ig recomputes only the layers after the attributed one; model build from the GGUF {sec['ig_model_load']:.1f} s). "
        f"Peak RSS of the whole script {result['peak_rss_mib']:.0f} MiB.",
    ]
    (args.out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
