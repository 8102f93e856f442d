"""Neuron statistics of mixture-of-experts models: the engine's MoECapture wired to the analysis's
ExpertAccumulator, and the run's files.

A run on an MoE model writes the dense run's files (neurons.json's per-layer entries, neuron_stats.npz),
a layer's neurons being every expert's (id = expert · n_ff + i, each counted over the tokens routed to its
expert), so the comparisons across levels apply unchanged; neurons.json's `experts` section adds, per
layer, how often each expert was routed and per expert its tokens and dead neurons; neuron_stats.npz adds
each token's top-k experts per layer (routing/L/prompt, pos, sets), which the level comparison's
routing_agreement reads.

    probe_class, finalize = neuron_pass_for(model_path)   # dense or MoE, from the GGUF's metadata
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..analysis.experts import ROUTE_FIELDS, ExpertAccumulator, ExpertLayerStats
from ..analysis.neurons import top_token_contexts
from ..engine.ffn import DEFINITIONS
from ..engine.moe_capture import MoECapture, model_moe
from ..errors import ProbeError
from ..layerspec import resolve_layers
from .neuron_stats import CaptureProbe, NeuronProbe
from .neurons import QUANTILES, cached_pieces, finalize_neurons
from .rundir import save_npz, write_json
from .tokens import decoded_tokens


# What the attribution methods cannot do for these models, in one line (pipeline and CLI say it).
MOE_ATTRIBUTION_NOTE = ("mixture of experts: salient neurons (exact, ig, dla) and the ablation check are not supported; "
                        "per-expert neuron statistics and routing counts only")
# What a level's activation drift against the reference means here: quantization changes the routing too.
MOE_DRIFT_NOTE = ("over each level's own routed tokens: an expert's means cover the tokens routed to it in that level, "
                  "so drift mixes routing changes with activation changes (routing_agreement: the share of tokens "
                  "routed to the same top-k experts as in the reference)")


class ExpertNeuronProbe(CaptureProbe):
    """NeuronProbe's interface for MoE models: per-expert statistics and routing counts.

    MoE has no per-expert redundancy: pairwise correlations are not accumulated, so redundancy,
    allow_large and memory_budget_bytes (which bound them) are accepted for NeuronProbe's signature only.
    """

    shares_prefix = False  # each prompt decoded whole (MoECapture does not unshare a prefix)

    def __init__(self, model_path: str | os.PathLike, layers: str | Sequence[int] = (0, 14, -1),
                 definitions: Sequence[str] = DEFINITIONS, *, redundancy: bool = True, top_k: int = 10,
                 memory_budget_bytes: int | None = None, allow_large: bool = False,
                 redundancy_full: bool = False) -> None:
        model = model_moe(model_path)
        if model is None:
            raise ProbeError(f"{model_path}: not a mixture-of-experts model")
        chosen = resolve_layers(layers, model.n_layer)
        self.model = model
        self.accumulator = ExpertAccumulator(chosen, list(definitions), model.n_expert, model.n_expert_used,
                                             model.n_ff, top_k=top_k)
        self.capture = MoECapture(model_path, self._update, self._update_routing, chosen, definitions)

    def _update(self, *args) -> None:  # through self: restore() swaps the accumulator
        self.accumulator.update(*args)

    def _update_routing(self, *args) -> None:
        self.accumulator.update_routing(*args)

    def restore(self, path: str | os.PathLike) -> None:
        loaded = ExpertAccumulator.load(path)
        settings = ("layers", "definitions", "n_expert", "n_expert_used", "n_ff_expert", "top_k", "top_by")
        differ = [f"{name} {getattr(loaded, name)} (this run: {getattr(self.accumulator, name)})"
                  for name in settings if getattr(loaded, name) != getattr(self.accumulator, name)]
        if differ:
            raise ProbeError(f"{path}: saved neuron state has other settings: {'; '.join(differ)}; "
                             f"resume with the same settings or start a new run")
        self.accumulator = loaded


def expert_stat_arrays(stats: ExpertLayerStats) -> dict[str, np.ndarray]:
    """One (definition, layer)'s per-neuron arrays of neuron_stats.npz (the dense run's names). An unrouted
    expert's neurons have no statistics: NaN in every field (neither dead nor alive; drift leaves them out)."""
    seen = stats.seen
    return {name: np.where(seen, values, np.nan) for name, values in (
        ("mean", stats.mean), ("var", stats.variance), ("maxabs", stats.maxabs), ("min", stats.min),
        ("max", stats.max))}


def finalize_expert_neurons(run_dir: Path, acc: ExpertAccumulator, engine, settings) -> dict[str, Any]:
    """Write neurons.json and neuron_stats.npz for a finished MoE run (the dense files' layout, plus the
    `experts` section); returns a short summary."""
    prompt_tokens = decoded_tokens(run_dir)
    piece = cached_pieces(engine)

    arrays: dict[str, np.ndarray] = {}
    layers_out: list[dict[str, Any]] = []
    per_layer: dict[str, Any] = {}
    for (definition, layer), stats in acc.stats.items():
        key = f"{definition}/{layer}"
        seen = stats.seen
        maxabs = stats.maxabs
        dead_ids = stats.dead(settings.tau)
        entry: dict[str, Any] = {
            "definition": definition, "layer": layer, "tokens": int(stats.count), "n_ff": int(acc.n_ff),
            "tau": settings.tau, "dead": int(len(dead_ids)), "dead_ids": [int(i) for i in dead_ids],
            "max_abs_quantiles": dict(zip((f"q{q}" for q in QUANTILES),
                                          (float(v) for v in np.percentile(maxabs[seen], QUANTILES))))
            if seen.any() else {f"q{q}": 0.0 for q in QUANTILES},
            "mean_fraction_positive": float(np.mean(stats.fraction_positive[seen])) if seen.any() else None,
            "unrouted_neurons": int((~seen).sum()),
        }
        if acc.top_k and seen.any():
            strongest = np.argsort(-np.where(seen, maxabs, -np.inf), kind="stable")[:10]
            entry["top_tokens"] = {int(j): top_token_contexts(acc.top[(definition, layer)], int(j), prompt_tokens, piece)
                                   for j in strongest if seen[j]}
        layers_out.append(entry)
        arrays.update({f"{key}/{name}": values for name, values in expert_stat_arrays(stats).items()})
        if str(layer) not in per_layer:
            arrays.update({f"routing/{layer}/{name}": values for name, values in zip(ROUTE_FIELDS, acc.routes(layer))})
        routing = per_layer.setdefault(str(layer), acc.routing_summary(layer))
        routing.setdefault("dead_per_expert", {})[definition] = stats.dead_per_expert(settings.tau)
    save_npz(run_dir / "neuron_stats.npz", **arrays)
    experts = {"n_expert": acc.n_expert, "n_expert_used": acc.n_expert_used, "n_ff_expert": acc.n_ff_expert,
               "neuron_ids": "expert · n_ff_expert + i; each expert's statistics over the tokens routed to it",
               "attribution": MOE_ATTRIBUTION_NOTE, "drift": MOE_DRIFT_NOTE, "layers": per_layer}
    result = {"settings": asdict(settings), "layers": layers_out, "prompts": len(prompt_tokens), "experts": experts}
    write_json(run_dir / "neurons.json", result)
    return {"layers": [e["layer"] for e in layers_out], "definitions": list(acc.definitions),
            "dead": {f"{e['definition']}/{e['layer']}": e["dead"] for e in layers_out},
            "experts": {layer: r["routed"] for layer, r in per_layer.items()}}


def neuron_pass_for(model_path: str | os.PathLike) -> tuple[type, Callable[..., dict[str, Any]]]:
    """The probe class and the finalizer of a neuron pass on this model: dense FFN or mixture of experts."""
    if model_moe(model_path) is not None:
        return ExpertNeuronProbe, finalize_expert_neurons
    return NeuronProbe, finalize_neurons
