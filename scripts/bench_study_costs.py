#!/usr/bin/env python3
"""Benchmark (issue 14): a small study's fixed costs, this tree against a baseline source tree.

Runs the same `ggml-probe study` on the demo (a small limit, so the fixed costs dominate) under
cProfile, once with this tree's code and once with --baseline-src's (e.g. `git archive <commit>`
unpacked), alternating which goes first each round; reports the wall time and the cumulative time
of the study's parts (salient neurons, ablation, redundancy clustering, report, GGUF header reads).
Writes benchmarks/study_costs.md and benchmarks/study_costs.json.

    python scripts/bench_study_costs.py --baseline-src /tmp/base --rounds 1 --limit 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOLQ = Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared")) / "data" / "boolq_validation.jsonl"

# what to report: (label, module path suffix, function name) matched in the profile
PARTS = [
    ("salient neurons (attribution)", "attribution/__init__.py", "attribute"),
    ("  of which exact IG", "analysis/salient.py", "integrated_gradients"),
    ("ablation check", "pipeline/neurons.py", "_ablation_check"),
    ("redundancy summaries (histogram, pairs, clustering)", "analysis/neurons.py", "redundancy_summary"),
    ("noise floor (its passes and their neuron part)", "pipeline/noise_floor.py", "study_floor"),
    ("neuron part of every run, floor included (salient, ablation, top tokens)", "pipeline/neurons.py", "neuron_level"),
    ("report", "report/render.py", "render_report"),
    ("GGUF header checks", "formats/gguf.py", "validate_gguf"),
]


def _child(out: str, limit: int, threads: int) -> None:
    import cProfile
    import pstats

    from click.testing import CliRunner

    from ggml_probe.cli import cli

    args = ["study", "demo", "--quants", "F16,Q4_0", "--task", "boolq", "--data", str(BOOLQ), "--limit", str(limit),
            "--salient-examples", "4", "--threads", str(threads), "--no-kld", "-o", out, "--force",
            "--allow-requantize", "-q"]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    prof.disable()
    seconds = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(result.output[-2000:])
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    parts = {}
    for label, suffix, name in PARTS:
        hits = [(v[1], v[3]) for (f, _, n), v in stats.items() if n == name and f.endswith(suffix)]
        parts[label] = {"calls": sum(h[0] for h in hits), "seconds": sum(h[1] for h in hits)}
    print("RESULT " + json.dumps({"seconds": seconds, "parts": parts}), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-src", type=Path, required=True, help="a source tree of the baseline (holds ggml_probe/)")
    ap.add_argument("--baseline-name", default="baseline")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = ap.parse_args()
    trees = {"this tree": REPO, args.baseline_name: args.baseline_src.resolve()}
    runs: dict[str, list] = {k: [] for k in trees}
    loads = []
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name in order:
            loads.append(os.getloadavg()[0])
            env = {**os.environ, "PYTHONPATH": str(trees[name])}
            out = tempfile.mkdtemp()
            proc = subprocess.run([sys.executable, __file__, "--child", out, str(args.limit), str(args.threads)],
                                  capture_output=True, text=True, env=env, cwd=trees[name])
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(lines[-1][7:]))
            print(f"round {r} {name}: {runs[name][-1]['seconds']:.1f} s", flush=True)
    command = (f"python scripts/bench_study_costs.py --baseline-src <{args.baseline_name}> --rounds {args.rounds} "
               f"--limit {args.limit} --threads {args.threads}")
    result = {"command": command, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "runs": runs, "load_1min": loads}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study_costs.json").write_text(json.dumps(result, indent=2) + "\n")
    base = args.baseline_name

    def med(name, label=None):
        return statistics.median(x["seconds"] if label is None else x["parts"][label]["seconds"] for x in runs[name])

    lines = [
        "# A small study's fixed costs: this tree against the baseline",
        "",
        f"Command: `{command}` · {result['platform']}, {os.cpu_count()} cores · {result['date']}",
        "",
        f"`ggml-probe study demo --quants F16,Q4_0 --task boolq --limit {args.limit} --salient-examples 4 --no-kld "
        f"--threads {args.threads}` under cProfile (which slows Python-heavy parts more than llama.cpp's), each tree "
        f"in a fresh process, {args.rounds} round(s), alternating which goes first; medians. Baseline: {base}. "
        f"The machine is 2 cores shared by eight engineers' jobs: 1-minute load {min(loads):.1f}–{max(loads):.1f} "
        "during these runs; read the ratios, not the seconds.",
        "",
        f"| part | {base} s | this tree s | **{base} / this tree** | calls ({base} / this tree) |",
        "|---|---:|---:|---:|---|",
        f"| whole study | {med(base):.1f} | {med('this tree'):.1f} | **{med(base) / med('this tree'):.2f}** | |",
    ]
    for label, _, _ in PARTS:
        a, b = med(base, label), med("this tree", label)
        calls = f"{runs[base][0]['parts'][label]['calls']} / {runs['this tree'][0]['parts'][label]['calls']}"
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | **{a / b:.2f}** | {calls} |" if b > 0 else
                     f"| {label} | {a:.1f} | {b:.1f} | — | {calls} |")
    (args.out / "study_costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
