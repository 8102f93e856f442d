#!/usr/bin/env python3
"""Does an imatrix collected by ggml-probe close the loop? Q4_0 and IQ4_NL with and without it.

1. The demo model's F16 rung is the reference.
2. An importance matrix is collected on BoolQ prompts from the END of the validation file
   (`--calib` rows), disjoint from the evaluation prompts (the first `--n` rows).
3. Q4_0 and IQ4_NL are quantized from F16 with and without it (llama.cpp's own quantizer).
4. Every file is evaluated on the same prompts and compared with F16: KL of the full next-token
   distribution, KL of the label distribution, answer agreement, accuracy.
Writes benchmarks/imatrix_loop.{md,json}.

    python scripts/imatrix_loop.py --n 200 --calib 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared")) / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="evaluation prompts (the first N BoolQ rows)")
    ap.add_argument("--calib", type=int, default=100, help="imatrix prompts (the last N BoolQ rows)")
    ap.add_argument("--levels", default="Q4_0,IQ4_NL")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks")
    ap.add_argument("--render-only", action="store_true", help="rewrite imatrix_loop.md from imatrix_loop.json")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((args.out / "imatrix_loop.json").read_text()), args.out)
        return

    from ggml_probe.pipeline.compare import compare_runs
    from ggml_probe.engine.imatrix_capture import collect_imatrix
    from ggml_probe.pipeline.evaluation import EvalConfig, evaluate
    from ggml_probe.formats.imatrix import write_imatrix
    from ggml_probe.models.quantize import quantize_ladder
    from ggml_probe.models.store import demo_model_path

    boolq = SHARED / "boolq_validation.jsonl"
    rows = [json.loads(line) for line in boolq.read_text().splitlines() if line.strip()]
    calib = [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows[-args.calib:]]
    work = Path(tempfile.mkdtemp(prefix="imatrix-loop-"))
    t0 = time.perf_counter()
    f16 = quantize_ladder(demo_model_path(), ["F16"], out_dir=work, allow_requantize=True)[0].path
    im = collect_imatrix(f16, calib, datasets=[f"boolq_validation.jsonl rows {len(rows) - args.calib + 1}-{len(rows)}"],
                         n_threads=args.threads)
    im_path = write_imatrix(work / "boolq.imatrix.gguf", im)
    levels = args.levels.split(",")
    files = {"F16": f16}
    for q in levels:
        files[q] = quantize_ladder(f16, [q], out_dir=work / "plain")[0].path
        files[f"{q}+imatrix"] = quantize_ladder(f16, [q], out_dir=work / "imatrix", imatrix=im.mean_squares())[0].path
    config = EvalConfig(task="boolq", data_path=str(boolq), limit=args.n, threads=args.threads, n_boot=200)
    runs = {name: evaluate(path, config, work / "runs" / name, quant_label=name) for name, path in files.items()}
    rows_out = []
    for name, summary in runs.items():
        if name == "F16":
            continue
        c = compare_runs(runs["F16"].run_dir, summary.run_dir, n_boot=1000)
        rows_out.append({
            "level": name, "kl_full_mean": c["kl_full_mean"], "kl_full_p99": c["kl_full_p99"],
            "kl_label_mean": c["kl_label_mean"], "top1_agreement": c["top1_agreement"], "agreement": c["agreement"],
            "accuracy": summary.metrics["label_set"]["accuracy"]["value"], "accuracy_delta": c["accuracy_delta"],
            "tensor_types": summary.manifest["model"]["tensor_types"],
        })
        print(json.dumps(rows_out[-1]), flush=True)
    ref_acc = runs["F16"].metrics["label_set"]["accuracy"]["value"]
    result = {"command": "python scripts/imatrix_loop.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "n_eval": args.n, "n_calib": args.calib, "f16_accuracy": ref_acc, "seconds": time.perf_counter() - t0,
              "imatrix": str(im_path), "rows": rows_out}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "imatrix_loop.json").write_text(json.dumps(result, indent=2) + "\n")
    render(result, args.out)


def type_differences(rows: list[dict]) -> list[str]:
    """Where llama.cpp chose other tensor types because an imatrix was given (its type rules look at
    has_imatrix: IQ4_NL/IQ4_XS keep Q5_K for the first n_layer/8 ffn_down only WITHOUT one, Q4_0 moves
    them to Q4_1 only WITH one), so a row pair is not the same file with better rounding."""
    by = {r["level"]: r["tensor_types"] for r in rows}
    notes = []
    for level, types in by.items():
        other = by.get(f"{level}+imatrix")
        if other is not None and other != types:
            diff = ", ".join(f"{t}: {types.get(t, 0)} → {other.get(t, 0)}" for t in sorted(set(types) | set(other))
                             if types.get(t, 0) != other.get(t, 0))
            notes.append(f"- {level} vs {level}+imatrix: llama.cpp chose different tensor types ({diff}).")
    return notes


def render(result: dict, out: Path) -> None:
    args = argparse.Namespace(calib=result["n_calib"], n=result["n_eval"])
    rows_out, ref_acc = result["rows"], result["f16_accuracy"]
    lines = [
        "# Closing the imatrix loop (scripts/imatrix_loop.py)",
        "",
        f"`{result['command']}`, {result['date']}, {result['seconds']:.0f} s. Demo model: F16 rung (itself dequantized",
        "from the shipped Q4_1) is the reference. imatrix: ggml-probe's `collect_imatrix` on the last "
        f"{args.calib} BoolQ validation questions; evaluation: the first {args.n} (disjoint). Same prompts for every file.",
        f"F16 accuracy (label-set): {ref_acc * 100:.1f}%.",
        "",
        "| level | KL full, mean | KL full, p99 | KL label, mean | top-1 agree % | answer agree % | accuracy % | Δ accuracy vs F16 (95% CI) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows_out:
        d = r["accuracy_delta"]
        lines.append(f"| {r['level']} | {r['kl_full_mean']:.4f} | {r['kl_full_p99']:.3f} | {r['kl_label_mean']:.4f} | "
                     f"{r['top1_agreement'] * 100:.1f} | {r['agreement'] * 100:.1f} | {r['accuracy'] * 100:.1f} | "
                     f"{d['value'] * 100:+.1f} [{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}] |")
    notes = type_differences(rows_out)
    if notes:
        lines += ["", "**Not only rounding.** llama.cpp's type rules depend on whether an imatrix is given "
                  "(`llama_tensor_get_type`: the first n_layer/8 ffn_down tensors stay Q5_K for IQ4_NL/IQ4_XS only "
                  "without one; for Q4_0 they become Q4_1 only with one), so each pair below compares different "
                  "type mixes as well as the imatrix's rounding:", "", *notes]
    (out / "imatrix_loop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
