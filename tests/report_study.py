"""Builds a study dict for the report tests from real runs of a real GGUF ladder (no numbers made up).

Every number comes from ggml_probe's own pipeline on the given files: evaluate + compare_levels for the
output level, collect_neuron_stats (llama.cpp eval callback) for dead/redundancy/top tokens, the exact
last-layer integrated gradients for salient neurons, compare_weights for the weight error.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def build_study(ladder: dict[str, Path], out: Path, task: str = "yesno-mini", limit: int = 8,
                layers: Sequence[int] = (0, -1), reference: str | None = None, ig_points: int = 16) -> dict:
    import pandas as pd

    from ggml_probe import __version__
    from ggml_probe.analysis.calibration import reliability_bins
    from ggml_probe.pipeline.compare import compare_levels
    from ggml_probe.pipeline.neuron_stats import collect_neuron_stats
    from ggml_probe.attribution.exact import last_layer_attribution
    from ggml_probe.engine.ffn import model_ffn
    from ggml_probe.layerspec import resolve_layers
    from ggml_probe.engine.model import Engine
    from ggml_probe.pipeline.evaluation import EvalConfig, evaluate
    from ggml_probe.report.study_report import neuron_comparison, neurons_section, weights_section, what_changed
    from ggml_probe.tasks import load_examples
    from ggml_probe.weights.error import compare_weights

    t0 = time.perf_counter()
    levels = list(ladder)
    reference = reference or levels[0]
    config = EvalConfig(task=task, limit=limit, n_boot=200)
    summaries = {lvl: evaluate(path, config, out / "runs" / lvl, quant_label=lvl) for lvl, path in ladder.items()}
    run_dirs = {lvl: s.run_dir for lvl, s in summaries.items()}
    comparison = compare_levels(run_dirs, reference=reference, n_boot=200)

    reliability = {}
    for lvl, d in run_dirs.items():
        pred = pd.read_parquet(d / "predictions.parquet")
        reliability[lvl] = {
            "label_set": reliability_bins(pred["confidence"].to_numpy(), pred["correct"].to_numpy()).rows(),
            "paper": reliability_bins(pred["paper_confidence"].to_numpy(), pred["paper_correct"].to_numpy()).rows(),
        }

    data = load_examples(task, limit=limit)
    prompts = [ex.prompt for ex in data.examples]
    n_layer = model_ffn(ladder[reference]).n_layer
    chosen = resolve_layers(list(layers), n_layer)
    last = n_layer - 1
    accs, salient_ids, neurons, converged = {}, {}, {}, {}
    for lvl, path in ladder.items():
        acc, tokens = collect_neuron_stats(path, prompts, chosen, ["act"], redundancy=True, top_k=5)
        accs[lvl] = acc
        if last in chosen:
            attr = last_layer_attribution(path, prompts, n_points=ig_points, check_real_change=False)
            summary = attr.salient(0.7)
            salient_ids[lvl] = {last: [int(i) for i in summary.ranking]}
            converged[lvl] = {last: bool(np.max(np.abs(attr.completeness_error)) < 1e-3)}
        with Engine(path, hidden_states=False) as engine:
            pieces = {}

            def piece(t: int, engine=engine, pieces=pieces) -> str:
                if t not in pieces:
                    pieces[t] = engine.token_to_piece(t)
                return pieces[t]

            neurons[lvl] = neurons_section(acc, "act", 0.1, salient=salient_ids.get(lvl),
                                           salient_method=f"exact last-layer IG ({ig_points}-point Gauss–Legendre)",
                                           salient_converged=converged.get(lvl), prompt_tokens=tokens, piece=piece)
    ncomp = {lvl: neuron_comparison(accs[reference], accs[lvl], "act", 0.1,
                                    reference_salient=salient_ids.get(reference), level_salient=salient_ids.get(lvl))
             for lvl in levels if lvl != reference}

    weights = {lvl: weights_section(compare_weights(path, ladder[reference], layers="0,-1", tensors="ffn_*"))
               for lvl, path in ladder.items() if lvl != reference}

    level_info = {}
    for lvl, s in summaries.items():
        m = s.manifest["model"]
        level_info[lvl] = {k: m.get(k) for k in ("file_type", "path", "sha256", "size_bytes", "bits_per_weight",
                                                  "tensor_types", "requantized_from")}
        level_info[lvl]["engine"] = s.manifest.get("engine", {})
    first = next(iter(summaries.values())).manifest
    study = {
        "study": {"model": "SmolLM2-135M-Instruct (demo)", "quants": levels, "reference": reference, "tasks": [task],
                  "mode": "default",
                  "definitions": {**first.get("definitions", {}).get("scoring", {}),
                                  **{k: v for k, v in (next(iter(summaries.values())).metrics["label_set"]["definitions"]).items()}},
                  "created": time.strftime("%Y-%m-%d %H:%M"),
                  "tool": {"ggml_probe": __version__, "python": platform.python_version(),
                           **{k: v for k, v in first.get("tool", {}).items() if k != "llama_cpp_system_info"}},
                  "command": f"tests/report_study.py build_study(limit={limit})",
                  "seconds": 0.0},
        "levels": level_info,
        "tasks": {task: {"data": {"task": task, "source": data.source, "data_sha256": data.data_sha256,
                                  "examples": len(data.examples), "label_counts": data.label_counts(),
                                  "fallback_from": None},
                         "runs": {lvl: {"run_dir": str(run_dirs[lvl]), "metrics": s.metrics} for lvl, s in summaries.items()},
                         "comparison": comparison,
                         "reliability": reliability,
                         "neurons": neurons,
                         "neuron_comparison": ncomp}},
        "weights": weights,
    }
    study["study"]["seconds"] = time.perf_counter() - t0
    study["what_changed"] = what_changed(study)
    return study
