"""An importance matrix from a run's prompts: per input channel, the sum of squares of every
matmul's input, accumulated inside llama.cpp through the eval callback (llama-imatrix's definition).

Which graph tensor feeds which weight (llama-family graphs, llama.cpp's cb names):
    attn_norm-N  → blk.N.attn_q / attn_k / attn_v      kqv_out-N    → blk.N.attn_output
    ffn_norm-N   → blk.N.ffn_gate / ffn_up             ffn_swiglu-N → blk.N.ffn_down
Like llama-imatrix without --process-output, output.weight is not collected.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from ..errors import ProbeError, UnsupportedArchitecture
from ..formats.imatrix import Imatrix, ImatrixEntry
from .ffn import model_ffn
from .model import Engine
from .probes import Probe, run_checked

FEEDS = {
    "attn_norm": ("attn_q", "attn_k", "attn_v"),
    "kqv_out": ("attn_output",),
    "ffn_norm": ("ffn_gate", "ffn_up"),
    "ffn_swiglu": ("ffn_down",),
}
SUPPORTED = ("llama", "qwen2", "qwen3")


class ImatrixProbe(Probe):
    """Accumulates Σx² per input channel for every layer's matmul inputs."""

    needs_all_outputs = True  # the last layer's FFN then sees every token, as the other layers do

    def __init__(self, n_layer: int) -> None:
        super().__init__()
        self.wanted = {f"{src}-{layer}": (src, layer) for src in FEEDS for layer in range(n_layer)}
        self.sums: dict[tuple[str, int], np.ndarray] = {}
        self.counts: dict[tuple[str, int], int] = {}

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def handle(self, t: int, name: str) -> None:
        key = self.wanted[name]
        x = self.reader.read(t, name).astype(np.float64)
        acc = self.sums.get(key)
        self.sums[key] = np.einsum("ij,ij->j", x, x) + (0.0 if acc is None else acc)
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def state(self) -> dict[str, np.ndarray]:
        """The sums so far as arrays (saved with a run's chunk state, so --resume continues them)."""
        out = {}
        for (src, layer), sums in self.sums.items():
            out[f"sums/{src}/{layer}"] = sums
            out[f"counts/{src}/{layer}"] = np.array(self.counts[(src, layer)], dtype=np.int64)
        return out

    def restore(self, path: str | os.PathLike) -> None:
        """Continue exactly where state() left off (replaces what this probe holds)."""
        sums, counts = {}, {}
        with np.load(path) as z:
            for key in z.files:
                kind, src, layer = key.split("/")
                if src not in FEEDS:
                    raise ProbeError(f"{path}: not an imatrix state (entry {key})")
                if kind == "sums":
                    sums[(src, int(layer))] = z[key].astype(np.float64)
                else:
                    counts[(src, int(layer))] = int(z[key])
        if set(sums) != set(counts) or any(f"{src}-{layer}" not in self.wanted for src, layer in sums):
            raise ProbeError(f"{path}: imatrix state for another model or incomplete")
        self.sums, self.counts = sums, counts

    def imatrix(self, datasets: Sequence[str], chunk_count: int) -> Imatrix:
        entries = {}
        for (src, layer), sums in sorted(self.sums.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            for weight in FEEDS[src]:
                entries[f"blk.{layer}.{weight}.weight"] = ImatrixEntry(sums.reshape(1, -1).copy(),
                                                                       np.array([float(self.counts[(src, layer)])]))
        return Imatrix(entries, datasets=list(datasets), chunk_count=chunk_count, chunk_size=0)


def collect_imatrix(model_path: str | os.PathLike, prompts: Sequence[np.ndarray | str], *,
                    datasets: Sequence[str] = ("prompts",), n_ctx: int = 2048, n_threads: int | None = None,
                    gpu_layers: str | int = "auto", progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """Decode each prompt once and return the importance matrix of its matmul inputs (every token counts).

    prompts: token arrays (a task's prompts fitted to the context as an eval run fits them:
    pipeline.imatrix), or texts, tokenized whole. A prompt longer than the context is refused, never
    cut here."""
    info = model_ffn(model_path)
    if info.arch not in SUPPORTED:
        raise UnsupportedArchitecture(f"{info.arch}: imatrix collection supports {', '.join(SUPPORTED)}")
    probe = ImatrixProbe(info.n_layer)
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=probe.eval_callback) as engine:
        for i, prompt in enumerate(prompts):
            tokens = engine.tokenize(prompt) if isinstance(prompt, str) else np.asarray(prompt, dtype=np.int32)
            if len(tokens) > engine.prompt_limit:
                raise ProbeError(f"prompt {i} has {len(tokens)} tokens, more than the {engine.prompt_limit} the "
                                 "context holds; fit it first (pipeline.imatrix) or raise --ctx")
            run_checked(engine, probe, [tokens])
            if progress:
                progress(i + 1, len(prompts))
    if not probe.sums:
        raise ProbeError("llama.cpp offered none of the matmul inputs; is this a llama-family model?")
    return probe.imatrix(datasets, len(prompts))
