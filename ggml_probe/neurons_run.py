"""Turning a run's neuron accumulator into files: neurons.json (figures) and neuron_stats.npz (arrays).

neuron_stats.npz keeps, per definition and layer, the per-neuron moments other levels are compared
against (activation drift, dead-set overlap); neurons.json holds what the report shows.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .rundir import save_npz, write_json

QUANTILES = (0, 10, 50, 90, 100)


def finalize_neurons(run_dir: Path, acc, engine, data, settings) -> dict[str, Any]:
    """Write neurons.json and neuron_stats.npz for a finished run; returns a short summary."""
    from .analysis.neurons import top_token_contexts

    prompt_tokens = [engine.tokenize(ex.prompt) for ex in data.examples]
    piece_cache: dict[int, str] = {}

    def piece(token: int) -> str:
        if token not in piece_cache:
            piece_cache[token] = engine.token_to_piece(token)
        return piece_cache[token]

    arrays: dict[str, np.ndarray] = {}
    layers_out: list[dict[str, Any]] = []
    for (definition, layer), stats in acc.stats.items():
        key = f"{definition}/{layer}"
        dead_ids = stats.dead(settings.tau)
        entry: dict[str, Any] = {
            "definition": definition, "layer": layer, "tokens": int(stats.count), "n_ff": int(acc.n_ff),
            "tau": settings.tau, "dead": int(len(dead_ids)), "dead_ids": [int(i) for i in dead_ids],
            "max_abs_quantiles": dict(zip((f"q{q}" for q in QUANTILES),
                                          (float(v) for v in np.percentile(stats.maxabs, QUANTILES)))),
            "mean_fraction_positive": float(np.mean(stats.fraction_positive)) if stats.count else None,
        }
        if acc.redundancy and stats.count > 1:
            red = acc.redundancy_summary(definition, layer, settings.redundancy_threshold, settings.cluster_threshold)
            entry["redundancy"] = {"histogram": [int(x) for x in red.histogram], "pairs_above": red.pairs_above,
                                   "threshold": red.threshold, "groups": red.n_groups,
                                   "cluster_threshold": red.cluster_threshold, "constant_neurons": red.n_constant}
        if acc.top_k and stats.count:
            # Until saliency is computed, show the neurons with the largest activations.
            strongest = np.argsort(-stats.maxabs, kind="stable")[:10]
            entry["top_tokens"] = {int(j): top_token_contexts(acc.top[(definition, layer)], int(j), prompt_tokens, piece)
                                   for j in strongest}
        layers_out.append(entry)
        arrays.update({f"{key}/mean": stats.mean, f"{key}/var": stats.variance, f"{key}/maxabs": stats.maxabs,
                       f"{key}/min": stats.min, f"{key}/max": stats.max})
    save_npz(run_dir / "neuron_stats.npz", **arrays)
    result = {"settings": asdict(settings), "layers": layers_out, "prompts": len(prompt_tokens)}
    write_json(run_dir / "neurons.json", result)
    return {"layers": [e["layer"] for e in layers_out], "definitions": list(acc.definitions),
            "dead": {f"{e['definition']}/{e['layer']}": e["dead"] for e in layers_out}}


def compare_neurons(ref_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Against the reference level: dead-set Jaccard and per-neuron activation drift, per layer."""
    from .rundir import read_json

    ref, cur = read_json(ref_dir / "neurons.json"), read_json(run_dir / "neurons.json")
    ref_stats, cur_stats = np.load(ref_dir / "neuron_stats.npz"), np.load(run_dir / "neuron_stats.npz")
    ref_by = {(e["definition"], e["layer"]): e for e in ref["layers"]}
    out: dict[str, Any] = {}
    for e in cur["layers"]:
        k = (e["definition"], e["layer"])
        if k not in ref_by:
            continue
        key = f"{k[0]}/{k[1]}"
        a, b = set(ref_by[k]["dead_ids"]), set(e["dead_ids"])
        d_mean = cur_stats[f"{key}/mean"] - ref_stats[f"{key}/mean"]
        d_std = np.sqrt(cur_stats[f"{key}/var"]) - np.sqrt(ref_stats[f"{key}/var"])
        d_max = cur_stats[f"{key}/maxabs"] - ref_stats[f"{key}/maxabs"]
        scale = np.sqrt(ref_stats[f"{key}/var"]).mean() or 1.0
        out[key] = {
            "dead_jaccard": (len(a & b) / len(a | b)) if (a | b) else 1.0,
            "drift_mean_abs": float(np.abs(d_mean).mean()),
            "drift_mean_max": float(np.abs(d_mean).max()),
            "drift_std_abs": float(np.abs(d_std).mean()),
            "drift_maxabs_abs": float(np.abs(d_max).mean()),
            "drift_relative": float(np.abs(d_mean).mean() / scale),
            "most_drifted": [int(i) for i in np.argsort(-np.abs(d_mean))[:10]],
        }
    return out
