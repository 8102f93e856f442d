"""Eval-callback probes: reading and patching llama.cpp graph tensors while a batch decodes.

A probe is asked about every tensor the scheduler builds (`ask=True`: do you want it?) and handed the
ones it wanted (`ask=False`: read or overwrite it). Tensors arrive as ggml [ne0, rows] (ne[0]
innermost), i.e. NumPy (rows, ne0) row-major. Each tensor asked for splits the graph and synchronises
the backend: a probe asks only for what it needs.

Typical use:

    capture = FFNCapture(model_path, consumer, layers=[0, 14, -1])
    with Engine(model_path, eval_callback=capture.eval_callback) as engine:
        run_checked(engine, capture, token_arrays)
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.special import logsumexp

from ..errors import ProbeError
from ..layerspec import resolve_layers
from .ffn import ACT_FUNCTIONS, DEFINITIONS, check_definitions, model_ffn
from .ggml_lib import GGML_TYPE_F32, GGML_TYPE_I32, libggml, tensor_shape, tensor_type
from .model import STOP_AFTER_KV, STOP_ANYWHERE


@dataclass
class BatchLayout:
    """Which prompt and position each row of the current batch's tensors belongs to.

    After a shared prefix (Engine.run's share_prefix) a group takes two decodes: the prefix's, whose
    rows stand for every prompt in `shared_by`, then the rests', whose rows start at position `prefix`.
    unshare() turns the two into the rows the group would have given decoded whole.
    """

    prompt_indices: list[int]  # global prompt indices (the run's indices + the probe's prompt_offset)
    lengths: list[int]
    row_prompt: np.ndarray  # int64 (n_rows,)
    row_pos: np.ndarray  # int64 (n_rows,)
    shared_by: list[int] | None = None  # a shared prefix's decode: the prompts its rows stand for
    prefix: int = 0  # the rests after a shared prefix of this many tokens

    @property
    def n_rows(self) -> int:
        return len(self.row_prompt)

    @property
    def last_rows(self) -> np.ndarray:
        """Row of each prompt's last token, in batch order."""
        return np.cumsum(self.lengths) - 1

    @classmethod
    def build(cls, indices: Sequence[int], token_arrays: Sequence[np.ndarray], offset: int = 0,
              start: int = 0, starts: Sequence[int] | None = None) -> "BatchLayout":
        """Rows of arrays decoded each from `start` (after a shared prefix of that many tokens when > 0), or
        each from its own position in `starts` (a prompt's last token decoded apart: no prefix to join)."""
        lengths = [len(t) for t in token_arrays]
        prompts = [offset + int(i) for i in indices]
        row_prompt = np.repeat(np.asarray(prompts, dtype=np.int64), lengths)
        firsts = [start] * len(lengths) if starts is None else [int(s) for s in starts]
        row_pos = (np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(firsts, lengths)]) if lengths
                   else np.zeros(0, np.int64))
        return cls(prompts, lengths, row_prompt, row_pos, prefix=start if starts is None else 0)

    @classmethod
    def shared(cls, indices: Sequence[int], prefix: np.ndarray, offset: int = 0) -> "BatchLayout":
        """A shared prefix's decode: its rows are attributed to the group's first prompt until unshared."""
        out = cls.build(list(indices)[:1], [prefix], offset)
        out.shared_by = [offset + int(i) for i in indices]
        return out

    def unshare(self, prefix_rows: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, "BatchLayout"]:
        """The rests' rows after `prefix_rows` (the shared prefix's decode): every prompt's prefix rows
        then its own, in prompt order, and their layout, as one decode of the whole prompts gives them."""
        n_prefix = len(prefix_rows)
        starts = n_prefix + np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        gather = np.concatenate([np.concatenate([np.arange(n_prefix), s + np.arange(n)])
                                 for s, n in zip(starts, self.lengths)])
        whole = [n_prefix + n for n in self.lengths]
        layout = BatchLayout.build(self.prompt_indices, [np.empty(n) for n in whole])
        return np.concatenate([prefix_rows, rows])[gather], layout


class TensorReader:
    """Copies a graph tensor into a reusable float32 NumPy buffer (any backend: CPU, CUDA, Metal)."""

    def __init__(self) -> None:
        self.lib = libggml()
        self._buffers: dict[str, np.ndarray] = {}

    def name(self, t: int) -> str:
        return (self.lib.ggml_get_name(t) or b"").decode(errors="replace")

    def read(self, t: int, key: str) -> np.ndarray:
        """The tensor as (rows, ne0) float32; the array is reused on the next read of `key`."""
        ne0, rows = self._checked_shape(t, GGML_TYPE_F32, "F32")
        size = ne0 * rows
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 1), dtype=np.float32)
            self._buffers[key] = buf
        return self._copy(t, buf[:size].reshape(rows, ne0))

    def read_new(self, t: int) -> np.ndarray:
        """The tensor as a new (rows, ne0) float32 array, to keep."""
        ne0, rows = self._checked_shape(t, GGML_TYPE_F32, "F32")
        return self._copy(t, np.empty((rows, ne0), dtype=np.float32))

    def read_i32(self, t: int) -> np.ndarray:
        """An I32 tensor (expert ids, argsort orders) as a new (rows, ne0) int32 array."""
        ne0, rows = self._checked_shape(t, GGML_TYPE_I32, "I32")
        return self._copy(t, np.empty((rows, ne0), dtype=np.int32))

    def _checked_shape(self, t: int, ggml_type: int, type_name: str) -> tuple[int, int]:
        if tensor_type(t) != ggml_type:
            raise ProbeError(f"graph tensor {self.name(t)} is not {type_name} (ggml type {tensor_type(t)}); "
                             "cannot read it")
        if not self.lib.ggml_is_contiguous(t):
            raise ProbeError(f"graph tensor {self.name(t)} is not contiguous; cannot read it")
        ne0, ne1, ne2, ne3 = tensor_shape(t)
        return ne0, ne1 * ne2 * ne3

    def _copy(self, t: int, out: np.ndarray) -> np.ndarray:
        nbytes = self.lib.ggml_nbytes(t)
        if nbytes != out.nbytes:
            raise ProbeError(f"graph tensor {self.name(t)}: {nbytes} bytes for {out.size} {out.dtype} values")
        self.lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, nbytes)
        return out

    def write(self, t: int, values: np.ndarray) -> None:
        arr = np.ascontiguousarray(values, dtype=np.float32)
        if arr.nbytes != self.lib.ggml_nbytes(t):
            raise ProbeError(f"patch for {self.name(t)}: {arr.nbytes} bytes for a {self.lib.ggml_nbytes(t)}-byte tensor")
        self.lib.ggml_backend_tensor_set(t, arr.ctypes.data, 0, arr.nbytes)


class Probe:
    """Base of every eval-callback probe: the callback preamble, the batch layout and error keeping.

    Subclasses say which graph tensors they want (`wants(name)`) and what to do with one (`handle(t,
    name)`). An exception cannot cross llama.cpp's C callback: it is kept in `error`, the callback
    returns False (which ends the graph's computation), and check() re-raises it afterwards, since
    llama_decode does not say. Set `prompt_offset` before each Engine.run when prompts are fed in several
    calls, so the layout's prompt indices stay global.

    Ending a graph early: when the engine says a decode's outputs will not be read (on_batch's may_stop),
    a probe that names its tensors (`stop_names`) returns False once it has handled the last of them,
    and llama.cpp skips the rest of the graph (ggml_backend_sched ends the split when the callback says
    False), the output matrix included. STOP_AFTER_KV decodes are ended only by a probe whose tensors
    reach past the last layer's attention (`reaches_last_layer`), since a later decode reads their KV.
    """

    needs_all_outputs = False  # True: the last layer must hold every token's row (batch.logits[i] = 1)
    shares_prefix = False  # True: handles Engine.run's share_prefix decodes (BatchLayout.shared_by / prefix)

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.layout: BatchLayout | None = None
        self.prompt_offset = 0
        self._reader: TensorReader | None = None
        self._stop: frozenset[str] = frozenset()  # this decode's graph ends after these tensors
        self._pending: set[str] = set()  # of them, those not handled yet in the current graph

    @property
    def reader(self) -> TensorReader:
        if self._reader is None:  # libggml is bound on first use, inside the first decode
            self._reader = TensorReader()
        return self._reader

    def wants(self, name: str) -> bool:
        raise NotImplementedError

    def handle(self, t: int, name: str) -> None:
        raise NotImplementedError

    def stop_names(self) -> Sequence[str]:
        """The tensors after which a graph may end (every one this probe reads), or nothing: never end it."""
        return ()

    @property
    def reaches_last_layer(self) -> bool:
        """Whether the last of stop_names comes after the last layer's attention (its KV written)."""
        return False

    @property
    def finished(self) -> bool:
        """True between handling the last tensor the current graph may end after and the next graph."""
        return bool(self._stop) and not self._pending

    def settle(self) -> None:
        """No graph ends early until an on_batch allows it again: after a run (run_checked calls it), and
        before any decode without on_batch (the Engine whose eval_callback this probe serves calls it)."""
        self._stop, self._pending = frozenset(), set()

    def on_batch(self, indices: list[int], token_arrays: list[np.ndarray], start: int = 0,
                 shared: bool = False, starts: Sequence[int] | None = None, may_stop: str | None = None) -> None:
        if shared:
            self.layout = BatchLayout.shared(indices, token_arrays[0], self.prompt_offset)
        else:
            self.layout = BatchLayout.build(indices, token_arrays, self.prompt_offset, start, starts)
        stops = may_stop == STOP_ANYWHERE or (may_stop == STOP_AFTER_KV and self.reaches_last_layer)
        self._stop = frozenset(self.stop_names()) if stops else frozenset()
        self._pending = set(self._stop)

    def require_layout(self) -> BatchLayout:
        if self.layout is None:
            raise ProbeError(f"{type(self).__name__}.on_batch was not called: pass on_batch=probe.on_batch "
                             "to Engine.run (run_checked does)")
        return self.layout

    def eval_callback(self, t: int, ask: bool) -> bool:
        name = self.reader.name(t)
        if ask:
            return self.wants(name)
        try:
            self.handle(t, name)
        except BaseException as exc:  # kept for check(): it cannot cross the C callback
            if self.error is None:  # the first error explains the rest
                self.error = exc
            return False
        if name in self._stop:
            if not self._pending:  # a decode llama.cpp cut in several ubatches: the next graph began
                self._pending = set(self._stop)
            self._pending.discard(name)
            return bool(self._pending)
        return True

    def check(self) -> None:
        if self.error is not None:
            exc, self.error = self.error, None
            raise exc


# A deferring capture holds back at most this many bytes of tensor copies before consuming them in the callback
_DEFERRED_BYTES = 64 << 20

# Called as consumer(layer, definition, values (n_rows, n_ff) float64, layout). `values` may be a
# reused buffer: copy what you keep.
Consumer = Callable[[int, str, np.ndarray, BatchLayout], None]


class DeferredCapture(Probe):
    """A capture whose callback only copies each tensor out (`_copy_out(t, name, layout)`, checked against
    the batch); `_consume(name, copied, layout)` runs between decodes (at the next on_batch, and when the
    run settles or is checked), in the order the tensors came.

    Work done inside the callback holds up the graph it interrupts: on the demo, moving the co-moment folds
    alone out of it made a 128-prompt pass 0.6–1.0 s faster in three pairs of runs, the folds taking as long
    as before. Copies held back stay under `_DEFERRED_BYTES`; past it they are consumed at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._deferred: deque[tuple[str, np.ndarray, BatchLayout]] = deque()  # tensors copied out, not yet consumed
        self._deferred_bytes = 0

    def _copy_out(self, t: int, name: str, layout: BatchLayout) -> np.ndarray:
        raise NotImplementedError

    def _consume(self, name: str, copied: np.ndarray, layout: BatchLayout) -> None:
        raise NotImplementedError

    def handle(self, t: int, name: str) -> None:
        layout = self.require_layout()
        copied = self._copy_out(t, name, layout)
        self._deferred.append((name, copied, layout))
        self._deferred_bytes += copied.nbytes
        if self._deferred_bytes > _DEFERRED_BYTES:
            self.drain()

    def on_batch(self, indices: list[int], token_arrays: list[np.ndarray], **where) -> None:
        self.drain()  # the last decode's tensors, before the next decode begins
        super().on_batch(indices, token_arrays, **where)

    def settle(self) -> None:
        super().settle()
        try:
            self.drain()
        except BaseException as exc:  # settle runs in run_checked's finally: check() raises it
            if self.error is None:
                self.error = exc

    def check(self) -> None:
        if self.error is None:  # a callback's error comes first (what was copied out after it is moot)
            self.drain()
        super().check()

    def drain(self) -> None:
        """Consume every tensor copied out so far, in the order they came."""
        while self._deferred:
            name, copied, layout = self._deferred.popleft()
            self._deferred_bytes -= copied.nbytes
            self._consume(name, copied, layout)


class FFNCapture(DeferredCapture):
    """Hands each chosen layer's FFN neurons (engine.ffn's definitions) to a consumer, batch by batch.

    Runs with all_outputs=True when it reads the last layer (`needs_all_outputs`): that layer's FFN then
    covers every token. `extra` names further graph tensors (e.g. "ffn_norm-3") handed to
    `on_extra(name, array, layout)`.

    After a shared prefix (Engine.run's share_prefix) the consumer gets every prompt's rows, the prefix's
    copied into each, as one decode of the whole prompts gives them; with `shared_rows` it gets the
    prefix's rows once instead, as they come, with a layout whose `shared_by` names the prompts they stand
    for, then the rests' rows (a consumer that can weigh rows is spared the copies).

    The consumer runs between decodes (DeferredCapture).
    """

    shares_prefix = True  # a shared prefix's rows go with every prompt's own (or once, with shared_rows)

    def __init__(
        self,
        model_path: str | os.PathLike,
        consumer: Consumer,
        layers: str | Sequence[int] = (0, 14, -1),
        definitions: Sequence[str] = DEFINITIONS,
        extra: Sequence[str] = (),
        on_extra: Callable[[str, np.ndarray, BatchLayout], None] | None = None,
        shared_rows: bool = False,
    ) -> None:
        super().__init__()
        if shared_rows and extra:
            raise ProbeError("FFNCapture: extra tensors are handed over per prompt; they cannot take shared_rows")
        self.shared_rows = shared_rows
        self.model = model_ffn(model_path)
        self.layers = resolve_layers(layers, self.model.n_layer)
        self.definitions = check_definitions(definitions)
        self.consumer = consumer
        self.on_extra = on_extra
        names = self.model.names
        # graph name → list of (layer, definition) it feeds
        self.wanted: dict[str, list[tuple[int, str]]] = {}
        for layer in self.layers:
            for d in self.definitions:
                src = names.act_source if d == "act" else names.down_in
                self.wanted.setdefault(f"{src}-{layer}", []).append((layer, d))
        self.extra = set(extra)
        self._prefix_rows: dict[str, np.ndarray] = {}  # a shared prefix's rows, per tensor, until the rests come

    @property
    def tensor_names(self) -> list[str]:
        """Every graph tensor this probe asks for."""
        return sorted(set(self.wanted) | self.extra)

    def stop_names(self) -> Sequence[str]:
        return self.tensor_names

    @property
    def reaches_last_layer(self) -> bool:
        last = self.model.n_layer - 1  # its FFN tensors (and ffn_* extras) follow the layer's attention
        return last in self.layers or any(name.startswith("ffn_") and name.endswith(f"-{last}") for name in self.extra)

    @property
    def needs_all_outputs(self) -> bool:
        return self.reaches_last_layer

    def wants(self, name: str) -> bool:
        return name in self.wanted or name in self.extra

    def _copy_out(self, t: int, name: str, layout: BatchLayout) -> np.ndarray:
        raw = self.reader.read_new(t)
        if raw.shape[0] != layout.n_rows:
            raise ProbeError(
                f"{name} holds {raw.shape[0]} rows for a batch of {layout.n_rows} tokens: "
                "run the engine with all_outputs=True so the last layer covers every token"
            )
        return raw

    def _consume(self, name: str, raw: np.ndarray, layout: BatchLayout) -> None:
        # with shared_rows the prefix's rows (layout.shared_by) and the rests' go on as they come
        if layout.shared_by is not None and not self.shared_rows:  # kept for every prompt until the rests arrive
            self._prefix_rows[name] = raw  # a copy of its own (read_new)
            return
        if layout.prefix and not self.shared_rows:
            prefix_rows = self._prefix_rows.pop(name, None)
            if prefix_rows is None:
                raise ProbeError(f"{name}: the rests of a group arrived without their shared prefix")
            raw, layout = layout.unshare(prefix_rows, raw)
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


class NeuronPatch(Probe):
    """Overwrites chosen neurons of one layer before ffn_down reads them.

    Writes into the down_in tensor (ffn_swiglu-N): `definition="down_in"` sets the value itself;
    `definition="act"` sets the activation, i.e. down_in = value · up (so it also reads ffn_up-N).
    Zero is the same under both. `values` is a scalar or one value per neuron. `positions="all"` patches
    every token, "last" only each prompt's last token. Set `enabled=False` to run unpatched through
    the same context.
    """

    needs_all_outputs = False  # the patch is found by name; the last layer holds the output rows only

    def __init__(
        self,
        model_path: str | os.PathLike,
        layer: int,
        neurons: Sequence[int],
        values: float | Sequence[float] = 0.0,
        definition: str = "down_in",
        positions: str = "all",
    ) -> None:
        super().__init__()
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
        self.patched = 0  # tensors written so far
        self._up: np.ndarray | None = None

    def wants(self, name: str) -> bool:
        return name == self.target or name == self.up_name

    def handle(self, t: int, name: str) -> None:
        if not self.enabled:
            return
        if name == self.up_name:
            self._up = self.reader.read(t, "up").copy()
        elif name == self.target:
            self._patch(t)

    def _patch(self, t: int) -> None:
        data = self.reader.read(t, "target")
        n_rows = data.shape[0]
        if self.positions == "all":
            rows = np.arange(n_rows)
        else:
            layout = self.require_layout()
            # the last layer may hold only the output rows (one per prompt when all_outputs is off)
            rows = layout.last_rows if n_rows == layout.n_rows else np.arange(n_rows)
        cols = self.neurons
        if self.needs_up:
            up = self._up
            if up is None or up.shape != data.shape:
                raise ProbeError(f"{self.up_name} was not read before {self.target}")
            data[np.ix_(rows, cols)] = (self.values[None, :] * up[np.ix_(rows, cols)]).astype(np.float32)
        else:
            data[np.ix_(rows, cols)] = self.values[None, :].astype(np.float32)
        self.reader.write(t, data)
        self.patched += 1


class LastPositionTap(Probe):
    """Keeps the last position's row of chosen graph tensors, per prompt: rows[(name, prompt)]."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = set(names)
        self.rows: dict[tuple[str, int], np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return name in self.names

    def handle(self, t: int, name: str) -> None:
        data = self.reader.read(t, name)
        layout = self.require_layout()
        if data.shape[0] == layout.n_rows:
            data = data[layout.last_rows]
        elif data.shape[0] != len(layout.lengths):  # the last layer holds one output row per prompt
            raise ProbeError(f"{name}: {data.shape[0]} rows for {len(layout.lengths)} prompts")
        for p, row in zip(layout.prompt_indices, data):
            self.rows[(name, p)] = row.astype(np.float64)


class ProbeSet:
    """Several probes on one context and one decode: each is asked about every tensor and handed
    exactly the ones it asked for, in the order given (e.g. neuron statistics + imatrix).

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

    @property
    def shares_prefix(self) -> bool:
        return all(getattr(p, "shares_prefix", False) for p in self.probes)

    def on_batch(self, indices: list[int], token_arrays: list[np.ndarray], **where) -> None:
        for p in self.probes:
            if getattr(p, "on_batch", None) is not None:
                p.on_batch(indices, token_arrays, **where)

    def eval_callback(self, t: int, ask: bool) -> bool:
        if ask:
            wanting = [p for p in self.probes if p.eval_callback(t, True)]
            self._wants[t] = wanting
            return bool(wanting)
        # False from one probe ends the graph: at once for its error (re-raised by check()), and once
        # every probe has what it needed from a graph that may end early.
        failed = False
        for p in self._wants.get(t, ()):
            p.eval_callback(t, False)
            failed |= getattr(p, "error", None) is not None
        return not failed and not self.finished

    @property
    def finished(self) -> bool:
        return all(getattr(p, "finished", False) for p in self.probes)

    @property
    def reaches_last_layer(self) -> bool:
        return all(getattr(p, "reaches_last_layer", False) for p in self.probes)

    def settle(self) -> None:
        for p in self.probes:
            if hasattr(p, "settle"):
                p.settle()

    def check(self) -> None:
        for p in self.probes:
            p.check()


class SwitchedProbe:
    """One context, several probes in turn: the callback goes to whichever probe is `current`."""

    def __init__(self, current=None) -> None:
        self.current = current

    def eval_callback(self, t: int, ask: bool) -> bool:
        return self.current.eval_callback(t, ask)

    def settle(self) -> None:
        if hasattr(self.current, "settle"):
            self.current.settle()


def run_checked(engine, probe, tokens: Sequence[np.ndarray], all_outputs: bool | None = None,
                share_prefix: bool = False, logits: bool = True):
    """engine.run with the probe's on_batch; an error raised inside the callback is re-raised as itself.
    share_prefix is used only when the probe handles it (`shares_prefix`). logits=False: the results are
    not wanted, so the probe may end each graph after its last tensor (Engine.run)."""
    if all_outputs is None:
        all_outputs = bool(getattr(probe, "needs_all_outputs", False))
    share_prefix = share_prefix and bool(getattr(probe, "shares_prefix", False))
    try:
        results = engine.run(tokens, all_outputs=all_outputs, on_batch=probe.on_batch, share_prefix=share_prefix,
                             logits=logits, probe_ends_graphs=bool(getattr(probe, "reaches_last_layer", False)))
    except ProbeError:
        probe.check()  # the callback's own error explains the failed decode better
        raise
    finally:
        if hasattr(probe, "settle"):
            probe.settle()
    probe.check()
    return results


def answer_logprob(logits: np.ndarray, token: int) -> float:
    """log p(token) under the softmax of one row of logits, in float64."""
    z = logits.astype(np.float64)
    return float(z[token] - logsumexp(z))
