"""Random-weight llama GGUF files of any shape that carry a real tokenizer: stand-ins for models that
cannot be downloaded here (a 1B llama for the scale benchmarks, tiny ones for tests).

Every `tokenizer.*` key-value of a vocabulary file (llama.cpp's vocab-only GGUF files, e.g.
ggml-vocab-llama-spm.gguf, or any model's GGUF) is copied byte for byte, so llama.cpp tokenizes
exactly as for the real model. The tensors are streamed to disk one at a time, so writing a 1B model
at F16 needs memory for its largest tensor, not for the model.
"""

from __future__ import annotations

import mmap
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# a weight matrix is generated and written in pieces of this many rows × columns at most
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters of a llama (GQA when n_head_kv < n_head)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int = 2048
    tied: bool = False  # output projection = token embeddings (no output.weight)
    rope_freq_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self, n_vocab: int) -> int:
        """Parameters of the model with this vocabulary: what llama.cpp's llama_model_n_params counts."""
        kv = self.n_head_kv * self.head_dim
        per_layer = 2 * self.n_embd * self.n_embd + 2 * kv * self.n_embd + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return n_vocab * self.n_embd * (1 if self.tied else 2) + self.n_layer * per_layer + self.n_embd


# Named shapes. "1b": the shape of a 1B llama (TinyLlama-1.1B / Llama 3.2 1B-like widths) — with a
# 32k vocabulary, untied: 1.10 B parameters, 2.2 GB at F16.
SHAPES: dict[str, LlamaShape] = {
    "1b": LlamaShape(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, n_ctx=4096),
}


@dataclass(frozen=True)
class WeightScales:
    """Standard deviation of each kind of random weight. The defaults (0.02, the usual initialisation)
    keep a 2048-wide model's activations O(1) through 16 layers, so logits and neuron values are finite
    and of a sane size."""

    embedding: float = 0.02
    matrix: float = 0.02
    output: float = 0.02


_FLOAT_TYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # numpy dtype, GGUF general.file_type


def write_llama_gguf(path: Path, vocab_file: Path, shape: LlamaShape, *, outtype: str = "f16", seed: int = 0,
                     scales: WeightScales = WeightScales(), name: str | None = None) -> Path:
    """A llama of `shape` with N(0, scale²) weights (norms 1), vocab_file's tokenizer, written to `path`.

    Matrices are stored at `outtype` (f16 or f32), norm vectors at F32 as llama.cpp's converter does.
    The random draws follow tensor order (embeddings, then per layer q, k, v, o, gate, up, down, then
    the output projection), so a seed gives the same weights at any outtype.
    """
    import gguf  # the writer: a dependency, imported here to keep `import ggml_probe.models` light

    if outtype not in _FLOAT_TYPES:
        raise ValueError(f"outtype must be one of {', '.join(_FLOAT_TYPES)}, not {outtype!r}")
    dtype, file_type = _FLOAT_TYPES[outtype]
    path = Path(path)
    tokenizer_kvs, n_vocab = _tokenizer_key_values(Path(vocab_file).read_bytes())
    plan = _tensor_plan(shape, n_vocab, scales)
    body = path.with_name(path.name + ".body.partial")
    w = gguf.GGUFWriter(str(body), "llama")
    w.add_name(name or f"random llama {shape.n_layer}x{shape.n_embd} with the tokenizer of {Path(vocab_file).name}")
    w.add_block_count(shape.n_layer)
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_freq_base)
    w.add_vocab_size(n_vocab)
    w.add_file_type(file_type)
    for tensor_name, dims, scale in plan:
        t_dtype = np.float32 if scale is None else dtype
        w.add_tensor_info(tensor_name, dims, np.dtype(t_dtype), int(np.prod(dims)) * np.dtype(t_dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, dims, scale in plan:
        w.write_tensor_data(np.ones(dims, np.float32) if scale is None else _normal(rng, dims, scale, dtype))
    w.close()
    partial = path.with_name(path.name + ".partial")
    _splice(body, partial, tokenizer_kvs)
    body.unlink()
    partial.replace(path)
    return path


def _tensor_plan(shape: LlamaShape, n_vocab: int, s: WeightScales) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(name, numpy shape (rows = outputs), scale or None for a norm of ones), in file order."""
    e, kv = shape.n_embd, shape.n_head_kv * shape.head_dim
    plan: list[tuple[str, tuple[int, ...], float | None]] = [("token_embd.weight", (n_vocab, e), s.embedding)]
    for layer in range(shape.n_layer):
        blk = f"blk.{layer}."
        plan += [(blk + "attn_norm.weight", (e,), None),
                 (blk + "attn_q.weight", (e, e), s.matrix),
                 (blk + "attn_k.weight", (kv, e), s.matrix),
                 (blk + "attn_v.weight", (kv, e), s.matrix),
                 (blk + "attn_output.weight", (e, e), s.matrix),
                 (blk + "ffn_norm.weight", (e,), None),
                 (blk + "ffn_gate.weight", (shape.n_ff, e), s.matrix),
                 (blk + "ffn_up.weight", (shape.n_ff, e), s.matrix),
                 (blk + "ffn_down.weight", (e, shape.n_ff), s.matrix)]
    plan.append(("output_norm.weight", (e,), None))
    if not shape.tied:
        plan.append(("output.weight", (n_vocab, e), s.output))
    return plan


def _normal(rng: np.random.Generator, dims: tuple[int, ...], scale: float, dtype) -> np.ndarray:
    """N(0, scale²) at dtype, drawn in float64 row pieces (the same stream as one draw of the whole
    matrix, without its float64 copy in memory)."""
    out = np.empty(dims, dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(1, dims[-1]))
    for start in range(0, dims[0], rows):
        piece = out[start:start + rows]
        piece[...] = rng.standard_normal(piece.shape) * scale
    return out


# ----------------------------------------------------------------------------- GGUF key-value bytes

# GGUF value types: sizes of the fixed-size ones (8: string, 9: array)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_ALIGNMENT = 32  # GGUF's default; the files written here set no general.alignment


def _skip_string(buf, pos: int) -> int:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return pos + 8 + n


def _skip_kv(buf, pos: int) -> tuple[str, int, int]:
    """(key, position after the key-value, array length or -1) of the key-value at pos."""
    (n,) = struct.unpack_from("<Q", buf, pos)
    key = bytes(buf[pos + 8:pos + 8 + n]).decode()
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
    """The raw bytes of every tokenizer.* key-value of a GGUF file, and the vocabulary size. (gguf-py's
    reader takes minutes over a 262k vocabulary; skipping over the bytes takes none.)"""
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
    """body + the extra key-values (after its own), with the tensor data realigned, streamed."""
    with open(body, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIqq", raw, 0)
        pos = 24
        for _ in range(n_kv):
            pos = _skip_kv(raw, pos)[1]
        kv_end = pos
        for _ in range(n_tensors):  # name, n_dims, dims, type, offset
            pos = _skip_string(raw, pos)
            (n_dims,) = struct.unpack_from("<I", raw, pos)
            pos += 4 + 8 * n_dims + 4 + 8
        head = struct.pack("<IIqq", magic, version, n_tensors, n_kv + len(extra)) + raw[24:kv_end] + b"".join(extra)
        head += raw[kv_end:pos]
        with open(path, "wb") as out:
            out.write(head + b"\0" * ((-len(head)) % _ALIGNMENT))
            f.seek(pos + (-pos) % _ALIGNMENT)
            shutil.copyfileobj(f, out, 1 << 24)
