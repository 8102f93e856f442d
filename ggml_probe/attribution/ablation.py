"""The ablation check: switch neurons off (or set them) inside llama.cpp and measure what the answer loses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..engine.model import Engine
from ..engine.probes import NeuronPatch, answer_logprob, run_checked
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
    patch = NeuronPatch(model_path, layer, neurons, values, definition, positions)
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=patch.eval_callback, kv_type=kv_type) as engine:
        tokens = tokens_of(engine, prompts)
        patch.enabled = False
        clean = run_checked(engine, patch, tokens)
        patch.enabled = True
        patched = run_checked(engine, patch, tokens)
    target_tokens = resolve_targets(clean, targets)
    lp_clean = np.array([answer_logprob(r.logits, tok) for r, tok in zip(clean, target_tokens)])
    lp_patched = np.array([answer_logprob(r.logits, tok) for r, tok in zip(patched, target_tokens)])
    return AblationResult(target_tokens, lp_clean, lp_patched, patch.patched)
