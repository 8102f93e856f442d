#!/usr/bin/env python3
"""Benchmark: ggml-probe on a 1B-shaped model (random weights, scripts/synthetic_model.py) and the
extrapolation to 7B and 8B.

Same run, same threads, CPU only, flash attention off on every side:
  eval, neurons   the eval pass (and with the neuron capture, at the paper's layers 0, 14, -1 with every
                  statistic, redundancy included), ggml_probe.pipeline.evaluation.evaluate in a child
                  process on the built-in yes/no task, one prompt per checkpoint with the time of each:
                  the pass rate is the tokens of prompts 2..N over their time (start-up, model load, the
                  first prompt and the final analyses excluded). The whole `ggml-probe neurons` command
                  (salient neurons, their ablation check, top tokens) is timed as a process too.
                  Baseline: llama-bench pp at the mean prompt length (eval decodes one prompt per
                  llama_decode, --batch 1).
  kld             `ggml-probe kld` scoring each level against the F16 file, tokens/s of its scoring pass,
                  against llama-perplexity --kl-divergence on the same text, ctx and chunks (both: decode
                  time after load, as each reports it).
  memory          peak RSS (the child's ru_maxrss, from wait4) of `ggml-probe study` on the largest level
                  alone, at two --limit values: goal ≤ 1.3 × file size + 300 MB, and flat in the examples.
  scaling         per-token cost of eval against parameter count (the demo's 135M F16 and the 1B F16, a
                  straight line through both), peak RSS of eval against file size, extrapolated to 7B and
                  8B llama shapes, beside the reference stack (fp32 transformers).

The machine is shared (2 cores, other jobs running): rates are noisy; ratios come from the same run.
Results go to benchmarks/scale.md and benchmarks/scale.json.

    python scripts/bench_scale.py --threads 1 --limit 8 --study-limits 2,8 --kld-ctx 128 --kld-chunks 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared")) / "data"
sys.path.insert(0, str(REPO / "scripts"))

from llama_tools import tool  # noqa: E402
from synthetic_model import DEFAULT_VOCAB, build  # noqa: E402

from ggml_probe.analysis.neurons import CoMoment  # noqa: E402
from ggml_probe.models.ggufinfo import inspect_gguf  # noqa: E402
from ggml_probe.models.store import models_dir  # noqa: E402
from ggml_probe.models.synthetic import SHAPES, LlamaShape  # noqa: E402
from ggml_probe.pipeline.evaluation import ladder_files  # noqa: E402

LEVELS = ("F16", "Q8_0", "Q4_K_M")
TASK = "yesno-mini"
# llama shapes of the extrapolation (published configs: Llama 2 7B; Llama 3 8B)
TARGETS = {
    "7B (Llama 2 shape)": (LlamaShape(32, 4096, 11008, 32, 32, 4096), 32000),
    "8B (Llama 3 shape)": (LlamaShape(32, 4096, 14336, 32, 8, 8192), 128256),
}
GB = 1e9


def _run(cmd: list[str], cwd: Path | None = None) -> dict:
    """A child process: wall seconds, its own peak RSS (wait4), stdout and stderr."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0), err.seek(0)
    res = {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "stdout": out.read(), "stderr": err.read(),
           "command": " ".join(str(c) for c in cmd)}
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {res['command']}\n{res['stderr'][-3000:]}")
    return res


def _probe(*args: str) -> list[str]:
    return [sys.executable, "-m", "ggml_probe", *args]


def _eval_like(command: str, model: Path, limit: int, threads: int, work: Path) -> dict:
    """One `ggml-probe eval|neurons` process: seconds, peak RSS, prompts and tokens decoded."""
    import pandas as pd

    out = work / f"{command}-{model.stem}-{limit}"
    r = _run(_probe(command, str(model), "--task", TASK, "--limit", str(limit), "--threads", str(threads),
                    "--gpu-layers", "0", "-o", str(out), "--force", "--json", "-q"), cwd=REPO)
    tokens = pd.read_parquet(out / "predictions.parquet")["n_tokens"]
    return {"seconds": r["seconds"], "peak_rss": r["peak_rss"], "prompts": int(len(tokens)),
            "tokens": int(tokens.sum()), "command": r["command"].split(" -m ", 1)[-1]}


def _child(args) -> None:
    """One eval pass (with the neuron capture for `neurons`) in this process, one prompt per checkpoint, the
    time of every prompt recorded: the pass rate is the tokens of prompts 2..N over the time from the
    end of the first to the end of the last (start-up, model load, the first prompt's warm-up and the
    final analyses excluded). Prints a JSON line."""
    import resource

    import pandas as pd

    from ggml_probe.pipeline.evaluation import EvalConfig, NeuronSettings, evaluate

    done_at: list[float] = []
    # the neuron pass at the paper's layers with every statistic but redundancy: every neuron's n_ff²
    # co-moments need 3 GiB at n_ff 8192, so the default budget would correlate a subset, which is not the
    # pass being timed (its memory: benchmarks/redundancy-budget.md)
    config = EvalConfig(task=TASK, limit=args.limit, threads=args.threads, gpu_layers=0, chunk_size=1,
                        neurons=NeuronSettings(redundancy=False) if args.child == "neurons" else None)
    out = Path(tempfile.mkdtemp(prefix="bench-scale-child-")) / "run"
    t0 = time.perf_counter()
    summary = evaluate(args.model, config, out, progress=lambda done, total: done_at.append(time.perf_counter()))
    seconds = time.perf_counter() - t0
    tokens = pd.read_parquet(out / "predictions.parquet")["n_tokens"].to_numpy()
    stamps = done_at[-len(tokens):]  # the first call reports 0 done, before any prompt
    print(json.dumps({"seconds": seconds, "summary_seconds": summary.seconds, "prompts": int(len(tokens)),
                      "tokens": int(tokens.sum()), "pass_tokens": int(tokens[1:].sum()),
                      "pass_seconds": stamps[-1] - stamps[0],
                      "pass_tokens_per_s": float(tokens[1:].sum() / (stamps[-1] - stamps[0])),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _pass(kind: str, model: Path, limit: int, threads: int) -> dict:
    r = _run([sys.executable, __file__, "--child", kind, "--model", str(model), "--limit", str(limit),
              "--threads", str(threads)], cwd=REPO)
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    res["peak_rss"] = r["peak_rss"]  # the child's own, from wait4
    return res


def _llama_bench(model: Path, n_prompt: int, threads: int, reps: int) -> dict:
    r = _run([str(tool("llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", "0",
              "-r", str(reps), "-fa", "0", "-ngl", "0", "-o", "json"])
    (t,) = json.loads(r["stdout"])
    return {"pp": n_prompt, "tokens_per_s": t["avg_ts"], "sd": t["stddev_ts"], "model_size": t["model_size"],
            "n_params": t["model_n_params"], "command": r["command"]}


def _perplexity_rate(text: str, ctx: int, chunks: int, batch: int = 2048) -> float:
    """tokens/s of llama-perplexity's decoding: its first pass (min(chunks, batch / ctx) chunks of ctx
    tokens in one batch) over the seconds it prints for it ("X seconds per pass")."""
    m = re.search(r"([\d.]+) seconds per pass", text)
    if not m:
        raise SystemExit("llama-perplexity printed no 'seconds per pass'")
    return min(chunks, max(1, batch // ctx)) * ctx / float(m.group(1))


def _kld(files: dict[str, Path], args, work: Path) -> dict:
    text = work / "kld-text.txt"
    with open(SHARED / "boolq_validation.jsonl") as f:
        text.write_text("\n\n".join(json.loads(line)["passage"] for _, line in zip(range(40), f)))
    common = ["-c", str(args.kld_ctx), "-b", "2048", "-t", str(args.threads), "--chunks", str(args.kld_chunks),
              "-ngl", "0", "-fa", "off"]
    base = work / "llama.kld"
    ref = _run([str(tool("llama-perplexity")), "-m", str(files["F16"]), "-f", str(text), "--kl-divergence-base",
                str(base), *common])
    out: dict = {"text": "BoolQ passages (first 40, ../shared/data)", "ctx": args.kld_ctx, "chunks": args.kld_chunks,
                 "llama_reference_tokens_per_s": _perplexity_rate(ref["stderr"] + ref["stdout"], args.kld_ctx, args.kld_chunks),
                 "levels": {}}
    ours = _run(_probe("kld", *(str(files[q]) for q in LEVELS[1:]), "--ref", str(files["F16"]), "--text", str(text),
                       "--ctx", str(args.kld_ctx), "--chunks", str(args.kld_chunks), "--threads", str(args.threads),
                       "--gpu-layers", "0", "-o", str(work / "kld"), "--json", "-q"), cwd=REPO)
    ours_json = json.loads(ours["stdout"])
    out["command"] = ours["command"].split(" -m ", 1)[-1]
    by_file = _by_file(ours_json)
    for q in LEVELS[1:]:
        llama = _run([str(tool("llama-perplexity")), "-m", str(files[q]), "--kl-divergence-base", str(base),
                      "--kl-divergence", *common])
        mine = by_file[files[q].stem]
        out["levels"][q] = {"ggml_probe_tokens_per_s": mine["tokens_per_second"],
                            "llama_perplexity_tokens_per_s": _perplexity_rate(llama["stderr"] + llama["stdout"],
                                                                              args.kld_ctx, args.kld_chunks),
                            "kld_mean": mine.get("kld_mean"), "n_tokens": mine.get("n_tokens")}
    out["peak_rss"] = ours["peak_rss"]
    return out


def _by_file(kld_json: dict) -> dict:
    """kld --json's per-model objects keyed by file stem, wherever the JSON nests them."""
    found = {}

    def walk(node, key=None):
        if isinstance(node, dict):
            if "tokens_per_second" in node and key is not None:
                found[Path(str(key)).stem] = node
            for k, v in node.items():
                walk(v, k)

    walk(kld_json)
    return found


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the straight line through two points (or least squares through more)."""
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def _derive(result: dict) -> None:
    """The scaling fits and the extrapolation, from the measured speed and memory figures."""
    import numpy as np

    demo, one = result["speed"]["demo F16"], result["speed"]["1B F16"]
    scaling = {"params": [demo["n_params"], one["n_params"]],
               "seconds_per_token": [1 / demo["eval"]["pass_tokens_per_s"], 1 / one["eval"]["pass_tokens_per_s"]],
               "file_bytes": [demo["file_bytes"], one["file_bytes"]],
               "eval_peak_rss": [demo["eval"]["peak_rss"], one["eval"]["peak_rss"]],
               # what the neuron pass adds to eval's peak on the 1B: its accumulators, n_ff² co-moments above all
               "neurons_extra_rss_1b": one["neurons"]["peak_rss"] - one["eval"]["peak_rss"],
               "n_ff_1b": SHAPES["1b"].n_ff}
    # how the per-token cost of the 1B changes with its file size across levels: cost ∝ size^e
    timed = [q for q in LEVELS if f"1B {q}" in result["speed"]]
    sizes = [result["speed"][f"1B {q}"]["file_bytes"] for q in timed]
    costs = [1 / result["speed"][f"1B {q}"]["eval"]["pass_tokens_per_s"] for q in timed]
    scaling["size_exponent"] = float(np.polyfit(np.log(sizes), np.log(costs), 1)[0])
    result["scaling"] = scaling
    result["extrapolation"] = _extrapolate(scaling, {q: f["bits_per_weight"] for q, f in result["files"].items()})


def _extrapolate(scaling: dict, bits: dict[str, float]) -> list[dict]:
    """Per target shape and level: predicted eval tok/s and peak RSS; the fp32 reference stack's need."""
    c0, c1 = _fit_line(scaling["params"], scaling["seconds_per_token"])
    m0, m1 = _fit_line(scaling["file_bytes"], scaling["eval_peak_rss"])
    rows = []
    for name, (shape, n_vocab) in TARGETS.items():
        params = shape.n_params(n_vocab)
        # activations of the reference stack at batch 16 × 256 tokens, fp32: the residual stream of every
        # layer (output_hidden_states) and the hooked FFN activations of 3 layers, plus the logits
        acts = 4 * 16 * 256 * ((shape.n_layer + 1) * shape.n_embd + 3 * shape.n_ff + n_vocab)
        for level in LEVELS:
            file_bytes = params * bits[level] / 8
            seconds_per_token = (c0 + c1 * params) * (file_bytes / (params * bits["F16"] / 8)) ** scaling["size_exponent"]
            rows.append({"target": name, "params": params, "level": level, "file_bytes": file_bytes,
                         "eval_tokens_per_s": 1 / seconds_per_token, "peak_rss": m0 + m1 * file_bytes,
                         "neurons_peak_rss": m0 + m1 * file_bytes
                         + scaling["neurons_extra_rss_1b"] * shape.n_ff / scaling["n_ff_1b"],
                         "redundancy_bytes": 3 * CoMoment.bytes_needed(shape.n_ff),
                         "reference_fp32_bytes": 4 * params + acts, "reference_activation_bytes": acts})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=20, help="prompts of the eval/neurons runs")
    ap.add_argument("--study-limits", default="4,16", help="two --limit values of the memory study")
    ap.add_argument("--kld-ctx", type=int, default=128)
    ap.add_argument("--kld-chunks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2, help="llama-bench repetitions")
    ap.add_argument("--models-dir", type=Path, default=None, help="default: $GGML_PROBE_MODELS or ./models")
    ap.add_argument("--speed-levels", default=",".join(LEVELS), help="the 1B levels of the eval/neurons timing")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed, kld, memory")
    ap.add_argument("--study-args", default="--layers=-1",
                    help="extra study options, e.g. --study-args=--no-redundancy (default: the neuron analyses at the "
                         "last layer only; at the paper's three layers, --study-args=, the default redundancy budget "
                         "correlates an evenly spaced subset of the 1B's neurons)")
    ap.add_argument("--name", default="scale", help="benchmarks/NAME.json and .md")
    ap.add_argument("--render", action="store_true", help="only rewrite NAME.md from NAME.json (--name)")
    ap.add_argument("--merge", default="", help="with --render: NAMEs of separate runs whose memory/kld parts to take")
    ap.add_argument("--note", action="append", default=[],
                    help="with --render: a reading of the figures, or one measured by hand (repeatable)")
    ap.add_argument("--child", choices=["eval", "neurons"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    if args.render:  # the fits and the page again, from the recorded figures
        result = json.loads((REPO / "benchmarks" / f"{args.name}.json").read_text())
        for part in args.merge.split(","):  # parts measured by separate runs (--name)
            if part:
                other = json.loads((REPO / "benchmarks" / f"{part}.json").read_text())
                taken = {k: v for k, v in other.items() if k in ("memory", "kld", "kld_error") and v}
                result.update(taken)
                result.setdefault("merged_runs", {})[part] = {"settings": other["settings"], "parts": sorted(taken),
                                                              "seconds": other["seconds"], "system": other["system"]}
        if result.get("kld"):
            result.pop("kld_error", None)
        if args.note:
            result["notes"] = args.note
        if result.get("speed"):
            _derive(result)
        (REPO / "benchmarks" / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str))
        (REPO / "benchmarks" / f"{args.name}.md").write_text(_markdown(result))
        return
    skip = {s for s in args.skip.split(",") if s}
    store = args.models_dir or models_dir()
    t_start = time.perf_counter()
    files = build("1b", DEFAULT_VOCAB, store, list(LEVELS[1:]), seed=0, threads=args.threads)
    demo_f16 = ladder_files("demo", ["F16"], allow_requantize=True, out_dir=store)["F16"]
    infos = {q: inspect_gguf(p) for q, p in files.items()}
    result: dict = {"settings": vars(args) | {"models_dir": str(store)},
                    "system": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                               "load_before": os.getloadavg()},
                    "files": {q: {"path": str(p), "file_bytes": p.stat().st_size, "n_params": infos[q].n_params,
                                  "bits_per_weight": infos[q].bits_per_weight} for q, p in files.items()},
                    "speed": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    speed_levels = [q for q in LEVELS if q in args.speed_levels.split(",")]
    models = {"demo F16": demo_f16, **{f"1B {q}": files[q] for q in speed_levels}}
    if "speed" not in skip:
        for label, path in models.items():
            row: dict = {"file_bytes": path.stat().st_size, "n_params": inspect_gguf(path).n_params}
            for command in ("eval", "neurons"):
                row[command] = _pass(command, path, args.limit, args.threads)
                print(f"{label} {command}: {row[command]['pass_tokens_per_s']:.1f} tok/s in the pass", flush=True)
            mean_prompt = round(row["eval"]["tokens"] / row["eval"]["prompts"])
            row["llama_bench"] = _llama_bench(path, mean_prompt, args.threads, args.reps)
            print(f"{label} llama-bench pp{mean_prompt}: {row['llama_bench']['tokens_per_s']:.1f} tok/s", flush=True)
            result["speed"][label] = row
    if "kld" not in skip:
        try:
            result["kld"] = _kld(files, args, work)
            print("kld:", {q: round(v["ggml_probe_tokens_per_s"] / v["llama_perplexity_tokens_per_s"], 2)
                           for q, v in result["kld"]["levels"].items()}, flush=True)
        except SystemExit as exc:  # keep the other parts' figures
            result["kld_error"] = str(exc)[-3000:]
    if "memory" not in skip:
        largest = max(files, key=lambda q: files[q].stat().st_size)
        mem = {"level": largest, "file_bytes": files[largest].stat().st_size, "runs": {}}
        mem["limit_bytes"] = 1.3 * mem["file_bytes"] + 300e6
        for limit in (int(x) for x in args.study_limits.split(",")):
            try:
                r = _run(_probe("study", str(files[largest]), "--quants", largest, "--task", TASK, "--limit", str(limit),
                                *args.study_args.split(),
                                "--threads", str(args.threads), "--gpu-layers", "0", "--kld-ctx", str(args.kld_ctx),
                                "--kld-chunks", str(args.kld_chunks), "-o", str(work / f"study-{limit}"), "--force",
                                "--json", "-q"), cwd=REPO)
            except SystemExit as exc:  # keep the other parts' figures
                mem["error"] = str(exc)[-3000:]
                break
            mem["runs"][limit] = {"peak_rss": r["peak_rss"], "seconds": r["seconds"],
                                  "command": r["command"].split(" -m ", 1)[-1]}
            print(f"study {largest} --limit {limit}: peak RSS {r['peak_rss'] / GB:.2f} GB", flush=True)
        result["memory"] = mem
    if result["speed"]:
        _derive(result)
    result["system"]["load_after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t_start
    bench = REPO / "benchmarks"
    if skip and (bench / f"{args.name}.json").exists():  # parts skipped this time keep their earlier figures
        earlier = json.loads((bench / f"{args.name}.json").read_text())
        for part in ("speed", "scaling", "extrapolation", "kld", "memory"):
            if not result.get(part) and earlier.get(part):
                result[part] = earlier[part]
    (bench / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str))
    (bench / f"{args.name}.md").write_text(_markdown(result))
    print((bench / f"{args.name}.md").read_text())


def _command(s: dict) -> str:
    return (f"python scripts/bench_scale.py --threads {s['threads']} --limit {s['limit']} "
            f"--study-limits {s['study_limits']} --kld-ctx {s['kld_ctx']} --kld-chunks {s['kld_chunks']} --reps {s['reps']} "
            f"--speed-levels {s['speed_levels']}" + (f" --skip {s['skip']}" if s.get("skip") else "")
            + (f" --name {s['name']}" if s.get("name", "scale") != "scale" else ""))


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def _markdown(r: dict) -> str:
    s = r["settings"]
    cmd = _command(s)
    lines = ["# Bigger models: a 1B llama shape, and the extrapolation to 7B and 8B (scripts/bench_scale.py)", "",
             f"Command: `{cmd}` · {r['system']['platform']}, {r['system']['cpu_count']} cores "
             f"(load average {r['system']['load_before'][0]:.1f} before, {r['system']['load_after'][0]:.1f} after) · "
             f"{s['threads']} threads, CPU, flash attention off everywhere · whole run {r['seconds'] / 60:.1f} min · "
             f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             *[f"Also merged from `{_command(m['settings'])}` ({', '.join(m['parts'])}; {m['seconds'] / 60:.1f} min, load "
               f"average {m['system']['load_before'][0]:.1f} before)" for m in r.get("merged_runs", {}).values()], "",
             "Model: random weights N(0, 0.02²) in the shape of a 1B llama (16 layers, 2048 wide, FFN 8192, 32 heads, "
             "8 KV heads, 32k vocabulary with LLaMA's SentencePiece tokenizer from ggml-vocab-llama-spm.gguf, untied "
             "output), written by `scripts/synthetic_model.py` at F16 and quantized by `ggml-probe quantize`. Speed "
             "and memory depend on the shape, not the values; answers and neurons of random weights mean nothing.", "",
             "| level | file GB | params | bits/weight |", "|---|---:|---:|---:|"]
    for q, f in r["files"].items():
        lines.append(f"| {q} | {_gb(f['file_bytes'])} | {f['n_params'] / 1e9:.3f} B | {f['bits_per_weight']:.2f} |")
    if r["speed"]:
        lines += ["", "## Throughput against llama.cpp's own tools", "",
                  f"`eval` and `neurons` on the built-in yes/no task, {s['limit']} prompts: the rate of the pass (prompts "
                  "2..N, timed per prompt: start-up, model load, the first prompt and the final analyses excluded), for "
                  "the neuron pass at layers 0, 14, -1 with every statistic but redundancy (below). Baseline: `llama-bench -p L -n 0 "
                  f"-r {s['reps']} -fa 0 -ngl 0` at L = the mean prompt length (eval decodes one prompt per llama_decode).", "",
                  "| model | llama-bench ppL tok/s | eval pass tok/s | **eval / llama-bench** | neurons pass tok/s "
                  "| **neurons / llama-bench** | eval peak RSS GB | neurons peak RSS GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, row in r["speed"].items():
            lb, e, n = row["llama_bench"], row["eval"], row["neurons"]
            lines.append(f"| {label} | pp{lb['pp']}: {lb['tokens_per_s']:.1f} ±{lb['sd']:.1f} | "
                         f"{e['pass_tokens_per_s']:.1f} | **{e['pass_tokens_per_s'] / lb['tokens_per_s']:.2f}** | "
                         f"{n['pass_tokens_per_s']:.1f} | **{n['pass_tokens_per_s'] / lb['tokens_per_s']:.2f}** | "
                         f"{_gb(e['peak_rss'])} | {_gb(n['peak_rss'])} |")
        lines += ["", "Commands (each its own process; seconds, tokens, peak RSS in scale.json):", ""]
        one = r["speed"]["1B F16"]
        lines += [f"- `{one['llama_bench']['command']}`"]
    if "kld" in r:
        k = r["kld"]
        lines += ["", "## `kld` against `llama-perplexity --kl-divergence`", "",
                  f"Text: {k['text']}; ctx {k['ctx']}, {k['chunks']} chunks, batch 2048, reference: the 1B F16. "
                  "Rates: each tool's own decode time after load (ggml-probe: `seconds` of its scoring pass; "
                  "llama-perplexity: the tokens of its pass over its printed 'seconds per pass').", "",
                  "| level | llama-perplexity tok/s | ggml-probe kld tok/s | **ratio** | KLD mean |", "|---|---:|---:|---:|---:|"]
        for q, v in k["levels"].items():
            lines.append(f"| {q} | {v['llama_perplexity_tokens_per_s']:.1f} | {v['ggml_probe_tokens_per_s']:.1f} | "
                         f"**{v['ggml_probe_tokens_per_s'] / v['llama_perplexity_tokens_per_s']:.2f}** | "
                         f"{'—' if v['kld_mean'] is None else format(v['kld_mean'], '.4f')} |")
        lines += ["", f"Command: `{k['command']}`"]
    if r.get("kld_error"):
        lines += ["", "## `kld` against `llama-perplexity --kl-divergence`", "", "Failed:", "", "```",
                  r["kld_error"][-1500:], "```"]
    if "memory" in r:
        m = r["memory"]
        lines += ["", "## Peak memory of a study on the largest level", "",
                  f"`ggml-probe study` on the 1B {m['level']} alone ({_gb(m['file_bytes'])} GB file), peak RSS of the "
                  f"process (ru_maxrss from wait4). Goal: ≤ 1.3 × file + 300 MB = {_gb(m['limit_bytes'])} GB, and flat "
                  "in the number of examples.", "", "| --limit | peak RSS GB | / goal | seconds |", "|---:|---:|---:|---:|"]
        for limit, run in m["runs"].items():
            lines.append(f"| {limit} | {_gb(run['peak_rss'])} | {run['peak_rss'] / m['limit_bytes']:.2f} | {run['seconds']:.0f} |")
        if m["runs"]:
            lines += ["", f"Command: `{next(iter(m['runs'].values()))['command']}`"]
        if m.get("error"):
            lines += ["", "The study failed:", "", "```", m["error"][-1500:], "```"]
    if "extrapolation" in r:
        sc = r["scaling"]
        lines += ["", "## Extrapolation to 7B and 8B", "",
                  f"| shape | params | level | file GB | eval tok/s ({s['threads']} thread(s)) | eval peak RSS GB | "
                  "neurons peak RSS GB (no redundancy) | + redundancy at 3 layers GB | reference stack fp32 GB |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for row in r["extrapolation"]:
            lines.append(f"| {row['target']} | {row['params'] / 1e9:.2f} B | {row['level']} | {_gb(row['file_bytes'])} | "
                         f"{row['eval_tokens_per_s']:.2f} | {_gb(row['peak_rss'])} | {_gb(row['neurons_peak_rss'])} | "
                         f"+{_gb(row['redundancy_bytes'])} | {_gb(row['reference_fp32_bytes'])} |")
        lines += ["", "Assumptions, each a simplification:",
                  f"- eval's per-token cost is a straight line in the parameter count through the two F16 points "
                  f"measured here (demo 135M: {sc['seconds_per_token'][0] * 1e3:.2f} ms/token, 1B: "
                  f"{sc['seconds_per_token'][1] * 1e3:.2f} ms/token); same threads, same CPU, same load, prompts as short "
                  "as these (attention's cost, quadratic in length, is ignored).",
                  f"- a quantized level's cost is the F16 cost × (its size / the F16 size)^{sc['size_exponent']:.2f}, the "
                  f"exponent fitted on the 1B's timed levels ({', '.join(k[3:] for k in r['speed'] if k.startswith('1B'))}).",
                  "- the file size is params × the 1B level's bits/weight / 8 (Llama 3's 128k embedding is the same type mix).",
                  "- ggml-probe's peak RSS is a straight line in the file size through the demo F16 and 1B F16 eval runs "
                  "(weights mmapped and resident; KV cache, buffers and accumulators grow with width, not only with size).",
                  f"- the neuron pass without redundancy adds to eval's peak what it added on the 1B F16 "
                  f"({_gb(sc['neurons_extra_rss_1b'])} GB), scaled by n_ff / {sc['n_ff_1b']} (per-neuron statistics and "
                  "top tokens). The redundancy analysis of every neuron adds its n_ff × n_ff co-moments, 2 × 8 × n_ff² "
                  "bytes per layer (`CoMoment.bytes_needed`), at the paper's 3 layers: 3.2 GB at the 1B's n_ff 8192. "
                  "By default it is held to `--redundancy-budget` (256 MiB): on the 1B, the 7B and the 8B an evenly "
                  "spaced subset of each layer's neurons is correlated instead, and the run says so "
                  "(benchmarks/redundancy-budget.md); `--redundancy-full` asks for every neuron.",
                  "- the reference stack (the paper's: transformers fp32, batch 16, act_fn hooks) needs 4 bytes per "
                  "parameter plus fp32 activations at batch 16 × 256 tokens: every layer's hidden state (output_hidden_states), "
                  "3 hooked FFN layers and one logit row per sequence position; its optimizer-free forward keeps no "
                  "gradients. It ignores the CUDA/PyTorch allocator's overhead.",
                  "- 7B: Llama 2's shape (32 layers, 4096, FFN 11008, MHA, 32k vocabulary); 8B: Llama 3's (32 layers, 4096, "
                  "FFN 14336, 8 KV heads, 128,256 vocabulary)."]
    if r.get("notes"):
        lines += ["", "## Reading it", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
