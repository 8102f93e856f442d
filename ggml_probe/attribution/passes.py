"""What the llama.cpp-based methods (exact, dla) share: the prompt and baseline passes, and the head.

The paper's baseline replaces every prompt token by id 0. Targets default to the model's own answer
(argmax of the last-position logits); the pipeline passes explicit targets (the label the model chose,
or the gold label's answer token).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..analysis.salient import LastLayerHead
from ..engine.ffn import ACT_FUNCTIONS, model_ffn, up_half
from ..engine.probes import run_checked
from ..errors import ProbeError
from ..weights.dequant import GGUFTensors
from .families import family


def require_closed_form(model_path: str | os.PathLike, what: str):
    """The model's FFN facts, or UnsupportedArchitecture when the closed form does not hold for it.

    Every architecture of the family registry ends its last layer in `l_out = residual + [post-norm](W_down(act
    ⊙ up) [+ bias])` followed by one RMSNorm (Phi-2: LayerNorm with a bias), the output matrix [+ bias] and
    [a soft-cap]: the closed form of analysis/salient.py holds. Phi-2's FFN is ungated: act is llama.cpp's
    GELU output and up = 1."""
    info = model_ffn(model_path)  # engine/ffn.py's act functions cover every family (silu, gelu_tanh, phi3's half)
    family(info.arch, f"the {what}")
    return info


def ffn_tap_names(names, layer: int, residual: bool = True) -> list[str]:
    """The graph tensors whose last-position rows give `layer`'s act, up and (with residual) FFN residual."""
    out = [f"{names.act_source}-{layer}"]
    if names.up and not names.fused_gate_up:
        out.append(f"{names.up}-{layer}")
    if residual:
        out += [f"{names.residual}-{layer}"] if names.residual else [f"l_out-{layer}", f"ffn_out-{layer}"]
    return out


def act_of(names, rows: dict, layer: int, p: int) -> np.ndarray:
    """act (float64) of prompt p at `layer`'s last position, from a tap of names.act_source."""
    return ACT_FUNCTIONS[names.act_fn](rows[(f"{names.act_source}-{layer}", p)])


def act_up_residual(names, rows: dict, layer: int, p: int, residual: bool = True):
    """act (the activation function applied here, float64), up and the FFN's residual input of prompt p at
    `layer`'s last position, from a LastPositionTap's rows. Where the graph names no residual (phi3, phi2) it
    is l_out − ffn_out. An ungated FFN (phi2) has up = 1."""
    source = rows[(f"{names.act_source}-{layer}", p)]
    act = ACT_FUNCTIONS[names.act_fn](source)
    if names.up is None:
        up = np.ones_like(act)
    else:
        up = up_half(source) if names.fused_gate_up else rows[(f"{names.up}-{layer}", p)]
    r = None
    if residual:
        r = rows[(f"{names.residual}-{layer}", p)] if names.residual else \
            rows[(f"l_out-{layer}", p)] - rows[(f"ffn_out-{layer}", p)]
    return act, np.asarray(up, np.float64), r


def tokens_of(engine, prompts: Sequence[str | np.ndarray]) -> list[np.ndarray]:
    return [engine.tokenize(p) if isinstance(p, str) else np.asarray(p, dtype=np.int32) for p in prompts]


def prompt_and_baseline_passes(engine, switch, tap_input, tap_base, prompts, targets):
    """The prompts through `tap_input`, then their all-token-0 baselines through `tap_base`, on one
    context whose callback is `switch` (engine.probes.SwitchedProbe). Returns (token arrays, the
    prompts' results, the target token per prompt: `targets` or the model's own answer)."""
    tokens = tokens_of(engine, prompts)
    switch.current = tap_input
    clean = run_checked(engine, tap_input, tokens)
    switch.current = tap_base
    run_checked(engine, tap_base, [np.zeros_like(t) for t in tokens])
    return tokens, clean, resolve_targets(clean, targets)


def resolve_targets(clean, targets: Sequence[int] | None) -> np.ndarray:
    """The token attributed per prompt: `targets`, or the model's own answer (argmax of its clean logits)."""
    if targets is None:
        return np.array([int(np.argmax(r.logits)) for r in clean], dtype=np.int64)
    target_tokens = np.asarray(list(targets), dtype=np.int64)
    if len(target_tokens) != len(clean):
        raise ProbeError(f"{len(target_tokens)} targets for {len(clean)} prompts")
    return target_tokens


def read_last_layer_head(model_path: str | os.PathLike, layer: int) -> LastLayerHead:
    """The GGUF's own (dequantized) ffn_down of `layer`, final norm and output matrix, with their biases where
    the file has them (Phi-2); the family registry says whether the final norm is a LayerNorm (Phi-2)."""
    info = model_ffn(model_path)
    fam = family(info.arch, "the closed-form head")
    with GGUFTensors(model_path) as tensors:
        names = set(tensors.names())

        def weight(name: str) -> np.ndarray:
            return np.asarray(tensors.dequantize(name), dtype=np.float64)

        out_name = "output.weight" if "output.weight" in names else "token_embd.weight"  # tied embeddings
        eps = tensors.summary.value(f"{info.arch}.{fam.eps_key}")
        if eps is None:
            raise ProbeError(f"{model_path}: no {info.arch}.{fam.eps_key} in the metadata")

        def bias(name: str) -> np.ndarray | None:
            return weight(name) if name in names else None

        post = f"blk.{layer}.post_ffw_norm.weight"
        softcap = tensors.summary.value(f"{info.arch}.final_logit_softcapping")
        if softcap is None:
            softcap = fam.final_softcap
        return LastLayerHead(weight(f"blk.{layer}.ffn_down.weight"), weight("output_norm.weight"), float(eps),
                             weight(out_name), weight(post) if post in names else None, float(softcap),
                             down_bias=bias(f"blk.{layer}.ffn_down.bias"), layer_norm=fam.layer_norm,
                             norm_bias=bias("output_norm.bias"), out_bias=bias("output.bias"))
