"""Check a GGUF file before llama.cpp opens it, and say in one line what is wrong with it.

llama.cpp rejects many malformed files with a generic "failed to load model", and on some it
takes the whole process down (GGML_ASSERT aborts, segfaults). `validate_gguf` parses the header
itself, with a bounds check before every read (gguf-py's GGUFReader trusts lengths and may try
to allocate whatever a corrupt length field says), then checks what llama.cpp's loader assumes.

Crash cases of llama.cpp (as vendored by llama-cpp-python 0.3.36) this module guards against,
found by reading llama-model.cpp / llama-vocab.cpp / ggml-cpu and confirmed by fuzzing
(tests/test_corrupt.py runs the refused files through an unguarded llama.cpp subprocess):
  - `{arch}.block_count` of 0 or above 512              -> GGML_ASSERT in load_hparams
  - `{arch}.nextn_predict_layers` > block_count          -> GGML_ASSERT
  - inconsistent expert counts (used > count, ...)       -> GGML_ASSERT
  - unknown `{arch}.rope.scaling.type`                   -> GGML_ASSERT
  - duplicate strings in `tokenizer.ggml.tokens`         -> GGML_ASSERT in llama_vocab::load
  - a NaN or negative RMS-norm epsilon                   -> GGML_ASSERT(eps >= 0) at the first decode
  - a 1-D tensor (norm weight, bias) not in F32          -> GGML_ABORT in the CPU binary ops at decode
  - an integer / F64 / Q8_1 / Q8_K matrix or embedding   -> segfault in mul_mat, abort in get_rows
Everything else below mirrors a check llama.cpp makes with a clean error, so that a file this
module accepts is one llama.cpp loads. A few checks are deliberately stricter than llama.cpp,
which tolerates these silently: special token ids outside the vocabulary (it falls back to
defaults), a context length or RMS epsilon of 0, NUL bytes inside tensor names.
"""

from __future__ import annotations

import math
import mmap
import re
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BadModelFile


GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_SIZE = 24  # magic, version (u32), tensor count (u64), key-value count (u64)
DEFAULT_ALIGNMENT = 32

# Limits llama.cpp's gguf.cpp / llama-hparams.h enforce.
MAX_STRING_LENGTH = 1 << 30
MAX_ARRAY_ELEMENTS = 1 << 30
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4
MAX_LAYERS = 512
MAX_EXPERTS = 1024
INT64_MAX = (1 << 63) - 1

# Smallest possible encodings, to judge whether the header's counts can fit in the file.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, one-byte key, type tag, one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset

# GGUF value types (gguf.GGUFValueType), spelled out so that parsing needs no gguf import.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
TYPE_NAMES = {
    UINT8: "UINT8", INT8: "INT8", UINT16: "UINT16", INT16: "INT16", UINT32: "UINT32",
    INT32: "INT32", FLOAT32: "FLOAT32", BOOL: "BOOL", STRING: "STRING", ARRAY: "ARRAY",
    UINT64: "UINT64", INT64: "INT64", FLOAT64: "FLOAT64",
}
_SCALARS = {
    UINT8: struct.Struct("<B"), INT8: struct.Struct("<b"), UINT16: struct.Struct("<H"),
    INT16: struct.Struct("<h"), UINT32: struct.Struct("<I"), INT32: struct.Struct("<i"),
    FLOAT32: struct.Struct("<f"), BOOL: struct.Struct("<b"), UINT64: struct.Struct("<Q"),
    INT64: struct.Struct("<q"), FLOAT64: struct.Struct("<d"),
}
_DTYPES = {
    UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
    FLOAT32: "<f4", BOOL: "<i1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8",
}
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")

# Values llama.cpp accepts for string-valued keys it parses (llama-model.cpp, llama-vocab.cpp).
ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})
TOKENIZER_MODELS = frozenset(
    {"no_vocab", "none", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv",
     "test", "plamo2", "gemma4"}
)
BPE_TOKENIZER_MODELS = frozenset({"gpt2", "hybriddna", "whitespace"})
# tokenizer.ggml.pre values llama-vocab.cpp knows for BPE vocabularies; anything else is a
# load error ("unknown pre-tokenizer type").
BPE_PRE_TOKENIZERS = frozenset(
    """default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2
    jina-v5-nano deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder
    gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2
    gemma4 granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace
    refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe
    poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish
    exaone exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie
    granite-embed-multi-97m tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe
    bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka
    grok-2 afmoe laguna minimax-m2 solar-open mellum2""".split()
)
SPECIAL_TOKEN_KEYS = tuple(
    f"tokenizer.ggml.{name}_token_id"
    for name in ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask",
                 "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep",
                 "prefix", "suffix", "middle")
)

# Keys whose type llama.cpp's loader insists on (it throws "key ... has wrong type" otherwise).
# `{arch}` is replaced by general.architecture.
_SCALAR_KEY_TYPES: dict[str, int] = {
    "general.name": STRING,
    "general.file_type": UINT32,
    "split.count": UINT16,
    "split.no": UINT16,
    "{arch}.context_length": UINT32,
    "{arch}.embedding_length": UINT32,
    "{arch}.embedding_length_out": UINT32,
    "{arch}.block_count": UINT32,
    "{arch}.vocab_size": UINT32,
    "{arch}.attention.causal": BOOL,
    "{arch}.pooling_type": UINT32,
    "{arch}.nextn_predict_layers": UINT32,
    "{arch}.expert_count": UINT32,
    "{arch}.expert_group_count": UINT32,
    "{arch}.expert_group_used_count": UINT32,
    "{arch}.attention.key_length": UINT32,
    "{arch}.attention.value_length": UINT32,
    "{arch}.attention.key_length_swa": UINT32,
    "{arch}.attention.value_length_swa": UINT32,
    "{arch}.attention.layer_norm_epsilon": FLOAT32,
    "{arch}.attention.layer_norm_rms_epsilon": FLOAT32,
    "{arch}.rope.dimension_count": UINT32,
    "{arch}.rope.dimension_count_swa": UINT32,
    "{arch}.rope.freq_base": FLOAT32,
    "{arch}.rope.scale_linear": FLOAT32,
    "{arch}.rope.scaling.type": STRING,
    "{arch}.rope.scaling.factor": FLOAT32,
    "{arch}.rope.scaling.attn_factor": FLOAT32,
    "{arch}.rope.scaling.alpha": FLOAT32,
    "{arch}.rope.scaling.original_context_length": UINT32,
    "{arch}.rope.scaling.finetuned": BOOL,
    "tokenizer.ggml.model": STRING,
    "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.token_type_count": UINT32,
    "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.ggml.add_eos_token": BOOL,
    "tokenizer.ggml.add_sep_token": BOOL,
    "tokenizer.ggml.add_space_prefix": BOOL,
    "tokenizer.ggml.remove_extra_whitespaces": BOOL,
    "tokenizer.ggml.normalizer.lowercase": BOOL,
    "tokenizer.ggml.normalizer.strip_accents": BOOL,
    **{key: UINT32 for key in SPECIAL_TOKEN_KEYS},
}
# Keys llama.cpp reads as "one value for every layer, or an array of block_count values".
_PER_LAYER_KEYS = (
    "{arch}.feed_forward_length",
    "{arch}.attention.head_count",
    "{arch}.attention.head_count_kv",
    "{arch}.expert_used_count",
)
# Array-valued keys and the element types llama-vocab.cpp accepts.
_ARRAY_KEY_TYPES: dict[str, frozenset[int]] = {
    "tokenizer.ggml.tokens": frozenset({STRING}),
    "tokenizer.ggml.scores": frozenset({FLOAT32, INT32}),
    "tokenizer.ggml.token_type": frozenset({INT32}),
    "tokenizer.ggml.merges": frozenset({STRING}),
    "tokenizer.ggml.suppress_tokens": frozenset({INT32}),
    "tokenizer.ggml.precompiled_charsmap": frozenset({INT8, UINT8}),
}

# ggml types that exist but that llama.cpp's CPU backend cannot use as weights: integer and F64
# tensors have no dot product, and Q8_1 / Q8_K are only the activations' side of a dot product.
NOT_COMPUTABLE_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"})

# Architectures whose full tensor list and shapes this module knows (llama.cpp's models/llama.cpp,
# qwen2.cpp, qwen3.cpp): for these, a file with a missing, misshapen or unknown tensor is
# rejected here rather than by llama.cpp. Other architectures get the generic checks only.
LLAMA_LIKE_ARCHS = frozenset({"llama", "qwen2", "qwen3"})
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry. `value` is a Python scalar, a str, a list[str] or a NumPy array."""

    type: int  # a GGUF value type (gguf.GGUFValueType)
    element_type: int | None  # for arrays
    value: Any

    @property
    def type_name(self) -> str:
        if self.type == ARRAY:
            return f"ARRAY[{TYPE_NAMES[self.element_type]}]"
        return TYPE_NAMES[self.type]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne[0])
    ggml_type: int  # gguf.GGMLQuantizationType value
    type_name: str
    offset: int  # absolute position of the tensor's data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=object))


@dataclass(frozen=True)
class GGUFSummary:
    """What `validate_gguf` found: header facts, every key-value and every tensor's layout."""

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int  # where the tensor data section starts
    metadata: Mapping[str, KeyValue] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str | None:
        kv = self.metadata.get("general.architecture")
        return kv.value if kv is not None and kv.type == STRING else None

    def value(self, key: str, default: Any = None) -> Any:
        kv = self.metadata.get(key)
        return default if kv is None else kv.value

    def tensor(self, name: str) -> TensorInfo | None:
        for info in self.tensors:
            if info.name == name:
                return info
        return None


class _Malformed(Exception):
    """A problem found while checking; the message is completed with the path by the caller."""


def validate_gguf(path: str | Path, *, for_llama: bool = True) -> GGUFSummary:
    """Check that `path` is a well-formed GGUF file, and with `for_llama` one llama.cpp can load.

    Without `for_llama` only the container is checked (header, key-values, tensor infos, data
    layout). With it, also the architecture's hyperparameters, the tokenizer and, for llama-like
    architectures, every tensor's name and shape. Raises BadModelFile("<path>: <what is wrong>")
    with a one-line message; returns a GGUFSummary of what was read. Reads only the header: the
    tensor data is never touched, so this is cheap even for a multi-gigabyte file.
    """
    path = Path(path)
    key = _file_key(path, for_llama)
    if key is not None and key in _VALIDATED:
        return _VALIDATED[key]
    try:
        summary = _parse(path)
        if for_llama:
            _check_for_llama(summary)
        if key is not None:
            if len(_VALIDATED) >= 32:
                _VALIDATED.pop(next(iter(_VALIDATED)))
            _VALIDATED[key] = summary
        return summary
    except _Malformed as problem:
        raise BadModelFile(_one_line(f"{path}: {problem}")) from None
    except (MemoryError, ValueError, OverflowError, IndexError, KeyError, TypeError,
            struct.error) as error:
        # A bug of ours or a case nobody foresaw: still a clean one-line refusal, never a crash.
        raise BadModelFile(_one_line(
            f"{path}: unreadable GGUF header ({type(error).__name__}: {error})")) from None


# Files that passed, by identity: a study validates the same files dozens of times (every engine, vocab
# and header read), and parsing a 49k-token vocabulary in Python costs about a second each time.
_VALIDATED: dict[tuple, GGUFSummary] = {}


def _file_key(path: Path, for_llama: bool) -> tuple | None:
    """The file as it is now (a rewrite changes its size, modification time or inode); None for a file
    written in the last two seconds, whose rewrite could fall within the clock's granularity."""
    try:
        st = path.stat()
    except OSError:
        return None
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return None
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, for_llama)


def read_gguf(path: str | Path, *, for_llama: bool = True):
    """Validate `path`, then open it with gguf-py: returns a `gguf.GGUFReader`.

    Other modules should open GGUF files through this (or use `validate_gguf`'s summary) so that
    no unvalidated file reaches GGUFReader or llama.cpp.
    """
    validate_gguf(path, for_llama=for_llama)
    from gguf import GGUFReader  # gguf imports numpy and its constants tables: keep it lazy

    try:
        return GGUFReader(path, "r")
    except Exception as error:  # GGUFReader raises anything from ValueError to numpy errors
        raise BadModelFile(_one_line(f"{path}: gguf-py cannot read it ({type(error).__name__}: {error})")) from None


# ---------------------------------------------------------------------------------------------
# Container parsing


def _parse(path: Path) -> GGUFSummary:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _Malformed("no such file") from None
    except OSError as error:
        raise _Malformed(f"cannot read ({error.strerror or error})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _Malformed("is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise _Malformed("not a regular file")
    size = st.st_size
    if size < len(GGUF_MAGIC):
        raise _Malformed(f"not a GGUF file (only {size} bytes)")
    try:
        with open(path, "rb") as handle:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_buffer(path, buf, len(buf))  # the size now, should the file have changed
    except OSError as error:
        raise _Malformed(f"cannot read ({error.strerror or error})") from None


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Malformed(
                f"truncated or corrupt: {what} at byte {self.pos} needs {n} bytes "
                f"but the {self.size}-byte file has {self.size - self.pos} left")

    def unpack(self, fmt: struct.Struct, what: str):
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def raw_string(self, what: str) -> bytes:
        length = self.unpack(_U64, f"{what} length")
        if length > MAX_STRING_LENGTH:
            raise _Malformed(f"{what}: string length {length} exceeds llama.cpp's limit of {MAX_STRING_LENGTH}")
        if length > self.left:
            raise _Malformed(
                f"truncated or corrupt: {what} claims {length} bytes at byte {self.pos} "
                f"but the {self.size}-byte file has {self.left} left")
        data = self.buf[self.pos:self.pos + length]
        self.pos += length
        return data


def _parse_buffer(path: Path, buf, size: int) -> GGUFSummary:
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise _Malformed(f"not a GGUF file (starts with {magic!r})")
    if size < HEADER_SIZE:
        raise _Malformed(f"truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte GGUF header")
    cur = _Cursor(buf, size)
    cur.pos = 4
    version = cur.unpack(_U32, "version")
    if version & 0xFFFF == 0 and version != 0:
        raise _Malformed(f"GGUF version 0x{version:08x}: a big-endian file, which this machine cannot load")
    if version not in SUPPORTED_VERSIONS:
        raise _Malformed(f"unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)")
    n_tensors = cur.unpack(_I64, "tensor count")
    n_kv = cur.unpack(_I64, "key-value count")
    if n_tensors < 0 or n_kv < 0:
        raise _Malformed(f"corrupt header: negative count ({n_tensors} tensors, {n_kv} key-values)")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > cur.left:
        raise _Malformed(
            f"truncated or corrupt: the header claims {n_kv} key-values and {n_tensors} tensors, "
            f"more than a {size}-byte file can hold")

    metadata: dict[str, KeyValue] = {}
    for index in range(n_kv):
        key, kv = _read_kv(cur, index)
        if key in metadata:
            raise _Malformed(f"duplicate key {_show(key)}")
        metadata[key] = kv

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        kv = metadata["general.alignment"]
        if kv.type != UINT32:
            raise _Malformed(f"key 'general.alignment' has type {kv.type_name}, expected UINT32")
        alignment = kv.value
        if alignment == 0 or alignment & (alignment - 1):
            raise _Malformed(f"general.alignment is {alignment}, not a power of two")

    infos = [_read_tensor_info(cur, index) for index in range(n_tensors)]
    seen: set[str] = set()
    for name, *_ in infos:
        if name in seen:
            raise _Malformed(f"duplicate tensor name {_show(name)}")
        seen.add(name)

    # The data section starts at the next multiple of the alignment; gguf.cpp requires each
    # tensor to start exactly where the previous one (padded to the alignment) ended.
    data_offset = _pad(cur.pos, alignment) if n_tensors else cur.pos
    tensors = []
    expected = 0
    for name, shape, ggml_type, type_name, relative_offset, n_bytes in infos:
        if relative_offset % alignment:
            raise _Malformed(
                f"tensor {_show(name)}: data offset {relative_offset} is not a multiple of the alignment {alignment}")
        if relative_offset != expected:
            raise _Malformed(
                f"tensor {_show(name)}: data offset {relative_offset}, expected {expected} "
                "(tensor data must be contiguous and in header order)")
        expected += _pad(n_bytes, alignment)
        tensors.append(TensorInfo(name, shape, ggml_type, type_name, data_offset + relative_offset, n_bytes))
    if tensors:
        last = tensors[-1]
        data_end = last.offset + last.n_bytes
        if data_end > size:
            raise _Malformed(
                f"truncated: tensor data ends at byte {data_end} but the file has {size} bytes "
                f"(last tensor {_show(last.name)}; an incomplete download?)")
    return GGUFSummary(path, version, size, alignment, data_offset, metadata, tuple(tensors))


def _read_kv(cur: _Cursor, index: int) -> tuple[str, KeyValue]:
    where = f"key-value #{index}"
    raw_key = cur.raw_string(f"{where} key")
    if not raw_key:
        raise _Malformed(f"{where} has an empty key")
    try:
        key = raw_key.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{where}: key {_show_bytes(raw_key)} is not valid UTF-8") from None
    if "\0" in key:
        raise _Malformed(f"{where}: key {_show(key)} contains a NUL byte")
    where = f"key {_show(key)}"
    tag = cur.unpack(_I32, f"{where} type")
    if tag not in TYPE_NAMES:
        raise _Malformed(f"{where} has invalid value type {tag}")
    if tag != ARRAY:
        return key, KeyValue(tag, None, _read_scalar(cur, tag, where))
    element = cur.unpack(_I32, f"{where} array element type")
    if element not in TYPE_NAMES or element == ARRAY:
        raise _Malformed(f"{where}: array has invalid element type {element}")
    count = cur.unpack(_U64, f"{where} array length")
    smallest = 8 if element == STRING else _SCALARS[element].size
    if count > MAX_ARRAY_ELEMENTS or count * smallest > cur.left:
        raise _Malformed(
            f"truncated or corrupt: {where} claims {count} {TYPE_NAMES[element]} elements "
            f"but only {cur.left} bytes are left in the file")
    if element == STRING:
        value: Any = _read_string_array(cur, count, where)
    else:
        dtype = np.dtype(_DTYPES[element])
        value = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos).copy()
        cur.pos += count * dtype.itemsize
        if element == BOOL:
            value = value != 0
    return key, KeyValue(ARRAY, element, value)


def _read_scalar(cur: _Cursor, tag: int, where: str) -> Any:
    if tag == STRING:
        return _decode(cur.raw_string(f"{where} value"))
    value = cur.unpack(_SCALARS[tag], f"{where} value")
    return value != 0 if tag == BOOL else value


def _read_string_array(cur: _Cursor, count: int, where: str) -> list[str]:
    # The hot loop of parsing (a vocabulary is 30k-250k strings): kept free of method calls.
    buf, pos, end = cur.buf, cur.pos, cur.size
    unpack = _U64.unpack_from
    out = []
    append = out.append
    for item in range(count):
        if end - pos < 8:
            raise _Malformed(f"truncated or corrupt: {where} element #{item} runs past the end of the file")
        (length,) = unpack(buf, pos)
        pos += 8
        if length > end - pos:
            raise _Malformed(
                f"truncated or corrupt: {where} element #{item} claims {length} bytes "
                f"but only {end - pos} are left in the file")
        append(buf[pos:pos + length].decode("utf-8", "surrogateescape"))
        pos += length
    cur.pos = pos
    return out


def _read_tensor_info(cur: _Cursor, index: int):
    raw_name = cur.raw_string(f"tensor #{index} name")
    if not raw_name:
        raise _Malformed(f"tensor #{index} has an empty name")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"tensor #{index}: name {_show_bytes(raw_name)} is not valid UTF-8") from None
    if "\0" in name:
        # llama.cpp keeps names as C strings: "a\0b" would silently become "a"
        raise _Malformed(f"tensor #{index}: name {_show(name)} contains a NUL byte")
    if len(raw_name) > MAX_TENSOR_NAME_BYTES:
        raise _Malformed(
            f"tensor #{index}: name {_show(name)} is {len(raw_name)} bytes, "
            f"longer than llama.cpp's {MAX_TENSOR_NAME_BYTES}")
    where = f"tensor {_show(name)}"
    n_dims = cur.unpack(_U32, f"{where} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Malformed(f"{where} has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
    shape = tuple(cur.unpack(_I64, f"{where} dimension") for _ in range(n_dims))
    n_elements = 1
    for axis, extent in enumerate(shape):
        if extent < 1:
            raise _Malformed(f"{where}: dimension {axis} is {extent} (must be at least 1)")
        n_elements *= extent
    if n_elements > INT64_MAX:
        raise _Malformed(f"{where}: shape {list(shape)} has more elements than llama.cpp can index")
    ggml_type = cur.unpack(_I32, f"{where} type")
    block_size, type_size, type_name = _ggml_type_facts(ggml_type, where)
    if shape[0] % block_size:
        raise _Malformed(
            f"{where}: rows of {shape[0]} elements are not a multiple of the "
            f"{type_name} block size {block_size}")
    n_bytes = n_elements // block_size * type_size
    offset = cur.unpack(_U64, f"{where} data offset")
    return name, shape, ggml_type, type_name, offset, n_bytes


_GGML_TYPES: dict[int, tuple[int, int, str]] | None = None


def _ggml_type_facts(ggml_type: int, where: str) -> tuple[int, int, str]:
    """(block size, bytes per block, name) from gguf-py's table of the types llama.cpp knows."""
    global _GGML_TYPES
    if _GGML_TYPES is None:
        from gguf import GGML_QUANT_SIZES

        _GGML_TYPES = {int(t): (block, nbytes, t.name) for t, (block, nbytes) in GGML_QUANT_SIZES.items()}
    facts = _GGML_TYPES.get(ggml_type)
    if facts is None:
        raise _Malformed(f"{where} has unknown ggml type {ggml_type}")
    return facts


# ---------------------------------------------------------------------------------------------
# What llama.cpp's model loader needs


def _check_for_llama(summary: GGUFSummary) -> None:
    md = summary.metadata
    arch_kv = md.get("general.architecture")
    if arch_kv is None:
        raise _Malformed("missing required key 'general.architecture'")
    if arch_kv.type != STRING:
        raise _Malformed(f"key 'general.architecture' has type {arch_kv.type_name}, expected STRING")
    arch = arch_kv.value
    from gguf import MODEL_ARCH_NAMES

    if arch not in set(MODEL_ARCH_NAMES.values()):
        raise _Malformed(f"unknown model architecture {_show(arch)}")

    for pattern, expected in _SCALAR_KEY_TYPES.items():
        _typed(md, pattern.format(arch=arch), expected)
    for pattern, expected in _ARRAY_KEY_TYPES.items():
        _typed_array(md, pattern, expected)

    hp = _check_hparams(md, arch)
    n_vocab = _check_tokenizer(md, arch)
    _check_tensors(summary, arch, hp, n_vocab)


def _typed(md: Mapping[str, KeyValue], key: str, expected: int, required: bool = False) -> Any:
    kv = md.get(key)
    if kv is None:
        if required:
            raise _Malformed(f"missing required key {_show(key)}")
        return None
    if kv.type != expected:
        raise _Malformed(f"key {_show(key)} has type {kv.type_name}, expected {TYPE_NAMES[expected]}")
    return kv.value


def _typed_array(md: Mapping[str, KeyValue], key: str, elements: frozenset[int], required: bool = False):
    kv = md.get(key)
    if kv is None:
        if required:
            raise _Malformed(f"missing required key {_show(key)}")
        return None
    if kv.type != ARRAY or kv.element_type not in elements:
        wanted = " or ".join(f"ARRAY[{TYPE_NAMES[e]}]" for e in sorted(elements))
        raise _Malformed(f"key {_show(key)} has type {kv.type_name}, expected {wanted}")
    return kv.value


def _per_layer(md: Mapping[str, KeyValue], key: str, n_layer: int) -> list[int] | None:
    """A key that is one UINT32 for all layers or an array with one value per layer."""
    kv = md.get(key)
    if kv is None:
        return None
    if kv.type == UINT32:
        return [kv.value] * n_layer
    if kv.type == ARRAY and kv.element_type in (UINT32, INT32, BOOL):
        if len(kv.value) != n_layer:
            raise _Malformed(f"key {_show(key)} has {len(kv.value)} values, expected one per layer ({n_layer})")
        return [int(v) for v in kv.value]
    raise _Malformed(f"key {_show(key)} has type {kv.type_name}, expected UINT32 or an array of them")


@dataclass
class _Hparams:
    n_embd: int
    n_layer: int
    n_ff: list[int] | None
    n_head: list[int] | None
    n_head_kv: list[int] | None
    n_expert: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int


def _check_hparams(md: Mapping[str, KeyValue], arch: str) -> _Hparams:
    n_ctx = _typed(md, f"{arch}.context_length", UINT32, required=True)
    n_embd = _typed(md, f"{arch}.embedding_length", UINT32, required=True)
    n_layer = _typed(md, f"{arch}.block_count", UINT32, required=True)
    if n_ctx == 0:
        raise _Malformed(f"{arch}.context_length is 0")
    if n_embd == 0:
        raise _Malformed(f"{arch}.embedding_length is 0")
    if not 1 <= n_layer <= MAX_LAYERS:
        # llama.cpp: GGML_ASSERT(n_layer > 0 && n_layer <= LLAMA_MAX_LAYERS) aborts the process
        raise _Malformed(f"{arch}.block_count is {n_layer} (llama.cpp supports 1 to {MAX_LAYERS})")
    n_nextn = _typed(md, f"{arch}.nextn_predict_layers", UINT32) or 0
    if n_nextn > n_layer:
        raise _Malformed(f"{arch}.nextn_predict_layers is {n_nextn}, more than block_count {n_layer}")

    n_ff = _per_layer(md, f"{arch}.feed_forward_length", n_layer)
    n_head = _per_layer(md, f"{arch}.attention.head_count", n_layer)
    n_head_kv = _per_layer(md, f"{arch}.attention.head_count_kv", n_layer) or n_head

    # Expert counts: each of these is a GGML_ASSERT in llama_model::load_hparams.
    n_expert = _typed(md, f"{arch}.expert_count", UINT32) or 0
    n_used = max(_per_layer(md, f"{arch}.expert_used_count", n_layer) or [0])
    n_groups = _typed(md, f"{arch}.expert_group_count", UINT32) or 0
    n_group_used = _typed(md, f"{arch}.expert_group_used_count", UINT32) or 0
    if n_expert > MAX_EXPERTS:
        raise _Malformed(f"{arch}.expert_count is {n_expert} (llama.cpp supports at most {MAX_EXPERTS})")
    if n_used > n_expert:
        raise _Malformed(f"{arch}.expert_used_count is {n_used}, more than expert_count {n_expert}")
    if n_expert > 0:
        if n_used == 0:
            raise _Malformed(f"{arch}.expert_count is {n_expert} but expert_used_count is 0")
        if n_groups >= n_expert:
            raise _Malformed(f"{arch}.expert_group_count {n_groups} is not less than expert_count {n_expert}")
        if n_groups > 1 and (n_expert % n_groups or not 0 < n_group_used < n_groups):
            raise _Malformed(
                f"{arch}: inconsistent expert groups ({n_expert} experts, {n_groups} groups, {n_group_used} used)")
    elif n_groups:
        raise _Malformed(f"{arch}.expert_group_count is {n_groups} but the model has no experts")

    rope_scaling = md.get(f"{arch}.rope.scaling.type")
    if rope_scaling is not None and rope_scaling.value not in ROPE_SCALING_TYPES:
        # llama.cpp: GGML_ASSERT(rope_scaling_type_train != UNSPECIFIED) aborts the process
        raise _Malformed(
            f"{arch}.rope.scaling.type is {_show(rope_scaling.value)} "
            f"(llama.cpp knows {', '.join(sorted(ROPE_SCALING_TYPES))})")

    # A NaN or negative norm epsilon trips GGML_ASSERT(eps >= 0) at the first decode; a rope base
    # below 1 (0, denormal, negative), infinite or NaN loads but turns every logit into NaN.
    for suffix, smallest, zero_ok in (
            ("attention.layer_norm_rms_epsilon", 0.0, False), ("attention.layer_norm_epsilon", 0.0, False),
            ("rope.freq_base", 1.0, True), ("rope.freq_base_swa", 1.0, True),
            ("rope.scaling.factor", 0.0, True), ("rope.scale_linear", 0.0, True)):
        kv = md.get(f"{arch}.{suffix}")
        if kv is not None and kv.type == FLOAT32:
            value = kv.value
            if not (math.isfinite(value) and (value > smallest or (zero_ok and value == smallest))):
                wanted = f">= {smallest:g}" if zero_ok else f"> {smallest:g}"
                raise _Malformed(f"{arch}.{suffix} is {value}, not a finite number {wanted}")

    head0 = n_head[0] if n_head else 0
    head_dim_k = _typed(md, f"{arch}.attention.key_length", UINT32)
    head_dim_v = _typed(md, f"{arch}.attention.value_length", UINT32)
    if head_dim_k is None:
        head_dim_k = n_embd // head0 if head0 else 0
    if head_dim_v is None:
        head_dim_v = n_embd // head0 if head0 else 0
    n_rot = _typed(md, f"{arch}.rope.dimension_count", UINT32)
    n_rot = head_dim_k if n_rot is None or not head0 else n_rot
    return _Hparams(n_embd, n_layer, n_ff, n_head, n_head_kv, n_expert, head_dim_k, head_dim_v, n_rot)


def _check_tokenizer(md: Mapping[str, KeyValue], arch: str) -> int:
    """Check the vocabulary as llama_vocab::load reads it; returns n_vocab."""
    model = _typed(md, "tokenizer.ggml.model", STRING, required=True)
    if model not in TOKENIZER_MODELS:
        raise _Malformed(f"unknown tokenizer.ggml.model {_show(model)}")
    if model in ("no_vocab", "none"):
        return _typed(md, f"{arch}.vocab_size", UINT32) or 0

    tokens = _typed_array(md, "tokenizer.ggml.tokens", frozenset({STRING}), required=True)
    n_vocab = len(tokens)
    if n_vocab == 0:
        raise _Malformed("tokenizer.ggml.tokens is empty")
    # llama.cpp maps text -> id and asserts that no two ids share a text (GGML_ASSERT, abort);
    # it renames empty tokens to "[EMPTY_<id>]" first.
    first_id: dict[str, int] = {}
    for token_id, text in enumerate(tokens):
        text = text or f"[EMPTY_{token_id}]"
        previous = first_id.setdefault(text, token_id)
        if previous != token_id:
            raise _Malformed(
                f"tokenizer.ggml.tokens has duplicate token {_show(text)} (ids {previous} and {token_id})")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = md.get(key)
        if values is not None and len(values.value) != n_vocab:
            raise _Malformed(f"{key} has {len(values.value)} entries but there are {n_vocab} tokens")
    for key in SPECIAL_TOKEN_KEYS:
        token_id = md[key].value if key in md else None
        if token_id is not None and token_id >= n_vocab:
            raise _Malformed(f"{key} is {token_id}, outside the vocabulary of {n_vocab} tokens")

    pre = md["tokenizer.ggml.pre"].value if "tokenizer.ggml.pre" in md else ""
    if model in BPE_TOKENIZER_MODELS or model == "gemma4":
        if "tokenizer.ggml.merges" not in md and not (model != "gemma4" and pre == "kimi-k2"):
            raise _Malformed(f"missing key 'tokenizer.ggml.merges' (required by the {model} tokenizer)")
        if model in BPE_TOKENIZER_MODELS and pre and pre not in BPE_PRE_TOKENIZERS:
            raise _Malformed(f"unknown tokenizer.ggml.pre {_show(pre)}")
    if model == "t5" and "tokenizer.ggml.precompiled_charsmap" in md:
        charsmap = md["tokenizer.ggml.precompiled_charsmap"].value
        blob = int(np.frombuffer(charsmap[:4].astype(np.uint8).tobytes(), "<u4")[0]) if len(charsmap) >= 4 else None
        if blob is None or blob + 4 >= len(charsmap):
            raise _Malformed("tokenizer.ggml.precompiled_charsmap is shorter than its header says")
    return n_vocab


def _check_tensors(summary: GGUFSummary, arch: str, hp: _Hparams, n_vocab: int) -> None:
    by_name = {t.name: t for t in summary.tensors}
    for info in summary.tensors:
        # The CPU backend aborts (GGML_ABORT in binary_op / get_rows) or segfaults (mul_mat with
        # no dot product) on these. Converters and llama-quantize never write such files.
        if len(info.shape) == 1 and info.type_name != "F32":
            raise _Malformed(
                f"tensor {_show(info.name)} is 1-D with type {info.type_name}; llama.cpp computes "
                "with norm weights and biases only in F32 and aborts otherwise")
        if len(info.shape) > 1 and info.type_name in NOT_COMPUTABLE_TYPES:
            raise _Malformed(
                f"tensor {_show(info.name)} has type {info.type_name}, which llama.cpp cannot "
                "compute with (it would crash)")
        match = _BLOCK_TENSOR.fullmatch(info.name)
        if match and int(match.group(1)) >= hp.n_layer:
            raise _Malformed(
                f"tensor {_show(info.name)} belongs to layer {match.group(1)} "
                f"but {arch}.block_count is {hp.n_layer}")
    embd = by_name.get("token_embd.weight")
    if embd is None:
        raise _Malformed("missing tensor 'token_embd.weight'")
    if embd.shape != (hp.n_embd, n_vocab):
        raise _Malformed(
            f"tensor 'token_embd.weight' has shape {list(embd.shape)}, expected "
            f"[{hp.n_embd}, {n_vocab}] ({arch}.embedding_length, number of tokens)")
    if arch in LLAMA_LIKE_ARCHS:
        _check_llama_like(summary, arch, hp, n_vocab)


def _check_llama_like(summary: GGUFSummary, arch: str, hp: _Hparams, n_vocab: int) -> None:
    """The tensor list of llama.cpp's llama / qwen2 / qwen3 loaders, name by name and shape by shape."""
    if hp.n_ff is None or hp.n_head is None:
        missing = f"{arch}.feed_forward_length" if hp.n_ff is None else f"{arch}.attention.head_count"
        raise _Malformed(f"missing required key {_show(missing)}")
    _typed(summary.metadata, f"{arch}.attention.layer_norm_rms_epsilon", FLOAT32, required=True)
    n_embd = hp.n_embd
    for layer in range(hp.n_layer):
        n_head, n_head_kv = hp.n_head[layer], hp.n_head_kv[layer]
        if n_head == 0 or n_head_kv == 0 or n_head % n_head_kv:
            raise _Malformed(
                f"{arch}: {n_head} attention heads cannot be shared by {n_head_kv} key-value heads")
        if hp.n_ff[layer] == 0:
            raise _Malformed(f"{arch}.feed_forward_length is 0")
    if arch == "llama" and hp.n_rot != hp.head_dim_k:
        raise _Malformed(f"{arch}.rope.dimension_count is {hp.n_rot}, expected the head size {hp.head_dim_k}")

    # name -> (shape, required)
    expected: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((n_embd, n_vocab), True),
        "output_norm.weight": ((n_embd,), True),
        "output.weight": ((n_embd, n_vocab), False),
        "rope_freqs.weight": ((hp.n_rot // 2,), False),
    }
    if arch == "qwen2":
        expected["output.bias"] = ((n_vocab,), False)
    by_name = {t.name: t for t in summary.tensors}
    names = by_name.keys()
    for layer in range(hp.n_layer):
        n_head, n_head_kv, n_ff = hp.n_head[layer], hp.n_head_kv[layer], hp.n_ff[layer]
        n_q, n_k, n_v = hp.head_dim_k * n_head, hp.head_dim_k * n_head_kv, hp.head_dim_v * n_head_kv
        if arch == "qwen2":
            n_q = n_embd
        blk = f"blk.{layer}."
        fused = f"{blk}attn_qkv.weight" in names
        layer_tensors = {
            "attn_norm.weight": ((n_embd,), True),
            "attn_output.weight": ((n_embd if arch == "qwen2" else hp.head_dim_v * n_head, n_embd), True),
            "attn_output.bias": ((n_embd,), False),
            "ffn_norm.weight": ((n_embd,), True),
            "attn_q.bias": ((n_q,), False),
            "attn_k.bias": ((n_k,), False),
            "attn_v.bias": ((n_v,), False),
        }
        if fused:
            layer_tensors["attn_qkv.weight"] = ((n_embd, n_q + n_k + n_v), True)
            layer_tensors["attn_qkv.bias"] = ((n_q + n_k + n_v,), False)
        else:
            layer_tensors["attn_q.weight"] = ((n_embd, n_q), True)
            layer_tensors["attn_k.weight"] = ((n_embd, n_k), True)
            layer_tensors["attn_v.weight"] = ((n_embd, n_v), True)
        if arch == "qwen3":
            layer_tensors["attn_q_norm.weight"] = ((hp.head_dim_k,), True)
            layer_tensors["attn_k_norm.weight"] = ((hp.head_dim_k,), True)
        if hp.n_expert == 0:
            layer_tensors.update({
                "ffn_gate.weight": ((n_embd, n_ff), True),
                "ffn_up.weight": ((n_embd, n_ff), True),
                "ffn_down.weight": ((n_ff, n_embd), True),
                "ffn_gate.bias": ((n_ff,), False),
                "ffn_up.bias": ((n_ff,), False),
                "ffn_down.bias": ((n_embd,), False),
            })
        elif arch == "llama":
            layer_tensors.update({
                "ffn_gate_inp.weight": ((n_embd, hp.n_expert), True),
                "ffn_gate_exps.weight": ((n_embd, n_ff, hp.n_expert), False),
                "ffn_up_exps.weight": ((n_embd, n_ff, hp.n_expert), True),
                "ffn_down_exps.weight": ((n_ff, n_embd, hp.n_expert), True),
            })
        else:
            return  # qwen2moe / qwen3moe files use their own architecture names; nothing to add
        for suffix, spec in layer_tensors.items():
            expected[blk + suffix] = spec

    for name, (shape, required) in expected.items():
        info = by_name.get(name)
        if info is None:
            if required:
                raise _Malformed(f"missing tensor {_show(name)}")
            continue
        if info.shape != shape:
            raise _Malformed(f"tensor {_show(name)} has shape {list(info.shape)}, expected {list(shape)}")
    for name in sorted(names - expected.keys()):
        raise _Malformed(f"unexpected tensor {_show(name)} (llama.cpp refuses tensors its {arch} loader does not use)")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _decode(raw: bytes) -> str:
    # surrogateescape keeps distinct byte strings distinct (llama.cpp compares bytes)
    return raw.decode("utf-8", "surrogateescape")


def _show(text: str, limit: int = 60) -> str:
    """A quoted, escaped, shortened rendering of text from the file, safe to put in one line."""
    shown = repr(text if len(text) <= limit else text[:limit] + "...")
    return shown


def _show_bytes(raw: bytes, limit: int = 40) -> str:
    return repr(raw if len(raw) <= limit else raw[:limit] + b"...")


def _one_line(message: str) -> str:
    return message.replace("\r", "\\r").replace("\n", "\\n")
