"""What is inside a GGUF file, read with gguf-py (never loads weights into llama.cpp)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..formats.gguf import validate_gguf
from .quant_types import ftype_name



@dataclass
class TensorInfo:
    name: str
    type: str
    shape: list[int]  # ggml order: ne[0] (the row length) first
    n_elements: int
    n_bytes: int


@dataclass
class GGUFInfo:
    path: str
    size_bytes: int
    architecture: str | None
    name: str | None
    n_layers: int | None
    hidden_size: int | None
    ffn_size: int | None
    n_heads: int | None
    n_kv_heads: int | None
    context_length: int | None
    vocab_size: int | None
    file_type: str | None
    tokenizer: str | None
    n_tensors: int
    n_params: int
    bits_per_weight: float
    tensor_types: dict[str, int]  # ggml type → number of tensors
    tensor_type_bytes: dict[str, int]  # ggml type → bytes of tensor data
    metadata: dict[str, Any] = field(default_factory=dict)  # small scalar key-values (no token arrays)
    tensors: list[TensorInfo] = field(default_factory=list)

    def to_dict(self, with_tensors: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_tensors:
            d.pop("tensors")
        return d

    @property
    def tied_embeddings(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)


def _plain(value: Any) -> Any:
    """JSON-friendly form of a metadata value (NumPy arrays become lists, long ones a summary)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and len(value) > 64:
        return f"<array of {len(value)}>"
    return value


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Summarise a GGUF file: architecture, sizes, file type, tensor types, bits per weight.

    Reads only the header, through the validator's bounds-checked parser (fast even for a
    multi-gigabyte file; a corrupt file raises BadModelFile instead of a numpy error).
    """
    path = Path(path)
    summary = validate_gguf(path, for_llama=False)
    value = summary.value
    arch = summary.architecture

    def hp(suffix: str) -> Any:
        return _plain(value(f"{arch}.{suffix}")) if arch else None

    tensors = [
        TensorInfo(name=t.name, type=t.type_name, shape=[int(x) for x in t.shape],
                   n_elements=int(t.n_elements), n_bytes=int(t.n_bytes))
        for t in summary.tensors
    ]
    types = Counter(t.type for t in tensors)
    type_bytes: Counter[str] = Counter()
    for t in tensors:
        type_bytes[t.type] += t.n_bytes
    n_params = sum(t.n_elements for t in tensors)
    data_bytes = sum(t.n_bytes for t in tensors)

    tokens = value("tokenizer.ggml.tokens")
    # The token list is what llama.cpp uses; {arch}.vocab_size is advisory and may disagree.
    vocab = len(tokens) if tokens is not None else hp("vocab_size")
    tok_model = value("tokenizer.ggml.model")
    tok_pre = value("tokenizer.ggml.pre")
    tokenizer = None if tok_model is None else (f"{tok_model} ({tok_pre})" if tok_pre else tok_model)

    def largest(v: Any) -> Any:  # some architectures store one value per layer
        return max(v) if isinstance(v, list) and v else v

    ft = value("general.file_type")
    metadata = {
        key: _plain(kv.value)
        for key, kv in summary.metadata.items()
        if not key.startswith("tokenizer.ggml.") and key != "tokenizer.chat_template"
    }
    return GGUFInfo(
        path=str(path),
        size_bytes=summary.file_size,
        architecture=arch,
        name=value("general.name"),
        n_layers=hp("block_count"),
        hidden_size=hp("embedding_length"),
        ffn_size=largest(hp("feed_forward_length")),
        n_heads=largest(hp("attention.head_count")),
        n_kv_heads=largest(hp("attention.head_count_kv")),
        context_length=hp("context_length"),
        vocab_size=vocab,
        file_type=ftype_name(ft) if ft is not None else None,
        tokenizer=tokenizer,
        n_tensors=len(tensors),
        n_params=n_params,
        bits_per_weight=(8.0 * data_bytes / n_params) if n_params else 0.0,
        tensor_types=dict(types.most_common()),
        tensor_type_bytes=dict(type_bytes.most_common()),
        metadata=metadata,
        tensors=tensors,
    )
