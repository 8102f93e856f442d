"""Which neurons drive the answer: the attribution methods behind salient neurons, in one registry.

    exact  the paper's integrated gradients for the LAST layer, in closed form from two llama.cpp
           passes and the GGUF's weights (no torch; the default)
    ig     the paper's integrated gradients for EVERY analysed layer, in torch on a model built from
           the GGUF's own dequantized weights (optional extra `attribution`; CPU, CUDA or MPS)
    dla    direct effect only, every layer, no torch: (act − baseline) × the direct path to the
           answer. Not the paper's method; before the last layer it misses what flows through later
           layers, and it is labelled so wherever it is shown.

Every method returns a `types.Attribution`: per layer, (n_prompts, n_ff) attributions and, for the
integrals, the completeness error that says whether the integral converged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..engine.ffn import model_ffn
from ..errors import ProbeError
from ..layerspec import resolve_layers
from .ablation import AblationResult, ablation_effect, ablation_effects
from .dla import direct_effect_attribution
from .exact import last_layer_attribution
from .ig import integrated_gradients
from .types import Attribution, LayerAttribution


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # shown beside every salient figure
    paper: bool  # the reference study's integrated gradients (exactly or numerically)
    all_layers: bool  # False: the last layer only
    needs_torch: bool


METHODS: dict[str, Method] = {
    m.name: m for m in (
        Method("exact", "the paper's integrated gradients, exact in closed form for the last layer (50-point "
               "Gauss-Legendre, token-0 baseline, from llama.cpp passes and the GGUF weights); earlier layers "
               "need --attribution ig", True, False, False),
        Method("ig", "the paper's integrated gradients (50-point Gauss-Legendre, token-0 baseline) in torch on the "
               "GGUF's own dequantized weights, every analysed layer", True, True, True),
        Method("dla", "DIRECT EFFECT ONLY (act − baseline act) × direct path to the answer; not the paper's "
               "integrated gradients, and unreliable before the last layer", False, True, False),
    )
}
CHOICES = (*METHODS, "none")


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ProbeError(f"unknown attribution {name!r}; choose one of {', '.join(CHOICES)}") from None


def attribute(
    name: str,
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layers: Sequence[int],
    *,
    targets: Sequence[int] | None = None,
    n_points: int = 50,
    n_ctx: int = 2048,
    threads: int | None = None,
    gpu_layers: str | int = "auto",
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    kv_type: int | None = None,
) -> Attribution:
    """Attributions of `layers` (negatives count from the end; the exact method keeps only the last) by `name`.

    kv_type: the ggml type of the KV cache of the llama.cpp passes (exact, dla; 0 = F32, so that an F32 file
    runs in F32 all through); None keeps llama.cpp's default (F16). ig runs in torch and has no KV cache.
    """
    m = method(name)
    if m.name == "ig":
        return integrated_gradients(model_path, prompts, layers, targets=targets, n_points=n_points,
                                    device=device, threads=threads, progress=progress)
    if m.name == "dla":
        return direct_effect_attribution(model_path, prompts, layers, targets=targets, n_ctx=n_ctx,
                                         n_threads=threads, gpu_layers=gpu_layers, kv_type=kv_type)
    last = model_ffn(model_path).n_layer - 1
    if last not in resolve_layers(list(layers), last + 1):
        return Attribution("exact", np.zeros(0, np.int64), np.zeros(0), n_points=n_points)
    res = last_layer_attribution(model_path, prompts, targets=targets, n_points=n_points, n_ctx=n_ctx,
                                 n_threads=threads, gpu_layers=gpu_layers, kv_type=kv_type)
    out = Attribution("exact", res.target_tokens, res.llama_logprob, n_points=n_points)
    closed_change = res.attributions.sum(axis=1) - res.completeness_error
    out.layers[last] = LayerAttribution(last, res.attributions, closed_change, res.completeness_error)
    out.llama_real_change = res.real_change
    return out


__all__ = ["Attribution", "LayerAttribution", "METHODS", "CHOICES", "Method", "attribute", "method",
           "AblationResult", "ablation_effect", "ablation_effects", "direct_effect_attribution", "last_layer_attribution",
           "integrated_gradients"]
