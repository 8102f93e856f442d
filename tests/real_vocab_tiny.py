"""Tiny random-weight llama models that carry a real tokenizer (llama.cpp's vocab-only test files in
../shared/data/vocab/), and an independent reading of that tokenizer (transformers' GGUF converter).

The model is a 1-layer llama with F32 weights and tied embeddings; every `tokenizer.*` key of the vocab
file is copied as it is, so llama.cpp tokenizes exactly as for the real model (SentencePiece, BPE,
Gemma's 262k vocabulary, GPT-2 without BOS).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from conftest import shared_data_dir

VOCABS = shared_data_dir() / "vocab"
NAMES = ("llama-spm", "phi-3", "gemma-4", "llama-bpe", "qwen2", "gpt-2")
N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, N_CTX = 64, 96, 4, 2, 1, 2048


def vocab_path(name: str) -> Path:
    return VOCABS / f"ggml-vocab-{name}.gguf"


def write_tiny_model(path: Path, vocab_file: Path, seed: int = 0) -> Path:
    """The tiny llama, written by gguf-py's writer, with the vocab file's `tokenizer.*` key-values spliced in
    byte for byte (gguf-py's reader takes minutes over a 262k vocabulary; copying the bytes takes none)."""
    import gguf

    raw = vocab_file.read_bytes()
    tokenizer_kvs, n_vocab = _tokenizer_key_values(raw)
    rng = np.random.default_rng(seed)
    body = path.with_suffix(".body.gguf")
    w = gguf.GGUFWriter(str(body), "llama")
    w.add_name(f"tiny llama with the tokenizer of {vocab_file.name}")
    w.add_block_count(N_LAYER)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)  # all F32

    def weights(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    head_dim = N_EMBD // N_HEAD
    # logits = normalised hidden state · embeddings: a row scale of 0.25 keeps them O(1), so label
    # probabilities are neither 0 nor 1
    w.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD, scale=0.25))
    for layer in range(N_LAYER):
        blk = f"blk.{layer}."
        w.add_tensor(blk + "attn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(blk + "attn_q.weight", weights(N_EMBD, N_EMBD, scale=0.2))
        w.add_tensor(blk + "attn_k.weight", weights(N_HEAD_KV * head_dim, N_EMBD, scale=0.2))
        w.add_tensor(blk + "attn_v.weight", weights(N_HEAD_KV * head_dim, N_EMBD, scale=0.2))
        w.add_tensor(blk + "attn_output.weight", weights(N_EMBD, N_EMBD, scale=0.2))
        w.add_tensor(blk + "ffn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(blk + "ffn_gate.weight", weights(N_FF, N_EMBD, scale=0.2))
        w.add_tensor(blk + "ffn_up.weight", weights(N_FF, N_EMBD, scale=0.2))
        w.add_tensor(blk + "ffn_down.weight", weights(N_EMBD, N_FF, scale=0.2))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _splice(body, path, tokenizer_kvs)
    body.unlink()
    return path


# GGUF value types: sizes of the fixed-size ones (8: string, 9: array)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_ALIGNMENT = 32


def _skip_string(buf: bytes, pos: int) -> int:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return pos + 8 + n


def _skip_kv(buf: bytes, pos: int) -> tuple[str, int, int]:
    """(key, position after the key-value, array length or -1) of the key-value at pos."""
    (n,) = struct.unpack_from("<Q", buf, pos)
    key = buf[pos + 8:pos + 8 + n].decode()
    pos += 8 + n
    (tag,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    if tag == 8:
        return key, _skip_string(buf, pos), -1
    if tag != 9:
        return key, pos + _SIZES[tag], -1
    element, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if element != 8:
        return key, pos + count * _SIZES[element], count
    for _ in range(count):
        pos = _skip_string(buf, pos)
    return key, pos, count


def _tokenizer_key_values(raw: bytes) -> tuple[list[bytes], int]:
    """The raw bytes of every tokenizer.* key-value of a GGUF file, and the vocabulary size."""
    _, _, n_tensors, n_kv = struct.unpack_from("<IIqq", raw, 0)
    pos, out, n_vocab = 24, [], 0
    for _ in range(n_kv):
        key, end, count = _skip_kv(raw, pos)
        if key.startswith("tokenizer."):
            out.append(raw[pos:end])
        if key == "tokenizer.ggml.tokens":
            n_vocab = count
        pos = end
    return out, n_vocab


def _splice(body: Path, path: Path, extra: list[bytes]) -> None:
    """body + the extra key-values (after its own), with the tensor data realigned."""
    raw = body.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIqq", raw, 0)
    pos = 24
    for _ in range(n_kv):
        pos = _skip_kv(raw, pos)[1]
    kv_end = pos
    for _ in range(n_tensors):  # name, n_dims, dims, type, offset
        pos = _skip_string(raw, pos)
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    data = raw[pos + (-pos) % _ALIGNMENT:]
    head = struct.pack("<IIqq", magic, version, n_tensors, n_kv + len(extra)) + raw[24:kv_end] + b"".join(extra)
    head += raw[kv_end:pos]
    path.write_bytes(head + b"\0" * ((-len(head)) % _ALIGNMENT) + data)


class HFTokenizer:
    """transformers' own tokenizer for a GGUF vocabulary (its GGUF converter, as AutoTokenizer uses it with
    gguf_file=, without reading the model config, which for gemma-4 transformers cannot parse)."""

    def __init__(self, vocab_file: Path):
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        arch, tokenizer_dict, _ = get_gguf_tokenizer(str(vocab_file))
        self.tok, _ = convert_gguf_tokenizer(arch, tokenizer_dict)

    def ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def after(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """(the tokens of prompt + continuation after their longest common prefix with the prompt's, that
        prefix's length counted in the prompt's own tokens from its end: 0 = follows the whole prompt)."""
        a, b = self.ids(prompt), self.ids(prompt + continuation)
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return b[k:], len(a) - k
