"""Neuron statistics from llama.cpp: the engine's FFN capture wired to the analysis's accumulators.

Typical use:

    probe = NeuronProbe(model_path, layers=[0, 14, -1])
    with Engine(model_path, eval_callback=probe.eval_callback) as engine:
        run_checked(engine, probe, token_arrays)
    probe.finish(); probe.save("neurons.npz")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..analysis.neurons import DEFAULT_REDUNDANCY_BUDGET, NeuronAccumulator
from ..analysis.pick import available_memory
from ..engine.ffn import DEFINITIONS, model_ffn
from ..engine.model import Engine
from ..engine.probes import FFNCapture, run_checked
from ..errors import ProbeError
from ..layerspec import resolve_layers


class CaptureProbe:
    """What a neuron pass's probe shares: an engine capture (`self.capture`) doing the engine's side, an
    analysis accumulator (`self.accumulator`) keeping the statistics. Subclasses build both and restore
    a saved state (each checks its own settings)."""

    capture: Any
    accumulator: Any

    @property
    def needs_all_outputs(self) -> bool:
        """The last layer's FFN covers every token only when every token is an output."""
        return self.capture.needs_all_outputs

    @property
    def reaches_last_layer(self) -> bool:
        return self.capture.reaches_last_layer

    @property
    def finished(self) -> bool:
        return self.capture.finished

    @property
    def error(self) -> BaseException | None:
        return self.capture.error

    def settle(self) -> None:
        self.capture.settle()

    @property
    def eval_callback(self):
        return self.capture.eval_callback

    @property
    def on_batch(self):
        return self.capture.on_batch

    @property
    def prompt_offset(self) -> int:
        return self.capture.prompt_offset

    @prompt_offset.setter
    def prompt_offset(self, value: int) -> None:
        self.capture.prompt_offset = int(value)

    def check(self) -> None:
        self.capture.check()

    def finish(self):
        """Raise any error kept from the callback; returns the accumulator."""
        self.capture.check()
        return self.accumulator

    def state(self) -> dict[str, np.ndarray]:
        self.check()  # what the capture still holds back goes in first
        return self.accumulator.state()

    def save(self, path: str | os.PathLike) -> Path:
        self.check()
        return self.accumulator.save(path)


class NeuronProbe(CaptureProbe):
    """An engine FFNCapture feeding the analysis's streaming statistics (NeuronAccumulator).

    state() / save(path) give the accumulated state; NeuronProbe.load(path, model_path) or
    probe.restore(path) continues a run exactly where the saved state left off.
    """

    shares_prefix = True  # a shared prefix's rows are counted once for every prompt sharing it

    def __init__(
        self,
        model_path: str | os.PathLike,
        layers: str | Sequence[int] = (0, 14, -1),
        definitions: Sequence[str] = DEFINITIONS,
        *,
        redundancy: bool = True,
        top_k: int = 10,
        memory_budget_bytes: int | None = None,
        allow_large: bool = False,
        redundancy_full: bool = False,
    ) -> None:
        model = model_ffn(model_path)
        chosen = resolve_layers(layers, model.n_layer)
        if memory_budget_bytes is None:  # every neuron asked for: what this machine has; else the default budget
            memory_budget_bytes = available_memory()[0] if redundancy_full else DEFAULT_REDUNDANCY_BUDGET
        self.accumulator = NeuronAccumulator(
            chosen, list(definitions), model.n_ff, redundancy=redundancy, top_k=top_k,
            memory_budget_bytes=memory_budget_bytes, allow_large=allow_large, redundancy_full=redundancy_full,
        )
        self.capture = FFNCapture(model_path, self.accumulator.update, chosen, definitions, shared_rows=True)
        self.model = model

    def restore(self, path: str | os.PathLike) -> None:
        loaded = NeuronAccumulator.load(path)
        if (loaded.layers, loaded.definitions, loaded.n_ff) != (self.accumulator.layers, self.accumulator.definitions,
                                                                 self.accumulator.n_ff):
            raise ProbeError(f"{path}: saved neuron state is for other layers/definitions/width")
        if (loaded.redundancy, loaded.redundancy_stride) != (self.accumulator.redundancy, self.accumulator.redundancy_stride):
            def which(acc) -> str:
                return "no neuron" if not acc.redundancy else (
                    "every neuron" if acc.redundancy_stride == 1 else f"one neuron in {acc.redundancy_stride}")
            raise ProbeError(f"{path}: the saved run correlates {which(loaded)}, this one would correlate "
                             f"{which(self.accumulator)}: pass the redundancy settings it was made with "
                             "(--redundancy-full or its --redundancy-budget) to continue it, or --force to redo it")
        # the top-activating tokens kept per neuron: a resumed run must keep as many, ranked the same way
        differ = [f"{name} {getattr(loaded, name)} (this run: {getattr(self.accumulator, name)})"
                  for name in ("top_k", "top_by") if getattr(loaded, name) != getattr(self.accumulator, name)]
        if differ:
            raise ProbeError(f"{path}: saved neuron state has other settings: {'; '.join(differ)}; pass the "
                             "settings it was made with (NeuronSettings.top_k) to continue it, or --force to redo it")
        loaded.redundancy_plan = self.accumulator.redundancy_plan  # why its neurons were chosen, for the note
        self.accumulator = loaded
        self.capture.consumer = loaded.update


# ------------------------------------------------------------------ patching (ablation)


def collect_neuron_stats(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layers: str | Sequence[int] = (0, 14, -1),
    definitions: Sequence[str] = DEFINITIONS,
    *,
    redundancy: bool = True,
    top_k: int = 10,
    allow_large: bool = False,
    memory_budget_bytes: int | None = None,
    chunk_size: int = 32,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    gpu_layers: str | int = "auto",
    progress: Callable[[int, int], None] | None = None,
):
    """Decode every prompt once with a NeuronProbe attached; returns (accumulator, token arrays).

    The token arrays resolve top activations to text (analysis.neurons.top_token_contexts).
    `progress(done, total)` is called after each chunk of prompts.
    """
    probe = NeuronProbe(model_path, layers, definitions, redundancy=redundancy, top_k=top_k,
                        memory_budget_bytes=memory_budget_bytes, allow_large=allow_large)
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=probe.eval_callback) as engine:
        tokens = [engine.tokenize(p) if isinstance(p, str) else np.asarray(p, dtype=np.int32) for p in prompts]
        for start in range(0, len(tokens), chunk_size):
            probe.prompt_offset = start
            # nothing is read back: each graph ends at the last tensor the statistics need
            run_checked(engine, probe, tokens[start:start + chunk_size], logits=False)
            if progress is not None:
                progress(min(start + chunk_size, len(tokens)), len(tokens))
    return probe.finish(), tokens
