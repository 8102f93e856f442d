"""An importance matrix from a run's prompts: per input channel, the sum of squares of every
matmul's input, accumulated inside llama.cpp through the eval callback (llama-imatrix's definition).

Which graph tensor feeds which weight (llama-family graphs, llama.cpp's cb names):
    attn_norm-N  → blk.N.attn_q / attn_k / attn_v      kqv_out-N    → blk.N.attn_output
    ffn_norm-N   → blk.N.ffn_gate / ffn_up             ffn_swiglu-N → blk.N.ffn_down
A Mixtral or Qwen3-MoE block (build_moe_ffn) multiplies its experts with MUL_MAT_ID: ffn_norm-N feeds the router
blk.N.ffn_gate_inp (a plain matmul over every token) and, row by row, the gate and up stacks
(ffn_gate_exps / ffn_up_exps) of the experts each token is routed to (ffn_moe_argsort-N); a row of
ffn_moe_swiglu-N (one per token and routed slot) feeds the down stack (ffn_down_exps) of its slot's
expert. As in llama-imatrix, such an entry holds one row of sums and one count per expert.
Like llama-imatrix without --process-output, output.weight is not collected.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from ..errors import ProbeError, UnsupportedArchitecture
from ..formats.gguf import validate_gguf
from ..formats.imatrix import Imatrix, ImatrixEntry
from .ffn import SUPPORTED_MOE_ARCHITECTURES, SUPPORTED_MOE_TEXT, model_ffn
from .model import Engine
from .moe_capture import ModelMoE, model_moe, read_routing
from .probes import Probe, run_checked

FEEDS = {
    "attn_norm": ("attn_q", "attn_k", "attn_v"),
    "kqv_out": ("attn_output",),
    "ffn_norm": ("ffn_gate", "ffn_up"),
    "ffn_swiglu": ("ffn_down",),
}
# "ffn_norm_routed" is ffn_norm-N's rows summed per routed expert (not a graph name of its own).
MOE_FEEDS = {
    "attn_norm": ("attn_q", "attn_k", "attn_v"),
    "kqv_out": ("attn_output",),
    "ffn_norm": ("ffn_gate_inp",),
    "ffn_norm_routed": ("ffn_gate_exps", "ffn_up_exps"),
    "ffn_moe_swiglu": ("ffn_down_exps",),
}
SUPPORTED = ("llama", "qwen2", "qwen3")
SUPPORTED_MOE = SUPPORTED_MOE_ARCHITECTURES  # experts without shared experts, gate and up stacks apart
SUPPORTED_TEXT = f"{', '.join(SUPPORTED)} and mixtures of experts of {SUPPORTED_MOE_TEXT}"


class ImatrixProbe(Probe):
    """Accumulates Σx² per input channel for every layer's matmul inputs (per expert for expert stacks)."""

    needs_all_outputs = True  # the last layer's FFN then sees every token, as the other layers do

    def __init__(self, n_layer: int, moe: ModelMoE | None = None) -> None:
        super().__init__()
        self.n_layer = n_layer
        self.moe = moe
        self.feeds = MOE_FEEDS if moe else FEEDS
        graph_names = [src for src in self.feeds if src != "ffn_norm_routed"] + (["ffn_moe_argsort"] if moe else [])
        self.wanted = {f"{src}-{layer}": (src, layer) for src in graph_names for layer in range(n_layer)}
        self.sums: dict[tuple[str, int], np.ndarray] = {}  # (n_mat, n_per_row): one row per expert
        self.counts: dict[tuple[str, int], np.ndarray] = {}  # (n_mat,) rows counted
        self._ffn_in: dict[int, np.ndarray] = {}  # this batch's ffn_norm-N rows, until its routing arrives
        self._experts: dict[int, np.ndarray] = {}  # this batch's routing per layer (n_tokens, n_expert_used)

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def handle(self, t: int, name: str) -> None:
        src, layer = self.wanted[name]
        if src == "ffn_moe_argsort":
            experts = read_routing(self.reader, t, self.moe)
            x = self._ffn_in.pop(layer, None)
            if x is None or len(x) != len(experts):
                raise ProbeError(f"{name} routes {len(experts)} tokens; ffn_norm-{layer} of this batch held "
                                 f"{'none' if x is None else len(x)}")
            self._experts[layer] = experts
            self._add_routed(("ffn_norm_routed", layer), x, experts)
            return
        x = self.reader.read(t, name).astype(np.float64)
        if src == "ffn_moe_swiglu":
            experts = self._experts.pop(layer, None)
            if experts is None or x.shape[0] != experts.size:
                raise ProbeError(f"{name} holds {x.shape[0]} rows, not one per token and routed expert of "
                                 f"this batch's ffn_moe_argsort-{layer}")
            self._add_routed((src, layer), x, experts.reshape(-1, 1))  # row t·k + j: token t's slot j
            return
        if self.moe and src == "ffn_norm":
            self._ffn_in[layer] = x
        self._add((src, layer), np.einsum("ij,ij->j", x, x)[None, :], np.array([x.shape[0]], dtype=np.int64))

    def _add_routed(self, key: tuple[str, int], x: np.ndarray, experts: np.ndarray) -> None:
        """Row i of x counts once for each expert in experts[i] (MUL_MAT_ID's rule)."""
        routed = np.zeros((len(x), self.moe.n_expert))
        np.add.at(routed, (np.arange(len(x))[:, None], experts), 1.0)
        self._add(key, routed.T @ (x * x), routed.sum(axis=0).astype(np.int64))

    def _add(self, key: tuple[str, int], sums: np.ndarray, counts: np.ndarray) -> None:
        if key in self.sums:
            sums, counts = sums + self.sums[key], counts + self.counts[key]
        self.sums[key], self.counts[key] = sums, counts

    @property
    def tokens(self) -> int:
        """Tokens counted (each matmul fed by every token counts each once; an expert counts fewer)."""
        return int(max((c.max() for c in self.counts.values()), default=0))

    def state(self) -> dict[str, np.ndarray]:
        """The sums so far as arrays (saved with a run's chunk state, so --resume continues them)."""
        out = {}
        for (src, layer), sums in self.sums.items():
            dense = src in FEEDS  # a dense input keeps the layout of files saved before expert stacks
            out[f"sums/{src}/{layer}"] = sums[0] if dense else sums
            out[f"counts/{src}/{layer}"] = self.counts[(src, layer)][0] if dense else self.counts[(src, layer)]
        return out

    def restore(self, path: str | os.PathLike) -> None:
        """Continue exactly where state() left off (replaces what this probe holds)."""
        sums, counts = {}, {}
        with np.load(path) as z:
            for key in z.files:
                kind, src, layer = key.split("/")
                if src not in FEEDS and src not in MOE_FEEDS:
                    raise ProbeError(f"{path}: not an imatrix state (entry {key})")
                if kind == "sums":
                    sums[(src, int(layer))] = np.atleast_2d(z[key].astype(np.float64))
                else:
                    counts[(src, int(layer))] = np.atleast_1d(z[key].astype(np.int64))
        n_mat = self.moe.n_expert if self.moe else 1
        if set(sums) != set(counts) or any(src not in self.feeds or layer >= self.n_layer for src, layer in sums) \
                or any(len(c) != (1 if src in FEEDS else n_mat) for (src, _), c in counts.items()):
            raise ProbeError(f"{path}: imatrix state for another model or incomplete")
        self.sums, self.counts = sums, counts

    def weight_names(self) -> list[str]:
        """Every weight the written imatrix will name."""
        return [f"blk.{layer}.{w}.weight" for layer in range(self.n_layer) for ws in self.feeds.values() for w in ws]

    def imatrix(self, datasets: Sequence[str], chunk_count: int) -> Imatrix:
        entries = {}
        for (src, layer), sums in sorted(self.sums.items(), key=lambda kv: (kv[0][1], list(self.feeds).index(kv[0][0]))):
            for weight in self.feeds[src]:
                entries[f"blk.{layer}.{weight}.weight"] = ImatrixEntry(sums.copy(),
                                                                       self.counts[(src, layer)].astype(np.float64))
        return Imatrix(entries, datasets=list(datasets), chunk_count=chunk_count, chunk_size=0)


def imatrix_probe_for(model_path: str | os.PathLike) -> ImatrixProbe:
    """The probe for this model's graph, or UnsupportedArchitecture in one line naming what is supported."""
    summary = validate_gguf(model_path, for_llama=False)
    arch = summary.architecture
    names = {t.name for t in summary.tensors}
    experts = any(".ffn_gate_inp." in n or "_exps." in n for n in names)  # a router or expert stacks
    if arch not in (SUPPORTED_MOE if experts else SUPPORTED):
        kind = "a mixture of experts of " if experts else ""
        raise UnsupportedArchitecture(f"{kind}{arch}: imatrix collection supports {SUPPORTED_TEXT}")
    moe = model_moe(model_path) if experts else None
    if experts and moe is None:
        raise UnsupportedArchitecture(f"{arch}: expert tensors but no {arch}.expert_count; imatrix collection "
                                      f"supports {SUPPORTED_TEXT}")
    probe = ImatrixProbe(moe.n_layer if moe else model_ffn(model_path).n_layer, moe)
    missing = sorted(set(probe.weight_names()) - names)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UnsupportedArchitecture(f"{arch}: imatrix collection supports {SUPPORTED_TEXT}; this model has no "
                                      f"{', '.join(missing[:3])}{more}")
    return probe


def collect_imatrix(model_path: str | os.PathLike, prompts: Sequence[np.ndarray | str], *,
                    datasets: Sequence[str] = ("prompts",), n_ctx: int = 2048, n_threads: int | None = None,
                    gpu_layers: str | int = "auto", progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """Decode each prompt once and return the importance matrix of its matmul inputs (every token counts).

    prompts: token arrays (a task's prompts fitted to the context as an eval run fits them:
    pipeline.imatrix), or texts, tokenized whole. A prompt longer than the context is refused, never
    cut here."""
    probe = imatrix_probe_for(model_path)
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
