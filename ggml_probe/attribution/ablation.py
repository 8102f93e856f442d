"""The ablation check: switch neurons off (or set them) inside llama.cpp and measure what the answer loses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..engine.model import Engine
from ..engine.probes import NeuronPatch, ProbeSet, answer_logprob, run_checked
from .passes import resolve_targets, tokens_of


@dataclass
class AblationResult:
    target_tokens: np.ndarray  # int64 (n_prompts,): the token whose log-prob is measured
    logprob_clean: np.ndarray  # float64 (n_prompts,)
    logprob_patched: np.ndarray  # float64 (n_prompts,)
    patched_tensors: int  # how many tensors the patch wrote (a check that it fired)

    @property
    def delta(self) -> np.ndarray:
        """patched − clean log-probability of the target token (negative: the neurons helped it)."""
        return self.logprob_patched - self.logprob_clean


def ablation_effect(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layer: int,
    neurons: Sequence[int],
    *,
    values: float | Sequence[float] = 0.0,
    definition: str = "down_in",
    targets: Sequence[int] | None = None,
    positions: str = "all",
    n_ctx: int = 2048,
    n_threads: int | None = None,
    gpu_layers: str | int = "auto",
    kv_type: int | None = None,
) -> AblationResult:
    """Change in the answer token's log-probability when `neurons` of `layer` are set to `values`.

    prompts are texts (tokenized by the model) or token arrays. The target per prompt is `targets`,
    or by default the model's own unpatched answer (argmax of the last-position logits). One context
    serves both passes: the patch is switched off for the clean pass.
    """
    return ablation_effects(model_path, prompts, layer, {"": neurons}, values=values, definition=definition,
                            targets=targets, positions=positions, n_ctx=n_ctx, n_threads=n_threads,
                            gpu_layers=gpu_layers, kv_type=kv_type)[""]


def ablation_effects(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layer: int,
    neuron_sets: Mapping[str, Sequence[int]],
    *,
    values: float | Sequence[float] = 0.0,
    definition: str = "down_in",
    targets: Sequence[int] | None = None,
    positions: str = "all",
    n_ctx: int = 2048,
    n_threads: int | None = None,
    gpu_layers: str | int = "auto",
    kv_type: int | None = None,
) -> dict[str, AblationResult]:
    """ablation_effect for several neuron sets of one layer (e.g. the salient candidates and a random
    control), by name: one model load and one clean pass serve them all, each set patched in a pass of
    its own (the other patches switched off)."""
    patches = {name: NeuronPatch(model_path, layer, ids, values, definition, positions)
               for name, ids in neuron_sets.items()}
    probes = ProbeSet(list(patches.values()))
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=probes.eval_callback, kv_type=kv_type) as engine:
        tokens = tokens_of(engine, prompts)
        for p in patches.values():
            p.enabled = False
        clean = run_checked(engine, probes, tokens)
        patched = {}
        for name, patch in patches.items():
            patch.enabled = True
            patched[name] = run_checked(engine, probes, tokens)
            patch.enabled = False
    target_tokens = resolve_targets(clean, targets)
    lp_clean = np.array([answer_logprob(r.logits, tok) for r, tok in zip(clean, target_tokens)])
    return {name: AblationResult(target_tokens, lp_clean,
                                 np.array([answer_logprob(r.logits, tok) for r, tok in zip(patched[name], target_tokens)]),
                                 patches[name].patched)
            for name in patches}
