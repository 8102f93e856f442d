"""The neuron part of a study: per-level figures from a run's neuron files, salient neurons by the
exact last-layer integrated gradients, and the comparison of every level with the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .rundir import read_json, write_json

SALIENT_METHOD = ("exact integrated gradients of the last layer's act neurons (closed form from the GGUF weights, "
                  "50-point Gauss-Legendre, token-0 baseline, target = the model's own answer token); earlier "
                  "layers are not attributed (they need gradients through later attention)")
# The closed-form integral is exact to rounding; a larger error would mean a broken computation.
COMPLETENESS_TOLERANCE = 1e-3


def _salient(run_dir: Path, model_path: Path, prompts: list[str], config, progress) -> dict[str, Any]:
    """Salient last-layer neurons of this level, cached in RUN_DIR/salient.json."""
    from .engine.capture import last_layer_attribution

    cache = run_dir / "salient.json"
    n = min(config.salient_examples, len(prompts))
    if cache.exists():
        cached = read_json(cache)
        if cached.get("n_prompts") == n and cached.get("threshold") == config.saliency:
            return cached
    if progress:
        progress.step(f"salient neurons (exact last-layer IG) on {n} prompts · {run_dir.parent.name}/{run_dir.name}")
    attr = last_layer_attribution(model_path, prompts[:n], n_points=50, n_ctx=config.n_ctx, n_threads=config.threads,
                                  gpu_layers=config.gpu_layers)
    summary = attr.salient(config.saliency)
    gap = (attr.attributions.sum(axis=1) - attr.real_change) if attr.real_change is not None else None
    result = {
        "layer": int(attr.layer), "n_prompts": n, "threshold": config.saliency, "method": SALIENT_METHOD,
        "union": [int(i) for i in summary.union], "count": int(len(summary.union)),
        "ranking": [int(i) for i in summary.ranking[:20]],
        "frequency_top": [int(summary.frequency[i]) for i in summary.ranking[:20]],
        "completeness_error_max": float(np.abs(attr.completeness_error).max()),
        "converged": bool(np.abs(attr.completeness_error).max() < COMPLETENESS_TOLERANCE),
        "llama_gap_mean": float(np.abs(gap).mean()) if gap is not None else None,
        "llama_gap_max": float(np.abs(gap).max()) if gap is not None else None,
    }
    write_json(cache, result)
    return result


def _top_tokens(run_dir: Path, model_path: Path, prompts: list[str], definition: str, layer: int,
                neurons: list[int]) -> dict[str, list]:
    """Top-activating tokens (with left context) of chosen neurons, from the run's final neuron state."""
    from .analysis.neurons import NeuronAccumulator, top_token_contexts
    from .engine.model import Vocab

    states = sorted((run_dir / "neuron_state").glob("*.npz"))
    if not states or not neurons:
        return {}
    acc = NeuronAccumulator.load(states[-1])
    top = acc.top.get((definition, layer))
    if top is None:
        return {}
    with Vocab(model_path) as vocab:
        tokens = [vocab.tokenize(p) for p in prompts]
        out = {}
        for j in neurons:
            rows = top_token_contexts(top, j, tokens, vocab.token_to_piece)
            out[str(j)] = [[r["token"], r["context"], r["value"]] for r in rows]
    return out


def neuron_level(run_dir: Path, model_path: Path, prompts: list[str], config, progress=None) -> dict[str, Any]:
    nj = read_json(run_dir / "neurons.json")
    entries = [e for e in nj["layers"] if e["definition"] == config.neuron]
    level: dict[str, Any] = {
        "layers": [e["layer"] for e in entries], "neuron": config.neuron, "tau": config.tau,
        "n_ff": entries[0]["n_ff"] if entries else None, "tokens": entries[0]["tokens"] if entries else 0,
        "dead": {str(e["layer"]): e["dead"] for e in entries},
        "dead_ids": {str(e["layer"]): e["dead_ids"] for e in entries},
        "max_abs_quantiles": {str(e["layer"]): list(e["max_abs_quantiles"].values()) for e in entries},
        "redundant_pairs": {str(e["layer"]): e["redundancy"]["pairs_above"] for e in entries if "redundancy" in e},
        "redundancy_groups": {str(e["layer"]): e["redundancy"]["groups"] for e in entries if "redundancy" in e},
        "redundancy_threshold": next((e["redundancy"]["threshold"] for e in entries if "redundancy" in e), None),
        "redundancy_hist": [int(x) for x in np.sum([e["redundancy"]["histogram"] for e in entries
                                                    if "redundancy" in e], axis=0)] if entries else [],
        "top_tokens": {},
    }
    last = max(level["layers"]) if level["layers"] else None
    try:
        sal = _salient(run_dir, model_path, prompts, config, progress) if config.salient_examples > 0 else None
    except Exception as exc:  # an architecture the exact method does not cover: say so, keep the rest
        from .errors import ProbeError

        if not isinstance(exc, ProbeError):
            raise
        sal = None
        level["salient_note"] = str(exc)
    if sal:
        level["salient"] = {str(sal["layer"]): sal["count"]}
        level["salient_ids"] = {str(sal["layer"]): sal["union"]}
        level["salient_method"] = sal["method"]
        level["salient_converged"] = {str(sal["layer"]): sal["converged"]}
        level["salient_detail"] = sal
        # Tokens of the most salient neurons need that layer's activations from the same run.
        if sal["layer"] == last and config.neuron == "act":
            level["top_tokens"][str(last)] = _top_tokens(run_dir, model_path, prompts, "act", last, sal["ranking"][:5])
    for e in entries:  # other layers: the strongest neurons' tokens, as the run recorded them
        key = str(e["layer"])
        if key not in level["top_tokens"] and e.get("top_tokens"):
            level["top_tokens"][key] = {j: [[r["token"], r["context"], r["value"]] for r in rows]
                                        for j, rows in list(e["top_tokens"].items())[:5]}
    return level


def neuron_comparison(run_dirs: dict[str, Path], reference: str, levels: dict[str, dict]) -> dict[str, Any]:
    from .neurons_run import compare_neurons

    out = {}
    ref = levels[reference]
    for lvl, d in run_dirs.items():
        if lvl == reference:
            continue
        raw = compare_neurons(run_dirs[reference], d)
        entry: dict[str, Any] = {"dead_jaccard": {}, "drift": {}, "salient_jaccard": {}}
        for key, v in raw.items():
            definition, layer = key.split("/")
            if definition != levels[lvl]["neuron"]:
                continue
            entry["dead_jaccard"][layer] = v["dead_jaccard"]
            entry["drift"][layer] = {"mean": v["drift_mean_abs"], "max": v["drift_mean_max"],
                                     "relative": v["drift_relative"], "std": v["drift_std_abs"]}
        for layer, ids in (levels[lvl].get("salient_ids") or {}).items():
            ref_ids = set((ref.get("salient_ids") or {}).get(layer, []))
            union = ref_ids | set(ids)
            entry["salient_jaccard"][layer] = len(ref_ids & set(ids)) / len(union) if union else 1.0
        out[lvl] = entry
    return out
