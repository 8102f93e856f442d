"""Where one architecture's FFN neurons live in llama.cpp's graph, and the activation functions.

Two neuron definitions (study-protocol.md):
  act      the activation output: SiLU(ffn_gate) for gated SiLU models, GELU(ffn_gate) for gated GELU
           models (Gemma), the GELU output for ungated GELU models (Phi-2). llama.cpp computes the gated
           product in one op, so for gated models the pre-activation `ffn_gate-N` is captured and the
           activation function applied here in float64.
  down_in  the input of ffn_down (`ffn_swiglu-N` / `ffn_geglu-N` / `ffn_gelu-N`), what llama.cpp's imatrix
           accumulates for ffn_down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import BadModelFile, ProbeError, UnsupportedArchitecture
from ..formats.gguf import validate_gguf

DEFINITIONS = ("act", "down_in")


def check_definitions(definitions: Sequence[str]) -> tuple[str, ...]:
    """The neuron definitions asked for, once each in their order; ProbeError (one line) for an unknown one."""
    bad = [d for d in definitions if d not in DEFINITIONS]
    if bad or not definitions:
        raise ProbeError(f"neuron definition must be one of {', '.join(DEFINITIONS)}, not {bad or list(definitions)}")
    return tuple(dict.fromkeys(definitions))


@dataclass(frozen=True)
class FFNNames:
    """Which graph tensors hold one architecture's FFN neurons (names without the `-N` layer suffix)."""

    arch: str
    act_source: str  # the tensor `act` is read from
    act_fn: str | None  # applied to act_source here: "silu", "gelu_tanh", or None (already activated)
    down_in: str  # the input of ffn_down
    up: str | None  # the up projection (gated models): down_in = act · up
    residual: str = "ffn_inp"  # the residual the FFN's output is added to (Gemma: after the attention post-norm);
    # "" where the graph names none (phi3): it is l_out − ffn_out
    fused_gate_up: bool = False  # phi3: one ffn_up tensor holds [gate | up]; act_fn reads the gate half


# Gated architectures whose build_ffn call is (up, gate, down, LLM_FFN_SILU|GELU, LLM_FFN_PAR); checked
# in llama.cpp's src/models/*.cpp and llama-graph.cpp build_ffn (vendored with llama-cpp-python 0.3.36).
_GATED = {"llama": "silu", "qwen2": "silu", "qwen3": "silu", "gemma": "gelu_tanh", "gemma2": "gelu_tanh",
          "gemma3": "gelu_tanh"}
_UNGATED_GELU = {"phi2"}
# Graphs that name the FFN's residual input other than `ffn_inp` (src/models/gemma*.cpp: `sa_out`).
_RESIDUAL = {"gemma": "sa_out", "gemma2": "sa_out", "gemma3": "sa_out"}
# Gate and up in one matmul, [gate | up] (src/models/phi3.cpp: build_ffn(ffn_up, …, LLM_FFN_SWIGLU, LLM_FFN_SEQ)).
_FUSED_GATE_UP = {"phi3": "silu_gate_half"}
SUPPORTED_ARCHITECTURES = tuple(sorted(set(_GATED) | _UNGATED_GELU | set(_FUSED_GATE_UP)))
# Mixture-of-experts architectures whose experts llama.cpp builds as gate/up/down with LLM_FFN_SILU, softmax
# routing and no shared expert (src/models/llama.cpp: Mixtral converts to llama with expert tensors;
# src/models/qwen3moe.cpp: the same build_moe_ffn call). arch → act function.
# The one list of what engine.moe_capture and the imatrix probe support.
MOE_ACT = {"llama": "silu", "qwen3moe": "silu"}
SUPPORTED_MOE_ARCHITECTURES = tuple(sorted(MOE_ACT))
_MOE_MODELS = {"llama": "Mixtral", "qwen3moe": "Qwen3-MoE"}
SUPPORTED_MOE_TEXT = ", ".join(f"{a} ({_MOE_MODELS[a]})" for a in SUPPORTED_MOE_ARCHITECTURES)


@dataclass(frozen=True)
class ModelFFN:
    """What the capture needs to know about a GGUF model's FFN."""

    path: str
    arch: str
    n_layer: int
    n_ff: int
    n_embd: int
    names: FFNNames


def ffn_names(arch: str, tensor_names: Iterable[str] = ()) -> FFNNames:
    """The graph names for `arch`; raises UnsupportedArchitecture for MoE or unknown FFNs."""
    names = set(tensor_names)
    if any(".ffn_gate_exps." in n or ".ffn_gate_inp." in n or "_exps." in n for n in names):
        moe = (f"{arch}'s experts get per-expert neuron statistics only (neurons, eval --neurons, study)"
               if arch in MOE_ACT else
               f"per-expert neuron statistics support only {SUPPORTED_MOE_TEXT}")
        raise UnsupportedArchitecture(
            f"{arch}: a mixture-of-experts FFN (ffn_*_exps): {moe}; this analysis needs a dense FFN "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if arch in _GATED:
        # build_ffn names the gate after its bias add `ffn_gate_b` and the up projection `ffn_up_b`.
        gate = "ffn_gate_b" if "blk.0.ffn_gate.bias" in names else "ffn_gate"
        up = "ffn_up_b" if "blk.0.ffn_up.bias" in names else "ffn_up"
        product = "ffn_swiglu" if _GATED[arch] == "silu" else "ffn_geglu"
        return FFNNames(arch, gate, _GATED[arch], product, up, _RESIDUAL.get(arch, "ffn_inp"))
    if arch in _FUSED_GATE_UP:
        return FFNNames(arch, "ffn_up", _FUSED_GATE_UP[arch], "ffn_swiglu", "ffn_up", "", fused_gate_up=True)
    if arch in _UNGATED_GELU:  # src/models/phi2.cpp: l_out = x + attn + ffn_out, no tensor holds x + attn
        return FFNNames(arch, "ffn_gelu", None, "ffn_gelu", None, "")
    raise UnsupportedArchitecture(
        f"{arch}: the neuron capture does not know this architecture's FFN tensor names "
        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


@lru_cache(maxsize=16)
def _model_ffn_cached(path: str, mtime: float) -> ModelFFN:
    # The validator's bounds-checked header parse: fast, and a corrupt file is refused in one line.
    summary = validate_gguf(path, for_llama=False)
    field = summary.value
    arch = summary.architecture
    if not arch:
        raise BadModelFile(f"{path}: no general.architecture in the GGUF metadata")
    names = ffn_names(arch, [t.name for t in summary.tensors])
    n_layer = field(f"{arch}.block_count")
    n_ff = field(f"{arch}.feed_forward_length")
    n_embd = field(f"{arch}.embedding_length")
    if hasattr(n_ff, "tolist"):
        n_ff = n_ff.tolist()
    if isinstance(n_ff, list):  # per-layer FFN widths
        if len(set(n_ff)) != 1:
            raise UnsupportedArchitecture(f"{path}: FFN width differs between layers; not supported")
        n_ff = n_ff[0]
    if n_layer is None or n_ff is None:
        raise BadModelFile(f"{path}: missing {arch}.block_count or {arch}.feed_forward_length")
    return ModelFFN(path, arch, int(n_layer), int(n_ff), int(n_embd or 0), names)


def model_ffn(path: str | os.PathLike) -> ModelFFN:
    """Architecture, layer count, FFN width and graph names of a GGUF file (metadata only)."""
    p = Path(path)
    return _model_ffn_cached(str(p.resolve()), p.stat().st_mtime)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU in float64, stable for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    return x * _sigmoid(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.tanh(0.5 * x)  # σ(x) = (1 + tanh(x/2)) / 2: one transcendental, no overflow on either side
    out *= 0.5
    out += 0.5
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU that ggml uses (and Gemma's gelu_pytorch_tanh), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def gate_half(fused: np.ndarray) -> np.ndarray:
    """The gate columns of a fused [gate | up] row block."""
    return fused[..., : fused.shape[-1] // 2]


def up_half(fused: np.ndarray) -> np.ndarray:
    """The up columns of a fused [gate | up] row block."""
    return fused[..., fused.shape[-1] // 2:]


ACT_FUNCTIONS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    "silu": silu, "gelu_tanh": gelu_tanh, None: lambda x: np.asarray(x, dtype=np.float64),
    "silu_gate_half": lambda x: silu(gate_half(x)),
}

