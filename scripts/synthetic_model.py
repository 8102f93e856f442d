#!/usr/bin/env python3
"""A random-weight GGUF with the shape of a 1B llama and a real tokenizer, and its ladder.

No real model above 270M installs offline here; this stands in for one where only the shape matters
(speed, memory, scaling): 16 layers, 2048 wide, FFN 8192, 32 heads (8 KV heads), 32k vocabulary
(llama.cpp's ggml-vocab-llama-spm.gguf: LLaMA's SentencePiece tokenizer), untied output, N(0, 0.02²)
weights (ggml_probe.models.synthetic). Written at F16, then quantized with ggml-probe's quantizer
(llama.cpp's, in-process) to the requested levels, into the store (--out-dir, default
$GGML_PROBE_MODELS or ./models):

    python scripts/synthetic_model.py                       # synthetic-llama-1b-{F16,Q8_0,Q4_K_M}.gguf
    python scripts/synthetic_model.py --quants Q8_0 --out-dir /tmp/models --threads 2

Existing files are kept (delete them to rebuild). Prints one line per file: path, size, seconds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ggml_probe.models.quantize import quantize_ladder
from ggml_probe.models.store import models_dir
from ggml_probe.models.synthetic import SHAPES, write_llama_gguf

SHARED = Path(os.environ.get("GGML_PROBE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
DEFAULT_VOCAB = SHARED / "vocab" / "ggml-vocab-llama-spm.gguf"


def build(shape_name: str, vocab: Path, out_dir: Path, quants: list[str], seed: int, threads: int) -> dict[str, Path]:
    """The F16 file and its ladder: {level: path}."""
    shape = SHAPES[shape_name]
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / f"synthetic-llama-{shape_name}-F16.gguf"
    files = {"F16": f16}
    if not f16.exists():
        t0 = time.perf_counter()
        write_llama_gguf(f16, vocab, shape, outtype="f16", seed=seed,
                         name=f"synthetic llama {shape_name} (random weights, seed {seed})")
        print(f"{f16}  {f16.stat().st_size / 1e9:.3f} GB  {time.perf_counter() - t0:.1f} s", flush=True)
    for q in quants:
        t0 = time.perf_counter()
        (r,) = quantize_ladder(f16, [q], out_dir=out_dir, skip_existing=True, nthread=threads)
        files[r.quant] = r.path
        print(f"{r.path}  {r.path.stat().st_size / 1e9:.3f} GB  {time.perf_counter() - t0:.1f} s", flush=True)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="a GGUF whose tokenizer.* keys are copied")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: $GGML_PROBE_MODELS or ./models")
    ap.add_argument("--quants", default="Q8_0,Q4_K_M", help="levels quantized from the F16 file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="quantizer threads")
    args = ap.parse_args()
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    build(args.shape, args.vocab, args.out_dir or models_dir(), quants, args.seed, args.threads)


if __name__ == "__main__":
    main()
