#!/usr/bin/env python3
"""Benchmark: `ggml-probe kld` against llama.cpp's own `llama-perplexity --kl-divergence`.

Same files (the demo ladder), same text (BoolQ passages), same ctx, batch and threads. llama-perplexity
(built from the vendored source by scripts/llama_tools.py) writes its base from the reference and scores
each level; ggml-probe scores each level (a) against its own base and (b) against llama-perplexity's base
file. Figures compared: mean KLD (goal: within 1 % relative), same top p (within 0.2 points), PPL (within
0.2 %); speed: tokens/s of the scoring pass, ggml-probe / llama-perplexity (goal ≥ 1.0×), each in a
fresh process; peak memory of ggml-probe at two text lengths (goal: flat). Results go to
benchmarks/kld.md and benchmarks/kld.json.

    python scripts/bench_kld.py --chunks 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared")) / "data"
sys.path.insert(0, str(REPO / "scripts"))

from llama_tools import tool  # noqa: E402

LEVELS = ("Q8_0", "Q4_K_M", "Q4_0")
FIGURES = {  # llama-perplexity's printed lines → our keys
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([-\d.]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*([-\d.]+)",
    "kld_mean": r"Mean\s+KLD:\s*([-\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([-\d.]+)",
    "kld_max": r"Maximum KLD:\s*([-\d.]+)",
    "rms_dp": r"RMS Δp\s*:\s*([-\d.]+)",
    "same_top_p": r"Same top p:\s*([-\d.]+)",
}
PERCENT = {"rms_dp", "same_top_p"}


def _text(n_passages: int) -> str:
    with open(SHARED / "boolq_validation.jsonl") as f:
        return "\n\n".join(json.loads(line)["passage"] for _, line in zip(range(n_passages), f))


def _llama_perplexity(args, *extra: str) -> tuple[str, float]:
    cmd = [str(tool("llama-perplexity")), "-c", str(args.ctx), "-b", str(args.batch), "-t", str(args.threads),
           "--chunks", str(args.chunks), "-ngl", "0", "-fa", "on" if args.flash_attn else "off", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"llama-perplexity failed: {proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr, seconds


def _parse(out: str) -> dict[str, float]:
    got = {}
    for key, pat in FIGURES.items():
        m = re.search(pat, out)
        if m:
            got[key] = float(m.group(1)) / (100.0 if key in PERCENT else 1.0)
    return got


def _child(args) -> None:
    """One ggml-probe scoring pass in its own process; prints a JSON line."""
    from ggml_probe.pipeline.kld import KLDSettings, score_model

    s = KLDSettings(ctx=args.ctx, batch=args.batch, threads=args.threads, gpu_layers=0, flash_attn=args.flash_attn)
    res = score_model(Path(args.model), Path(args.base), s)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def _ours(args, model: Path, base: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--base", str(base), "--ctx", str(args.ctx),
           "--batch", str(args.batch), "--threads", str(args.threads), *(["--flash-attn"] if args.flash_attn else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ggml-probe child failed: {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passages", type=int, default=400)
    ap.add_argument("--flash-attn", action="store_true",
                    help="flash attention on both sides (llama-perplexity's default is auto, on for CPU)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    from ggml_probe.models.quantize import quantize_ladder
    from ggml_probe.pipeline.kld import KLDSettings, write_base, text_tokens
    from ggml_probe.engine.model import Vocab

    work = Path(tempfile.mkdtemp(prefix="bench-kld-"))
    ladder = {r.quant: r.path for r in quantize_ladder("demo", ["F16", *LEVELS], out_dir=REPO / "models",
                                                       allow_requantize=True, skip_existing=True)}
    text_file = work / "text.txt"
    text_file.write_text(_text(args.passages))
    ref = ladder["F16"]

    llama_base = work / "llama.kld"
    _, base_seconds = _llama_perplexity(args, "-m", str(ref), "-f", str(text_file), "--kl-divergence-base",
                                        str(llama_base))
    with Vocab(ref) as vocab:
        tokens = text_tokens(vocab, text_file.read_text(), args.ctx, args.chunks)
    our_base = work / "ours.kld"
    t0 = time.perf_counter()
    write_base(ref, tokens, KLDSettings(ctx=args.ctx, batch=args.batch, threads=args.threads, gpu_layers=0,
                                                         flash_attn=args.flash_attn), our_base)
    our_base_seconds = time.perf_counter() - t0

    rows = []
    for level in LEVELS:
        out, seconds = _llama_perplexity(args, "-m", str(ladder[level]), "--kl-divergence-base", str(llama_base),
                                         "--kl-divergence")
        theirs = _parse(out)
        load = re.search(r"load time =\s*([\d.]+) ms", out)
        scoring = seconds - (float(load.group(1)) / 1000 if load else 0.0)  # like ours: model load excluded
        n_tokens = args.chunks * args.ctx
        ours_own = _ours(args, ladder[level], our_base)
        ours_theirs = _ours(args, ladder[level], llama_base)
        rows.append({
            "level": level, "llama_perplexity": theirs, "llama_process_seconds": seconds, "llama_seconds": scoring,
            "llama_tokens_per_second": n_tokens / scoring,
            "ours_own_base": {k: ours_own[k] for k in (*FIGURES, "seconds", "tokens_per_second", "peak_rss_mib")},
            "ours_llama_base": {k: ours_theirs[k] for k in (*FIGURES, "seconds", "tokens_per_second", "peak_rss_mib",
                                                             "process_seconds")},
        })

    # memory flat in the text's length: the same scoring on a quarter of the chunks
    short = work / "short.kld"
    write_base(ref, tokens[:max(2, args.chunks // 4) * args.ctx],
               KLDSettings(ctx=args.ctx, batch=args.batch, threads=args.threads, gpu_layers=0,
                           flash_attn=args.flash_attn), short)
    mem_short = _ours(args, ladder["Q4_0"], short)["peak_rss_mib"]
    mem_long = next(r for r in rows if r["level"] == "Q4_0")["ours_own_base"]["peak_rss_mib"]

    result = {"command": "python scripts/bench_kld.py " + " ".join(sys.argv[1:]), "machine": platform.platform(),
              "cpus": os.cpu_count(), "ctx": args.ctx, "batch": args.batch, "chunks": args.chunks,
              "threads": args.threads, "flash_attn": "on" if args.flash_attn else "off", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "base_seconds": {"llama_perplexity": base_seconds, "ggml_probe": our_base_seconds},
              "levels": rows, "memory_mib": {"chunks": [max(2, args.chunks // 4), args.chunks],
                                             "peak": [mem_short, mem_long]}}
    (REPO / "benchmarks" / "kld.json").write_text(json.dumps(result, indent=2))
    (REPO / "benchmarks" / "kld.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    lines = [
        "## Quality statistics: `ggml-probe kld` vs `llama-perplexity --kl-divergence`", "",
        f"Command: `{r['command']}` · {r['machine']}, {r['cpus']} cores · {r['date']}", "",
        f"Demo ladder (F16 reference, requantized from Q4_1), {r['chunks']} chunks of {r['ctx']} BoolQ-passage "
        f"tokens, batch {r['batch']}, {r['threads']} threads, CPU, flash attention {r['flash_attn']} on both sides. llama-perplexity built from the llama.cpp "
        "vendored in llama-cpp-python 0.3.36 (scripts/llama_tools.py).", "",
        "| level | figure | llama-perplexity | ggml-probe (own base) | ggml-probe (llama's base) | rel. diff (llama's base) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in r["levels"]:
        t, o, ob = row["llama_perplexity"], row["ours_own_base"], row["ours_llama_base"]
        for k in ("ppl", "kld_mean", "kld_p99", "same_top_p", "rms_dp"):
            if k in t:
                rel = (ob[k] - t[k]) / t[k] if t[k] else float("nan")
                lines.append(f"| {row['level']} | {k} | {t[k]:.6f} | {o[k]:.6f} | {ob[k]:.6f} | {rel:+.3%} |")
    lines += ["", "| level | llama-perplexity tok/s | ggml-probe tok/s | **ratio** |", "|---|---:|---:|---:|"]
    for row in r["levels"]:
        ours = row["ours_llama_base"]["tokens_per_second"]
        lines.append(f"| {row['level']} | {row['llama_tokens_per_second']:.0f} | {ours:.0f} | "
                     f"**{ours / row['llama_tokens_per_second']:.2f}×** |")
    lines += ["", "Times exclude model loading on both sides: llama-perplexity's whole process less the load time "
              "it reports; ggml-probe's scoring loop (reading the base, decoding, the statistics).", "",
              f"Peak RSS of the ggml-probe scoring process: {r['memory_mib']['peak'][0]:.0f} MiB at "
              f"{r['memory_mib']['chunks'][0]} chunks, {r['memory_mib']['peak'][1]:.0f} MiB at "
              f"{r['memory_mib']['chunks'][1]} chunks.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
