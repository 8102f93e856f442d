"""A tiny random Llama (f32) for the neuron tests: HF checkpoint, its GGUF, and a transformers reference.

Built offline with the tokenizer helpers of test_convert.py; one variant can have chosen columns of
one layer's ffn_down zeroed (the ablation check).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, N_FF, N_LAYER = 64, 96, 3


def build_hf(folder: Path, seed: int = 7):
    """Save a tiny LlamaForCausalLM (f32, random weights) and its tokenizer to `folder`."""
    import torch
    import transformers
    from test_convert import byte_level_tokenizer, randomise, set_rope

    tokenizer = byte_level_tokenizer("smollm")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def zero_down_columns(src: Path, dst: Path, layer: int, columns: list[int]) -> Path:
    """Copy the HF checkpoint with columns (input channels) of layer's down_proj set to zero."""
    import shutil

    import torch
    import transformers

    shutil.copytree(src, dst)
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[:, columns] = 0.0
    model.save_pretrained(dst)
    return dst


def transformers_ffn(folder: Path, token_ids: list[int]) -> dict[str, dict[int, np.ndarray]]:
    """act = act_fn(gate_proj(x)) and down_in = the input of down_proj, per layer, float32 (tokens, n_ff)."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out: dict[str, dict[int, np.ndarray]] = {"act": {}, "down_in": {}}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        hooks.append(mlp.act_fn.register_forward_hook(
            lambda _m, _inp, res, i=i: out["act"].__setitem__(i, res[0].detach().numpy().copy())))
        hooks.append(mlp.down_proj.register_forward_pre_hook(
            lambda _m, inp, i=i: out["down_in"].__setitem__(i, inp[0][0].detach().numpy().copy())))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for h in hooks:
        h.remove()
    return out


def _act_of_prompt_and_baseline(folder: Path, token_ids: list[int], layer: int):
    """transformers in float64 with `layer`'s act_fn output captured on the prompt and on the
    all-token-0 baseline: (model, act_fn, act (tokens, n_ff), baseline act, last-position logits)."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    act_fn = model.model.layers[layer].mlp.act_fn
    seen = {}
    handle = act_fn.register_forward_hook(lambda _m, _i, out: seen.__setitem__("act", out.detach().clone()))
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, -1]
        a = seen["act"][0]
        model(torch.zeros((1, len(token_ids)), dtype=torch.long))
        b = seen["act"][0]
    handle.remove()
    return model, act_fn, a, b, logits


def _gauss_legendre_01(n_points: int):
    import torch

    x, w = np.polynomial.legendre.leggauss(n_points)
    return torch.tensor((x + 1) / 2, dtype=torch.float64), torch.tensor(w / 2, dtype=torch.float64)


def torch_last_layer_ig(folder: Path, token_ids: list[int], target: int, n_points: int = 80) -> np.ndarray:
    """Integrated gradients of log p(target) w.r.t. the last layer's act_fn output at the last position,
    by autograd in float64 (token-0 baseline, Gauss–Legendre in α): an independent reference."""
    import torch

    model, act_fn, a, b, _ = _act_of_prompt_and_baseline(folder, token_ids, -1)
    a, b = a[-1], b[-1]
    alphas, weights = _gauss_legendre_01(n_points)
    points = (b[None, :] + alphas[:, None] * (a - b)[None, :]).requires_grad_(True)

    def replace_last(_m, _i, out):
        return torch.cat([out[:, :-1], points[:, None, :]], dim=1)

    handle = act_fn.register_forward_hook(replace_last)
    logits = model(torch.tensor([token_ids] * n_points)).logits[:, -1]
    handle.remove()
    torch.log_softmax(logits, dim=-1)[:, target].sum().backward()
    mean_grad = (weights[:, None] * points.grad).sum(0)
    return ((a - b) * mean_grad).numpy()


def torch_layer_ig(folder: Path, token_ids: list[int], layer: int, target: int, n_points: int = 50) -> dict:
    """Captum's LayerIntegratedGradients on one layer's act_fn output, rebuilt with plain autograd on
    transformers in float64: the act is replaced at every position along the straight path from the
    all-token-0 prompt's act, attributions summed over positions. An independent reference for
    ggml_probe.attribution.ig (a different model implementation, HF's rope layout, no shared code)."""
    import torch

    model, act_fn, a, b, logits = _act_of_prompt_and_baseline(folder, token_ids, layer)
    alphas, weights = _gauss_legendre_01(n_points)
    points = (b[None] + alphas[:, None, None] * (a - b)[None]).requires_grad_(True)
    handle = act_fn.register_forward_hook(lambda _m, _i, out: points)
    logp = torch.log_softmax(model(torch.tensor([token_ids] * n_points)).logits[:, -1], dim=-1)[:, target]
    logp.sum().backward()
    handle.remove()
    mean_grad = (weights[:, None, None] * points.grad).sum(0)
    return {"attributions": ((a - b) * mean_grad).sum(0).numpy(),
            "logp_input": float(torch.log_softmax(logits, -1)[target])}
