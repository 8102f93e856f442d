"""FFN neurons out of llama.cpp's graph, through the eval callback: capture, statistics, patching.

Two neuron definitions (study-protocol.md):
  act      the activation output: SiLU(ffn_gate) for gated SiLU models, GELU(ffn_gate) for gated GELU
           models (Gemma), the GELU output for ungated GELU models (Phi-2). llama.cpp computes the gated
           product in one op, so for gated models the pre-activation `ffn_gate-N` is captured and the
           activation function applied here in float64.
  down_in  the input of ffn_down (`ffn_swiglu-N` / `ffn_geglu-N` / `ffn_gelu-N`), what llama.cpp's imatrix
           accumulates for ffn_down.

Tensors arrive as ggml [n_ff, n_tokens] (ne[0] innermost), i.e. NumPy (n_tokens, n_ff) row-major.
The probe asks the scheduler only for the tensors it needs: each one asked for splits the graph.

Typical use:

    probe = NeuronProbe(model_path, layers=[0, 14, -1])
    with Engine(model_path, eval_callback=probe.eval_callback) as engine:
        engine.run(prompts, all_outputs=probe.needs_all_outputs, on_batch=probe.on_batch)
    probe.finish(); probe.save("neurons.npz")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import ProbeError, UnsupportedArchitecture

DEFINITIONS = ("act", "down_in")


# ------------------------------------------------------------------ architecture → graph names


@dataclass(frozen=True)
class FFNNames:
    """Which graph tensors hold one architecture's FFN neurons (names without the `-N` layer suffix)."""

    arch: str
    act_source: str  # the tensor `act` is read from
    act_fn: str | None  # applied to act_source here: "silu", "gelu_tanh", or None (already activated)
    down_in: str  # the input of ffn_down
    up: str | None  # the up projection (gated models): down_in = act · up


# Gated architectures whose build_ffn call is (up, gate, down, LLM_FFN_SILU|GELU, LLM_FFN_PAR); checked
# in llama.cpp's src/models/*.cpp and llama-graph.cpp build_ffn (vendored with llama-cpp-python 0.3.36).
_GATED = {"llama": "silu", "qwen2": "silu", "qwen3": "silu", "gemma": "gelu_tanh", "gemma2": "gelu_tanh",
          "gemma3": "gelu_tanh"}
_UNGATED_GELU = {"phi2"}
SUPPORTED_ARCHITECTURES = tuple(sorted(set(_GATED) | _UNGATED_GELU))


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
        raise UnsupportedArchitecture(
            f"{arch}: mixture-of-experts FFNs are not supported by the neuron capture "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if arch in _GATED:
        # build_ffn names the gate after its bias add `ffn_gate_b` and the up projection `ffn_up_b`.
        gate = "ffn_gate_b" if "blk.0.ffn_gate.bias" in names else "ffn_gate"
        up = "ffn_up_b" if "blk.0.ffn_up.bias" in names else "ffn_up"
        product = "ffn_swiglu" if _GATED[arch] == "silu" else "ffn_geglu"
        return FFNNames(arch, gate, _GATED[arch], product, up)
    if arch in _UNGATED_GELU:
        return FFNNames(arch, "ffn_gelu", None, "ffn_gelu", None)
    raise UnsupportedArchitecture(
        f"{arch}: the neuron capture does not know this architecture's FFN tensor names "
        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


@lru_cache(maxsize=16)
def _model_ffn_cached(path: str, mtime: float) -> ModelFFN:
    # The validator's bounds-checked header parse: fast, and a corrupt file is refused in one line.
    from ..errors import BadModelFile
    from ..models.validate import validate_gguf

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


def resolve_layers(layers: str | Sequence[int] | int, n_layer: int) -> list[int]:
    """'all', an int, a list of ints or a text like '0,14,-1' → sorted distinct layer indices."""
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return list(range(n_layer))
        try:
            layers = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise ProbeError(f"layers must be 'all' or a list of integers like 0,14,-1, not {layers!r}") from None
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for layer in layers:
        idx = int(layer) + n_layer if int(layer) < 0 else int(layer)
        if not 0 <= idx < n_layer:
            raise ProbeError(f"layer {layer} is out of range: the model has {n_layer} layers (0..{n_layer - 1})")
        out.add(idx)
    if not out:
        raise ProbeError("no layers chosen")
    return sorted(out)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU in float64, stable for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    return x * _sigmoid(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # ≤ 1: no overflow on either side
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU that ggml uses (and Gemma's gelu_pytorch_tanh), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


ACT_FUNCTIONS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    "silu": silu, "gelu_tanh": gelu_tanh, None: lambda x: np.asarray(x, dtype=np.float64),
}


# ------------------------------------------------------------------ batch layout


@dataclass
class BatchLayout:
    """Which prompt and position each row of the current batch's tensors belongs to."""

    prompt_indices: list[int]  # global prompt indices (the run's indices + the probe's prompt_offset)
    lengths: list[int]
    row_prompt: np.ndarray  # int64 (n_rows,)
    row_pos: np.ndarray  # int64 (n_rows,)

    @property
    def n_rows(self) -> int:
        return len(self.row_prompt)

    @property
    def last_rows(self) -> np.ndarray:
        """Row of each prompt's last token, in batch order."""
        return np.cumsum(self.lengths) - 1

    @classmethod
    def build(cls, indices: Sequence[int], token_arrays: Sequence[np.ndarray], offset: int = 0) -> "BatchLayout":
        lengths = [len(t) for t in token_arrays]
        prompts = [offset + int(i) for i in indices]
        row_prompt = np.repeat(np.asarray(prompts, dtype=np.int64), lengths)
        row_pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]) if lengths else np.zeros(0, np.int64)
        return cls(prompts, lengths, row_prompt, row_pos)


# ------------------------------------------------------------------ reading tensors in the callback


class _TensorReader:
    """Copies a graph tensor into a reusable float32 NumPy buffer (any backend: CPU, CUDA, Metal)."""

    def __init__(self) -> None:
        from .ggml_lib import libggml

        self.lib = libggml()
        self._buffers: dict[str, np.ndarray] = {}

    def name(self, t: int) -> str:
        return (self.lib.ggml_get_name(t) or b"").decode(errors="replace")

    def read(self, t: int, key: str) -> np.ndarray:
        """The tensor as (rows, ne0) float32; the array is reused on the next read of `key`."""
        from .ggml_lib import GGML_TYPE_F32, tensor_shape, tensor_type

        name = self.name(t)
        if tensor_type(t) != GGML_TYPE_F32:
            raise ProbeError(f"graph tensor {name} is not F32 (ggml type {tensor_type(t)}); cannot read it")
        if not self.lib.ggml_is_contiguous(t):
            raise ProbeError(f"graph tensor {name} is not contiguous; cannot read it")
        ne0, ne1, ne2, ne3 = tensor_shape(t)
        rows = ne1 * ne2 * ne3
        size = ne0 * rows
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 1), dtype=np.float32)
            self._buffers[key] = buf
        nbytes = self.lib.ggml_nbytes(t)
        if nbytes != size * 4:
            raise ProbeError(f"graph tensor {name}: {nbytes} bytes for {size} float32 values")
        self.lib.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
        return buf[:size].reshape(rows, ne0)

    def write(self, t: int, values: np.ndarray) -> None:
        arr = np.ascontiguousarray(values, dtype=np.float32)
        if arr.nbytes != self.lib.ggml_nbytes(t):
            raise ProbeError(f"patch for {self.name(t)}: {arr.nbytes} bytes for a {self.lib.ggml_nbytes(t)}-byte tensor")
        self.lib.ggml_backend_tensor_set(t, arr.ctypes.data, 0, arr.nbytes)


# Called as consumer(layer, definition, values (n_rows, n_ff) float64, layout). `values` may be a
# reused buffer: copy what you keep.
Consumer = Callable[[int, str, np.ndarray, BatchLayout], None]


class _KeepsCallbackError:
    """An exception cannot cross llama.cpp's C callback: a probe keeps it in `error`, returns False
    (which aborts the decode), and check() re-raises it afterwards, since llama_decode only says 'aborted'."""

    error: BaseException | None = None

    def check(self) -> None:
        if self.error is not None:
            exc, self.error = self.error, None
            raise exc


class FFNCapture(_KeepsCallbackError):
    """Eval-callback probe that hands each chosen layer's FFN neurons to a consumer, batch by batch.

    Pass `eval_callback` to Engine(eval_callback=...), and `on_batch` to Engine.run(on_batch=...) with
    `all_outputs=True` (`needs_all_outputs`): the last layer's FFN then covers every token. Set
    `prompt_offset` before each Engine.run when prompts are fed in several calls, so prompt indices
    stay global. `extra` names further graph tensors (e.g. "ffn_norm-3") handed to `on_extra(name, array)`.
    """

    needs_all_outputs = True

    def __init__(
        self,
        model_path: str | os.PathLike,
        consumer: Consumer,
        layers: str | Sequence[int] = (0, 14, -1),
        definitions: Sequence[str] = DEFINITIONS,
        extra: Sequence[str] = (),
        on_extra: Callable[[str, np.ndarray, BatchLayout], None] | None = None,
    ) -> None:
        self.model = model_ffn(model_path)
        self.layers = resolve_layers(layers, self.model.n_layer)
        bad = [d for d in definitions if d not in DEFINITIONS]
        if bad or not definitions:
            raise ProbeError(f"neuron definition must be one of {', '.join(DEFINITIONS)}, not {bad or definitions}")
        self.definitions = tuple(dict.fromkeys(definitions))
        self.consumer = consumer
        self.on_extra = on_extra
        self.prompt_offset = 0
        self.layout: BatchLayout | None = None
        self._reader: _TensorReader | None = None
        self.error: BaseException | None = None
        names = self.model.names
        # graph name → list of (layer, definition) it feeds
        self.wanted: dict[str, list[tuple[int, str]]] = {}
        for layer in self.layers:
            for d in self.definitions:
                src = names.act_source if d == "act" else names.down_in
                self.wanted.setdefault(f"{src}-{layer}", []).append((layer, d))
        self.extra = set(extra)

    @property
    def tensor_names(self) -> list[str]:
        """Every graph tensor this probe asks for."""
        return sorted(set(self.wanted) | self.extra)

    def on_batch(self, indices: list[int], token_arrays: list[np.ndarray]) -> None:
        self.layout = BatchLayout.build(indices, token_arrays, self.prompt_offset)

    def eval_callback(self, t: int, ask: bool) -> bool:
        if self._reader is None:
            self._reader = _TensorReader()
        name = self._reader.name(t)
        if ask:
            return name in self.wanted or name in self.extra
        try:
            self._handle(t, name)
            return True
        except BaseException as exc:  # an exception cannot cross the C callback: keep it, abort the decode
            self.error = exc
            return False

    def _handle(self, t: int, name: str) -> None:
        layout = self.layout
        if layout is None:
            raise ProbeError("FFNCapture.on_batch was not called: pass on_batch=probe.on_batch to Engine.run")
        raw = self._reader.read(t, name)  # type: ignore[union-attr]
        if raw.shape[0] != layout.n_rows:
            raise ProbeError(
                f"{name} holds {raw.shape[0]} rows for a batch of {layout.n_rows} tokens: "
                "run the engine with all_outputs=True so the last layer covers every token"
            )
        if name in self.extra and self.on_extra is not None:
            self.on_extra(name, raw, layout)
        targets = self.wanted.get(name)
        if not targets:
            return
        converted: dict[str, np.ndarray] = {}
        for layer, definition in targets:
            if definition == "act":
                values = ACT_FUNCTIONS[self.model.names.act_fn](raw)
            else:
                values = converted.get("down_in")
                if values is None:
                    values = raw.astype(np.float64)
            converted[definition] = values
            self.consumer(layer, definition, values, layout)


# ------------------------------------------------------------------ statistics probe


class NeuronProbe:
    """FFNCapture feeding streaming statistics (ggml_probe.analysis.neurons.NeuronAccumulator).

    state() / save(path) give the accumulated state; NeuronProbe.load(path, model_path) or
    probe.restore(path) continues a run exactly where the saved state left off.
    """

    needs_all_outputs = True

    def __init__(
        self,
        model_path: str | os.PathLike,
        layers: str | Sequence[int] = (0, 14, -1),
        definitions: Sequence[str] = DEFINITIONS,
        *,
        redundancy: bool = True,
        top_k: int = 10,
        memory_budget_bytes: int = 2 << 30,
        allow_large: bool = False,
    ) -> None:
        from ..analysis.neurons import NeuronAccumulator

        model = model_ffn(model_path)
        chosen = resolve_layers(layers, model.n_layer)
        self.accumulator = NeuronAccumulator(
            chosen, list(definitions), model.n_ff, redundancy=redundancy, top_k=top_k,
            memory_budget_bytes=memory_budget_bytes, allow_large=allow_large,
        )
        self.capture = FFNCapture(model_path, self.accumulator.update, chosen, definitions)
        self.model = model

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
        return self.accumulator.state()

    def save(self, path: str | os.PathLike) -> Path:
        return self.accumulator.save(path)

    def restore(self, path: str | os.PathLike) -> None:
        from ..analysis.neurons import NeuronAccumulator

        loaded = NeuronAccumulator.load(path)
        if (loaded.layers, loaded.definitions, loaded.n_ff) != (self.accumulator.layers, self.accumulator.definitions,
                                                                 self.accumulator.n_ff):
            raise ProbeError(f"{path}: saved neuron state is for other layers/definitions/width")
        self.accumulator = loaded
        self.capture.consumer = loaded.update


# ------------------------------------------------------------------ patching (ablation)


class NeuronPatch(_KeepsCallbackError):
    """Eval-callback probe that overwrites chosen neurons of one layer before ffn_down reads them.

    Writes into the down_in tensor (ffn_swiglu-N): `definition="down_in"` sets the value itself;
    `definition="act"` sets the activation, i.e. down_in = value · up (so it also reads ffn_up-N).
    Zero is the same under both. `values` is a scalar or one value per neuron. `positions="all"` patches
    every token, "last" only each prompt's last token. Set `enabled=False` to run unpatched through
    the same context.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        layer: int,
        neurons: Sequence[int],
        values: float | Sequence[float] = 0.0,
        definition: str = "down_in",
        positions: str = "all",
    ) -> None:
        self.model = model_ffn(model_path)
        (self.layer,) = resolve_layers([layer], self.model.n_layer)
        self.neurons = np.asarray(list(neurons), dtype=np.int64)
        if self.neurons.size and (self.neurons.min() < 0 or self.neurons.max() >= self.model.n_ff):
            raise ProbeError(f"neuron ids must be in 0..{self.model.n_ff - 1}")
        self.values = np.broadcast_to(np.asarray(values, dtype=np.float64), self.neurons.shape).copy()
        if definition not in DEFINITIONS:
            raise ProbeError(f"definition must be one of {', '.join(DEFINITIONS)}")
        if positions not in ("all", "last"):
            raise ProbeError("positions must be 'all' or 'last'")
        names = self.model.names
        self.needs_up = definition == "act" and bool(np.any(self.values != 0)) and names.up is not None
        if definition == "act" and names.up is None and names.act_fn is not None:
            raise ProbeError(f"{names.arch}: cannot patch act without the up projection")
        self.target = f"{names.down_in}-{self.layer}"
        self.up_name = f"{names.up}-{self.layer}" if self.needs_up else None
        self.positions = positions
        self.enabled = True
        self.layout: BatchLayout | None = None
        self.patched = 0  # tensors written so far
        self.error: BaseException | None = None
        self._reader: _TensorReader | None = None
        self._up: np.ndarray | None = None

    needs_all_outputs = False  # the patch is found by name; the last layer holds the output rows only

    def on_batch(self, indices: list[int], token_arrays: list[np.ndarray]) -> None:
        self.layout = BatchLayout.build(indices, token_arrays)

    def eval_callback(self, t: int, ask: bool) -> bool:
        if self._reader is None:
            self._reader = _TensorReader()
        name = self._reader.name(t)
        if ask:
            return name == self.target or name == self.up_name
        try:
            if not self.enabled:
                return True
            if name == self.up_name:
                self._up = self._reader.read(t, "up").copy()
                return True
            if name == self.target:
                self._patch(t)
            return True
        except BaseException as exc:
            self.error = exc
            return False

    def _patch(self, t: int) -> None:
        data = self._reader.read(t, "target")  # type: ignore[union-attr]
        n_rows = data.shape[0]
        if self.positions == "all":
            rows = np.arange(n_rows)
        else:
            if self.layout is None:
                raise ProbeError("NeuronPatch(positions='last') needs on_batch=probe.on_batch in Engine.run")
            # the last layer may hold only the output rows (one per prompt when all_outputs is off)
            rows = self.layout.last_rows if n_rows == self.layout.n_rows else np.arange(n_rows)
        cols = self.neurons
        if self.needs_up:
            up = self._up
            if up is None or up.shape != data.shape:
                raise ProbeError(f"{self.up_name} was not read before {self.target}")
            data[np.ix_(rows, cols)] = (self.values[None, :] * up[np.ix_(rows, cols)]).astype(np.float32)
        else:
            data[np.ix_(rows, cols)] = self.values[None, :].astype(np.float32)
        self._reader.write(t, data)  # type: ignore[union-attr]
        self.patched += 1



def run_checked(engine, probe, tokens: Sequence[np.ndarray], all_outputs: bool | None = None):
    """engine.run with the probe's on_batch; an error raised inside the callback is re-raised as itself."""
    if all_outputs is None:
        all_outputs = bool(getattr(probe, "needs_all_outputs", False))
    try:
        results = engine.run(tokens, all_outputs=all_outputs, on_batch=probe.on_batch)
    except ProbeError:
        probe.check()  # the callback's own error explains the failed decode better
        raise
    probe.check()
    return results


class ProbeSet:
    """Several eval-callback probes on one context and one decode: each is asked about every tensor
    and handed exactly the ones it asked for, in the order given (e.g. neuron statistics + imatrix).

    Quacks like one probe for Engine(eval_callback=...) and run_checked: on_batch, check and
    prompt_offset reach every probe that has them; needs_all_outputs if any probe needs it.
    """

    def __init__(self, probes: Sequence) -> None:
        self.probes = [p for p in probes if p is not None]
        self._wants: dict[int, list] = {}  # tensor pointer → probes that asked for it in this graph

    @property
    def needs_all_outputs(self) -> bool:
        return any(getattr(p, "needs_all_outputs", False) for p in self.probes)

    @property
    def prompt_offset(self) -> int:
        return next((p.prompt_offset for p in self.probes if hasattr(p, "prompt_offset")), 0)

    @prompt_offset.setter
    def prompt_offset(self, value: int) -> None:
        for p in self.probes:
            if hasattr(p, "prompt_offset"):
                p.prompt_offset = value

    def on_batch(self, indices: list[int], token_arrays: list[np.ndarray]) -> None:
        for p in self.probes:
            if getattr(p, "on_batch", None) is not None:
                p.on_batch(indices, token_arrays)

    def eval_callback(self, t: int, ask: bool) -> bool:
        if ask:
            wanting = [p for p in self.probes if p.eval_callback(t, True)]
            self._wants[t] = wanting
            return bool(wanting)
        # False from one probe aborts the decode; its error is re-raised by check()
        return all(p.eval_callback(t, False) for p in self._wants.get(t, ()))

    def check(self) -> None:
        for p in self.probes:
            p.check()


def _answer_logprob(logits: np.ndarray, token: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(z[token] - m - np.log(np.exp(z - m).sum()))


@dataclass
class AblationResult:
    target_tokens: np.ndarray  # int64 (n_prompts,): the token whose log-prob is measured
    logprob_clean: np.ndarray  # float64 (n_prompts,)
    logprob_patched: np.ndarray  # float64 (n_prompts,)
    patched_tensors: int  # how many tensors the patch wrote (a check that it fired)

    @property
    def delta(self) -> np.ndarray:
        """patched − clean log-probability of the target token (negative: the neurons helped it)."""
        return self.logprob_patched - self.logprob_clean


def ablation_effect(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layer: int,
    neurons: Sequence[int],
    *,
    values: float | Sequence[float] = 0.0,
    definition: str = "down_in",
    targets: Sequence[int] | None = None,
    positions: str = "all",
    n_ctx: int = 2048,
    n_threads: int | None = None,
    gpu_layers: str | int = "auto",
    kv_type: int | None = None,
) -> AblationResult:
    """Change in the answer token's log-probability when `neurons` of `layer` are set to `values`.

    prompts are texts (tokenized by the model) or token arrays. The target per prompt is `targets`,
    or by default the model's own unpatched answer (argmax of the last-position logits). One context
    serves both passes: the patch is switched off for the clean pass.
    """
    from .model import Engine

    patch = NeuronPatch(model_path, layer, neurons, values, definition, positions)
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=patch.eval_callback, kv_type=kv_type) as engine:
        tokens = [engine.tokenize(p) if isinstance(p, str) else np.asarray(p, dtype=np.int32) for p in prompts]
        patch.enabled = False
        clean = run_checked(engine, patch, tokens)
        patch.enabled = True
        patched = run_checked(engine, patch, tokens)
    if targets is None:
        target_tokens = np.array([int(np.argmax(r.logits)) for r in clean], dtype=np.int64)
    else:
        target_tokens = np.asarray(list(targets), dtype=np.int64)
        if len(target_tokens) != len(tokens):
            raise ProbeError(f"{len(target_tokens)} targets for {len(tokens)} prompts")
    lp_clean = np.array([_answer_logprob(r.logits, tok) for r, tok in zip(clean, target_tokens)])
    lp_patched = np.array([_answer_logprob(r.logits, tok) for r, tok in zip(patched, target_tokens)])
    return AblationResult(target_tokens, lp_clean, lp_patched, patch.patched)


# ------------------------------------------------------------------ last-layer integrated gradients

# Architectures whose last layer is `l_out = ffn_inp + W_down(act ⊙ up)` followed by one RMSNorm and the
# output matrix, with no logit scaling or soft-capping: the closed form of analysis/salient.py holds.
EXACT_IG_ARCHITECTURES = ("llama", "qwen2", "qwen3")


class _LastPositionTap(_KeepsCallbackError):
    """Eval-callback probe keeping the last position's row of chosen graph tensors, per prompt."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.rows: dict[tuple[str, int], np.ndarray] = {}
        self.layout: BatchLayout | None = None
        self.error: BaseException | None = None
        self._reader: _TensorReader | None = None

    def on_batch(self, indices, token_arrays) -> None:
        self.layout = BatchLayout.build(indices, token_arrays)

    def eval_callback(self, t: int, ask: bool) -> bool:
        if self._reader is None:
            self._reader = _TensorReader()
        name = self._reader.name(t)
        if ask:
            return name in self.names
        try:
            data = self._reader.read(t, name)
            layout = self.layout
            if layout is None:
                raise ProbeError("_LastPositionTap.on_batch was not called")
            if data.shape[0] == layout.n_rows:
                data = data[layout.last_rows]
            elif data.shape[0] != len(layout.lengths):  # the last layer holds one output row per prompt
                raise ProbeError(f"{name}: {data.shape[0]} rows for {len(layout.lengths)} prompts")
            for p, row in zip(layout.prompt_indices, data):
                self.rows[(name, p)] = row.astype(np.float64)
            return True
        except BaseException as exc:
            self.error = exc
            return False



def _prompt_and_baseline_passes(engine, current: list, tap_input, tap_base, prompts, targets):
    """The prompts through `tap_input`, then their all-token-0 baselines (the paper's) through
    `tap_base`, on one context whose callback calls current[0]. Returns (token arrays, the prompts'
    results, the target token per prompt: `targets` or the model's own answer)."""
    tokens = [engine.tokenize(p) if isinstance(p, str) else np.asarray(p, dtype=np.int32) for p in prompts]
    current[0] = tap_input
    clean = run_checked(engine, tap_input, tokens)
    current[0] = tap_base
    run_checked(engine, tap_base, [np.zeros_like(t) for t in tokens])
    if targets is None:
        target_tokens = np.array([int(np.argmax(r.logits)) for r in clean], dtype=np.int64)
    else:
        target_tokens = np.asarray(list(targets), dtype=np.int64)
    return tokens, clean, target_tokens


def read_last_layer_head(model_path: str | os.PathLike, layer: int):
    """The GGUF's own (dequantized) ffn_down of `layer`, final norm and output matrix, as LastLayerHead."""
    from ..analysis.salient import LastLayerHead
    from ..weights.dequant import GGUFTensors

    info = model_ffn(model_path)
    with GGUFTensors(model_path) as tensors:
        names = set(tensors.names())

        def weight(name: str) -> np.ndarray:
            return np.asarray(tensors.dequantize(name), dtype=np.float64)

        out_name = "output.weight" if "output.weight" in names else "token_embd.weight"  # tied embeddings
        eps = tensors.summary.value(f"{info.arch}.attention.layer_norm_rms_epsilon")
        if eps is None:
            raise ProbeError(f"{model_path}: no RMSNorm epsilon in the metadata")
        return LastLayerHead(weight(f"blk.{layer}.ffn_down.weight"), weight("output_norm.weight"), float(eps),
                             weight(out_name))


@dataclass
class LastLayerAttribution:
    layer: int
    target_tokens: np.ndarray  # (n_prompts,)
    attributions: np.ndarray  # (n_prompts, n_ff)
    completeness_error: np.ndarray  # Σ attr − (f(a) − f(b)) in the closed form
    real_change: np.ndarray | None  # llama.cpp: log p(target) − log p(target | last-layer act := baseline's)
    closed_form_logprob: np.ndarray  # f(a) from the GGUF weights
    llama_logprob: np.ndarray  # log p(target) from llama.cpp's logits
    n_points: int

    def salient(self, threshold: float = 0.7):
        from ..analysis.salient import summarise_salient

        return summarise_salient(self.attributions, threshold)


def last_layer_attribution(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    *,
    targets: Sequence[int] | None = None,
    n_points: int = 50,
    check_real_change: bool = True,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    gpu_layers: str | int = "auto",
    kv_type: int | None = None,
) -> LastLayerAttribution:
    """The paper's integrated gradients for the last layer's act neurons, exact, from llama.cpp passes.

    Baseline: every token replaced by id 0 (the paper's). Target per prompt: `targets`, or the model's
    own answer (argmax at the last position). With check_real_change, a third pass per prompt swaps the
    last position's act for the baseline's inside llama.cpp (down_in := b ⊙ up) and records the real
    change of the target log-probability, the completeness check against llama.cpp itself.
    """
    from ..analysis.salient import integrated_gradients
    from .model import Engine

    info = model_ffn(model_path)
    if info.arch not in EXACT_IG_ARCHITECTURES or info.names.act_fn != "silu":
        raise UnsupportedArchitecture(
            f"{info.arch}: the exact last-layer attribution supports {', '.join(EXACT_IG_ARCHITECTURES)}"
        )
    layer = info.n_layer - 1
    names = info.names
    gate, up, resid = f"{names.act_source}-{layer}", f"{names.up}-{layer}", f"ffn_inp-{layer}"
    tap_input, tap_base = _LastPositionTap([gate, up, resid]), _LastPositionTap([gate])
    current: list = [tap_input]

    def dispatch(t: int, ask: bool) -> bool:  # one context, several probes in turn
        return current[0].eval_callback(t, ask)

    head = read_last_layer_head(model_path, layer)
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=dispatch, kv_type=kv_type) as engine:
        tokens, clean, target_tokens = _prompt_and_baseline_passes(engine, current, tap_input, tap_base, prompts,
                                                                   targets)
        llama_lp = np.array([_answer_logprob(r.logits, t) for r, t in zip(clean, target_tokens)])

        attributions, completeness, closed = [], [], []
        for p in range(len(tokens)):
            a = silu(tap_input.rows[(gate, p)])
            b = silu(tap_base.rows[(gate, p)])
            res = integrated_gradients(head, a, b, tap_input.rows[(up, p)], tap_input.rows[(resid, p)],
                                       int(target_tokens[p]), n_points)
            attributions.append(res.attributions)
            completeness.append(res.completeness_error)
            closed.append(res.logprob_input)

        real = None
        if check_real_change:
            patch = NeuronPatch(model_path, layer, range(info.n_ff), 1.0, definition="act", positions="last")
            current[0] = patch
            swapped = []
            for p, toks in enumerate(tokens):
                patch.values = silu(tap_base.rows[(gate, p)])
                (r,) = run_checked(engine, patch, [toks])
                swapped.append(_answer_logprob(r.logits, int(target_tokens[p])))
            real = llama_lp - np.array(swapped)
    return LastLayerAttribution(layer, target_tokens, np.array(attributions), np.array(completeness), real,
                                np.array(closed), llama_lp, n_points)


def direct_effect_attribution(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layers: Sequence[int],
    *,
    targets: Sequence[int] | None = None,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    gpu_layers: str | int = "auto",
):
    """Direct-effect attribution (`--attribution dla`): (act − baseline act) × its direct path to log p(target).

    A llama.cpp pass per prompt reads each layer's act and up and the final residual at the last
    position, a second one the all-token-0 baseline's act (the paper's baseline, so that the figures
    are on IG's scale: at the last layer this is IG's first-order approximation); the path from a layer's act through ffn_down straight to the final norm and the output
    matrix (skipping every later layer) is linearised there. It needs no torch and no gradients, and
    it is NOT the paper's integrated gradients: before the last layer it ignores everything a neuron
    does through later layers (measured on the demo model: Spearman about 0.4 to 0.6 against IG).
    """
    from ..analysis.salient import direct_effect
    from ..attribution.ig import Attribution, LayerAttribution
    from .model import Engine

    info = model_ffn(model_path)
    if info.arch not in EXACT_IG_ARCHITECTURES or info.names.act_fn != "silu":
        raise UnsupportedArchitecture(
            f"{info.arch}: the direct-effect attribution supports {', '.join(EXACT_IG_ARCHITECTURES)}")
    layers = resolve_layers(list(layers), info.n_layer)
    names = info.names
    final = f"l_out-{info.n_layer - 1}"
    wanted = [final] + [f"{n}-{L}" for L in layers for n in (names.act_source, names.up)]
    tap, tap_base = _LastPositionTap(wanted), _LastPositionTap([f"{names.act_source}-{L}" for L in layers])
    current: list = [tap]
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=lambda t, ask: current[0].eval_callback(t, ask)) as engine:
        tokens, results, target_tokens = _prompt_and_baseline_passes(engine, current, tap, tap_base, prompts, targets)
    out = Attribution("dla", target_tokens, np.array([_answer_logprob(r.logits, int(t))
                                                      for r, t in zip(results, target_tokens)]), n_points=0)
    head = read_last_layer_head(model_path, info.n_layer - 1)
    from ..weights.dequant import GGUFTensors

    with GGUFTensors(model_path) as tensors:
        for L in layers:
            head.w_down = np.asarray(tensors.dequantize(f"blk.{L}.ffn_down.weight"), dtype=np.float64)
            gate = f"{names.act_source}-{L}"
            attr = np.stack([direct_effect(head, silu(tap.rows[(gate, p)]), silu(tap_base.rows[(gate, p)]),
                                           tap.rows[(f"{names.up}-{L}", p)], tap.rows[(final, p)],
                                           int(target_tokens[p])) for p in range(len(tokens))])
            out.layers[L] = LayerAttribution(L, attr, None, None)
    return out


# ------------------------------------------------------------------ one-call neuron run


def collect_neuron_stats(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layers: str | Sequence[int] = (0, 14, -1),
    definitions: Sequence[str] = DEFINITIONS,
    *,
    redundancy: bool = True,
    top_k: int = 10,
    allow_large: bool = False,
    memory_budget_bytes: int = 2 << 30,
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
    from .model import Engine

    probe = NeuronProbe(model_path, layers, definitions, redundancy=redundancy, top_k=top_k,
                        memory_budget_bytes=memory_budget_bytes, allow_large=allow_large)
    with Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, hidden_states=False,
                eval_callback=probe.eval_callback) as engine:
        tokens = [engine.tokenize(p) if isinstance(p, str) else np.asarray(p, dtype=np.int32) for p in prompts]
        for start in range(0, len(tokens), chunk_size):
            probe.prompt_offset = start
            run_checked(engine, probe, tokens[start:start + chunk_size])
            if progress is not None:
                progress(min(start + chunk_size, len(tokens)), len(tokens))
    return probe.finish(), tokens
