"""The graph tensors the divergence trace reads and overwrites: per block, the attention and FFN outputs and
the residual stream after the block.

Names as llama.cpp's graph gives them (src/models/llama.cpp and the other decoder models, vendored with
llama-cpp-python 0.3.36; the callback sees the final `name-il` of each node):

    embd        the token embeddings (ggml_get_rows of token_embd), the input of block 0
    kqv_out-N   the attention heads' output, concatenated, before the output projection attn_output
    attn_out-N  the attention sublayer's output after attn_output (what is added to the residual stream)
    ffn_out-N   the FFN sublayer's output after ffn_down (build_ffn's result; the sum with the residual
                stream is renamed l_out-N)
    l_out-N     the residual stream after block N, the input of block N+1

A mixture-of-experts block names its FFN output `ffn_moe_out-N` (src/models/llama.cpp's MoE branch; there
`ffn_out` names the sum, which becomes l_out-N): TensorCapture reads it as ffn_out-N.

`TensorCapture` copies chosen tensors of one decode; `TensorPatch` overwrites one tensor with given values
while the graph runs (the later nodes read the written values), as NeuronPatch does for FFN neurons.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import ProbeError
from .probes import Probe

EMBEDDING = "embd"
SUBLAYERS = ("kqv_out", "attn_out", "ffn_out", "l_out")
RESIDUAL = "l_out"
ALIASES = {"ffn_moe_out": "ffn_out"}  # graph name (without -N) → the sublayer it stands for


def graph_name(sublayer: str, layer: int) -> str:
    """The callback's name of a per-block tensor, e.g. graph_name('l_out', 3) == 'l_out-3'."""
    return f"{sublayer}-{layer}"


class TensorCapture(Probe):
    """Keeps a float32 copy of each named graph tensor of the last decode: tensors[name] (rows, ne0).

    Run with every position an output (Engine.logits_from(..., first=0)): the last block's tensors then
    hold every token's row. clear() before each decode.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = set(names)
        self.tensors: dict[str, np.ndarray] = {}

    def clear(self) -> None:
        self.tensors = {}

    def wants(self, name: str) -> bool:
        return _canonical(name) in self.names

    def handle(self, t: int, name: str) -> None:
        # one reused read buffer: the copy is kept
        self.tensors[_canonical(name)] = self.reader.read(t, "capture").copy()

    def missing(self) -> list[str]:
        """Names asked for that the last decode's graph did not hold."""
        return sorted(self.names - set(self.tensors))


def _canonical(name: str) -> str:
    """The trace's name of a graph tensor: ffn_moe_out-3 → ffn_out-3; others unchanged."""
    base, dash, layer = name.rpartition("-")
    return f"{ALIASES[base]}-{layer}" if dash and base in ALIASES else name


class TensorPatch(Probe):
    """Overwrites the graph tensor `target` with `values` (rows, ne0) during the decode; `patched` counts
    the writes. Set target and values before each decode (None: patch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.target: str | None = None
        self.values: np.ndarray | None = None
        self.patched = 0

    def set(self, target: str, values: np.ndarray) -> None:
        self.target, self.values, self.patched = target, np.ascontiguousarray(values, dtype=np.float32), 0

    def wants(self, name: str) -> bool:
        return self.target is not None and name == self.target

    def handle(self, t: int, name: str) -> None:
        current = self.reader.read(t, "patch")
        if self.values is None or current.shape != self.values.shape:
            shape = None if self.values is None else self.values.shape
            raise ProbeError(f"patch for {name}: values of shape {shape} for a tensor of shape {current.shape}")
        self.reader.write(t, self.values)
        self.patched += 1
