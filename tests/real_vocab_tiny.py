"""Tiny random-weight llama models that carry a real tokenizer (llama.cpp's vocab-only test files in
../shared/data/vocab/), and an independent reading of that tokenizer (transformers' GGUF converter).

The model is a 1-layer llama with F32 weights and tied embeddings; every `tokenizer.*` key of the vocab
file is copied as it is, so llama.cpp tokenizes exactly as for the real model (SentencePiece, BPE,
Gemma's 262k vocabulary, GPT-2 without BOS).
"""

from __future__ import annotations

from pathlib import Path

from conftest import shared_data_dir
from ggml_probe.models.synthetic import LlamaShape, WeightScales, write_llama_gguf

VOCABS = shared_data_dir() / "vocab"
NAMES = ("llama-spm", "phi-3", "gemma-4", "llama-bpe", "qwen2", "gpt-2")
N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, N_CTX = 64, 96, 4, 2, 1, 2048
SHAPE = LlamaShape(N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_CTX, tied=True)


def vocab_path(name: str) -> Path:
    return VOCABS / f"ggml-vocab-{name}.gguf"


def write_tiny_model(path: Path, vocab_file: Path, seed: int = 0) -> Path:
    """The tiny llama (F32, tied embeddings), written by the package's synthetic-model writer."""
    # logits = normalised hidden state · embeddings: a row scale of 0.25 keeps them O(1), so label
    # probabilities are neither 0 nor 1
    return write_llama_gguf(path, vocab_file, SHAPE, outtype="f32", seed=seed,
                            scales=WeightScales(embedding=0.25, matrix=0.2),
                            name=f"tiny llama with the tokenizer of {vocab_file.name}")


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
