"""The paper's integrated gradients for the last layer's act neurons, exact, from llama.cpp passes.

At the last layer, log p(target) is a closed-form function of the act vector (analysis/salient.py):
the integral needs the prompt's and the baseline's act, up and residual at the last position, which
two llama.cpp passes provide, and the GGUF's own last-layer weights. No torch, no gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..analysis.salient import integrated_gradients, summarise_salient
from ..engine.model import Engine
from ..engine.probes import LastPositionTap, NeuronPatch, SwitchedProbe, answer_logprob, run_checked
from .passes import (act_of, act_up_residual, ffn_tap_names, prompt_and_baseline_passes, read_last_layer_head,
                     require_closed_form)


@dataclass
class LastLayerAttribution:
    layer: int
    target_tokens: np.ndarray  # (n_prompts,)
    attributions: np.ndarray  # (n_prompts, n_ff)
    completeness_error: np.ndarray  # Σ attr − (f(a) − f(b)) in the closed form
    real_change: np.ndarray | None  # llama.cpp: log p(target) − log p(target | last-layer act := baseline's)
    closed_form_logprob: np.ndarray  # f(a) from the GGUF weights
    llama_logprob: np.ndarray  # log p(target) from llama.cpp's logits
    n_points: int

    def salient(self, threshold: float = 0.7):
        return summarise_salient(self.attributions, threshold)


def last_layer_attribution(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    *,
    targets: Sequence[int] | None = None,
    n_points: int = 50,
    check_real_change: bool = True,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    gpu_layers: str | int = "auto",
    kv_type: int | None = None,
) -> LastLayerAttribution:
    """Integrated gradients of log p(target) w.r.t. the last layer's act neurons, in closed form.

    Baseline: every token replaced by id 0 (the paper's). Target per prompt: `targets`, or the model's
    own answer (argmax at the last position). With check_real_change, a third pass per prompt swaps the
    last position's act for the baseline's inside llama.cpp (down_in := b ⊙ up) and records the real
    change of the target log-probability, the completeness check against llama.cpp itself.
    """
    info = require_closed_form(model_path, "exact last-layer attribution")
    layer = info.n_layer - 1
    names = info.names
    tap_input = LastPositionTap(ffn_tap_names(names, layer))
    tap_base = LastPositionTap([f"{names.act_source}-{layer}"])
    switch = SwitchedProbe(tap_input)

    head = read_last_layer_head(model_path, layer)
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=switch.eval_callback, kv_type=kv_type) as engine:
        tokens, clean, target_tokens = prompt_and_baseline_passes(engine, switch, tap_input, tap_base, prompts,
                                                                  targets)
        llama_lp = np.array([answer_logprob(r.logits, t) for r, t in zip(clean, target_tokens)])

        attributions, completeness, closed, swaps = [], [], [], []
        for p in range(len(tokens)):
            a, up, resid = act_up_residual(names, tap_input.rows, layer, p)
            b = act_of(names, tap_base.rows, layer, p)
            res = integrated_gradients(head, a, b, up, resid, int(target_tokens[p]), n_points)
            attributions.append(res.attributions)
            completeness.append(res.completeness_error)
            closed.append(res.logprob_input)
            swaps.append(b * up)  # down_in with act := the baseline's, up kept (the prompt's)

        real = None
        if check_real_change:
            patch = NeuronPatch(model_path, layer, range(info.n_ff), 0.0, definition="down_in", positions="last")
            switch.current = patch
            swapped = []
            for p, toks in enumerate(tokens):
                patch.values = swaps[p]
                (r,) = run_checked(engine, patch, [toks])
                swapped.append(answer_logprob(r.logits, int(target_tokens[p])))
            real = llama_lp - np.array(swapped)
    return LastLayerAttribution(layer, target_tokens, np.array(attributions), np.array(completeness), real,
                                np.array(closed), llama_lp, n_points)
