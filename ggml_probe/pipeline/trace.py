"""`ggml-probe trace`: where a quantized model's error enters and where it grows, block by block.

    from ggml_probe.pipeline.trace import TraceSettings, run_trace
    result = run_trace(Path("m-Q4_K_M.gguf"), Path("m-F16.gguf"), text, TraceSettings(tokens=1024))

The same tokens go through the reference and the quantized model, one chunk of `ctx` tokens at a time (a
fresh sequence per chunk, its first token BOS as llama-perplexity does): per block, the attention output
(before and after attn_output), the FFN output and the residual stream after the block are read from both
graphs (engine.trace) and compared (analysis.trace: relative error, cosine). Then the reference model runs
once more per KL point with its residual stream after block k overwritten by the quantized model's: the KL
of that output against the reference's is the KL with blocks ≤ k quantized, and its steps from block to
block say how much each block adds to the final KL.

Memory is flat in the text's length: one chunk's tensors of both models at a time, sums across chunks.
Cost per chunk: 2 + (KL points) decodes of `ctx` tokens; `kl=False` leaves the KL points out.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..analysis.trace import DEFINITIONS, EMBEDDING_POINT, FULL_POINT, TraceAccumulator, log_probs
from ..engine.model import Engine
from ..engine.probes import SwitchedProbe
from ..engine.trace import EMBEDDING, RESIDUAL, SUBLAYERS, TensorCapture, TensorPatch, graph_name
from ..errors import ProbeError
from ..layerspec import resolve_layers

# Called as progress(done_chunks, total_chunks).
TraceProgress = Callable[[int, int], None]


@dataclass
class TraceSettings:
    ctx: int = 256  # tokens per chunk (one decode, one fresh sequence)
    tokens: int = 1024  # at most this many tokens of the text (whole chunks)
    layers: str | Sequence[int] | None = None  # blocks compared and patched (layerspec); None: every block
    kl: bool = True  # the KL attribution (one extra reference decode per chosen block, per chunk)
    sublayers: Sequence[str] = field(default_factory=lambda: list(SUBLAYERS))
    threads: int | None = None
    gpu_layers: str | int = "auto"
    kv_type: int | None = None  # ggml type of the KV cache (0: F32); None: llama.cpp's default, F16


def _engine(path: Path, s: TraceSettings, callback) -> Engine:
    # One chunk per decode and one graph per chunk (n_ubatch = ctx): the callback sees each tensor once.
    return Engine(path, n_ctx=s.ctx, n_batch=s.ctx, n_ubatch=s.ctx, n_threads=s.threads, gpu_layers=s.gpu_layers,
                  hidden_states=False, eval_callback=callback, kv_type=s.kv_type)


def trace_chunks(tokens: np.ndarray, s: TraceSettings, add_bos: bool, bos: int) -> list[np.ndarray]:
    """Whole chunks of ctx tokens, at most s.tokens in all, each starting with BOS where the vocabulary adds one."""
    if s.ctx < 2:
        raise ProbeError(f"--ctx must be at least 2 tokens, not {s.ctx}")
    if s.tokens < s.ctx:
        raise ProbeError(f"--tokens {s.tokens} is less than one chunk of --ctx {s.ctx} tokens")
    if len(tokens) < s.ctx:
        raise ProbeError(f"the text tokenizes to {len(tokens)} tokens; the trace with --ctx {s.ctx} needs at least {s.ctx}")
    n_chunk = min(len(tokens) // s.ctx, s.tokens // s.ctx)
    chunks = []
    for i in range(n_chunk):
        chunk = np.array(tokens[i * s.ctx:(i + 1) * s.ctx], dtype=np.int32)
        if add_bos:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def _logits(engine: Engine, probe, chunk: np.ndarray) -> np.ndarray:
    """Every position's logits of one chunk; an error raised inside the probe's callback is re-raised as itself."""
    try:
        (rows,) = engine.logits_from([chunk], 0)
    except ProbeError:
        probe.check()
        raise
    probe.check()
    return rows


def _check_pair(model: Path, ref: Engine, quant: Engine, text: str) -> np.ndarray:
    """The text's tokens, after checking the two models can be compared token for token."""
    if quant.n_vocab != ref.n_vocab:
        raise ProbeError(f"{model.name} has a vocabulary of {quant.n_vocab} tokens, the reference {ref.path.name} "
                         f"{ref.n_vocab}: the trace needs the same vocabulary")
    if (quant.n_layer, quant.n_embd) != (ref.n_layer, ref.n_embd):
        raise ProbeError(f"{model.name} has {quant.n_layer} blocks of width {quant.n_embd}, the reference "
                         f"{ref.path.name} {ref.n_layer} of width {ref.n_embd}: not the same model")
    tokens = ref.tokenize(text, add_special=True)
    if not np.array_equal(tokens, quant.tokenize(text, add_special=True)):
        raise ProbeError(f"{model.name} and the reference {ref.path.name} tokenize the text differently: "
                         "the trace needs the same vocabulary")
    return tokens


def _missing(capture: TensorCapture, path: Path) -> None:
    missing = capture.missing()
    if missing:
        raise ProbeError(f"{path.name}: llama.cpp's graph has no tensor {missing[0]} "
                         f"({len(missing)} of the traced tensors missing); this architecture is not supported by trace")


def run_trace(model: Path, reference: Path, text: str, settings: TraceSettings | None = None,
              progress: TraceProgress | None = None) -> dict[str, Any]:
    """The divergence trace of `model` against `reference` on `text` (see the module's docstring)."""
    s = settings or TraceSettings()
    model, reference = Path(model), Path(reference)
    t0 = time.perf_counter()
    switched = SwitchedProbe()
    with _engine(reference, s, switched.eval_callback) as ref:
        layers = resolve_layers(s.layers, ref.n_layer)
        sublayers = [sub for sub in s.sublayers if sub in SUBLAYERS]
        if not sublayers:
            raise ProbeError(f"sublayers must be among {', '.join(SUBLAYERS)}")
        kl_layers = layers if s.kl else []
        names = {graph_name(sub, k) for sub in sublayers for k in layers}
        quant_names = names | {graph_name(RESIDUAL, k) for k in kl_layers} | ({EMBEDDING} if s.kl else set())
        ref_capture, patch = TensorCapture(names), TensorPatch()
        quant_capture = TensorCapture(quant_names)
        with _engine(model, s, quant_capture.eval_callback) as quant:
            tokens = _check_pair(model, ref, quant, text)
            chunks = trace_chunks(tokens, s, ref.add_bos, ref.bos)
            acc = TraceAccumulator(sublayers, layers, kl_layers, ref.n_layer)
            for i, chunk in enumerate(chunks):
                switched.current = ref_capture
                ref_capture.clear()
                ref_lp = log_probs(_logits(ref, ref_capture, chunk))  # once per chunk, for every KL point
                _missing(ref_capture, reference)
                quant_capture.clear()
                acc.update_kl(FULL_POINT, ref_lp, _logits(quant, quant_capture, chunk))
                _missing(quant_capture, model)
                for sub in sublayers:
                    for k in layers:
                        name = graph_name(sub, k)
                        acc.update_tensor(sub, k, ref_capture.tensors[name], quant_capture.tensors[name])
                ref_capture.clear()
                switched.current = patch
                for point in (acc.kl_points[:-1] if s.kl else []):
                    target = EMBEDDING if point == EMBEDDING_POINT else graph_name(RESIDUAL, point)
                    patch.set(target, quant_capture.tensors[target])
                    logits = _logits(ref, patch, chunk)
                    if patch.patched != 1:
                        raise ProbeError(f"{reference.name}: the graph tensor {target} was written {patch.patched} "
                                         "times, not once; the KL attribution cannot patch it")
                    acc.update_kl(point, ref_lp, logits)
                if progress:
                    progress(i + 1, len(chunks))
    result = acc.result()
    return {"model": model.name, "model_path": str(model), "reference": reference.name,
            "reference_path": str(reference), "n_layer": acc.n_layer, "ctx": s.ctx, "chunks": len(chunks),
            "tokens": len(chunks) * s.ctx, "sublayers": sublayers, **result,
            "settings": {**asdict(s), "layers": layers, "sublayers": sublayers},
            "seconds": time.perf_counter() - t0, "definitions": DEFINITIONS}


def trace_key(model_sha256: str, reference_sha256: str, text: str, s: TraceSettings) -> str:
    """What a trace depends on: both files (their SHA-256), the text and the settings that change what is measured."""
    h = hashlib.sha256()
    for digest in (model_sha256, reference_sha256):
        h.update(digest.encode())
    h.update(text.encode("utf-8", errors="replace"))
    h.update(f"ctx={s.ctx} tokens={s.tokens} layers={s.layers} kl={s.kl} sub={list(s.sublayers)} kv={s.kv_type}".encode())
    return h.hexdigest()[:16]
