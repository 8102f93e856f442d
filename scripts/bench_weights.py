#!/usr/bin/env python
"""Time and peak memory of dequantizing a whole GGUF file: ggml-probe's streaming path vs gguf-py.

Each measurement runs in a fresh subprocess, which reports its own ru_maxrss (peak resident set:
it counts memory-mapped file pages that were touched, which tracemalloc cannot see) before and after
the work. Methods:
  stream-ggml   ggml_probe.weights.GGUFTensors, rows in blocks, ggml's to_float, pages released
  stream-numpy  the same streaming reader, gguf-py's NumPy dequantizer per block
  gguf-py       gguf.GGUFReader + gguf.quants.dequantize per whole tensor (the plain way)
  compare       ggml_probe.weights.compare_weights(model, ref) — the whole `weights` analysis
The file is read once beforehand so every method starts with a warm page cache.

    python scripts/bench_weights.py [--models DIR] [--repeat 3] [--out benchmarks/weights]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "stream-ggml": "ggml_probe.weights.GGUFTensors: rows in blocks from an mmap, ggml's own to_float, pages released",
    "stream-numpy": "the same streaming reader with gguf-py's NumPy dequantizer per block",
    "gguf-py": "gguf.GGUFReader + gguf.quants.dequantize, one whole tensor at a time (the plain way)",
    "compare": "ggml_probe.weights.compare_weights(model, ref): the whole `weights` analysis, both files",
}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(method: str, path: str, ref: str | None) -> dict:
    import numpy as np

    if method in ("stream-ggml", "stream-numpy", "compare"):
        from ggml_probe.weights import GGUFTensors, compare_weights
        from ggml_probe.weights.dequant import _lib

        _lib()  # load libggml before the baseline, like gguf-py's import below
    else:
        import gguf  # noqa: F401
        import gguf.quants  # noqa: F401
    base = _maxrss_mib()
    t0 = time.perf_counter()
    checksum = 0.0
    n_elements = 0
    if method.startswith("stream"):
        backend = "ggml" if method == "stream-ggml" else "numpy"
        with GGUFTensors(path) as g:
            for name, ref_ in g.tensors.items():
                b = "auto" if ref_.type_name == "F32" else backend
                for _, block in g.iter_rows(name, backend=b):
                    checksum += float(block.sum(dtype=np.float64))
                    n_elements += block.size
    elif method == "gguf-py":
        from gguf import GGUFReader
        from gguf.quants import dequantize

        reader = GGUFReader(path)
        for t in reader.tensors:
            values = dequantize(t.data, t.tensor_type)
            checksum += float(values.sum(dtype=np.float64))
            n_elements += values.size
            del values
    elif method == "compare":
        report = compare_weights(path, ref)
        checksum = report.total["rel_rmse"]
        n_elements = sum(int(np.prod(t.ggml_shape)) for t in report.tensors)
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    return {"method": method, "seconds": seconds, "baseline_mib": base, "peak_mib": _maxrss_mib(),
            "checksum": checksum, "n_elements": n_elements}


def run_one(method: str, path: Path, ref: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(path)] + ([str(ref)] if ref else [])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--stem", default="SmolLM2-135M-Instruct")
    ap.add_argument("--levels", default="F16,Q4_0")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "weights")
    args = ap.parse_args()

    levels = [x.strip() for x in args.levels.split(",")]
    files = {q: args.models / f"{args.stem}-{q}.gguf" for q in levels}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (build them with `ggml-probe quantize demo "
                         f"--allow-requantize --to F16 --to Q4_0`)")
    rows = []
    plan = [(q, m, files[q], None) for q in levels for m in ("stream-ggml", "stream-numpy", "gguf-py")]
    ref_level = levels[0]
    for q in levels[1:]:
        plan.append((f"{q} vs {ref_level}", "compare", files[q], files[ref_level]))
    for label, method, path, ref in plan:
        _warm(path)
        if ref:
            _warm(ref)
        runs = [run_one(method, path, ref) for _ in range(args.repeat)]
        size = path.stat().st_size + (ref.stat().st_size if ref else 0)
        gb = size / 1e9
        secs = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_mib"] for r in runs)
        extra = max(r["peak_mib"] - r["baseline_mib"] for r in runs)
        rows.append({
            "file": label, "method": method, "size_mb": size / 1e6, "seconds_median": secs,
            "seconds_all": [r["seconds"] for r in runs], "seconds_per_gb": secs / gb,
            "peak_rss_mib": peak, "peak_over_baseline_mib": extra, "peak_over_baseline_mib_per_gb": extra / gb,
            "checksum": runs[0]["checksum"], "n_elements": runs[0]["n_elements"],
        })
        print(f"{label:>14} {method:>13}  {secs:7.2f} s  {secs / gb:7.2f} s/GB  peak {peak:7.0f} MiB "
              f"(+{extra:6.0f} over imports)", flush=True)

    # Same tensors, same values: the checksums of the three dequantizing methods must agree.
    for q in levels:
        sums = {r["method"]: r["checksum"] for r in rows if r["file"] == q}
        first = next(iter(sums.values()))
        assert all(math.isclose(v, first, rel_tol=1e-9, abs_tol=1e-6) for v in sums.values()), (q, sums)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "repeat": args.repeat, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Weight dequantization: streaming (ggml-probe) vs gguf-py's plain reader",
        "",
        f"Generated by `scripts/bench_weights.py` on {meta['date']} ({meta['machine']}); median of "
        f"{args.repeat} runs, each in a fresh process, page cache warm. Peak = ru_maxrss of the process "
        "(includes touched mmap pages); '+ work' subtracts the RSS after imports.",
        "",
        "| file | method | size MB | s | s / GB | peak RSS MiB | + work MiB | + work MiB / GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['file']} | {r['method']} | {r['size_mb']:.0f} | {r['seconds_median']:.2f} | "
                     f"{r['seconds_per_gb']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_over_baseline_mib']:.0f} | "
                     f"{r['peak_over_baseline_mib_per_gb']:.0f} |")
    lines += ["", "Methods:", "", *[f"- `{m}`: {text}" for m, text in METHODS.items()], ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)))
    else:
        main()
