"""`ggml-probe kld`: llama-perplexity's quality figures (KLD, PPL ratio, same top p, Δp) of models against a reference.

The protocol is llama-perplexity's `--kl-divergence` (tools/perplexity/perplexity.cpp): the text is
tokenized once with BOS as llama.cpp adds it, cut into chunks of `ctx` tokens, the first token of each
chunk replaced by BOS (when the vocabulary adds one), and the second half of each chunk scored. The
reference's log-probabilities are computed once per (reference file, text tokens, ctx) and stored in
llama-perplexity's own `--kl-divergence-base` format (formats/kld_base.py), so a base made by llama.cpp
can be read and ours can be given to llama-perplexity. Memory stays flat in the text's length: one
batch of chunks' logits at a time.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..analysis.kld import KLDAccumulator, RowStatistics, row_statistics
from ..engine.model import Engine, Vocab
from ..errors import ProbeError
from ..formats.kld_base import KLDBaseReader, KLDBaseWriter, chunk_offset, complete_chunks, decode_rows, scored_rows
from ..fsutil import sha256_file
from .rundir import read_json, save_npz, write_json

# Called as progress(done_chunks, total_chunks, label).
ChunkProgress = Callable[[int, int, str], None]

# Rows per statistics task: (32 × n_vocab) float32 temporaries stay near the cache, and the blocks
# spread over the decode's threads (NumPy releases the GIL in its loops), as llama-perplexity spreads
# its KL computation over its threads.
STAT_ROWS = 32


@dataclass
class KLDSettings:
    ctx: int = 512
    chunks: int | None = None  # None: every whole chunk of the text
    batch: int = 2048  # tokens per llama_decode: batch // ctx chunks decode together (llama-perplexity's default)
    threads: int | None = None
    gpu_layers: str | int = "auto"
    # Off like the rest of ggml-probe (design.md: on CPU it moves logits); llama-perplexity's default is
    # auto (on for CPU): with `-fa off` its printed figures equal ours to the last digit (benchmarks/kld.md).
    flash_attn: bool = False


@dataclass
class KLDResult:
    reference: str
    base_file: Path
    base_source: str  # "computed" | "cached" | "given"
    n_ctx: int
    n_chunk: int
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "base_file": str(self.base_file), "base_source": self.base_source,
                "ctx": self.n_ctx, "chunks": self.n_chunk, "models": self.models}


def text_tokens(vocab: Vocab, text: str, ctx: int, chunks: int | None) -> np.ndarray:
    """The text's tokens as llama-perplexity takes them: BOS as the vocabulary adds it, whole chunks only."""
    tokens = vocab.tokenize(text, add_special=True)
    if len(tokens) < 2 * ctx:
        raise ProbeError(f"the text tokenizes to {len(tokens)} tokens; KLD with --ctx {ctx} needs at least {2 * ctx}")
    n_chunk = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    return np.asarray(tokens[:n_chunk * ctx], dtype=np.int32)


def _chunk_inputs(tokens: np.ndarray, ctx: int, add_bos: bool, bos: int) -> list[np.ndarray]:
    out = []
    for start in range(0, len(tokens), ctx):
        chunk = tokens[start:start + ctx].copy()
        if add_bos:
            chunk[0] = bos  # llama-perplexity: "add BOS token for the first batch of each chunk"
        out.append(chunk)
    return out


def _scored_logits(engine: Engine, chunks: list[np.ndarray], ctx: int, per_decode: int):
    """Yields (chunk index, logits of its scored positions) decoding `per_decode` chunks per llama_decode."""
    first = ctx // 2
    for start in range(0, len(chunks), per_decode):
        group = chunks[start:start + per_decode]
        for k, rows in enumerate(engine.logits_from(group, first)):
            yield start + k, rows[:scored_rows(ctx)]


def _engine(path: Path, s: KLDSettings) -> Engine:
    per_decode = max(1, s.batch // s.ctx)
    # llama-perplexity's context: each chunk its own sequence of ctx cells (not unified), ubatches of 512
    return Engine(path, n_ctx=s.ctx * per_decode, n_batch=max(s.ctx, (s.batch // s.ctx) * s.ctx),
                  n_seq_max=per_decode, n_threads=s.threads, gpu_layers=s.gpu_layers, hidden_states=False,
                  flash_attn=s.flash_attn, n_ubatch=min(512, s.ctx * per_decode), kv_unified=False)


def base_key(reference: Path, tokens: np.ndarray, s: KLDSettings) -> str:
    """What makes a base: the reference file, the text's tokens, ctx and the settings that move logits."""
    h = hashlib.sha256()
    h.update(sha256_file(reference).encode())
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    h.update(f"ctx={s.ctx} batch={s.batch} fa={s.flash_attn}".encode())
    return h.hexdigest()[:16]


def write_base(reference: Path, tokens: np.ndarray, s: KLDSettings, path: Path,
               progress: ChunkProgress | None = None) -> Path:
    """The reference's log-probabilities over the text, in llama-perplexity's base format.

    Written to PATH.partial chunk by chunk and renamed when complete: an interrupted run keeps the
    finished chunks and continues after them.
    """
    partial = path.with_name(path.name + ".partial")
    with _engine(reference, s) as engine:
        chunks = _chunk_inputs(tokens, s.ctx, engine.add_bos, engine.bos)
        done = complete_chunks(partial, s.ctx, engine.n_vocab, tokens)
        with open(partial, "r+b" if done else "wb") as f:
            if done:
                f.truncate(chunk_offset(s.ctx, engine.n_vocab, tokens, done))
                f.seek(0, 2)
                writer = KLDBaseWriter.resuming(f, s.ctx, engine.n_vocab, tokens, done)
            else:
                writer = KLDBaseWriter(f, s.ctx, engine.n_vocab, tokens)
            for i, rows in _scored_logits(engine, chunks[done:], s.ctx, max(1, s.batch // s.ctx)):
                writer.add_chunk(rows)
                f.flush()
                if progress:
                    progress(done + i + 1, len(chunks), f"{reference.name} (reference)")
    os.replace(partial, path)
    return path


def score_model(model: Path, base: Path, s: KLDSettings, progress: ChunkProgress | None = None,
                state_file: Path | None = None) -> dict[str, Any]:
    """One model's figures against a base file (its tokens, ctx and the reference's log-probabilities).

    With `state_file`, the accumulated sums are saved after every decode, and a rerun continues after
    the chunks they cover.
    """
    acc, done = KLDAccumulator(), 0
    if state_file is not None and state_file.exists():
        with np.load(state_file) as z:
            acc, done = KLDAccumulator.from_state(dict(z)), int(z["chunks_done"])
    with KLDBaseReader(base) as reader, _engine(model, KLDSettings(**{**s.__dict__, "ctx": reader.header.n_ctx})) as engine:
        t0 = time.perf_counter()  # the scoring pass: model load excluded, as llama-perplexity's timings exclude it
        h = reader.header
        if engine.n_vocab != h.n_vocab:
            raise ProbeError(f"{model.name} has a vocabulary of {engine.n_vocab} tokens, the reference "
                             f"{reader.path.name} {h.n_vocab}: KLD needs the same vocabulary")
        chunks = _chunk_inputs(h.tokens, h.n_ctx, engine.add_bos, engine.bos)
        first = h.n_ctx // 2
        base_rows = reader.chunks(start=done)
        per_decode = max(1, s.batch // h.n_ctx)

        def block_statistics(block: tuple[np.ndarray, np.ndarray, np.ndarray]) -> RowStatistics:
            logits, stored, next_tokens = block
            return row_statistics(logits, decode_rows(stored, h.n_vocab), next_tokens)

        with ThreadPoolExecutor(max_workers=engine.n_threads) as pool:
            for start in range(done, len(chunks), per_decode):
                group = list(range(start, min(start + per_decode, len(chunks))))
                # views of llama.cpp's buffer: every chunk of the group is scored before the next decode
                for chunk, rows in zip(group, engine.logits_from([chunks[c] for c in group], first, copy=False)):
                    logits, stored = rows[:scored_rows(h.n_ctx)], next(base_rows)
                    next_tokens = h.chunk_tokens(chunk)[first + 1:]
                    blocks = [(logits[i:i + STAT_ROWS], stored[i:i + STAT_ROWS], next_tokens[i:i + STAT_ROWS])
                              for i in range(0, len(logits), STAT_ROWS)]
                    acc.add(RowStatistics.concat(list(pool.map(block_statistics, blocks))))
                    if progress:
                        progress(chunk + 1, len(chunks), model.name)
                if state_file is not None:  # after each decode: a rerun continues after these chunks
                    save_npz(state_file, **acc.state(), chunks_done=np.array(group[-1] + 1))
        decoded = (len(chunks) - done) * h.n_ctx
    out = acc.result()
    seconds = time.perf_counter() - t0
    out.update(seconds=seconds, tokens_per_second=decoded / seconds if seconds else None)
    return out


def run_kld(models: dict[str, Path], reference: Path | None, text: str | None, out: Path,
            settings: KLDSettings | None = None, *, base_file: Path | None = None,
            progress: ChunkProgress | None = None) -> KLDResult:
    """KLD statistics of every model against the reference (or a given llama-perplexity base file).

    The base is cached in `out` under a key of the reference file's hash, the text's tokens and ctx,
    so every later level and run reuses it.
    """
    s = settings or KLDSettings()
    out.mkdir(parents=True, exist_ok=True)
    if base_file is not None:
        base, source, ref_name = Path(base_file), "given", str(base_file)
    else:
        if reference is None or text is None:
            raise ProbeError("kld needs --ref and --text (or --base FILE from llama-perplexity --kl-divergence-base)")
        with Vocab(reference) as vocab:
            tokens = text_tokens(vocab, text, s.ctx, s.chunks)
        base = out / f"base-{base_key(reference, tokens, s)}.kld"
        source, ref_name = ("cached" if base.exists() else "computed"), reference.name
        if not base.exists():
            write_base(reference, tokens, s, base, progress)
    with KLDBaseReader(base) as reader:
        h = reader.header
    result = KLDResult(ref_name, base, source, h.n_ctx, h.n_chunk)
    # A model already scored against this very base (same file name: same key) is not scored again.
    previous = read_json(out / "kld.json") if (out / "kld.json").exists() else {}
    kept = previous.get("models", {}) if previous.get("base_file") == str(base) else {}
    for name, path in models.items():
        model_key = sha256_file(Path(path))[:16]
        if name in kept and kept[name].get("model_sha256_16") == model_key:
            result.models[name] = kept[name]
            continue
        state = out / f"state-{model_key}-{base.stem}.npz"
        figures = score_model(Path(path), base, s, progress, state_file=state)
        figures["model_sha256_16"] = model_key
        result.models[name] = figures
        write_json(out / "kld.json", result.to_dict())  # each finished model is kept at once
        state.unlink(missing_ok=True)
    write_json(out / "kld.json", result.to_dict())
    return result
