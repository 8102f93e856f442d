"""The neuron part of a run and of a study.

Per run: the accumulator becomes files, neurons.json (figures) and neuron_stats.npz (per definition
and layer, the per-neuron moments other levels are compared against: activation drift, dead-set
overlap). Per study level: salient neurons by the chosen attribution method (ggml_probe.attribution),
the ablation check, top-activating tokens; across levels: the comparison with the reference.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..analysis.experts import ROUTE_FIELDS, routing_agreement
from ..analysis.neurons import TopActivations, activation_drift, top_token_contexts
from ..attribution import ablation_effects, attribute, method
from ..engine.ffn import model_ffn
from ..engine.model import Vocab
from ..errors import ProbeError
from ..tasks.answers import label_answers
from .rundir import read_json, save_npz, write_json
from .tokens import decoded_tokens

QUANTILES = (0, 10, 50, 90, 100)


@dataclass
class NeuronAnalysis:
    """The neuron part's settings, after the pass (the study's and `eval --neurons` / `neurons`'s alike):
    which captured neurons are analysed, dead, salient (attribution method, target, prompts, threshold)
    and the ablation check. Every function below that takes `config` reads these fields.

    layers, neuron and tau also tell the pass what to capture (pipeline.runs); n_ctx, threads and
    gpu_layers are the engine settings of the attribution and ablation passes, which pipeline.runs
    sets to those of the pass they explain.
    """

    layers: str = "0,14,-1"
    neuron: str = "act"  # the definition analysed: act (SiLU(gate) / GELU output) or down_in
    tau: float = 0.1  # dead: every value over every token within (−tau, tau)
    saliency: float = 0.7  # salient: |attribution| / max per example above this
    salient_examples: int = 10  # prompts attributed (0: none)
    attribution: str = "exact"  # ggml_probe.attribution's methods, or "none"
    attribution_target: str = "label"  # TARGET_DEFINITIONS
    attribution_device: str = "auto"  # torch device for ig
    ablate_top: int = 5  # causal check: switch off each layer's top-N salient candidates (0: skip)
    redundancy: bool = True  # pairwise correlations: n_ff² per layer, the pass's largest memory (off for big models)
    redundancy_budget: int | None = None  # NeuronSettings.redundancy_budget: over it, an evenly spaced subset
    redundancy_full: bool = False  # every neuron, or a one-line refusal over the budget
    n_ctx: int = 2048
    threads: int | None = None
    gpu_layers: str | int = "auto"


# What the salient neurons explain (--attribution-target): log p of this token at the answer position.
TARGET_DEFINITIONS = {
    "label": ("the label the model chose under label-set scoring, as the first token it would emit for that "
              "label after the prompt"),
    "answer": ("the model's own full-vocabulary argmax token at the answer position (the paper's; on small "
               "models often not a label, e.g. the end of the turn)"),
    "gold": "the gold label, as the first token the model would emit for it after the prompt",
}


def cached_pieces(engine) -> Callable[[int], str]:
    """engine.token_to_piece, each token looked up once (top-token contexts repeat tokens a lot)."""
    return lru_cache(maxsize=None)(engine.token_to_piece)


def finalize_neurons(run_dir: Path, acc, engine, settings) -> dict[str, Any]:
    """Write neurons.json and neuron_stats.npz for a finished run; returns a short summary."""
    prompt_tokens = decoded_tokens(run_dir)  # the arrays the run decoded: positions point into these
    piece = cached_pieces(engine)
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
                                   "cluster_threshold": red.cluster_threshold, "constant_neurons": red.n_constant,
                                   "neurons": len(acc.redundancy_neurons), "stride": acc.redundancy_stride}
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
    note = acc.redundancy_plan.note() if acc.redundancy_plan is not None else None
    if note:  # the budget shrank the redundancy: say what, why, and how to get all of it
        result["redundancy_note"] = note
    write_json(run_dir / "neurons.json", result)
    return {"layers": [e["layer"] for e in layers_out], "definitions": list(acc.definitions),
            "dead": {f"{e['definition']}/{e['layer']}": e["dead"] for e in layers_out},
            **({"redundancy_note": note} if note else {})}


def compare_neurons(ref_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Against the reference level, per "definition/layer": dead-set Jaccard and the activation drift
    (analysis.neurons.activation_drift, DRIFT_DEFINITION) from the two runs' neuron_stats.npz. Mixture of
    experts: the drift is over each level's own routed tokens (said in its `tokens`), and routing_agreement
    (analysis.experts) gives the share of tokens routed to the reference's top-k experts."""
    ref, cur = read_json(ref_dir / "neurons.json"), read_json(run_dir / "neurons.json")
    ref_stats, cur_stats = np.load(ref_dir / "neuron_stats.npz"), np.load(run_dir / "neuron_stats.npz")
    ref_by = {(e["definition"], e["layer"]): e for e in ref["layers"]}
    alike = _prompts_decoded_alike(ref_dir, run_dir) if cur.get("experts") and ref.get("experts") else None
    out: dict[str, Any] = {}
    for e in cur["layers"]:
        k = (e["definition"], e["layer"])
        if k not in ref_by:
            continue
        key = f"{k[0]}/{k[1]}"
        a, b = set(ref_by[k]["dead_ids"]), set(e["dead_ids"])
        out[key] = {"dead_jaccard": (len(a & b) / len(a | b)) if (a | b) else 1.0,
                    "drift": activation_drift(ref_stats[f"{key}/mean"], ref_stats[f"{key}/var"], cur_stats[f"{key}/mean"])}
        if cur.get("experts") and ref.get("experts"):  # MoE: each level's means cover its own routed tokens
            out[key]["drift"]["tokens"] = "each level's own routed tokens"
            routes = f"routing/{k[1]}/sets"
            if routes in ref_stats.files and routes in cur_stats.files:
                out[key]["routing_agreement"] = routing_agreement(
                    *(tuple(z[f"routing/{k[1]}/{n}"] for n in ROUTE_FIELDS) for z in (ref_stats, cur_stats)),
                    prompts=alike)
    return out


def _prompts_decoded_alike(ref_dir: Path, run_dir: Path) -> list[int]:
    """Run positions of the prompts both runs decoded as the same token arrays."""
    ref, cur = decoded_tokens(ref_dir), decoded_tokens(run_dir)
    return [i for i, (a, b) in enumerate(zip(ref, cur)) if np.array_equal(a, b)]


def _target_kind(config) -> str:
    kind = config.attribution_target or "label"
    if kind not in TARGET_DEFINITIONS:
        raise ProbeError(f"unknown attribution target {kind!r}; choose one of {', '.join(TARGET_DEFINITIONS)}")
    return kind


def label_target_tokens(vocab, prompt: str, labels) -> dict[str, int]:
    """Per label, the first of its answer tokens after `prompt` — the token the model would emit first for
    it, as the label-set scoring reads it (tasks.answers; vocab: an Engine or Vocab)."""
    return {a.label: a.tokens[0] for a in label_answers(vocab, prompt, labels)}


def neuron_targets(run_dir: Path, examples, config) -> list[int] | None:
    """The attribution target per example (TARGET_DEFINITIONS). None for `answer`: each prompt's own argmax,
    found by the attribution itself. `label`: the label the run's predictions.parquet says the model chose;
    `gold`: the gold label; either as the token the model would emit for that label after the prompt."""
    kind = _target_kind(config)
    if kind == "answer":
        return None
    if kind == "label":
        import pandas as pd  # a heavy import, only where a run's predictions are read

        preds = pd.read_parquet(run_dir / "predictions.parquet", columns=["position", "pred", "pred_index"]
                                ).sort_values("position")
        if len(preds) != len(examples):
            raise ProbeError(f"{run_dir}: predictions.parquet has {len(preds)} rows for {len(examples)} examples")
        words = [str(w) for w in preds["pred"]]
        chosen = [int(j) for j in preds["pred_index"]] if "pred_index" in preds else [None] * len(words)
    else:
        words = [ex.label for ex in examples]
        chosen = [ex.gold for ex in examples]
    # A multiple-choice example's label names a choice: its target is that choice's first answer token.
    words = [ex.choices[j] if ex.choices else w for ex, w, j in zip(examples, words, chosen)]
    with Vocab(read_json(run_dir / "manifest.json")["model"]["path"]) as vocab:
        return [label_target_tokens(vocab, ex.prompt, [w])[w] for ex, w in zip(examples, words)]


def _target_summary(model_path: Path, prompts: list[str], labels, kind: str, targets: list[int],
                    choices: list[tuple[str, ...]] | None = None) -> dict[str, Any]:
    """Which tokens were attributed (piece text → count, most frequent first) and how many are no label's
    token: neither the first token of a label's surface forms ('W', ' W', as the run's manifest records
    them) nor the token the model would emit for a label after that prompt. A multiple-choice prompt's
    labels are its own choices (`choices`, per prompt): a target is a label's when it starts one of them."""
    with Vocab(model_path) as vocab:
        if choices and any(choices):
            own = [set(label_target_tokens(vocab, p, c).values()) for p, c in zip(prompts, choices)]
            not_label = sum(int(t) not in ids for t, ids in zip(targets, own))
        else:
            label_ids = {int(t) for ids in labels.values() for t in ids}
            for p in prompts:
                label_ids |= set(label_target_tokens(vocab, p, labels).values())
            not_label = sum(int(t) not in label_ids for t in targets)
        pieces = Counter(vocab.token_to_piece(t) for t in targets)
    return {"kind": kind, "tokens": dict(pieces.most_common()), "not_label": not_label, "n": len(targets)}


def _salient_inputs(run_dir: Path, tokens: list[np.ndarray], config) -> dict[str, Any]:
    """What an attribution's result depends on beyond its cache key: the model file, the token arrays and the
    engine settings of its passes (a run of the same file with other decode settings for its own pass, e.g. a
    noise-floor run, attributes the same tokens the same way and may take another run's result)."""
    digest = hashlib.sha256()
    for t in tokens:
        digest.update(np.asarray(t, dtype=np.int64).tobytes() + b"|")
    return {"model_sha256": read_json(run_dir / "manifest.json")["model"]["sha256"], "tokens_sha256": digest.hexdigest(),
            "n_ctx": config.n_ctx, "threads": config.threads, "gpu_layers": str(config.gpu_layers),
            "device": config.attribution_device}


def _reused_salient(key: dict[str, Any], inputs: dict[str, Any], donors, config) -> dict[str, Any] | None:
    """A donor run's salient.json with the same inputs and the same key (its ablation check too, unless this
    one has none: then without it), or None."""
    def bare(k: dict[str, Any]) -> dict[str, Any]:
        return {name: v for name, v in k.items() if name != "ablate_top"}

    for donor in donors:
        path = Path(donor) / "salient.json"
        cached = read_json(path) if path.exists() else {}
        if cached.get("inputs") != inputs or bare(cached.get("key") or {}) != bare(key):
            continue
        if config.ablate_top and cached["key"].get("ablate_top") != config.ablate_top:
            continue
        if not config.ablate_top:
            for entry in cached["layers"].values():
                entry.pop("ablation", None)
        return {**cached, "key": key, "reused_from": str(donor)}
    return None


def _salient(run_dir: Path, model_path: Path, prompts: list[str], layers: list[int], config, progress,
             targets: list[int] | None = None, choices: list[tuple[str, ...]] | None = None,
             donors: tuple[Path, ...] = ()) -> dict[str, Any] | None:
    """Salient neurons of this level by config.attribution, cached in RUN_DIR/salient.json. The first
    prompts are attributed (and ablated) as the run decoded them: its token arrays (pipeline.tokens), so a
    prompt fitted to the context keeps its template here too; `prompts` only name the target tokens.
    donors: run directories whose result is taken when it was computed from the same inputs (_reused_salient)."""
    m = method(config.attribution)
    n = min(config.salient_examples, len(prompts))
    kind = _target_kind(config)
    key = {"method": m.name, "n_prompts": n, "threshold": config.saliency, "layers": sorted(layers),
           "target": kind, "targets": None if targets is None else [int(t) for t in targets[:n]],
           "ablate_top": config.ablate_top, "definitions_version": 4}  # 4: the run's decoded tokens
    cache = run_dir / "salient.json"
    if cache.exists():
        cached = read_json(cache)
        if cached.get("key") == key:
            return cached
    wanted = sorted(layers) if m.all_layers else [max(layers)]
    tokens = decoded_tokens(run_dir)[:n]
    inputs = _salient_inputs(run_dir, tokens, config)
    reused = _reused_salient(key, inputs, donors, config)
    if reused is not None:  # the same attribution already made (e.g. the reference's, for its noise floor)
        write_json(cache, reused)
        return reused
    if progress:
        progress.step(f"salient neurons ({m.name}) on {n} prompts, layers {','.join(map(str, wanted))} · "
                      f"{run_dir.parent.name}/{run_dir.name}")
    attr = attribute(m.name, model_path, tokens, wanted, targets=None if targets is None else targets[:n],
                     n_ctx=config.n_ctx, threads=config.threads, gpu_layers=config.gpu_layers,
                     device=config.attribution_device)
    result: dict[str, Any] = {"key": key, "inputs": inputs, "method": m.name, "label": m.label, "paper_method": m.paper,
                              "n_prompts": n, "threshold": config.saliency, "target": kind,
                              "targets": [int(t) for t in attr.target_tokens], "layers": {}}
    result["salient_targets"] = _target_summary(model_path, prompts[:n], read_json(run_dir / "manifest.json")["label_tokens"],
                                                kind, result["targets"], choices[:n] if choices else None)
    for layer, la in attr.layers.items():
        summary = la.salient(config.saliency)
        entry = {"union": [int(i) for i in summary.union], "count": int(len(summary.union)),
                 "ranking": [int(i) for i in summary.ranking[:20]],
                 "frequency_top": [int(summary.frequency[i]) for i in summary.ranking[:20]]}
        if la.completeness_error is not None:  # an integral: did it converge?
            ok = la.converged
            entry.update(completeness_error_mean=float(np.abs(la.completeness_error).mean()),
                         completeness_error_max=float(np.abs(la.completeness_error).max()),
                         real_change_mean=float(np.abs(la.real_change).mean()),
                         converged_prompts=int(ok.sum()), converged=bool(ok.all()))
        result["layers"][str(layer)] = entry
    if config.ablate_top > 0:
        _ablation_check(result, model_path, tokens, config)
    if attr.llama_real_change is not None:  # exact: the closed form against llama.cpp's own swap
        gap = attr.layers[max(attr.layers)].attributions.sum(axis=1) - attr.llama_real_change
        result.update(llama_gap_mean=float(np.abs(gap).mean()), llama_gap_max=float(np.abs(gap).max()))
    write_json(cache, result)
    return result


def _ablation_check(result: dict[str, Any], model_path: Path, tokens: list[np.ndarray], config) -> None:
    """A causal second opinion beside the attribution: switch the top candidates of each layer off
    inside llama.cpp (act := 0 at every position) and measure the change of log p(target) on the same
    token arrays; the same for as many random neurons of that layer (seeded), as a control."""
    n_ff = model_ffn(model_path).n_ff
    rng = np.random.default_rng(0)
    for key, entry in result["layers"].items():
        top = entry["ranking"][:config.ablate_top]
        if not top:
            continue
        others = np.setdiff1d(np.arange(n_ff), top)
        control = sorted(int(i) for i in rng.choice(others, size=len(top), replace=False))
        # one model load and one clean pass for both sets
        effects = ablation_effects(model_path, tokens, int(key), {"top": top, "control": control}, values=0.0,
                                   definition="act", targets=result["targets"], n_ctx=config.n_ctx,
                                   n_threads=config.threads, gpu_layers=config.gpu_layers)
        deltas = {name: res.delta for name, res in effects.items()}
        entry["ablation"] = {
            "neurons": [int(i) for i in top], "control_neurons": control, "value": 0.0,
            "delta_logprob_mean": float(deltas["top"].mean()),
            "delta_logprob_abs_mean": float(np.abs(deltas["top"]).mean()),
            "control_delta_logprob_mean": float(deltas["control"].mean()),
            "control_delta_logprob_abs_mean": float(np.abs(deltas["control"]).mean()),
        }


def _top_tokens(run_dir: Path, model_path: Path, definition: str, layer: int, neurons: list[int]) -> dict[str, list]:
    """Top-activating tokens (with left context) of chosen neurons, from the run's final neuron state,
    looked up in the token arrays the run decoded."""
    states = sorted((run_dir / "neuron_state").glob("*.npz"))
    if not states or not neurons:
        return {}
    # only this layer's top activations: the whole state holds every layer's co-moments (n_ff² each)
    prefix = f"{definition}/{layer}/top."
    with np.load(states[-1], allow_pickle=False) as state:
        arrays = {k[len(prefix):]: state[k] for k in state.files if k.startswith(prefix)}
    if not arrays:
        return {}
    top = TopActivations.from_arrays(arrays)
    tokens = decoded_tokens(run_dir)
    with Vocab(model_path) as vocab:
        out = {}
        for j in neurons:
            rows = top_token_contexts(top, j, tokens, vocab.token_to_piece)
            out[str(j)] = [[r["token"], r["context"], r["value"]] for r in rows]
    return out


def neuron_level(run_dir: Path, model_path: Path, prompts: list[str], config, progress=None,
                 targets: list[int] | None = None, choices: list[tuple[str, ...]] | None = None,
                 salient_donors: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One level's neuron figures; targets: a token per prompt for the attribution (neuron_targets; None:
    each prompt's own argmax). salient_targets says which tokens were attributed and how many are no label
    (choices: a multiple-choice task's choices per prompt, its labels). salient_donors: runs of the same file
    whose attribution is reused when made from the same inputs (_salient)."""
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
                                                    if "redundancy" in e], axis=0)]
                            if any("redundancy" in e for e in entries) else [],  # a pass without redundancy: none
        "top_tokens": {},
    }
    if nj.get("redundancy_note"):
        level["redundancy_note"] = nj["redundancy_note"]
    sal = None
    if nj.get("experts"):  # mixture of experts: per-expert statistics and routing; no attribution method applies
        level["experts"] = nj["experts"]
        level["salient_note"] = nj["experts"]["attribution"]
    elif config.salient_examples > 0 and config.attribution != "none" and level["layers"]:
        try:
            sal = _salient(run_dir, model_path, prompts, level["layers"], config, progress, targets, choices,
                           salient_donors)
        except Exception as exc:  # an architecture or an extra the method lacks: say so, keep the rest
            if not isinstance(exc, ProbeError):
                raise
            level["salient_note"] = str(exc)
    if sal:
        per = sal["layers"]
        level["salient"] = {k: v["count"] for k, v in per.items()}
        level["salient_ids"] = {k: v["union"] for k, v in per.items()}
        level["salient_method"] = f"{sal['method']}: {sal['label']}"
        level["salient_converged"] = {k: v["converged"] for k, v in per.items() if "converged" in v}
        level["salient_detail"] = sal
        level["salient_targets"] = sal["salient_targets"]
        # Tokens of the most salient neurons, from the same run's activations of that layer.
        if config.neuron == "act":
            for k, v in per.items():
                level["top_tokens"][k] = _top_tokens(run_dir, model_path, "act", int(k), v["ranking"][:5])
    for e in entries:  # other layers: the strongest neurons' tokens, as the run recorded them
        key = str(e["layer"])
        if key not in level["top_tokens"] and e.get("top_tokens"):
            level["top_tokens"][key] = {j: [[r["token"], r["context"], r["value"]] for r in rows]
                                        for j, rows in list(e["top_tokens"].items())[:5]}
    return level


def compare_neuron_levels(run_dirs: dict[str, Path], reference: str, levels: dict[str, dict]) -> dict[str, Any]:
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
            entry["drift"][layer] = v["drift"]
            if "routing_agreement" in v:
                entry.setdefault("routing_agreement", {})[layer] = v["routing_agreement"]
        for layer, ids in (levels[lvl].get("salient_ids") or {}).items():
            ref_ids = set((ref.get("salient_ids") or {}).get(layer, []))
            union = ref_ids | set(ids)
            entry["salient_jaccard"][layer] = len(ref_ids & set(ids)) / len(union) if union else 1.0
        out[lvl] = entry
    return out
