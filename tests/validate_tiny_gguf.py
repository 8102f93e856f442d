"""A tiny real llama-architecture GGUF, a map of where each field lies in it, and corruptions.

The model (also in qwen2 / qwen3 / phi2 flavours): 2 layers, hidden 64, FFN 128, 4 heads (2 key-value heads), random weights in F32, F16
and Q8_0, and a real byte-level BPE tokenizer: the first 2,048 tokens of SmolLM2's vocabulary
(the demo model) with the merges that stay inside them. Without the demo, a self-made GPT-2
style vocabulary (256 byte tokens, a few merges, one special token) stands in.

The field map comes from gguf-py's GGUFReader, independently of the validator under test.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_CTX = 2, 64, 128, 4, 2, 256
HEAD_DIM = N_EMBD // N_HEAD
DEMO_VOCAB_SIZE = 2048


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos: int
    eos: int
    unk: int | None
    pad: int | None
    source: str


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def self_made_vocab() -> Vocab:
    byte_chars = _gpt2_byte_chars()
    tokens = ["<|endoftext|>"] + byte_chars
    merges = []
    for pair in ("Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "r e", "Ġ w", "o r", "l l", "Ġ h"):
        left, right = pair.split(" ")
        merges.append(pair)
        tokens.append(left + right)
    return Vocab(tokens, [3] + [1] * (len(tokens) - 1), merges, "gpt-2", 0, 0, None, None, "self-made")


def demo_vocab(size: int = DEMO_VOCAB_SIZE) -> Vocab | None:
    """The demo model's tokenizer cut down to its first `size` tokens, or None without the demo."""
    from ggml_probe.errors import ProbeError
    from ggml_probe.models.store import demo_model_path
    from gguf import GGUFReader

    try:
        path = demo_model_path()
    except ProbeError:
        return None
    reader = GGUFReader(path)

    def strings(key: str) -> list[str]:
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")[:size]
    kept = set(tokens)
    merges = [m for m in strings("tokenizer.ggml.merges")
              if (parts := m.split(" ")) and len(parts) == 2 and parts[0] in kept and parts[1] in kept
              and parts[0] + parts[1] in kept]
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in
             reader.fields["tokenizer.ggml.token_type"].data[:size]]
    scalar = lambda key: int(reader.fields[key].parts[-1][0])  # noqa: E731
    pre = bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode()
    return Vocab(tokens, types, merges, pre, scalar("tokenizer.ggml.bos_token_id"),
                 scalar("tokenizer.ggml.eos_token_id"), scalar("tokenizer.ggml.unknown_token_id"),
                 scalar("tokenizer.ggml.padding_token_id"), "demo")


TINY_ARCHS = ("llama", "qwen2", "qwen3", "phi2")


def write_tiny_llama(path: Path, vocab: Vocab, seed: int = 0) -> Path:
    return write_tiny_model(path, vocab, "llama", seed)


def write_tiny_model(path: Path, vocab: Vocab, arch: str = "llama", seed: int = 0) -> Path:
    """A 2-layer model of one of TINY_ARCHS, laid out as llama.cpp's loader for it expects.

    llama (the one the corruptions start from) mixes F32 norms, F16 and F32 matrices and a
    Q8_0 FFN, with the output tied to the embeddings as in SmolLM2; qwen2 adds q/k/v biases,
    qwen3 q/k norms, phi2 is a GELU model with fused QKV, LayerNorm biases and a separate output.
    """
    import gguf

    assert arch in TINY_ARCHS
    rng = np.random.default_rng(seed)
    n_vocab = len(vocab.tokens)
    n_head_kv = N_HEAD if arch == "phi2" else N_HEAD_KV
    n_kv = n_head_kv * HEAD_DIM
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"ggml-probe tiny test {arch}")
    w.add_block_count(N_LAYER)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(n_head_kv)
    if arch == "phi2":
        w.add_layer_norm_eps(1e-5)
        w.add_rope_dimension_count(HEAD_DIM // 2)  # partial rotary, as in Phi-2
    else:
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(1)  # mostly F16
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    if vocab.unk is not None:
        w.add_unk_token_id(vocab.unk)
    if vocab.pad is not None:
        w.add_pad_token_id(vocab.pad)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")

    def weights(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(N_EMBD, np.float32)
    # numpy shape is (rows, row length): GGUF's ne is the reverse
    w.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD, scale=0.5).astype(np.float16))
    for layer in range(N_LAYER):
        blk = f"blk.{layer}."
        w.add_tensor(blk + "attn_norm.weight", ones)
        if arch == "phi2":
            w.add_tensor(blk + "attn_norm.bias", weights(N_EMBD))
            w.add_tensor(blk + "attn_qkv.weight", weights(3 * N_EMBD, N_EMBD).astype(np.float16))
            w.add_tensor(blk + "attn_qkv.bias", weights(3 * N_EMBD))
            w.add_tensor(blk + "attn_output.weight", weights(N_EMBD, N_EMBD))
            w.add_tensor(blk + "attn_output.bias", weights(N_EMBD))
            w.add_tensor(blk + "ffn_up.weight", weights(N_FF, N_EMBD))
            w.add_tensor(blk + "ffn_up.bias", weights(N_FF))
            w.add_tensor(blk + "ffn_down.weight", weights(N_EMBD, N_FF))
            w.add_tensor(blk + "ffn_down.bias", weights(N_EMBD))
            continue
        w.add_tensor(blk + "attn_q.weight", weights(N_EMBD, N_EMBD).astype(np.float16))
        w.add_tensor(blk + "attn_k.weight", weights(n_kv, N_EMBD).astype(np.float16))
        w.add_tensor(blk + "attn_v.weight", weights(n_kv, N_EMBD).astype(np.float16))
        if arch == "qwen2":
            w.add_tensor(blk + "attn_q.bias", weights(N_EMBD))
            w.add_tensor(blk + "attn_k.bias", weights(n_kv))
            w.add_tensor(blk + "attn_v.bias", weights(n_kv))
        if arch == "qwen3":
            w.add_tensor(blk + "attn_q_norm.weight", np.ones(HEAD_DIM, np.float32))
            w.add_tensor(blk + "attn_k_norm.weight", np.ones(HEAD_DIM, np.float32))
        w.add_tensor(blk + "attn_output.weight", weights(N_EMBD, N_EMBD))
        w.add_tensor(blk + "ffn_norm.weight", ones)
        w.add_tensor(blk + "ffn_gate.weight", weights(N_FF, N_EMBD).astype(np.float16))
        up = gguf.quants.quantize(weights(N_FF, N_EMBD), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(blk + "ffn_up.weight", up, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(blk + "ffn_down.weight", weights(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", ones)
    if arch == "phi2":
        w.add_tensor("output_norm.bias", weights(N_EMBD))
    if arch != "llama":
        w.add_tensor("output.weight", weights(n_vocab, N_EMBD).astype(np.float16))
    if arch == "phi2":
        w.add_tensor("output.bias", weights(n_vocab))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------
# Where things are in the file


@dataclass
class KVSpan:
    key: str
    start: int  # the key's length field
    type_pos: int  # the value type tag
    value_pos: int  # scalar value, string length, or (arrays) the element type
    end: int
    type: int
    element_type: int | None
    count: int  # array length (1 for scalars)


@dataclass
class TensorSpan:
    name: str
    start: int  # the name's length field
    n_dims_pos: int
    dims_pos: int
    n_dims: int
    type_pos: int
    offset_pos: int
    end: int
    shape: tuple[int, ...]
    ggml_type: int


@dataclass
class Layout:
    size: int
    alignment: int
    kvs: list[KVSpan]
    tensors: list[TensorSpan]
    infos_end: int
    data_start: int

    def kv(self, key: str) -> KVSpan:
        return next(k for k in self.kvs if k.key == key)

    def tensor(self, name: str) -> TensorSpan:
        return next(t for t in self.tensors if t.name == name)


def read_layout(path: Path) -> Layout:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    kvs = []
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue  # the header's own fields
        sizes = [int(p.nbytes) for p in f.parts]
        start = f.offset
        type_pos = start + sizes[0] + sizes[1]
        value_pos = type_pos + sizes[2]
        end = start + sum(sizes)
        is_array = int(f.types[0]) == 9
        kvs.append(KVSpan(f.name, start, type_pos, value_pos, end, int(f.types[0]),
                          int(f.types[1]) if is_array else None, len(f.data) if is_array else 1))
    tensors = []
    for t in reader.tensors:
        f = t.field
        sizes = [int(p.nbytes) for p in f.parts]
        start = f.offset
        n_dims_pos = start + sizes[0] + sizes[1]
        dims_pos = n_dims_pos + sizes[2]
        type_pos = dims_pos + sizes[3]
        offset_pos = type_pos + sizes[4]
        tensors.append(TensorSpan(t.name, start, n_dims_pos, dims_pos, int(f.parts[2][0]), type_pos,
                                  offset_pos, offset_pos + 8, tuple(int(d) for d in f.parts[3]),
                                  int(t.tensor_type)))
    alignment = 32
    if "general.alignment" in reader.fields:
        alignment = int(reader.fields["general.alignment"].parts[-1][0])
    infos_end = tensors[-1].end
    data_start = (infos_end + alignment - 1) // alignment * alignment
    return Layout(path.stat().st_size, alignment, kvs, tensors, infos_end, data_start)


# ---------------------------------------------------------------------------------------------
# Byte surgery


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def encode_kv(key: str, vtype: int, value, element_type: int | None = None) -> bytes:
    """One key-value in GGUF encoding (types as gguf.GGUFValueType numbers)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    out = gguf_string(key) + u32(vtype)
    if vtype == 8:
        return out + gguf_string(value)
    if vtype == 9:
        out += u32(element_type) + u64(len(value))
        if element_type == 8:
            return out + b"".join(gguf_string(v) for v in value)
        return out + b"".join(struct.pack(scalar[element_type], v) for v in value)
    return out + struct.pack(scalar[vtype], value)


def patch(data: bytes, pos: int, new: bytes) -> bytes:
    return data[:pos] + new + data[pos + len(new):]


def splice(data: bytes, layout: Layout, edits: list[tuple[int, int, bytes]],
           kv_delta: int = 0, tensor_delta: int = 0) -> bytes:
    """Replace byte ranges of the metadata (which may change its length), fix the header counts,
    and re-pad so the unchanged tensor data section starts aligned again: a file that differs
    from the original only by the edits."""
    head = bytearray(data[:layout.infos_end])
    for start, end, new in sorted(edits, reverse=True):
        head[start:end] = new
    n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
    struct.pack_into("<QQ", head, 8, n_tensors + tensor_delta, n_kv + kv_delta)
    padding = (-len(head)) % layout.alignment
    return bytes(head) + b"\0" * padding + data[layout.data_start:]


# ---------------------------------------------------------------------------------------------
# Corruptions


@dataclass
class Corruption:
    category: str  # header | kv | tensor-info | truncation | byte-flip | data
    name: str
    make: Callable[[], bytes] = field(repr=False)


def corruptions(data: bytes, layout: Layout, seed: int) -> list[Corruption]:
    """Deterministic (seeded) corruptions of the tiny model, every kind the validator must handle."""
    rng = random.Random(seed)
    out: list[Corruption] = []

    def add(category: str, name: str, make: Callable[[], bytes]) -> None:
        out.append(Corruption(category, name, make))

    # --- header
    for name, magic in (("zeros", b"\0\0\0\0"), ("GGUG", b"GGUG"), ("lowercase", b"gguf"), ("GGML", b"GGML"),
                        ("FUGG", b"FUGG")):
        add("header", f"magic {name}", lambda m=magic: patch(data, 0, m))
    for version in (0, 1, 4, 99, 0x03000000, 0xFFFFFFFF):
        add("header", f"version {version:#x}", lambda v=version: patch(data, 4, u32(v)))
    n_tensors = len(layout.tensors)
    n_kv = len(layout.kvs)
    for value in (0, n_tensors - 1, n_tensors + 1, 2**40, 2**63 + 5, 2**64 - 1):
        add("header", f"tensor count {value}", lambda v=value: patch(data, 8, u64(v)))
    for value in (0, n_kv - 1, n_kv + 1, 2**40, 2**64 - 1):
        add("header", f"kv count {value}", lambda v=value: patch(data, 16, u64(v)))

    # --- key-values: type tags, lengths, counts
    for kv in layout.kvs:
        for tag in (13, 99, 0xFFFFFFFF):
            add("kv", f"{kv.key}: type tag {tag}", lambda k=kv, t=tag: patch(data, k.type_pos, u32(t)))
        key_length = len(kv.key.encode())
        for length in (0, key_length - 1, key_length + 1, 2**62):
            add("kv", f"{kv.key}: key length {length}", lambda k=kv, n=length: patch(data, k.start, u64(n)))
        if kv.type == 8:  # string
            value_length = struct.unpack_from("<Q", data, kv.value_pos)[0]
            for length in (value_length + 1, value_length - 1 if value_length else 5, 2**40):
                add("kv", f"{kv.key}: string length {length}",
                    lambda k=kv, n=length: patch(data, k.value_pos, u64(n)))
            add("kv", f"{kv.key}: truncated string", lambda k=kv: splice(data, layout, [(k.end - 1, k.end, b"")]))
        elif kv.type == 9:  # array
            count_pos = kv.value_pos + 4
            for count in (0, kv.count - 1, kv.count + 1, 2**31, 2**60):
                add("kv", f"{kv.key}: array length {count}", lambda k=kv, c=count, p=count_pos: patch(data, p, u64(c)))
            for element in (9, 13, 6 if kv.element_type != 6 else 4):
                add("kv", f"{kv.key}: array element type {element}",
                    lambda k=kv, e=element: patch(data, k.value_pos, u32(e)))
        else:  # a scalar: a valid tag of a different width or meaning
            for tag in {4: (5, 6, 10, 8), 6: (4, 12), 7: (0, 4)}.get(kv.type, (4,)):
                add("kv", f"{kv.key}: retyped {kv.type}->{tag}", lambda k=kv, t=tag: patch(data, k.type_pos, u32(t)))

    # deleted keys, duplicated keys, and required keys re-encoded with the wrong type
    for key in ("general.architecture", "llama.block_count", "llama.embedding_length", "llama.context_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "general.name"):
        kv = layout.kv(key)
        add("kv", f"delete {key}", lambda k=kv: splice(data, layout, [(k.start, k.end, b"")], kv_delta=-1))
    for key in ("llama.block_count", "tokenizer.ggml.model", "general.architecture"):
        kv = layout.kv(key)
        add("kv", f"duplicate {key}",
            lambda k=kv: splice(data, layout, [(k.end, k.end, data[k.start:k.end])], kv_delta=1))
    retypes = [
        ("general.architecture", 4, 7, None), ("llama.block_count", 8, "2", None),
        ("llama.block_count", 6, 2.0, None), ("llama.block_count", 10, 2, None), ("llama.block_count", 5, 2, None),
        ("llama.block_count", 9, [2, 2], 4), ("llama.embedding_length", 12, 64.0, None),
        ("llama.context_length", 11, N_CTX, None), ("llama.attention.layer_norm_rms_epsilon", 12, 1e-5, None),
        ("llama.attention.head_count", 9, [N_HEAD, N_HEAD, N_HEAD], 4),
        ("tokenizer.ggml.model", 4, 2, None), ("tokenizer.ggml.bos_token_id", 5, 1, None),
        ("tokenizer.ggml.eos_token_id", 10, 2, None), ("tokenizer.ggml.add_bos_token", 4, 0, None),
        ("tokenizer.ggml.merges", 9, [1, 2, 3], 4), ("general.name", 4, 3, None),
        ("llama.rope.freq_base", 4, 10000, None),
    ]
    for key, vtype, value, element in retypes:
        kv = layout.kv(key)
        add("kv", f"{key} as type {vtype}",
            lambda k=kv, t=vtype, v=value, e=element: splice(data, layout, [(k.start, k.end, encode_kv(k.key, t, v, e))]))
    # values llama.cpp chokes on or rejects
    value_edits = [
        ("llama.block_count", 0), ("llama.block_count", 1), ("llama.block_count", 3), ("llama.block_count", 513),
        ("llama.block_count", 2**32 - 1), ("llama.embedding_length", 0), ("llama.embedding_length", 63),
        ("llama.embedding_length", 128), ("llama.context_length", 0), ("llama.feed_forward_length", 0),
        ("llama.feed_forward_length", 127), ("llama.attention.head_count", 0), ("llama.attention.head_count", 3),
        ("llama.attention.head_count", 8), ("llama.attention.head_count_kv", 0), ("llama.attention.head_count_kv", 3),
        ("llama.attention.head_count_kv", 4), ("llama.rope.dimension_count", 8), ("llama.rope.dimension_count", 0),
        ("tokenizer.ggml.bos_token_id", None), ("tokenizer.ggml.eos_token_id", 2**31),
        ("tokenizer.ggml.padding_token_id", 2**32 - 1), ("llama.vocab_size", 7), ("general.file_type", 9999),
    ]
    n_vocab = layout.kv("tokenizer.ggml.tokens").count
    for key, value in value_edits:
        if key not in {k.key for k in layout.kvs}:
            continue
        value = n_vocab if value is None else value
        add("kv", f"{key} = {value}", lambda k=layout.kv(key), v=value: patch(data, k.value_pos, u32(v)))
    for key, value in (("llama.attention.layer_norm_rms_epsilon", 0.0), ("llama.attention.layer_norm_rms_epsilon", -1e-5),
                       ("llama.attention.layer_norm_rms_epsilon", float("nan")), ("llama.rope.freq_base", 0.0),
                       ("llama.rope.freq_base", 1e-45), ("llama.rope.freq_base", float("inf"))):
        add("kv", f"{key} = {value}", lambda k=layout.kv(key), v=value: patch(data, k.value_pos, struct.pack("<f", v)))
    # added keys that llama.cpp reads and asserts on
    extra = [
        ("llama.rope.scaling.type", 8, "bogus", None), ("llama.rope.scaling.type", 8, "yarn", None),
        ("llama.nextn_predict_layers", 4, 5, None), ("llama.expert_count", 4, 4, None),
        ("llama.expert_used_count", 4, 2, None), ("llama.expert_count", 4, 5000, None),
        ("llama.expert_group_count", 4, 2, None), ("general.alignment", 4, 48, None),
        ("general.alignment", 4, 0, None), ("general.alignment", 10, 32, None), ("split.count", 4, 1, None),
        ("tokenizer.ggml.pre", 8, "no-such-pre", None),
    ]
    kv_end = layout.kvs[-1].end
    for key, vtype, value, element in extra:
        if key == "tokenizer.ggml.pre":
            k = layout.kv(key)
            add("kv", f"{key} = {value!r}", lambda k=k, t=vtype, v=value: splice(data, layout, [(k.start, k.end, encode_kv(k.key, t, v))]))
            continue
        add("kv", f"add {key} = {value!r} (type {vtype})",
            lambda key=key, t=vtype, v=value, e=element: splice(data, layout, [(kv_end, kv_end, encode_kv(key, t, v, e))], kv_delta=1))
    # tokenizer arrays rewritten: duplicate tokens, mismatched lengths
    tokens_kv = layout.kv("tokenizer.ggml.tokens")
    tokens = _read_strings(data, tokens_kv)
    for i, j in ((300, 301), (0, 5), (n_vocab - 1, n_vocab - 2)):
        dup = list(tokens)
        dup[j] = dup[i]
        add("kv", f"duplicate token {i}->{j}",
            lambda d=dup: splice(data, layout, [(tokens_kv.start, tokens_kv.end, encode_kv(tokens_kv.key, 9, d, 8))]))
    emptied = list(tokens)
    emptied[400] = ""
    add("kv", "empty token 400", lambda: splice(data, layout, [(tokens_kv.start, tokens_kv.end, encode_kv(tokens_kv.key, 9, emptied, 8))]))
    add("kv", "tokens minus one", lambda: splice(data, layout, [(tokens_kv.start, tokens_kv.end, encode_kv(tokens_kv.key, 9, tokens[:-1], 8))]))
    add("kv", "tokens plus one", lambda: splice(data, layout, [(tokens_kv.start, tokens_kv.end, encode_kv(tokens_kv.key, 9, tokens + ["zzzz-new"], 8))]))
    types_kv = layout.kv("tokenizer.ggml.token_type")
    add("kv", "token types minus one", lambda: splice(data, layout, [(types_kv.start, types_kv.end, encode_kv(types_kv.key, 9, [1] * (n_vocab - 1), 5))]))
    add("kv", "token types as float", lambda: splice(data, layout, [(types_kv.start, types_kv.end, encode_kv(types_kv.key, 9, [1.0] * n_vocab, 6))]))
    add("kv", "add scores of wrong length",
        lambda: splice(data, layout, [(kv_end, kv_end, encode_kv("tokenizer.ggml.scores", 9, [0.0] * 10, 6))], kv_delta=1))

    # --- tensor infos
    picks = [layout.tensors[0], layout.tensors[1], layout.tensors[len(layout.tensors) // 2], layout.tensors[-1]]
    picks += [t for t in layout.tensors if t.name in ("blk.0.ffn_up.weight", "blk.1.attn_q.weight")]
    for t in picks:
        for n_dims in (0, 5, 0xFFFFFFFF, 3 - t.n_dims):
            add("tensor-info", f"{t.name}: n_dims {n_dims}", lambda t=t, n=n_dims: patch(data, t.n_dims_pos, u32(n)))
        for axis in range(t.n_dims):
            pos = t.dims_pos + 8 * axis
            for extent in (0, -1, t.shape[axis] + 1, t.shape[axis] * 2, 2**40, 2**62):
                add("tensor-info", f"{t.name}: dim {axis} = {extent}", lambda p=pos, e=extent: patch(data, p, u64(e)))
        if t.n_dims == 2:
            swapped = u64(t.shape[1]) + u64(t.shape[0])
            add("tensor-info", f"{t.name}: dims swapped", lambda t=t, s=swapped: patch(data, t.dims_pos, s))
        same_size = {0: (26,), 1: (30, 25), 30: (1,), 8: (2, 41)}.get(t.ggml_type, ())
        for ggml_type in (4, 99, 0xFFFFFFFF, 0 if t.ggml_type != 0 else 1, 8, *same_size):
            if ggml_type != t.ggml_type:
                add("tensor-info", f"{t.name}: type {ggml_type}", lambda t=t, g=ggml_type: patch(data, t.type_pos, u32(g)))
        offset = struct.unpack_from("<Q", data, t.offset_pos)[0]
        for new in (offset + 1, offset + layout.alignment, max(offset - layout.alignment, 0), 2**40, 2**64 - 32):
            if new != offset:
                add("tensor-info", f"{t.name}: offset {new}", lambda t=t, o=new: patch(data, t.offset_pos, u64(o)))
        name_length = len(t.name)
        for length in (0, name_length - 1, name_length + 1, 2**50):
            add("tensor-info", f"{t.name}: name length {length}", lambda t=t, n=length: patch(data, t.start, u64(n)))

    def rename(t: TensorSpan, new_name: str) -> bytes:
        return splice(data, layout, [(t.start, t.start + 8 + len(t.name.encode()), gguf_string(new_name))])

    q0 = layout.tensor("blk.0.attn_q.weight")
    for new_name in ("blk.0.attn_k.weight", "blk.0.attn_q.weighx", "blk.2.attn_q.weight", "blk.9999.attn_q.weight",
                     "blk.x.attn_q.weight", "", "t" * 64, "t" * 63, "blk.0.attn_q.weight\0", "token_embd.weight"):
        add("tensor-info", f"rename blk.0.attn_q.weight -> {new_name[:30]!r}", lambda n=new_name: rename(q0, n))
    norm = layout.tensor("output_norm.weight")
    add("tensor-info", "drop output_norm.weight (count and data kept)",
        lambda: splice(data, layout, [(norm.start, norm.end, b"")], tensor_delta=-1))

    # --- truncation at structural points and at seeded random points
    points = {1, 3, 4, 7, 8, 15, 16, 23, 24, 25, 40, layout.kvs[0].type_pos, layout.kvs[0].value_pos + 2,
              tokens_kv.value_pos + 6, (tokens_kv.start + tokens_kv.end) // 2, tokens_kv.end - 3,
              layout.tensors[0].start, layout.tensors[0].dims_pos + 5, layout.tensors[-1].offset_pos + 4,
              layout.infos_end, layout.data_start, layout.data_start + 1, layout.size // 2, layout.size - 1}
    points |= {rng.randrange(24, layout.data_start) for _ in range(14)}
    points |= {rng.randrange(layout.data_start, layout.size) for _ in range(6)}
    for point in sorted(points):
        add("truncation", f"truncated to {point} bytes", lambda p=point: data[:p])
    add("truncation", "empty file", lambda: b"")

    # --- random bit flips in the metadata region (and a few in the weights, which are harmless)
    for index in range(60):
        positions = [rng.randrange(0, layout.data_start) for _ in range(rng.choice((1, 1, 2, 4)))]
        bits = [1 << rng.randrange(8) for _ in positions]
        add("byte-flip", f"flip #{index} at {positions}", lambda ps=positions, bs=bits: _flip(data, ps, bs))
    for index in range(4):
        position = rng.randrange(layout.data_start, layout.size)
        add("data", f"weight byte flip at {position}", lambda p=position: _flip(data, [p], [0x40]))
    return out


def _flip(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    out = bytearray(data)
    for position, bit in zip(positions, bits):
        out[position] ^= bit
    return bytes(out)


def _read_strings(data: bytes, kv: KVSpan) -> list[str]:
    pos = kv.value_pos + 12  # element type, count
    out = []
    for _ in range(kv.count):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append(data[pos + 8:pos + 8 + length].decode("utf-8"))
        pos += 8 + length
    return out
