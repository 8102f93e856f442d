#!/usr/bin/env python3
"""The open imatrix question (issue 13): IQ4_NL with an imatrix answers BoolQ far worse than without one
(41.3 % vs 62.0 %, benchmarks/imatrix_loop.md), and with an imatrix llama.cpp demotes blk.0–2.ffn_down from
Q5_K to IQ4_NL. Put those three tensors back at Q5_K (quantize --tensor-type) with the imatrix and see
whether the accuracy returns.

Same protocol as scripts/imatrix_loop.py: the demo's F16 rung, an imatrix from the last `--calib` BoolQ
validation questions, evaluation on the first `--n` (disjoint). Appends its table to benchmarks/mix.md
(between markers, so a rerun replaces it) and writes benchmarks/imatrix_ffn_down.json.

    python scripts/imatrix_ffn_down.py --n 150 --calib 100 --threads 1
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
BEGIN, END = "<!-- imatrix_ffn_down -->", "<!-- /imatrix_ffn_down -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render-only", action="store_true", help="rewrite the section from benchmarks/imatrix_ffn_down.json")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((REPO / "benchmarks" / "imatrix_ffn_down.json").read_text()))
        return

    from ggml_probe.engine.imatrix_capture import collect_imatrix
    from ggml_probe.formats.imatrix import write_imatrix
    from ggml_probe.models.quantize import MixOptions, quantize_ladder
    from ggml_probe.models.store import demo_model_path
    from ggml_probe.pipeline.compare import compare_runs
    from ggml_probe.pipeline.evaluation import EvalConfig, evaluate

    boolq = SHARED / "boolq_validation.jsonl"
    rows = [json.loads(line) for line in boolq.read_text().splitlines() if line.strip()]
    calib = [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows[-args.calib:]]
    work = Path(tempfile.mkdtemp(prefix="imatrix-ffn-down-"))
    t0 = time.perf_counter()
    f16 = quantize_ladder(demo_model_path(), ["F16"], out_dir=work, allow_requantize=True)[0].path
    im = collect_imatrix(f16, calib, datasets=[f"boolq_validation.jsonl rows {len(rows) - args.calib + 1}-{len(rows)}"],
                         n_threads=args.threads)
    write_imatrix(work / "boolq.imatrix.gguf", im)
    pattern = r"blk\.[0-2]\.ffn_down"
    files = {
        "F16": f16,
        "IQ4_NL": quantize_ladder(f16, ["IQ4_NL"], out_dir=work / "plain")[0].path,
        "IQ4_NL+imatrix": quantize_ladder(f16, ["IQ4_NL"], out_dir=work / "imatrix", imatrix=im.mean_squares())[0].path,
        "IQ4_NL+imatrix, blk.0-2.ffn_down Q5_K": quantize_ladder(
            f16, ["IQ4_NL"], out_dir=work / "fixed", imatrix=im.mean_squares(),
            mix=MixOptions([(pattern, "Q5_K")]))[0].path,
    }
    config = EvalConfig(task="boolq", data_path=str(boolq), limit=args.n, threads=args.threads, n_boot=200)
    runs = {name: evaluate(path, config, work / "runs" / name.replace(" ", "_").replace(",", ""), quant_label=name)
            for name, path in files.items()}
    out_rows = []
    for name, summary in runs.items():
        if name == "F16":
            continue
        c = compare_runs(runs["F16"].run_dir, summary.run_dir, n_boot=1000)
        out_rows.append({"level": name, "kl_full_mean": c["kl_full_mean"], "agreement": c["agreement"],
                         "accuracy": summary.metrics["label_set"]["accuracy"]["value"],
                         "accuracy_delta": c["accuracy_delta"], "tensor_types": summary.manifest["model"]["tensor_types"]})
        print(json.dumps(out_rows[-1]), flush=True)
    result = {"command": "python scripts/imatrix_ffn_down.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.perf_counter() - t0,
              "n_eval": args.n, "n_calib": args.calib,
              "f16_accuracy": runs["F16"].metrics["label_set"]["accuracy"]["value"], "rows": out_rows}
    (REPO / "benchmarks" / "imatrix_ffn_down.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    render(result)


def _delta(d: dict) -> str:
    return f"{100 * d['value']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def render(r: dict) -> None:
    lines = [BEGIN, "## The imatrix question: blk.0–2.ffn_down back at Q5_K", "",
             f"`{r['command']}`, {r['date']}, {r['seconds']:.0f} s. Demo F16 rung as reference, imatrix from the last "
             f"{r['n_calib']} BoolQ validation questions, evaluation on the first {r['n_eval']}. "
             f"F16 accuracy (label set): {100 * r['f16_accuracy']:.1f} %.", "",
             "| level | KL full, mean | answer agree % | accuracy % | Δ accuracy vs F16 (95% CI) | tensor types |",
             "|---|---:|---:|---:|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['level']} | {row['kl_full_mean']:.4f} | {100 * row['agreement']:.1f} | "
                     f"{100 * row['accuracy']:.1f} | {_delta(row['accuracy_delta'])} | {row['tensor_types']} |")
    by = {row["level"]: row for row in r["rows"]}
    plain, im = by.get("IQ4_NL"), by.get("IQ4_NL+imatrix")
    fixed = by.get("IQ4_NL+imatrix, blk.0-2.ffn_down Q5_K")
    if plain and im and fixed:
        gap = plain["accuracy"] - im["accuracy"]
        back = (fixed["accuracy"] - im["accuracy"]) / gap if gap else float("nan")
        lines += ["", f"With the imatrix and blk.0–2.ffn_down back at Q5_K the file has the same tensor types as IQ4_NL "
                  f"without one; accuracy goes from {100 * im['accuracy']:.1f} % to {100 * fixed['accuracy']:.1f} % "
                  f"(without the imatrix: {100 * plain['accuracy']:.1f} %), so the three demoted tensors explain "
                  f"{100 * back:.0f} % of the loss on these {r['n_eval']} questions; the rest comes with the imatrix's "
                  "rounding of the IQ4_NL tensors themselves."]
    lines += ["", END]
    md = REPO / "benchmarks" / "mix.md"
    text = md.read_text() if md.exists() else ""
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + text[text.index(END) + len(END) + 1:]
    md.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
