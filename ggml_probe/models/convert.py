"""Hugging Face checkpoint folder → GGUF file that llama.cpp loads.

Supports the llama family (Llama 2/3, SmolLM, TinyLlama, Mistral, Mixtral), Qwen2, Qwen3, Qwen3-MoE, Gemma, Gemma 2,
Gemma 3 (text), Phi-2 and Phi-3. Everything architecture-specific that gguf-py already knows (tensor
names, metadata keys, token types, special-token discovery) comes from gguf-py; this module adds
only what a checkpoint folder does not say directly:

- Gemma's RMSNorm multiplies by (1 + w): the norm weights are stored as 1 + w, as llama.cpp's
  own converter does; Gemma 2/3's soft-caps, sliding windows (which layers) and local rope base
  are written as llama.cpp reads them.
- llama.cpp's LLAMA architecture rotates adjacent pairs of q/k dimensions, while Hugging Face
  llama checkpoints rotate the two halves of each head ("rotate_half"), so q/k rows are
  reordered per head. Qwen2/3 run with NEOX rope in llama.cpp, which is rotate-half: no reorder.
- Mixtral's and Qwen3-MoE's experts are stored one matrix per expert (`experts.E.w1/w2/w3`,
  `experts.E.gate_proj/up_proj/down_proj`); llama.cpp reads each layer's experts as one 3-D tensor
  (`ffn_gate_exps` / `ffn_down_exps` / `ffn_up_exps`), so they are stacked.
- the llama.cpp pre-tokenizer name is chosen from the structure of tokenizer.json's
  pre_tokenizer (llama.cpp refuses names it does not know, and a wrong one tokenizes wrongly).

Tensors are streamed: each one is read through a memory map, converted and written before the
next is touched, so peak memory stays near the largest single tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ProbeError, UnsupportedArchitecture
from ..fsutil import atomic_output, check_output
from .store import models_dir

if TYPE_CHECKING:
    import gguf

# HF `architectures` name → gguf-py architecture name (a key of gguf.MODEL_ARCH_NAMES' values).
_ARCH_BY_HF_NAME = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",  # llama.cpp runs Mixtral as llama with expert tensors (ffn_*_exps)
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",  # qwen2 without q/k/v biases, with per-head q/k RMSNorms
    "Qwen3MoeForCausalLM": "qwen3moe",  # qwen3's attention; every layer a softmax-routed MoE, no shared expert
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",  # fused qkv_proj and gate_up_proj, as llama.cpp's phi3 graph reads them
    "PhiForCausalLM": "phi2",  # LayerNorm with biases, parallel attention and FFN, ungated GELU
}
# Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w, so the converter stores 1 + w (as llama.cpp's own does).
_NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}
# The FFN activation each llama.cpp graph applies (HF config key hidden_act, or Gemma's hidden_activation).
_ACTIVATION = {"llama": ("silu",), "qwen2": ("silu",), "qwen3": ("silu",), "qwen3moe": ("silu",),
               "gemma": ("gelu_pytorch_tanh", "gelu"), "gemma2": ("gelu_pytorch_tanh",),
               "gemma3": ("gelu_pytorch_tanh",), "phi3": ("silu",), "phi2": ("gelu_new",)}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_BY_HF_NAME)

OUTTYPES = ("f32", "f16", "bf16")

# Checkpoint tensors that hold nothing a GGUF file needs (recomputed by llama.cpp).
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)

# The Split regexes of tokenizer.json pre-tokenizers whose llama.cpp counterparts are known.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_KNOWN_BPE_PRE = {
    # (pre-tokenizer steps, summarised) → tokenizer.ggml.pre accepted by llama.cpp
    (("split", _LLAMA3_SPLIT), ("byte_level", False)): "llama-bpe",
    (("split", _QWEN2_SPLIT), ("byte_level", False)): "qwen2",
    (("digits", True), ("byte_level", True)): "smollm",
    (("byte_level", True),): "gpt-2",
}


def convert_hf_to_gguf(
    hf_dir: Path,
    out_path: Path | None = None,
    outtype: str = "f16",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a Hugging Face checkpoint folder to a GGUF file and return the file's path.

    hf_dir holds config.json, *.safetensors (one file, or shards listed in
    model.safetensors.index.json) and tokenizer.json and/or tokenizer.model (SentencePiece).
    outtype is "f16", "bf16" or "f32": the type of every 2-D weight; 1-D tensors (norms,
    biases) and an MoE router (ffn_gate_inp, as llama.cpp writes it) stay f32. The default out_path is `models_dir()/<folder name>-<OUTTYPE>.gguf`.
    An existing output is refused unless force. progress(done, total) is called once per
    tensor written. Raises UnsupportedArchitecture or ProbeError with a one-line message.
    """
    import gguf

    hf_dir = Path(hf_dir).expanduser()
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ProbeError(f"unsupported output type {outtype!r} (choose one of: {', '.join(OUTTYPES)})")
    if not hf_dir.is_dir():
        raise ProbeError(f"{hf_dir} is not a folder (expected a Hugging Face checkpoint folder)")

    config = _read_json(hf_dir / "config.json")
    hparams = _read_hparams(config, hf_dir)
    model_name = hf_dir.resolve().name
    if out_path is None:
        out_path = models_dir() / f"{model_name}-{outtype.upper()}.gguf"
    out_path = Path(out_path)
    check_output(out_path, force)

    checkpoint = _SafetensorsCheckpoint.open(hf_dir)
    plan = _plan_tensors(checkpoint, hparams, outtype)
    n_vocab_rows = next(t.shape[0] for t in plan if t.gguf_name == "token_embd.weight")
    vocab = _read_vocab(hf_dir, n_vocab_rows)

    writer = gguf.GGUFWriter(path=None, arch=hparams.arch)
    _add_metadata(writer, hparams, model_name, outtype)
    vocab.add_to(writer, hf_dir)
    for t in plan:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)

    with atomic_output(out_path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, t in enumerate(plan, start=1):
                writer.write_tensor_data(_materialise(t, checkpoint, outtype))
                if progress is not None:
                    progress(done, len(plan))
        finally:
            writer.close()
    return out_path


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class _HParams:
    arch: str  # gguf architecture name: "llama" | "qwen2"
    hf_arch: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_type: str
    rope: dict[str, Any]
    tied_embeddings: bool
    # Gemma 2/3 only (None/empty elsewhere)
    rope_theta_swa: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_dim: int = 0  # rotated dimensions per head (Phi-3's partial rotary); 0: head_dim
    n_expert: int = 0  # mixture of experts (Mixtral, Qwen3-MoE): experts per layer, and how many each token uses
    n_expert_used: int = 0
    n_ff_expert: int = 0  # Qwen3-MoE: one expert's FFN width (moe_intermediate_size); 0: n_ff


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ProbeError(f"{path} is missing (not a Hugging Face checkpoint folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProbeError(f"{path} does not hold a JSON object")
    return data


def _read_hparams(config: dict[str, Any], hf_dir: Path) -> _HParams:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ProbeError(f"{hf_dir / 'config.json'} has no 'architectures' list naming the model class")
    hf_arch = archs[0]
    if hf_arch not in _ARCH_BY_HF_NAME:
        raise UnsupportedArchitecture(
            f"cannot convert {hf_arch}: supported architectures are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise ProbeError(f"{hf_dir / 'config.json'}: '{key}' is missing or not a number")
        return config[key]

    n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    if hf_arch == "Qwen2ForCausalLM":
        head_dim = n_embd // n_head  # Qwen2 has no head_dim setting; a stray key must not win
    if n_head % n_head_kv:
        raise ProbeError(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    arch = _ARCH_BY_HF_NAME[hf_arch]
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act not in _ACTIVATION[arch]:
        raise ProbeError(f"hidden activation {act!r} is not supported (llama.cpp's {hf_arch} graph uses "
                         f"{_ACTIVATION[arch][0]})")

    # transformers >= 5 writes rope_parameters (with rope_theta inside); older ones rope_scaling.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_swa = None
    if "full_attention" in rope:  # Gemma 3: one rope setting per layer type
        rope_swa = rope.get("sliding_attention") or {}
        rope = dict(rope["full_attention"])
        rope_swa = float(rope_swa.get("rope_theta", config.get("rope_local_base_freq", 10000.0)))
    rope_type = str(rope.get("rope_type") or rope.get("type") or "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ProbeError(f"rope scaling {rope_type!r} is not supported (supported: linear, llama3)")
    if rope_type == "llama3" and _ARCH_BY_HF_NAME[hf_arch] != "llama":
        raise ProbeError(f"rope scaling 'llama3' is not supported for {hf_arch}")
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    # Mixtral's config counts the experts in num_local_experts, the hub's Qwen3-MoE in num_experts
    # (transformers 5 writes num_local_experts for both)
    n_expert = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if arch == "qwen3moe":
        _check_qwen3moe(config, hf_dir)

    return _HParams(
        arch=_ARCH_BY_HF_NAME[hf_arch],
        hf_arch=hf_arch,
        n_layers=int(need("num_hidden_layers")),
        n_embd=n_embd,
        n_ff=int(need("intermediate_size")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=int(config.get("max_position_embeddings") or 4096),
        rms_eps=float(config.get("rms_norm_eps", config.get("layer_norm_eps", 1e-6))),
        rope_theta=rope_theta,
        rope_type=rope_type,
        rope=rope,
        tied_embeddings=bool(config.get("tie_word_embeddings", arch in _NORM_PLUS_ONE)),
        rope_theta_swa=rope_swa,
        sliding_window=int(config["sliding_window"]) if config.get("sliding_window") else None,
        layer_types=tuple(config.get("layer_types") or ()),
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
        query_pre_attn_scalar=config.get("query_pre_attn_scalar"),
        rope_dim=int(head_dim * float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))),
        n_expert=n_expert,
        n_expert_used=int(config.get("num_experts_per_tok") or 0) if n_expert else 0,
        n_ff_expert=int(need("moe_intermediate_size")) if arch == "qwen3moe" else 0,
    )


def _check_qwen3moe(config: dict[str, Any], hf_dir: Path) -> None:
    """What llama.cpp's qwen3moe graph (src/models/qwen3moe.cpp) fixes: every layer an MoE block, and the top-k
    weights renormalised to sum to 1 (build_moe_ffn's norm_w is true there, whatever the file says)."""
    where = hf_dir / "config.json"
    if not (config.get("num_local_experts") or config.get("num_experts")) or not config.get("num_experts_per_tok"):
        raise ProbeError(f"{where}: num_experts or num_experts_per_tok is missing (a Qwen3MoeForCausalLM needs both)")
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
        raise ProbeError(f"{where}: dense layers among the experts (mlp_only_layers / decoder_sparse_step) are not "
                         "supported: llama.cpp's qwen3moe graph makes every layer a mixture of experts")
    if config.get("norm_topk_prob") is False:
        raise ProbeError(f"{where}: norm_topk_prob false is not supported: llama.cpp's qwen3moe graph always "
                         "renormalises the top-k routing weights")


def _add_metadata(writer: gguf.GGUFWriter, hp: _HParams, model_name: str, outtype: str) -> None:
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }
    writer.add_type("model")
    writer.add_name(model_name)
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    if hp.arch == "phi2":  # LayerNorm, not RMSNorm
        writer.add_layer_norm_eps(hp.rms_eps)
    else:
        writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.rope_dim or hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
    if hp.arch in ("gemma2", "gemma3"):
        _add_gemma_metadata(writer, hp)
    if hp.n_expert:
        writer.add_expert_count(hp.n_expert)
        writer.add_expert_used_count(hp.n_expert_used)
    if hp.n_ff_expert:
        writer.add_expert_feed_forward_length(hp.n_ff_expert)


def _add_gemma_metadata(writer: gguf.GGUFWriter, hp: _HParams) -> None:
    """Sliding windows (which layers, how wide), soft-capping and the local rope base."""
    if hp.query_pre_attn_scalar is not None and float(hp.query_pre_attn_scalar) != float(hp.head_dim):
        # llama.cpp scales queries by 1/sqrt(head_dim) (the 27B's n_embd/n_head aside)
        raise ProbeError(f"query_pre_attn_scalar {hp.query_pre_attn_scalar} ≠ head_dim {hp.head_dim} is not "
                         "supported (llama.cpp scales queries by 1/sqrt(head_dim))")
    if hp.sliding_window:
        writer.add_sliding_window(hp.sliding_window)
        if hp.layer_types:
            writer.add_array(f"{hp.arch}.attention.sliding_window_pattern",
                             [t == "sliding_attention" for t in hp.layer_types])
    if hp.attn_softcap:
        writer.add_attn_logit_softcapping(float(hp.attn_softcap))
    if hp.final_softcap:
        writer.add_final_logit_softcapping(float(hp.final_softcap))
    if hp.rope_theta_swa is not None:
        writer.add_float32(f"{hp.arch}.rope.freq_base_swa", hp.rope_theta_swa)


# --------------------------------------------------------------------------- tensors


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int


class _SafetensorsCheckpoint:
    """Every tensor of a (possibly sharded) safetensors checkpoint, read one at a time.

    The safetensors layout is read directly (an 8-byte header length, a JSON header, raw
    little-endian data) instead of through safetensors' numpy loader, which cannot return
    bf16 tensors, the dtype most checkpoints are published in.
    """

    def __init__(self, tensors: dict[str, _StoredTensor]):
        self.tensors = tensors

    @classmethod
    def open(cls, hf_dir: Path) -> _SafetensorsCheckpoint:
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ProbeError(f"{index} has no 'weight_map'")
            files = sorted({hf_dir / str(f) for f in weight_map.values()})
        else:
            files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise ProbeError(f"no *.safetensors files in {hf_dir} (PyTorch .bin checkpoints are not supported)")
        tensors: dict[str, _StoredTensor] = {}
        for file in files:
            for name, stored in _read_safetensors_header(file).items():
                if name in tensors:
                    raise ProbeError(f"tensor {name} appears in both {tensors[name].file.name} and {file.name}")
                tensors[name] = stored
        return cls(tensors)

    def load_f32(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        count = math.prod(t.shape)
        raw = np.memmap(t.file, dtype=np.dtype(_SAFETENSORS_DTYPES[t.dtype]).newbyteorder("<"), mode="r",
                        offset=t.start, shape=(count,))
        if t.dtype == "BF16":  # bf16 is the top half of an f32
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        del raw
        return values.reshape(t.shape)


def _read_safetensors_header(file: Path) -> dict[str, _StoredTensor]:
    if not file.is_file():
        raise ProbeError(f"{file} is missing (listed in model.safetensors.index.json)")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise ProbeError(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProbeError(f"{file} is not a safetensors file (unreadable header)") from exc
    data_start = 8 + n
    out: dict[str, _StoredTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ProbeError(f"{file.name}: tensor {name} has dtype {dtype}; only F32, F16, BF16 and F64 are supported")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if end - begin != math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize or data_start + end > size:
            raise ProbeError(f"{file} is truncated or corrupt (tensor {name})")
        out[name] = _StoredTensor(file, dtype, shape, data_start + begin, data_start + end)
    return out


@dataclass(frozen=True)
class _PlannedTensor:
    gguf_name: str
    hf_name: str | None  # None: generated (rope_freqs)
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    interleave_heads: int  # >0: reorder rotary halves into pairs for this many heads
    generated: np.ndarray | None = None
    norm_plus_one: bool = False  # Gemma's (1 + w) RMSNorm weight
    stacked: tuple[str, ...] = ()  # one expert's tensor per entry, stacked into (n_expert, rows, cols)


# 2-D tensors kept F32 at every outtype: the MoE router, as llama.cpp's convert_hf_to_gguf.py writes it
# (and llama-quantize never quantizes it: a rounded router changes which experts a token is sent to).
_ALWAYS_F32 = re.compile(r"blk\.\d+\.ffn_gate_inp\.weight")


def _plan_tensors(checkpoint: _SafetensorsCheckpoint, hp: _HParams, outtype: str) -> list[_PlannedTensor]:
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == hp.arch)
    name_map = gguf.get_tensor_name_map(arch, hp.n_layers)
    weight_qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
    }[outtype]

    plan: list[_PlannedTensor] = []
    seen: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = {}  # "….experts.w1.weight" (gate_proj, …) → expert id → its tensor
    for hf_name, stored in checkpoint.tensors.items():
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        if m := _EXPERT_TENSOR.fullmatch(hf_name):
            experts.setdefault(f"{m['prefix']}.{m['kind']}.weight", {})[int(m["expert"])] = hf_name
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ProbeError(f"tensor {hf_name} has no {hp.arch} GGUF counterpart (is this really a {hp.hf_arch}?)")
        if gguf_name == "output.weight" and hp.tied_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if gguf_name in seen:
            raise ProbeError(f"tensors {seen[gguf_name]} and {hf_name} both map to {gguf_name}")
        seen[gguf_name] = hf_name

        interleave = 0
        if hp.arch == "llama":
            if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", gguf_name):
                interleave = hp.n_head
            elif re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", gguf_name):
                interleave = hp.n_head_kv
        if interleave and (stored.shape[0] != interleave * hp.head_dim or hp.head_dim % 2):
            raise ProbeError(
                f"{hf_name} has {stored.shape[0]} rows, expected {interleave} heads × head_dim {hp.head_dim}"
            )
        keep_f32 = len(stored.shape) < 2 or _ALWAYS_F32.fullmatch(gguf_name)
        qtype = gguf.GGMLQuantizationType.F32 if keep_f32 else weight_qtype
        plus_one = hp.arch in _NORM_PLUS_ONE and gguf_name.endswith("norm.weight")
        plan.append(_PlannedTensor(gguf_name, hf_name, stored.shape, qtype, _nbytes(stored.shape, qtype), interleave,
                                   norm_plus_one=plus_one))

    for merged, by_expert in experts.items():
        plan.append(_stacked_experts(merged, by_expert, checkpoint, hp, name_map, weight_qtype))
        seen[plan[-1].gguf_name] = merged

    if "token_embd.weight" not in seen:
        raise ProbeError("the checkpoint has no token embedding (model.embed_tokens.weight)")
    attn_in = "attn_qkv" if hp.arch == "phi3" else "attn_q"  # phi3's fused q/k/v projection
    missing = [f"blk.{i}.{attn_in}.weight" for i in range(hp.n_layers) if f"blk.{i}.{attn_in}.weight" not in seen]
    if missing:
        raise ProbeError(f"the checkpoint lacks {missing[0]}'s source tensor (incomplete shards?)")

    if hp.rope_type == "llama3":
        factors = _llama3_rope_factors(hp)
        f32 = gguf.GGMLQuantizationType.F32
        plan.append(_PlannedTensor("rope_freqs.weight", None, factors.shape, f32, factors.nbytes, 0, factors))
    return sorted(plan, key=_file_order)


_EXPERT_TENSOR = re.compile(
    r"(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<kind>w[123]|gate_proj|up_proj|down_proj)\.weight")


def _stacked_experts(merged: str, by_expert: dict[int, str], checkpoint: _SafetensorsCheckpoint, hp: _HParams,
                     name_map, qtype) -> _PlannedTensor:
    """One layer's experts of one kind (w1/gate_proj, w2/down_proj, w3/up_proj) as the 3-D tensor llama.cpp reads."""
    gguf_name = name_map.get_name(merged, try_suffixes=(".weight",))
    if gguf_name is None:
        raise ProbeError(f"expert tensors {merged} have no {hp.arch} GGUF counterpart")
    if sorted(by_expert) != list(range(hp.n_expert)):
        raise ProbeError(f"{merged}: the checkpoint holds experts {sorted(by_expert)}, config.json says "
                         f"{hp.n_expert} experts")
    names = tuple(by_expert[e] for e in range(hp.n_expert))
    shapes = {checkpoint.tensors[n].shape for n in names}
    if len(shapes) != 1:
        raise ProbeError(f"{merged}: the experts' tensors differ in shape ({sorted(shapes)})")
    shape = (hp.n_expert, *shapes.pop())
    return _PlannedTensor(gguf_name, None, shape, qtype, _nbytes(shape, qtype), 0, stacked=names)


def _file_order(t: _PlannedTensor) -> tuple[int, str]:
    """Global tensors, then blocks in numeric order (checkpoints list blk.10 before blk.2)."""
    if m := re.match(r"blk\.(\d+)\.", t.gguf_name):
        return int(m.group(1)), t.gguf_name
    return (-1 if t.gguf_name in ("token_embd.weight", "rope_freqs.weight") else 1 << 30), t.gguf_name


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    import gguf

    bytes_per_value = 4 if qtype == gguf.GGMLQuantizationType.F32 else 2  # f16 and bf16
    return math.prod(shape) * bytes_per_value


def _llama3_rope_factors(hp: _HParams) -> np.ndarray:
    """Per-frequency divisors that reproduce Llama 3.1's rope rescaling in llama.cpp.

    transformers scales inv_freq: unchanged for short wavelengths, divided by `factor` for long
    ones, and blended in between; llama.cpp divides each rotation frequency by rope_freqs[i].
    """
    r = hp.rope
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
    return divisors.astype(np.float32)


def _materialise(t: _PlannedTensor, checkpoint: _SafetensorsCheckpoint, outtype: str) -> np.ndarray:
    import gguf

    if t.generated is not None:
        return t.generated
    if t.stacked:
        data = np.stack([checkpoint.load_f32(n) for n in t.stacked])
    else:
        assert t.hf_name is not None
        data = checkpoint.load_f32(t.hf_name)
    if t.interleave_heads:
        data = _rotary_halves_to_pairs(data, t.interleave_heads)
    if t.norm_plus_one:
        data = data + np.float32(1.0)
    if t.qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t.qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.BF16)


def _rotary_halves_to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of each head from [x0..x(d/2-1), y0..y(d/2-1)] to [x0, y0, x1, y1, ...].

    HF llama rotates dimension i with i + d/2 (rotate_half); llama.cpp's LLAMA rope rotates
    2i with 2i+1. Works for weights (rows × in) and biases (rows,).
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- tokenizer


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None
    add_space_prefix: bool | None = None

    def add_to(self, writer: gguf.GGUFWriter, hf_dir: Path) -> None:
        import gguf

        writer.add_vocab_size(len(self.tokens))
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        special = gguf.SpecialVocab(hf_dir, load_merges=self.model == "gpt2", n_vocab=len(self.tokens))
        if self.model == "gpt2" and not special.merges:
            raise ProbeError(f"{hf_dir / 'tokenizer.json'} has no BPE merges")
        if "bos" not in special.add_special_token:
            # Neither tokenizer_config nor tokenizer.json's post-processor asks for BOS: a fast
            # (tokenizer.json) tokenizer then adds none, a slow SentencePiece llama one does.
            special.add_special_token["bos"] = not (hf_dir / "tokenizer.json").is_file()
        special.add_to_gguf(writer, quiet=True)


def _read_vocab(hf_dir: Path, n_rows: int) -> _Vocab:
    """tokenizer.json decides the kind of tokenizer; tokenizer.model, when present, supplies
    the real scores of a SentencePiece one."""
    tok_json_path = hf_dir / "tokenizer.json"
    tok_json = _read_json(tok_json_path) if tok_json_path.is_file() else None
    has_spm_model = (hf_dir / "tokenizer.model").is_file()
    if tok_json is None:
        if not has_spm_model:
            raise ProbeError(f"{hf_dir} has neither tokenizer.json nor tokenizer.model")
        vocab = _sentencepiece_vocab(hf_dir, None)
    else:
        model = tok_json.get("model") or {}
        if model.get("type") != "BPE":
            raise ProbeError(f"tokenizer.json model type {model.get('type')!r} is not supported (only BPE)")
        if not model.get("byte_fallback"):
            vocab = _byte_level_bpe_vocab(tok_json)
        elif has_spm_model:
            vocab = _sentencepiece_vocab(hf_dir, tok_json)
        else:
            vocab = _byte_fallback_bpe_vocab(tok_json)
            vocab.add_space_prefix = _space_prefix(hf_dir, tok_json)

    if len(vocab.tokens) > n_rows:
        raise ProbeError(f"the tokenizer has {len(vocab.tokens)} tokens but the embedding only {n_rows} rows")
    _pad_vocab(vocab, n_rows)
    return vocab


def _added_tokens(tok_json: dict[str, Any] | None) -> dict[int, tuple[str, bool]]:
    """tokenizer.json's added_tokens as id → (text, is_special)."""
    if not tok_json:
        return {}
    return {int(a["id"]): (str(a["content"]), bool(a.get("special"))) for a in tok_json.get("added_tokens") or []}


def _tokens_by_id(vocab: dict[str, int], added: dict[int, tuple[str, bool]]) -> list[str]:
    by_id = {int(i): t for t, i in vocab.items()}
    for i, (text, _special) in added.items():
        by_id.setdefault(i, text)
    n = max(by_id) + 1 if by_id else 0
    holes = [i for i in range(n) if i not in by_id]
    if holes:
        raise ProbeError(f"tokenizer.json leaves token id {holes[0]} unassigned")
    return [by_id[i] for i in range(n)]


def _byte_level_bpe_vocab(tok_json: dict[str, Any]) -> _Vocab:
    import gguf

    added = _added_tokens(tok_json)
    texts = _tokens_by_id(tok_json["model"]["vocab"], added)
    types = []
    for i in range(len(texts)):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return _Vocab("gpt2", _bpe_pre_name(tok_json), [t.encode("utf-8") for t in texts], [int(t) for t in types], None)


def _bpe_pre_name(tok_json: dict[str, Any]) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    summary: list[tuple[str, Any]] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            summary.append(("split", (step.get("pattern") or {}).get("Regex")))
        elif kind == "ByteLevel":
            summary.append(("byte_level", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            summary.append(("digits", bool(step.get("individual_digits"))))
        else:
            summary.append((str(kind), None))
    name = _KNOWN_BPE_PRE.get(tuple(summary))
    if name is None:
        known = ", ".join(sorted(set(_KNOWN_BPE_PRE.values())))
        raise ProbeError(f"tokenizer.json's pre-tokenizer {summary} matches no llama.cpp pre-tokenizer known here ({known})")
    return name


def _sentencepiece_vocab(hf_dir: Path, tok_json: dict[str, Any] | None) -> _Vocab:
    import gguf

    try:
        spm = gguf.vocab.SentencePieceVocab(hf_dir)
    except RuntimeError as exc:
        if gguf.vocab.SentencePieceProcessor is None:
            raise ProbeError("reading tokenizer.model needs the sentencepiece package: pip install sentencepiece") from exc
        raise ProbeError(f"{hf_dir / 'tokenizer.model'} is not a SentencePiece model: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ProbeError(f"{hf_dir / 'tokenizer.model'} could not be read: {exc}") from exc
    tokens, scores, types = [], [], []
    for text, score, ttype in spm.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    # tokenizer.json may know more added tokens (chat markers) than tokenizer.model
    for i, (text, special) in sorted(_added_tokens(tok_json).items()):
        kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        if i < len(tokens):
            if types[i] == gguf.TokenType.NORMAL and tokens[i] == text.encode("utf-8"):
                types[i] = int(kind)
        elif i == len(tokens):
            tokens.append(text.encode("utf-8"))
            scores.append(-1000.0)
            types.append(int(kind))
        else:
            raise ProbeError(f"tokenizer.json adds token id {i} after a gap (tokenizer.model has {len(tokens)})")
    return _Vocab("llama", "default", tokens, types, scores, _space_prefix(hf_dir, tok_json))


def _byte_fallback_bpe_vocab(tok_json: dict[str, Any]) -> _Vocab:
    """A SentencePiece-style BPE (byte fallback, ▁ for spaces) known only through tokenizer.json.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the highest
    score, so each token scores minus the rank of the first merge that produces it.
    """
    import gguf

    added = _added_tokens(tok_json)
    model = tok_json["model"]
    texts = _tokens_by_id(model["vocab"], added)
    merge_rank: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merge_rank.setdefault(left + right, rank)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i, text in enumerate(texts):
        if i in added:
            ttype = gguf.TokenType.UNKNOWN if text == unk else (
                gguf.TokenType.CONTROL if added[i][1] else gguf.TokenType.USER_DEFINED)
        elif text == unk:
            ttype = gguf.TokenType.UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            ttype = gguf.TokenType.BYTE
        else:
            ttype = gguf.TokenType.NORMAL
        tokens.append(text.encode("utf-8"))
        scores.append(-float(merge_rank[text]) if text in merge_rank else 0.0)
        types.append(int(ttype))
    return _Vocab("llama", "default", tokens, types, scores)


def _space_prefix(hf_dir: Path, tok_json: dict[str, Any] | None) -> bool | None:
    """Whether the HF tokenizer puts "▁" before the first word (llama.cpp's add_space_prefix)."""
    if (hf_dir / "tokenizer_config.json").is_file():
        setting = _read_json(hf_dir / "tokenizer_config.json").get("add_prefix_space")
        if isinstance(setting, bool):
            return setting
    if tok_json is None:
        return None  # llama.cpp's SentencePiece default (a prefix) matches tokenizer.model's usual one
    text = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    for m in re.finditer(r'"type": "Metaspace"[^}]*', text):
        if '"prepend_scheme": "never"' not in m.group(0) and '"add_prefix_space": false' not in m.group(0):
            return True
    return False


def _pad_vocab(vocab: _Vocab, n_rows: int) -> None:
    """Fill the embedding rows no token names (checkpoints round vocab_size up)."""
    import gguf

    for i in range(len(vocab.tokens), n_rows):
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.types.append(int(gguf.TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
