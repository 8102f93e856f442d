#!/usr/bin/env bash
# ggml-probe on an NVIDIA GPU: build llama-cpp-python (and llama-bench) with CUDA, run eval, neurons
# (capture, salient neurons and the ablation patch, on device tensors with full offload) and kld on the
# demo and on the synthetic 1B, check that CPU and GPU agree (tolerances: scripts/gpu_compare.py), and
# record throughput against llama-bench built with CUDA from the same llama.cpp source.
#
#   scripts/gpu_check.sh                # on a machine with an NVIDIA GPU, nvcc and cmake
#   scripts/gpu_check.sh --cpu-only     # the same steps with no offload (the "device" side is the CPU
#                                       # with another thread count): tests the script up to the CUDA build
#   scripts/gpu_check.sh --quick        # the demo only (no 1B model)
#
# Environment: OUT (results, default ./gpu-check), PYTHON (a Python with ggml-probe's dependencies,
# default python3), LLAMA_SDIST (a local llama_cpp_python-0.3.36.tar.gz for an offline machine; default:
# the one scripts/llama_tools.py keeps, else pip downloads it; offline, pip also needs the build backend
# scikit-build-core where it can find it, e.g. PIP_FIND_LINKS=a wheel folder), GGML_PROBE_MODELS (where models are
# built, default $OUT/models), LIMIT (prompts, 20), THREADS (CPU threads, all cores), SHARED (the
# shared data folder holding boolq_validation.jsonl, default ../shared/data), BENCH_P, BENCH_N, BENCH_R
# (the throughput tests: -p 128,512 -n 128 -r 3).
# Results: $OUT/summary.md and summary.json, every run's JSON under $OUT/runs, the log in $OUT/log.txt.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$PWD/gpu-check}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-20}
THREADS=${THREADS:-$(nproc)}
SHARED=${SHARED:-$REPO/../shared/data}
BENCH_P=${BENCH_P:-128,512}  # llama-bench -p / -n / -r of the throughput step
BENCH_N=${BENCH_N:-128}
BENCH_R=${BENCH_R:-3}
LLAMA_VERSION=0.3.36
CPU_ONLY=0
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --cpu-only) CPU_ONLY=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/runs"
OUT=$(cd "$OUT" && pwd)
MODELS=${GGML_PROBE_MODELS:-$OUT/models}
export GGML_PROBE_MODELS=$MODELS
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
LOG=$OUT/log.txt
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }
die() { log "FAILED: $*"; exit 1; }
step() { log "$1"; shift; "$@" >>"$LOG" 2>&1 || die "$(printf '%q ' "$@")"; }

log "gpu_check: OUT=$OUT cpu_only=$CPU_ONLY quick=$QUICK limit=$LIMIT threads=$THREADS"
"$PY" -c "import ggml_probe, llama_cpp" 2>>"$LOG" || die "$PY cannot import ggml_probe and llama_cpp (pip install -e '$REPO')"
TOOLS_SRC=$("$PY" -c "import sys; sys.path.insert(0, '$REPO/scripts'); import llama_tools; print(llama_tools.tools_dir())")

# --------------------------------------------------------------------------- 1. the builds
if [ "$CPU_ONLY" = 1 ]; then
  DEV_PY=$PY
  DEV_LAYERS=0
  DEV_THREADS=$(( THREADS > 1 ? THREADS / 2 : 1 ))  # another thread count: real CPU-side noise to compare
  step "llama.cpp tools (CPU build, scripts/llama_tools.py)" "$PY" "$REPO/scripts/llama_tools.py"
  BENCH_BIN=$("$PY" "$REPO/scripts/llama_tools.py" | tail -1)
  echo '{"device": "CPU only (--cpu-only): no offload"}' > "$OUT/device.json"
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here (use --cpu-only to test the script)"
  command -v nvcc >/dev/null || die "nvcc not found: the CUDA toolkit is needed to build llama.cpp with CUDA"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.csv" >>"$LOG"
  "$PY" -c "import json,subprocess; print(json.dumps({'device': subprocess.check_output(['nvidia-smi','--query-gpu=name,memory.total','--format=csv,noheader'], text=True).strip()}))" > "$OUT/device.json"
  DEV_LAYERS=999
  DEV_THREADS=$THREADS
  SDIST=${LLAMA_SDIST:-$TOOLS_SRC/llama_cpp_python-$LLAMA_VERSION.tar.gz}
  [ -f "$SDIST" ] || SDIST="llama-cpp-python==$LLAMA_VERSION"
  # its own venv, seeing this Python's packages (ggml-probe's dependencies), with a CUDA llama-cpp-python
  step "venv for the CUDA build" "$PY" -m venv --system-site-packages "$OUT/venv-cuda"
  DEV_PY=$OUT/venv-cuda/bin/python
  export CMAKE_ARGS="-DGGML_CUDA=on" FORCE_CMAKE=1
  step "building llama-cpp-python $LLAMA_VERSION with CUDA from $SDIST (several minutes)" \
    "$DEV_PY" -m pip install --no-deps --force-reinstall --no-cache-dir "$SDIST"
  unset CMAKE_ARGS FORCE_CMAKE
  "$DEV_PY" -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'built without GPU offload'" >>"$LOG" 2>&1 \
    || die "the CUDA build of llama-cpp-python does not offload"
  if [ -f "$SDIST" ]; then  # the vendored llama.cpp of the same sdist (no network needed)
    mkdir -p "$OUT/src" && tar -xzf "$SDIST" -C "$OUT/src"
    SRC=$OUT/src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
  else
    SRC=$("$PY" -c "import sys; sys.path.insert(0, '$REPO/scripts'); import llama_tools; print(llama_tools.source_dir())")
  fi
  step "llama-bench and llama-perplexity with CUDA (the same vendored source)" \
    cmake -S "$SRC" -B "$OUT/llama-cuda" -DGGML_CUDA=on -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
  step "  compiling" cmake --build "$OUT/llama-cuda" -j "$(nproc)" --target llama-bench llama-perplexity
  BENCH_BIN=$OUT/llama-cuda/bin
fi

# --------------------------------------------------------------------------- 2. the models
step "demo ladder (F16, Q8_0)" "$PY" -m ggml_probe quantize demo --allow-requantize --to F16 --to Q8_0 -o "$MODELS" --skip-existing
MODEL_LIST=("$MODELS/SmolLM2-135M-Instruct-F16.gguf")
KLD_PAIRS=("$MODELS/SmolLM2-135M-Instruct-F16.gguf:$MODELS/SmolLM2-135M-Instruct-Q8_0.gguf")
if [ "$QUICK" = 0 ]; then
  step "synthetic 1B (F16, Q4_K_M)" "$PY" "$REPO/scripts/synthetic_model.py" --out-dir "$MODELS" --quants Q4_K_M --threads "$THREADS"
  MODEL_LIST+=("$MODELS/synthetic-llama-1b-F16.gguf" "$MODELS/synthetic-llama-1b-Q4_K_M.gguf")
  KLD_PAIRS+=("$MODELS/synthetic-llama-1b-F16.gguf:$MODELS/synthetic-llama-1b-Q4_K_M.gguf")
fi
TEXT=$OUT/kld-text.txt
"$PY" - "$SHARED/boolq_validation.jsonl" "$TEXT" <<'EOF' || die "the KLD text (BoolQ passages) could not be written"
import json, sys
with open(sys.argv[1]) as f:
    passages = [json.loads(line)["passage"] for _, line in zip(range(60), f)]
open(sys.argv[2], "w").write("\n\n".join(passages))
EOF

# --------------------------------------------------------------------------- 3. CPU against the device
# side: cpu (this Python, no offload) or dev (the CUDA build, every layer offloaded)
side_args() { if [ "$1" = cpu ]; then echo "$PY 0 $THREADS"; else echo "$DEV_PY $DEV_LAYERS $DEV_THREADS"; fi; }
FAILED=0
for model in "${MODEL_LIST[@]}"; do
  name=$(basename "$model" .gguf)
  for cmd in eval neurons; do
    for side in cpu dev; do
      read -r py layers threads <<<"$(side_args $side)"
      dir=$OUT/runs/$name/$side/$cmd
      extra=()
      [ "$cmd" = neurons ] && extra=(--salient-examples 5 --ablate-top 5)  # capture, attribution, ablation patch
      start=$(date +%s%N)
      step "$name $cmd ($side, gpu layers $layers)" "$py" -m ggml_probe "$cmd" "$model" --task yesno-mini --limit "$LIMIT" \
        --threads "$threads" --gpu-layers "$layers" -o "$dir" --force --json -q "${extra[@]}"
      awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "{\"seconds\": %.3f}\n", (b - a) / 1e9 }' > "$dir/timing.json"
    done
    if ! "$PY" "$REPO/scripts/gpu_compare.py" "$cmd" "$OUT/runs/$name/cpu/$cmd" "$OUT/runs/$name/dev/$cmd" \
        > "$OUT/runs/$name/compare-$cmd.json" 2>>"$LOG"; then
      log "  $name $cmd: CPU and device DISAGREE beyond the tolerance (runs/$name/compare-$cmd.json)"; FAILED=1
    else
      log "  $name $cmd: CPU and device agree"
    fi
  done
done
for pair in "${KLD_PAIRS[@]}"; do
  ref=${pair%%:*}; model=${pair##*:}; name=$(basename "$model" .gguf)
  mkdir -p "$OUT/runs/$name"
  for side in cpu dev; do
    read -r py layers threads <<<"$(side_args $side)"
    log "$name kld against $(basename "$ref") ($side)"
    "$py" -m ggml_probe kld "$model" --ref "$ref" --text "$TEXT" --ctx 256 --chunks 8 --threads "$threads" \
      --gpu-layers "$layers" -o "$OUT/runs/$name/$side/kld" --json -q > "$OUT/runs/$name/kld-$side.json" 2>>"$LOG" \
      || die "kld $name ($side)"
  done
  if ! "$PY" "$REPO/scripts/gpu_compare.py" kld "$OUT/runs/$name/kld-cpu.json" "$OUT/runs/$name/kld-dev.json" \
      > "$OUT/runs/$name/compare-kld.json" 2>>"$LOG"; then
    log "  $name kld: CPU and device DISAGREE beyond the tolerance"; FAILED=1
  else
    log "  $name kld: CPU and device agree"
  fi
done

# --------------------------------------------------------------------------- 4. throughput against llama-bench
for model in "${MODEL_LIST[@]}"; do
  name=$(basename "$model" .gguf)
  step "$name: ggml-probe bench (device)" sh -c "'$DEV_PY' -m ggml_probe bench '$model' -p $BENCH_P -n $BENCH_N -r $BENCH_R \
    --threads $DEV_THREADS --gpu-layers $DEV_LAYERS --json -q > '$OUT/runs/$name/bench.json'"
  step "$name: llama-bench (device)" sh -c "'$BENCH_BIN/llama-bench' -m '$model' -p $BENCH_P -n $BENCH_N -r $BENCH_R \
    -t $DEV_THREADS -ngl $DEV_LAYERS -fa 0 -o json > '$OUT/runs/$name/llama-bench.json'"
done

# --------------------------------------------------------------------------- 5. the summary
"$PY" - "$OUT" "$CPU_ONLY" <<'EOF' || die "summary"
import json, sys
from pathlib import Path

out, cpu_only = Path(sys.argv[1]), sys.argv[2] == "1"
device = json.loads((out / "device.json").read_text())["device"]
summary = {"device": device, "cpu_only": cpu_only, "models": {}}
lines = [f"# gpu_check: {device}", "",
         "CPU only (--cpu-only): the 'device' side is the CPU with another thread count; no GPU was used." if cpu_only
         else "Device: every layer offloaded (--gpu-layers 999); CPU: --gpu-layers 0.", "",
         "| model | eval | neurons | kld | ggml-probe / llama-bench (device) |", "|---|---|---|---|---|"]
for d in sorted(p for p in (out / "runs").iterdir() if p.is_dir()):
    m = {}
    for kind in ("eval", "neurons", "kld"):
        f = d / f"compare-{kind}.json"
        m[kind] = json.loads(f.read_text()) if f.exists() else None
    ratios = {}
    if (d / "bench.json").exists() and (d / "llama-bench.json").exists():
        (ours,) = json.loads((d / "bench.json").read_text())["levels"].values()
        for t in json.loads((d / "llama-bench.json").read_text()):
            name = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
            if name in ours["tests"]:
                ratios[name] = {"ggml_probe": ours["tests"][name]["tokens_per_second"], "llama_bench": t["avg_ts"],
                                "ratio": ours["tests"][name]["tokens_per_second"] / t["avg_ts"]}
        m["vram_used_bytes"] = ours["memory"].get("vram_used_bytes")
    m["speed"] = ratios
    for kind in ("eval", "neurons"):
        t = d / "dev" / kind / "timing.json"
        if t.exists():
            m.setdefault("seconds", {})[kind] = {s: json.loads((d / s / kind / "timing.json").read_text())["seconds"]
                                                 for s in ("cpu", "dev")}
    summary["models"][d.name] = m
    cell = lambda c: "—" if c is None else ("agree" if c["ok"] else "**DISAGREE**")
    speed = ", ".join(f"{k} {v['ggml_probe']:.0f}/{v['llama_bench']:.0f} = {v['ratio']:.2f}" for k, v in ratios.items()) or "—"
    lines.append(f"| {d.name} | {cell(m['eval'])} | {cell(m['neurons'])} | {cell(m['kld'])} | {speed} |")
lines += ["", "Tolerances: scripts/gpu_compare.py (its docstring says why). Every figure: summary.json and runs/."]
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
if [ "$FAILED" = 1 ]; then log "done: some comparisons failed (see summary.md)"; exit 1; fi
log "done: $OUT/summary.md"
