"""llama-perplexity's `--kl-divergence-base` file: a reference model's log-probabilities, compactly.

Layout (tools/perplexity/perplexity.cpp, llama.cpp as vendored by llama-cpp-python 0.3.36):

    "_logits_"                      8 bytes
    n_ctx                           uint32
    n_vocab, n_chunk                int32, int32
    tokens                          int32 × (n_ctx · n_chunk)   the text's tokens, chunk after chunk
    per chunk, per scored position  uint16 × nv, nv = 2·⌈n_vocab/2⌉ + 4:
        float32 scale, float32 min_log_prob  (the first 4 uint16)
        uint16 q[i] per token id: log p(i) = scale·q[i] + min_log_prob; 0 where log p ≤ the floor

A chunk scores positions n_ctx/2 … n_ctx−2 (each predicts the next token): n_ctx − 1 − n_ctx/2 rows.
The floor is max(min logit, max logit − 16): log-probabilities more than 16 nats below the top are
stored as the floor, which is why llama.cpp's KLD sums only over base log p > −16.

A reference of any length streams through this format: one chunk's rows at a time, never the text's
whole logit matrix.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from ..errors import BadModelFile

MAGIC = b"_logits_"
FLOOR_NATS = 16.0


def row_width(n_vocab: int) -> int:
    """uint16 values per stored row: two float32 (scale, min) then one value per token, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_rows(n_ctx: int) -> int:
    """Positions scored per chunk: the second half, less the last (it predicts nothing inside the chunk)."""
    return n_ctx - 1 - n_ctx // 2


def encode_rows(logits: np.ndarray) -> np.ndarray:
    """Rows of logits (n, n_vocab) → stored rows (n, nv) uint16, as llama.cpp's log_softmax(…, log_prob, …)."""
    z = np.asarray(logits, dtype=np.float32)
    n, n_vocab = z.shape
    max_logit = z.max(axis=1)
    min_logit = np.maximum(z.min(axis=1), max_logit - np.float32(FLOOR_NATS))
    sum_exp = np.exp(z - max_logit[:, None]).sum(axis=1, dtype=np.float64)  # expf per value, summed in double
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    min_log_prob = (min_logit - max_logit - log_sum_exp).astype(np.float32)
    scale = ((max_logit - min_logit) / np.float32(65535.0)).astype(np.float32)
    out = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    head = np.stack([scale, min_log_prob], axis=1).astype(np.float32)
    out[:, :4] = head.view(np.uint16).reshape(n, 4)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(scale != 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
    # nearest_int: round half to even in float32, like the 12582912 trick in perplexity.cpp
    q = np.rint(inv_scale[:, None] * (z - min_logit[:, None])).astype(np.int64)
    q = np.where(z > min_logit[:, None], q, 0)
    out[:, 4:4 + n_vocab] = np.clip(q, 0, 65535).astype(np.uint16)
    return out


def decode_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Stored rows (n, nv) uint16 → log-probabilities (n, n_vocab) float32 (floor values included)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint16)
    head = rows[:, :4].copy().view(np.float32)  # (n, 2): scale, min_log_prob
    return (head[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]).astype(np.float32)


@dataclass
class KLDBaseHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 (n_chunk · n_ctx,)

    @property
    def row_width(self) -> int:
        return row_width(self.n_vocab)

    @property
    def rows_per_chunk(self) -> int:
        return scored_rows(self.n_ctx)

    def chunk_tokens(self, chunk: int) -> np.ndarray:
        return self.tokens[chunk * self.n_ctx:(chunk + 1) * self.n_ctx]


class KLDBaseReader:
    """Streams a base file chunk by chunk: `header`, then `chunks()` yields (n_rows, nv) uint16 arrays."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f: BinaryIO = open(self.path, "rb")
        try:
            self.header = self._read_header()
        except BaseException:
            self._f.close()
            raise

    def _read_header(self) -> KLDBaseHeader:
        f = self._f
        if f.read(8) != MAGIC:
            raise BadModelFile(f"{self.path}: not a llama-perplexity KL-divergence base file (no '_logits_' magic)")
        raw = f.read(12)
        if len(raw) != 12:
            raise BadModelFile(f"{self.path}: truncated header")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", raw)
        if n_ctx < 4 or n_vocab < 2 or n_chunk < 1:
            raise BadModelFile(f"{self.path}: implausible header n_ctx={n_ctx} n_vocab={n_vocab} n_chunk={n_chunk}")
        tokens = np.fromfile(f, dtype="<i4", count=n_ctx * n_chunk)
        if tokens.size != n_ctx * n_chunk:
            raise BadModelFile(f"{self.path}: truncated: {tokens.size} of {n_ctx * n_chunk} tokens")
        expected = 20 + tokens.nbytes + n_chunk * scored_rows(n_ctx) * row_width(n_vocab) * 2
        size = self.path.stat().st_size
        if size < expected:
            raise BadModelFile(f"{self.path}: truncated: {size} bytes, the header promises {expected}")
        return KLDBaseHeader(int(n_ctx), int(n_vocab), int(n_chunk), tokens.astype(np.int32))

    def chunks(self, start: int = 0) -> Iterator[np.ndarray]:
        """The stored rows of chunk `start` onwards, one chunk at a time."""
        h = self.header
        n = h.rows_per_chunk * h.row_width
        self._f.seek(20 + h.tokens.nbytes + start * n * 2)
        for _ in range(start, h.n_chunk):
            data = np.fromfile(self._f, dtype="<u2", count=n)
            if data.size != n:
                raise BadModelFile(f"{self.path}: truncated log-probabilities")
            yield data.reshape(h.rows_per_chunk, h.row_width)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "KLDBaseReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunk_offset(n_ctx: int, n_vocab: int, tokens: np.ndarray, chunk: int) -> int:
    """Byte offset where chunk `chunk`'s rows start."""
    return 20 + 4 * len(tokens) + chunk * scored_rows(n_ctx) * row_width(n_vocab) * 2


def complete_chunks(path: Path, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> int:
    """How many whole chunks a partly written base holds, if it was started for these very tokens (else 0)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:8] != MAGIC or struct.unpack("<Iii", head[8:]) != (n_ctx, n_vocab,
                                                                                          len(tokens) // n_ctx):
                return 0
            if not np.array_equal(np.fromfile(f, dtype="<i4", count=len(tokens)), tokens):
                return 0
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    per_chunk = scored_rows(n_ctx) * row_width(n_vocab) * 2
    return max(0, min(len(tokens) // n_ctx, (size - chunk_offset(n_ctx, n_vocab, tokens, 0)) // per_chunk))


class KLDBaseWriter:
    """Writes a base file llama-perplexity reads: the header and tokens first, then each chunk's rows."""

    def __init__(self, f: BinaryIO, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype="<i4")
        if tokens.size % n_ctx:
            raise ValueError(f"{tokens.size} tokens are not whole chunks of {n_ctx}")
        self._f, self.n_ctx, self.n_vocab = f, n_ctx, n_vocab
        self.n_chunk = tokens.size // n_ctx
        f.write(MAGIC)
        f.write(struct.pack("<Iii", n_ctx, n_vocab, self.n_chunk))
        f.write(tokens.tobytes())
        self.written = 0

    @classmethod
    def resuming(cls, f: BinaryIO, n_ctx: int, n_vocab: int, tokens: np.ndarray, written: int) -> "KLDBaseWriter":
        """A writer continuing a file whose header and first `written` chunks are already in place."""
        self = cls.__new__(cls)
        self._f, self.n_ctx, self.n_vocab = f, n_ctx, n_vocab
        self.n_chunk = len(tokens) // n_ctx
        self.written = written
        return self

    def add_chunk(self, scored_logits: np.ndarray) -> None:
        """The logits of one chunk's scored positions, (n_ctx − 1 − n_ctx/2, n_vocab)."""
        if scored_logits.shape != (scored_rows(self.n_ctx), self.n_vocab):
            raise ValueError(f"chunk logits of shape {scored_logits.shape}, expected "
                             f"({scored_rows(self.n_ctx)}, {self.n_vocab})")
        self._f.write(encode_rows(scored_logits).astype("<u2").tobytes())
        self.written += 1
