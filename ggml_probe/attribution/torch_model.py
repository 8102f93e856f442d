"""A llama-family transformer in torch, built from a GGUF file's own dequantized weights.

llama.cpp has no backward pass, and integrated gradients for a layer before the last need gradients
through every later layer's attention. This module rebuilds the forward pass of the file llama.cpp
runs — same tensors, dequantized by ggml itself, so a Q4_0 file is attributed with its Q4_0 weights —
in torch, and exposes it in the pieces integrated gradients needs: run the prompt once keeping each
analysed layer's FFN state, then run only the layers after one of them from a replaced act.

Rope follows llama.cpp, not transformers: GGUF llama files carry Q/K rows reordered for llama.cpp's
adjacent-pair rope (LLAMA_ROPE_TYPE_NORM), qwen2/qwen3 use the rotate-half form (NEOX). Linear rope
scaling and llama3's per-frequency factors (rope_freqs.weight) are applied as llama.cpp does.

Phi-2 (src/models/phi2.cpp) differs most: LayerNorms with biases, attention and an ungated GELU FFN
both reading the same normed layer input (out = x + attn + ffn), biases on every projection and the
output; its `up` is a vector of ones, so that act ⊙ up is the FFN's hidden layer as for gated models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ProbeError, UnsupportedArchitecture
from ..weights.dequant import GGUFTensors
from .families import Family, family as family_of


def require_torch():
    try:
        import torch
    except ImportError:
        raise ProbeError("--attribution ig needs torch: pip install 'ggml-probe[attribution]' "
                         "(CPU build: pip install torch==2.13.0)") from None
    return torch


def pick_device(device: str = "auto") -> str:
    torch = require_torch()
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class Hyper:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_base: float
    rope_dim: int
    rope_scale: float  # positions are multiplied by this (linear scaling: 1 / factor)
    family: Family = Family()
    rope_base_swa: float = 0.0  # the rope base of sliding-window layers (Gemma 3's local base)
    n_swa: int = 0  # sliding window (tokens a query sees, itself included); 0: none
    swa_layers: tuple[bool, ...] = ()  # per layer: sliding-window attention
    attn_softcap: float = 0.0  # Gemma 2: scores ← cap·tanh(scores / cap)
    final_softcap: float = 0.0  # Gemma 2: logits ← cap·tanh(logits / cap)
    attn_scale: float = 0.0  # queries × this (0: 1/sqrt(head_dim))


@dataclass
class LayerState:
    """One analysed layer on the prompt: the FFN input residual, act = SiLU(gate) and up, (seq, ·)."""

    residual: "object"
    act: "object"
    up: "object"


class TorchModel:
    """The GGUF model's forward pass in torch (float32 by default), weights frozen."""

    def __init__(self, path: str | os.PathLike, *, device: str = "auto", dtype: str = "float32"):
        torch = require_torch()
        self.torch = torch
        self.path = str(path)
        self.device = pick_device(device)
        self.dtype = getattr(torch, dtype)
        with GGUFTensors(path) as tensors:
            self.hp = _hyper(tensors)
            names = set(tensors.names())

            def weight(name: str, optional: bool = False):
                if name not in names:
                    if optional:
                        return None
                    raise ProbeError(f"{path}: tensor {name} is missing")
                return torch.from_numpy(np.array(tensors.dequantize(name), dtype=np.float32)).to(self.device, self.dtype)

            self.embed = weight("token_embd.weight")
            self.out_norm = weight("output_norm.weight")
            self.out_norm_bias = weight("output_norm.bias", optional=True)  # Phi-2's LayerNorm bias
            self.out = weight("output.weight", optional=True)
            if self.out is None:  # tied embeddings
                self.out = self.embed
            self.out_bias = weight("output.bias", optional=True)  # Phi-2
            family = self.hp.family
            factors = weight("rope_freqs.weight", optional=True)
            self.layers = []
            for i in range(self.hp.n_layer):
                p = f"blk.{i}."
                fused_qkv = p + "attn_qkv.weight" in names  # phi3, phi2: [q | k | v] in one matrix
                fused_ffn = family.gated and p + "ffn_gate.weight" not in names  # phi3: ffn_up holds [gate | up]
                keys = ["attn_norm", "attn_output", "ffn_up", "ffn_down"]
                keys += [] if family.parallel else ["ffn_norm"]
                keys += ["attn_qkv"] if fused_qkv else ["attn_q", "attn_k", "attn_v"]
                keys += [] if fused_ffn or not family.gated else ["ffn_gate"]
                layer = {k: weight(p + k + ".weight") for k in keys}
                # biases: qwen2's q/k/v; Phi-2's everywhere (the LayerNorms' included)
                for k in keys:
                    layer[k + "_bias"] = weight(p + k + ".bias", optional=True)
                n_q, n_kv = self.hp.n_head * self.hp.head_dim, self.hp.n_head_kv * self.hp.head_dim
                for suffix in ("", "_bias"):
                    if fused_qkv and layer.get("attn_qkv" + suffix) is not None:
                        q, k, v = layer.pop("attn_qkv" + suffix).split([n_q, n_kv, n_kv])
                        layer["attn_q" + suffix], layer["attn_k" + suffix], layer["attn_v" + suffix] = q, k, v
                    layer.setdefault("attn_q" + suffix, None)
                if fused_ffn:
                    layer["ffn_gate"], layer["ffn_up"] = layer["ffn_up"].chunk(2, dim=0)
                self.layers.append(layer)
                for k in ("attn_q_norm", "attn_k_norm",  # qwen3's and gemma3's per-head norms
                          "post_attention_norm", "post_ffw_norm"):  # gemma2/3's post-norms
                    self.layers[-1][k] = weight(p + k + ".weight", optional=True)
        hp = self.hp
        self._theta = {}
        for base in {hp.rope_base, hp.rope_base_swa or hp.rope_base}:
            theta = base ** (-torch.arange(0, hp.rope_dim, 2, dtype=torch.float64) / hp.rope_dim)
            if factors is not None:
                theta = theta / factors.double().cpu()
            self._theta[base] = theta
        self._rope_cache: dict[tuple, tuple] = {}

    # pieces ---------------------------------------------------------------------------------
    def _rms(self, x, w):
        return x * self.torch.rsqrt((x * x).mean(-1, keepdim=True) + self.hp.eps) * w

    def _norm(self, x, w, bias=None):
        """The family's block / final norm: RMSNorm, or LayerNorm with its bias (Phi-2)."""
        if not self.hp.family.layer_norm:
            return self._rms(x, w)
        x = x - x.mean(-1, keepdim=True)
        y = self._rms(x, w)
        return y if bias is None else y + bias

    def _rope(self, x, seq: int, base: float):
        """Rotate x (batch, seq, heads, head_dim) by position, in llama.cpp's pairing for the arch."""
        torch, hp = self.torch, self.hp
        if (seq, base) not in self._rope_cache:
            pos = torch.arange(seq, dtype=torch.float64) * hp.rope_scale
            ang = pos[:, None] * self._theta[base][None, :]
            self._rope_cache[(seq, base)] = (ang.cos().to(self.device, self.dtype)[None, :, None, :],
                                             ang.sin().to(self.device, self.dtype)[None, :, None, :])
        cos, sin = self._rope_cache[(seq, base)]
        rot, rest = x[..., :hp.rope_dim], x[..., hp.rope_dim:]
        if hp.family.neox_rope:
            half = hp.rope_dim // 2
            x0, x1 = rot[..., :half], rot[..., half:]
            out = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        else:
            x0, x1 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    def _attention(self, w: dict, x, layer: int):
        torch, hp = self.torch, self.hp
        b, seq, _ = x.shape
        swa = bool(hp.swa_layers and hp.swa_layers[layer] and hp.n_swa)
        base = hp.rope_base_swa if swa and hp.rope_base_swa else hp.rope_base
        h = self._norm(x, w["attn_norm"], w["attn_norm_bias"])
        q, k, v = h @ w["attn_q"].T, h @ w["attn_k"].T, h @ w["attn_v"].T
        if w["attn_q_bias"] is not None:
            q, k, v = q + w["attn_q_bias"], k + w["attn_k_bias"], v + w["attn_v_bias"]
        q = q.view(b, seq, hp.n_head, hp.head_dim)
        k = k.view(b, seq, hp.n_head_kv, hp.head_dim)
        v = v.view(b, seq, hp.n_head_kv, hp.head_dim)
        if w["attn_q_norm"] is not None:
            q, k = self._rms(q, w["attn_q_norm"]), self._rms(k, w["attn_k_norm"])
        q, k = self._rope(q, seq, base), self._rope(k, seq, base)
        group = hp.n_head // hp.n_head_kv
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if swa or hp.attn_softcap:
            o = self._masked_attention(q, k, v, hp.n_swa if swa else 0)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._attn_scale())
        o = o.transpose(1, 2).reshape(b, seq, hp.n_head * hp.head_dim) @ w["attn_output"].T
        if w["attn_output_bias"] is not None:
            o = o + w["attn_output_bias"]
        if w["post_attention_norm"] is not None:
            o = self._rms(o, w["post_attention_norm"])
        return o

    def _attn_scale(self) -> float:
        return self.hp.attn_scale or 1.0 / float(np.sqrt(self.hp.head_dim))

    def _masked_attention(self, q, k, v, window: int):
        """Causal attention with Gemma 2's score soft-cap and a sliding window (llama.cpp's
        LLAMA_SWA_TYPE_STANDARD: a query at p sees keys at p − window < p' ≤ p)."""
        torch, hp = self.torch, self.hp
        seq = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self._attn_scale()
        if hp.attn_softcap:
            scores = hp.attn_softcap * torch.tanh(scores / hp.attn_softcap)
        pos = torch.arange(seq, device=q.device)
        allowed = pos[None, :] <= pos[:, None]
        if window:
            allowed = allowed & (pos[:, None] - pos[None, :] < window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def _ffn_parts(self, w: dict, x, residual):
        """act and up of the FFN of the layer whose input is x and FFN residual `residual` (x + attention)."""
        family = self.hp.family
        h = self._norm(x, w["attn_norm"], w["attn_norm_bias"]) if family.parallel else \
            self._norm(residual, w["ffn_norm"], w["ffn_norm_bias"])
        up = h @ w["ffn_up"].T
        if w["ffn_up_bias"] is not None:
            up = up + w["ffn_up_bias"]
        gate = h @ w["ffn_gate"].T if family.gated else up
        if family.gated and w.get("ffn_gate_bias") is not None:
            gate = gate + w["ffn_gate_bias"]
        if family.act == "gelu_tanh":
            act = self.torch.nn.functional.gelu(gate, approximate="tanh")
        else:
            act = self.torch.nn.functional.silu(gate)
        return act, up if family.gated else self.torch.ones_like(act)

    def _block_from_act(self, w: dict, residual, act, up):
        out = (act * up) @ w["ffn_down"].T
        if w["ffn_down_bias"] is not None:
            out = out + w["ffn_down_bias"]
        if w["post_ffw_norm"] is not None:
            out = self._rms(out, w["post_ffw_norm"])
        return residual + out

    def _head(self, x):
        """log-softmax at the last position, (batch, vocab)."""
        z = self._norm(x[:, -1, :], self.out_norm, self.out_norm_bias) @ self.out.T
        if self.out_bias is not None:
            z = z + self.out_bias
        if self.hp.final_softcap:
            z = self.hp.final_softcap * self.torch.tanh(z / self.hp.final_softcap)
        return self.torch.log_softmax(z, dim=-1)

    def _embed(self, tokens):
        x = self.embed[self.torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)][None]
        if self.hp.family.embed_scale:
            x = x * float(np.float32(np.sqrt(np.float32(self.hp.n_embd))))  # llama.cpp's sqrtf(n_embd)
        return x

    # what IG uses ---------------------------------------------------------------------------
    def run(self, tokens: Sequence[int], keep: Sequence[int] = ()) -> tuple["object", dict[int, LayerState]]:
        """log p(· | tokens) at the last position (vocab,), and the FFN state of the `keep` layers."""
        torch = self.torch
        keep = set(keep)
        states: dict[int, LayerState] = {}
        with torch.no_grad():
            x = self._embed(tokens)
            for i, w in enumerate(self.layers):
                residual = x + self._attention(w, x, i)
                act, up = self._ffn_parts(w, x, residual)
                if i in keep:
                    states[i] = LayerState(residual[0], act[0], up[0])
                x = self._block_from_act(w, residual, act, up)
            return self._head(x)[0], states

    def logprob_from_act(self, layer: int, state: LayerState, acts, target: int):
        """log p(target) at the last position for a batch of replacement acts (batch, seq, n_ff) of
        `layer`, everything before that FFN (residual, up) held at the prompt's values."""
        x = self._block_from_act(self.layers[layer], state.residual[None], acts, state.up[None])
        for i in range(layer + 1, self.hp.n_layer):
            w = self.layers[i]
            residual = x + self._attention(w, x, i)
            act, up = self._ffn_parts(w, x, residual)
            x = self._block_from_act(w, residual, act, up)
        return self._head(x)[:, target]


def _hyper(tensors) -> Hyper:
    arch = tensors.architecture
    family = family_of(arch, "--attribution ig")
    s = tensors.summary

    def meta(key: str, default=None):
        v = s.value(f"{arch}.{key}")
        if v is None and default is None:
            raise ProbeError(f"{tensors.path}: no {arch}.{key} in the metadata")
        return default if v is None else v

    n_embd, n_head = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", n_embd // n_head))
    scaling = s.value(f"{arch}.rope.scaling.type")
    scale = 1.0
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UnsupportedArchitecture(f"{tensors.path}: rope scaling {scaling!r} is not supported by --attribution ig")
        scale = 1.0 / float(meta("rope.scaling.factor"))
    n_layer = int(meta("block_count"))
    n_swa = int(meta("attention.sliding_window", 0)) if family.swa_pattern else 0
    swa_layers: tuple[bool, ...] = ()
    if n_swa:
        # llama.cpp's load_swa_pattern: a per-layer bool array, or a period n (layer i global when i % n == n − 1)
        pattern = s.value(f"{arch}.attention.sliding_window_pattern")
        pattern = pattern.tolist() if hasattr(pattern, "tolist") else pattern
        if isinstance(pattern, list):
            swa_layers = tuple(bool(v) for v in pattern)
        else:
            n = int(pattern or family.swa_pattern)
            swa_layers = tuple(i % n < n - 1 for i in range(n_layer))
    rope_base = float(meta("rope.freq_base", 10000.0))
    # llama.cpp scales the 27B Gemmas' queries by 1/sqrt(n_embd/n_head), not 1/sqrt(head_dim) (src/models/gemma2.cpp)
    big = (arch, n_layer) in (("gemma2", 46), ("gemma3", 62))
    attn_scale = 1.0 / float(np.sqrt(n_embd // n_head)) if big else 0.0
    return Hyper(arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=int(meta("feed_forward_length")),
                 n_head=n_head, n_head_kv=int(meta("attention.head_count_kv", n_head)), head_dim=head_dim,
                 eps=float(meta(family.eps_key)),
                 rope_base=rope_base,
                 rope_dim=int(meta("rope.dimension_count", head_dim)), rope_scale=scale, family=family,
                 rope_base_swa=float(meta("rope.freq_base_swa", rope_base)), n_swa=n_swa, swa_layers=swa_layers,
                 attn_softcap=float(meta("attn_logit_softcapping", family.attn_softcap)),
                 final_softcap=float(meta("final_logit_softcapping", family.final_softcap)),
                 attn_scale=attn_scale)
