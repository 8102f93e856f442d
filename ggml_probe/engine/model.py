"""Loading a GGUF into llama.cpp and running prompts: logits and final hidden states as NumPy.

Everything that touches llama.cpp contexts, batches, offload and the eval callback lives here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import BadModelFile, ProbeError
from ..formats.gguf import validate_gguf
from .ggml_lib import devices, libggml, threadpool_free, threadpool_new
from .llama_lib import _log_lines, clear_log, default_threads, last_error, llama

# An eval-callback probe: called with (tensor pointer, ask) exactly as llama.cpp calls cb_eval.
EvalCallback = Callable[[int, bool], bool]


@dataclass
class PromptResult:
    """What one prompt produced at its last position."""

    n_tokens: int  # tokens actually decoded (after truncation)
    truncated: int  # tokens dropped from the left to fit the context
    logits: np.ndarray | None  # float32 (n_vocab,) at the last prompt position; None: run(logits=False)
    hidden: np.ndarray | None  # float32 (n_embd,): result_norm at the last position


@dataclass
class EngineInfo:
    model_path: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx: int
    n_ctx_train: int
    n_threads: int
    gpu_layers_requested: int
    gpu_offload_supported: bool
    offloaded_layers: str | None  # llama.cpp's own "offloaded N/M layers" figure when it logs one
    devices: list[dict[str, str]] = field(default_factory=list)
    loaded_tensor_types: dict[str, int] = field(default_factory=dict)  # as llama.cpp's loader reports them
    model_desc: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_gpu_layers(value: str | int | None) -> int | None:
    """'auto' → None (all layers where a GPU backend exists, else 0); an int → that many."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ProbeError(f"--gpu-layers must be 'auto' or a number, not {value!r}") from None
    if n < -1:
        raise ProbeError("--gpu-layers must be 'auto', -1 (all) or ≥ 0")
    return n


def offload_layers(gpu_layers: str | int | None) -> int:
    """The n_gpu_layers llama.cpp gets for a --gpu-layers value: 999 for all, 0 without a GPU backend."""
    requested = parse_gpu_layers(gpu_layers)
    if not llama().llama_supports_gpu_offload():
        return 0
    return 999 if requested is None or requested == -1 else requested


class _VocabMethods:
    """Tokenizing with llama.cpp's own tokenizer (needs self._lib and self._vocab)."""

    _lib: Any
    _vocab: Any

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Token ids as llama.cpp's tokenizer gives them (BOS added when the model asks for it)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (self._lib.llama_token * n_max)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def token_to_piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(128)
        n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, True)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of a token sequence (llama.cpp's detokenizer; special tokens as text)."""
        arr = (self._lib.llama_token * max(1, len(tokens)))(*[int(t) for t in tokens])
        n_max = 8 * len(tokens) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(n_max)
            n = self._lib.llama_detokenize(self._vocab, arr, len(tokens), buf, n_max, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            n_max = -n  # buffer too small: -n is the size needed
        raise ProbeError("llama.cpp could not detokenize a token sequence")

    def continuation_tokens(self, prompt: str, continuation: str) -> list[int]:
        """The tokens the model would emit for `continuation` right after `prompt`: prompt + continuation
        tokenized together, after the prompt's own tokens. A tokenizer may merge across the boundary
        ('Answer: ' + 'True' → … ' True'): then the prompt's tokens are not a prefix of the joint
        tokenization, and what follows their longest common prefix is returned."""
        head = self.tokenize(prompt)
        joint = self.tokenize(prompt + continuation)
        k, n = 0, min(len(head), len(joint))
        while k < n and head[k] == joint[k]:
            k += 1
        return [int(t) for t in joint[k:]]



class Vocab(_VocabMethods):
    """Only a model's vocabulary (no weights): tokenize and detokenize cheaply, even for a 70B file."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        self.path = Path(model_path)
        validate_gguf(self.path, for_llama=True)
        lib = llama()
        self._lib = lib
        params = lib.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        clear_log()
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise BadModelFile(f"{self.path}: llama.cpp could not load its vocabulary: {last_error('unknown error')}")
        self._vocab = lib.llama_model_get_vocab(self._model)

    def close(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Vocab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine(_VocabMethods):
    """One llama.cpp model and context.

    Use as a context manager, or call close(). `eval_callback` receives every graph tensor the
    scheduler offers (ask=True: return whether you want it; ask=False: read it, return True).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        gpu_layers: str | int | None = "auto",
        n_seq_max: int = 1,
        n_batch: int | None = None,
        hidden_states: bool = True,
        eval_callback: EvalCallback | None = None,
        validate: bool = True,
        flash_attn: bool = False,
        kv_type: int | None = None,
        n_ubatch: int | None = None,
        kv_unified: bool = True,
    ) -> None:
        self.path = Path(model_path)
        if validate:
            validate_gguf(self.path, for_llama=True)
        lib = llama()
        self._lib = lib
        self._model = None
        self._ctx = None
        self._callback_ref = None
        self._n_params: int | None = None
        self.last_tokens_apart: bool | None = None  # run()'s last tokens apart: None decides by cost (split_pays)

        offload = bool(lib.llama_supports_gpu_offload())
        n_gpu = offload_layers(gpu_layers)

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu
        clear_log()
        model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise BadModelFile(f"{self.path}: llama.cpp could not load it: {last_error('failed to load model')}")
        self._model = model
        self.offloaded_layers = _offload_from_log()
        self.loaded_tensor_types = _loaded_types_from_log()
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(lib.llama_model_n_embd(model))
        self.n_layer = int(lib.llama_model_n_layer(model))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(model))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(lib.llama_vocab_bos(self._vocab))

        self.n_threads = n_threads or default_threads()
        self.n_seq_max = max(1, n_seq_max)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch or n_ctx
        # One graph per batch by default: the callback sees whole prompts. Runs without probes (kld) may
        # split it like llama.cpp's tools do (n_ubatch 512), which is faster for long batches.
        cparams.n_ubatch = n_ubatch or n_batch or n_ctx
        # no more sequences than one batch has rows (llama.cpp asserts on it: a tiny --ctx with --batch 32)
        self.n_seq_max = min(self.n_seq_max, int(cparams.n_ubatch))
        cparams.n_seq_max = self.n_seq_max
        # Unified: sequences share the cache, so a batch may be any mix of lengths. Not unified: each of
        # the n_seq_max sequences gets n_ctx / n_seq_max cells and attends over its own only (llama-perplexity).
        cparams.kv_unified = kv_unified
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        # Hidden states come from the graph's result_norm through the eval callback: embeddings mode
        # would make llama.cpp output (and compute logits for) every token.
        cparams.embeddings = False
        cparams.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        cparams.no_perf = True
        # Off by default: on CPU, flash attention accumulates in F16 and moved SmolLM2's logits by ~1.0
        # against the plain path (its residual stream carries values in the thousands).
        cparams.flash_attn_type = 1 if flash_attn else 0
        if kv_type is not None:  # a ggml type id for the K and V cache (0 = F32; llama.cpp's default is F16)
            cparams.type_k = kv_type
            cparams.type_v = kv_type
        self._user_callback = eval_callback
        # The probe the callback belongs to ends a graph early only in a decode whose on_batch allowed it; a
        # decode without on_batch settles it first (_llama_decode), so a stop allowed before is not carried over.
        self._settle_probe: Callable[[], None] | None = getattr(getattr(eval_callback, "__self__", None), "settle", None)
        self._told = False  # on_batch was called for the decode to come
        self._user_wants: set[int] = set()  # tensors the user's callback asked for in this graph
        self._hidden_rows: np.ndarray | None = None
        if eval_callback is not None or hidden_states:
            self._ggml = libggml()
            self._callback_ref = lib.ggml_backend_sched_eval_callback(lambda t, ask, _ud: self._on_tensor(t, ask))
            cparams.cb_eval = self._callback_ref
            cparams.cb_eval_user_data = None
        clear_log()
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise ProbeError(f"llama.cpp could not create a context: {last_error('unknown error')}")
        self._ctx = ctx
        self.n_ctx = int(lib.llama_n_ctx(ctx))
        self.n_batch = int(lib.llama_n_batch(ctx))
        self.hidden_states = hidden_states
        self._mem = lib.llama_get_memory(ctx)
        self.gpu_layers_requested = n_gpu
        self.gpu_offload_supported = offload

    # ------------------------------------------------------------------ eval callback
    def _on_tensor(self, t: int, ask: bool) -> bool:
        """Serves the engine's own hidden-state read and the caller's probe in one callback."""
        name = self._ggml.ggml_get_name(t)
        mine = self.hidden_states and name == b"result_norm"
        user = self._user_callback
        if ask:
            theirs = bool(user(t, True)) if user is not None else False
            if theirs:
                self._user_wants.add(t)
            else:
                self._user_wants.discard(t)
            return mine or theirs
        if mine:
            n = self._ggml.ggml_nelements(t)
            rows = np.empty((n // self.n_embd, self.n_embd), dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(t, rows.ctypes.data, 0, rows.nbytes)
            self._hidden_rows = rows
        if user is not None and t in self._user_wants:
            return bool(user(t, False))
        return True

    def _llama_decode(self, batch) -> None:
        """llama_decode of a filled batch; the probe is settled first when this decode had no on_batch."""
        if not self._told and self._settle_probe is not None:
            self._settle_probe()
        self._told = False
        clear_log()
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise ProbeError(f"llama_decode failed (code {rc}): {last_error('no message')}")

    def _tell(self, on_batch: Callable[..., None] | None, group: list[int], token_arrays: Sequence[np.ndarray],
              **where) -> None:
        """on_batch(group, arrays, …) before a decode, with only the keywords that differ from a plain decode
        (start 0, not shared, may not stop), so a callback that takes none still serves plain decodes."""
        if on_batch is not None:
            on_batch(group, token_arrays, **{k: v for k, v in where.items() if v})
            self._told = True

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def info(self) -> EngineInfo:
        buf = ctypes.create_string_buffer(256)
        self._lib.llama_model_desc(self._model, buf, 256)
        return EngineInfo(
            model_path=str(self.path),
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_vocab=self.n_vocab,
            n_ctx=self.n_ctx,
            n_ctx_train=self.n_ctx_train,
            n_threads=self.n_threads,
            gpu_layers_requested=self.gpu_layers_requested,
            gpu_offload_supported=self.gpu_offload_supported,
            offloaded_layers=self.offloaded_layers,
            devices=devices(),
            loaded_tensor_types=self.loaded_tensor_types,
            model_desc=buf.value.decode(errors="replace"),
        )

    # ------------------------------------------------------------------ logits of whole sequences
    def logits_from(self, sequences: Sequence[np.ndarray], first: int, *, copy: bool = True) -> list[np.ndarray]:
        """Decode the sequences together (one llama_decode, each its own sequence) and return, per
        sequence, the float32 logits of positions first … len−1, shape (len − first, n_vocab).

        llama-perplexity's layout: only the positions it scores are outputs, so llama.cpp computes
        the output matrix for those rows alone. No truncation: each sequence must fit n_ctx / n_seq_max.
        copy=False returns views of llama.cpp's logits buffer instead, valid until the next decode (a
        consumer that reads them at once saves copying n_out × n_vocab floats).
        """
        lib = self._lib
        lengths = [len(s) for s in sequences]
        total = sum(lengths)
        if len(sequences) > self.n_seq_max or total > self.n_batch or max(lengths, default=0) > self.n_ctx:
            raise ProbeError(f"{len(sequences)} sequences of {max(lengths, default=0)} tokens do not fit one decode "
                             f"(n_seq_max {self.n_seq_max}, n_batch {self.n_batch}, n_ctx {self.n_ctx})")
        self._decode_fresh(sequences, lambda pos, n: pos >= first)
        # outputs are stored in batch order: each sequence's scored rows, one sequence after another
        n_out = sum(max(0, n - first) for n in lengths)
        every = np.ctypeslib.as_array(lib.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))
        out, start = [], 0
        for n in lengths:
            k = max(0, n - first)
            out.append(every[start:start + k].copy() if copy else every[start:start + k])
            start += k
        return out

    # ------------------------------------------------------------------ continuations after a shared prefix
    def continuation_logits(self, prefix: Sequence[int] | np.ndarray,
                            continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each continuation c, the float32 logits that predict its tokens after `prefix`: shape
        (len(c), n_vocab), row j predicting c[j] (row 0 is the prefix's last position).

        The prefix is decoded once into sequence 0; each continuation but its last token is then decoded
        after it on the same KV cache, read, and removed again (llama_memory_seq_rm), so a label of
        several tokens costs its own tokens, not the prompt again. The eval callback's probes and the
        hidden-state read do not see these decodes: they are the scoring's, not the pass being probed.
        """
        lib = self._lib
        head = np.ascontiguousarray(prefix, dtype=np.int32).ravel()
        conts = [np.ascontiguousarray(c, dtype=np.int32).ravel() for c in continuations]
        if len(head) == 0 or any(len(c) == 0 for c in conts):
            raise ProbeError("a continuation and the prefix it follows need a token each at least")
        longest = max((len(c) for c in conts), default=1)
        if len(head) > self.n_batch or longest - 1 > self.n_batch or len(head) + longest - 1 > self.n_ctx:
            raise ProbeError(f"a prefix of {len(head)} tokens and a continuation of {longest} do not fit the context "
                             f"(n_ctx {self.n_ctx}, n_batch {self.n_batch})")
        user, hidden = self._user_callback, self.hidden_states
        self._user_callback, self.hidden_states = None, False
        try:
            lib.llama_memory_clear(self._mem, True)
            last = self._decode_span(head, 0, every_row=False)
            out = []
            for c in conts:
                if len(c) == 1:
                    out.append(last.copy())
                    continue
                rows = self._decode_span(c[:-1], len(head), every_row=True)
                out.append(np.concatenate([last, rows]))
                if not lib.llama_memory_seq_rm(self._mem, 0, len(head), -1):  # a memory that cannot cut: start over
                    lib.llama_memory_clear(self._mem, True)
                    self._decode_span(head, 0, every_row=False)
            return out
        finally:
            self._user_callback, self.hidden_states = user, hidden

    def _decode_span(self, tokens: np.ndarray, start: int, every_row: bool) -> np.ndarray:
        """Decode tokens into sequence 0 at positions start…, after what the cache holds; float32 logits of
        every row (every_row) or of the last, shape (rows, n_vocab)."""
        lib = self._lib
        n = len(tokens)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(tokens.tolist()):
                batch.token[i] = tok
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (every_row or i == n - 1) else 0
            batch.n_tokens = n
            self._llama_decode(batch)
            rows = n if every_row else 1
            return np.ctypeslib.as_array(lib.llama_get_logits(self._ctx), shape=(rows, self.n_vocab)).copy()
        finally:
            lib.llama_batch_free(batch)

    # ------------------------------------------------------------------ decoding with the KV cache kept
    def decode_at(self, tokens: Sequence[int] | np.ndarray, positions: int | Sequence[int] | np.ndarray | None = None,
                  *, outputs: str = "last", seq: int = 0, read: bool = True) -> np.ndarray | None:
        """Decode `tokens` into sequence `seq` at `positions`, keeping what the KV cache already holds
        (generation one token at a time after a prompt; a prompt in pieces, as llama-bench decodes one
        longer than a batch). Nothing is cleared: see clear_cache.

        positions: one per token, a start position (consecutive from there), or None: right after the
        sequence's last cached position. outputs: 'last', 'all' or 'none', the rows llama.cpp computes
        logits for. Returns their float32 logits, shape (n_outputs, n_vocab), or None (read=False or no
        outputs). The backend is synchronised before returning, so timing the call times the compute.
        """
        lib = self._lib
        toks = np.ascontiguousarray(tokens, dtype=np.int32).ravel()
        n = len(toks)
        if n == 0:
            raise ProbeError("nothing to decode: no tokens")
        if n > self.n_batch:
            raise ProbeError(f"{n} tokens do not fit one decode (n_batch {self.n_batch})")
        if positions is None:
            start = int(lib.llama_memory_seq_pos_max(self._mem, seq)) + 1  # −1 + 1 on an empty sequence
            pos = np.arange(start, start + n, dtype=np.int32)
        elif np.ndim(positions) == 0:
            pos = np.arange(int(positions), int(positions) + n, dtype=np.int32)  # type: ignore[arg-type]
        else:
            pos = np.ascontiguousarray(positions, dtype=np.int32).ravel()
            if len(pos) != n:
                raise ProbeError(f"{n} tokens but {len(pos)} positions")
        if pos.min() < 0 or pos.max() >= self.n_ctx:
            raise ProbeError(f"positions {pos.min()}…{pos.max()} fall outside the context (n_ctx {self.n_ctx})")
        flags = np.zeros(n, dtype=np.int8)
        if outputs == "all":
            flags[:] = 1
        elif outputs == "last":
            flags[-1] = 1
        elif outputs != "none":
            raise ValueError(f"outputs must be 'last', 'all' or 'none', not {outputs!r}")
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            np.ctypeslib.as_array(batch.token, shape=(n,))[:] = toks
            np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = pos
            np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = flags
            for i in range(n):
                batch.seq_id[i][0] = seq
            batch.n_tokens = n
            self._llama_decode(batch)
            lib.llama_synchronize(self._ctx)
            n_out = int(flags.sum())
            if not read or n_out == 0:
                return None
            return np.ctypeslib.as_array(lib.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab)).copy()
        finally:
            lib.llama_batch_free(batch)

    def clear_cache(self, data: bool = False) -> None:
        """Empty the KV cache (every sequence); data=True also zeroes its buffers (llama-bench does not)."""
        self._lib.llama_memory_clear(self._mem, data)

    def eval_counts(self) -> tuple[int, int]:
        """llama.cpp's own counts since the last reset_eval_counts: (prompt tokens, generated tokens).

        llama.cpp adds a synchronised decode of one token to the second, of more to the first, and
        reports a count of 0 as 1 (llama_perf_context), so ask only about work done.
        """
        data = self._lib.llama_perf_context(self._ctx)
        return int(data.n_p_eval), int(data.n_eval)

    @contextlib.contextmanager
    def threadpool(self, poll: int = 50):
        """Attach a persistent CPU threadpool of n_threads to the context for the block, as llama-bench
        (poll 50, its default) and llama-cli run; without one, ggml starts and joins its threads for every
        graph. Yields whether one was attached (False where the CPU backend's functions are unreachable)."""
        tp = threadpool_new(self.n_threads, poll)
        if tp is None:
            yield False
            return
        raw = self._lib.llama_cpp._lib  # libllama: llama-cpp-python does not bind the threadpool calls
        raw.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        raw.llama_attach_threadpool.restype = None
        raw.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        raw.llama_detach_threadpool.restype = None
        raw.llama_attach_threadpool(self._ctx, tp, tp)
        try:
            yield True
        finally:
            raw.llama_detach_threadpool(self._ctx)
            threadpool_free(tp)

    def reset_eval_counts(self) -> None:
        self._lib.llama_perf_context_reset(self._ctx)

    def model_size(self) -> tuple[int, int]:
        """(bytes of the model's tensors, parameters) as llama.cpp counts them (llama-bench's size and params)."""
        return int(self._lib.llama_model_size(self._model)), int(self._lib.llama_model_n_params(self._model))

    def context_buffers(self) -> dict[str, dict[str, int]]:
        """The KV, output and compute buffers llama.cpp allocated for this context, in bytes per device
        ({'KV': {'CPU': …}, 'compute': {…}, 'output': {…}}), as its log reported them at creation.

        Read from the captured log: call it right after construction, before anything else decodes or
        loads (each clears the log); later it returns {}.
        """
        out: dict[str, dict[str, int]] = {}
        for _level, text in _log_lines:
            m = _BUFFER_RE.search(text)
            if m:
                out.setdefault(m.group(2), {})[m.group(1)] = int(round(float(m.group(3)) * 1024 * 1024))
        return out

    # ------------------------------------------------------------------ decoding
    @property
    def prompt_limit(self) -> int:
        """The most tokens one prompt may have (its sequence's context, one batch)."""
        return min(self.n_ctx, self.n_batch)

    def fit(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        """Truncate from the left so the prompt fits one sequence's context; returns (tokens, dropped).

        A last resort for token arrays made without the limit in mind: the pipeline fits prompts
        itself (tasks.TaskSpec.fit keeps the template and cuts the content) and never gets here.
        """
        limit = self.prompt_limit
        if len(tokens) <= limit:
            return tokens, 0
        return tokens[-limit:], len(tokens) - limit

    def run(
        self,
        prompts: Sequence[np.ndarray],
        *,
        all_outputs: bool = False,
        on_batch: Callable[..., None] | None = None,
        share_prefix: bool = False,
        logits: bool = True,
        probe_ends_graphs: bool = False,
    ) -> list[PromptResult]:
        """Decode each prompt (token arrays) and return its last-position logits and hidden state.

        Prompts are packed several to a llama_decode, each in its own sequence, as long as their
        tokens fit the batch; the cache is cleared between batches. With `all_outputs`, every token
        is marked as an output (the last layer's FFN then covers all tokens, for neuron probes).
        `on_batch(indices, token_arrays, ...)` is called before each decode, so an eval-callback probe
        knows which rows of the batch belong to which prompt (keywords below).

        `share_prefix`: when a group's prompts begin with the same tokens (a task's instruction), that
        prefix is decoded once into sequence 0 and its KV cells shared with the other sequences
        (llama_memory_seq_cp), then the rest of every prompt is decoded in one batch after it. The
        callback then sees two decodes per group: on_batch(indices, [prefix], shared=True) — rows that
        stand for every prompt of the group — and on_batch(indices, rests, start=len(prefix)).

        `logits=False`: nothing is read back (results carry logits and hidden None), so every decode is
        on_batch(..., may_stop=STOP_ANYWHERE): the probe may end the graph once it has read its last
        tensor, and llama.cpp skips the rest, the output matrix included.

        With `all_outputs` and logits, the output matrix would run on every row to give one row per
        prompt. When the probe ends a graph after its last tensor (`probe_ends_graphs`: its tensors reach the
        last layer's FFN) and the rows spared outweigh another pass over the weights (split_pays), each
        prompt's last token is decoded apart: first the rows before it (every one an output, none read:
        on_batch(..., may_stop=STOP_AFTER_KV), empty arrays for one-token prompts), then the last tokens
        (on_batch(indices, lasts, starts=[position of each])), whose logits are read.
        """
        fitted = [self.fit(np.asarray(p, dtype=np.int32)) for p in prompts]
        for i, (toks, _) in enumerate(fitted):
            if len(toks) == 0:
                raise ProbeError(f"prompt {i} has no tokens")
        results: list[PromptResult | None] = [None] * len(fitted)
        for group in self._pack([len(t) for t, _ in fitted]):
            toks = [fitted[i][0] for i in group]
            n_shared = common_prefix_length(toks) if share_prefix and len(toks) > 1 else 0
            if n_shared * (len(toks) - 1) >= MIN_SHARED_ROWS:
                outs = self._decode_shared(toks, n_shared, all_outputs, logits, probe_ends_graphs, group, on_batch)
            else:
                self._lib.llama_memory_clear(self._mem, True)
                outs = self._decode_rows(toks, 0, all_outputs, logits, probe_ends_graphs, group, on_batch)
            for i, (row_logits, hidden) in zip(group, outs):
                results[i] = PromptResult(len(fitted[i][0]), fitted[i][1], row_logits, hidden)
        return results  # type: ignore[return-value]

    def _decode_shared(self, token_arrays: list[np.ndarray], n_shared: int, all_outputs: bool, logits: bool,
                       probe_ends_graphs: bool, group: list[int], on_batch: Callable[..., None] | None):
        """The group's common prefix once into sequence 0, its cells shared with sequences 1…, then the
        rests (_decode_rows); returns (logits, hidden) per prompt."""
        lib = self._lib
        head = np.asarray(token_arrays[0][:n_shared], dtype=np.int32)
        rests = [np.asarray(t[n_shared:], dtype=np.int32) for t in token_arrays]
        # The prefix's outputs are never read; its KV is, at every layer the rests reach.
        may_stop = STOP_ANYWHERE if not logits else STOP_AFTER_KV if all_outputs else None
        self._tell(on_batch, group, [head], shared=True, may_stop=may_stop)
        # every prefix row is an output when all rows must be (the last layer's FFN covers them); else
        # none is needed, but one keeps llama.cpp on its usual path
        lib.llama_memory_clear(self._mem, True)
        self._decode_batch([head], 0, lambda pos, n: all_outputs or pos == n - 1)
        for seq in range(1, len(token_arrays)):
            lib.llama_memory_seq_cp(self._mem, 0, seq, -1, -1)
        return self._decode_rows(rests, n_shared, all_outputs, logits, probe_ends_graphs, group, on_batch)

    def _decode_rows(self, token_arrays: list[np.ndarray], start: int, all_outputs: bool, logits: bool,
                     probe_ends_graphs: bool, group: list[int], on_batch: Callable[..., None] | None):
        """Decode array s into sequence s from position `start`, after what the cache holds; (logits,
        hidden) at each array's last row, or (None, None) each without `logits`."""
        if not logits:
            self._tell(on_batch, group, token_arrays, start=start, may_stop=STOP_ANYWHERE)
            self._decode_batch(token_arrays, start, lambda pos, n: all_outputs or pos == n - 1)
            return [(None, None)] * len(token_arrays)
        heads = [t[:-1] for t in token_arrays]
        if all_outputs and probe_ends_graphs and self.split_pays(sum(len(h) for h in heads)):
            self._tell(on_batch, group, heads, start=start, may_stop=STOP_AFTER_KV)
            self._decode_batch(heads, start, lambda pos, n: True)
            lasts = [t[-1:] for t in token_arrays]
            starts = [start + len(h) for h in heads]
            self._tell(on_batch, group, lasts, starts=starts)
            self._decode_batch(lasts, starts, lambda pos, n: True)
            return self._group_outputs(lasts, True)
        self._tell(on_batch, group, token_arrays, start=start)
        self._decode_batch(token_arrays, start, lambda pos, n: all_outputs or pos == n - 1)
        return self._group_outputs(token_arrays, all_outputs)

    def split_pays(self, rows_spared: int) -> bool:
        """Whether sparing the output matrix `rows_spared` rows is worth one more decode (about a pass over
        the weights, costed as SPLIT_DECODE_ROWS rows of the whole model — every expert's weights on a
        mixture of experts, so it is taken less often there than it would pay; not tuned).

        A probe's False ends only the current backend split of the graph (ggml_backend_sched), so the
        output matrix is spared only when the layers after the stop share that split: on the CPU alone or
        with every layer offloaded, not with some layers on each."""
        if self.last_tokens_apart is not None:
            return self.last_tokens_apart and rows_spared > 0
        if self.offloaded_layers:
            done, total = (int(x) for x in self.offloaded_layers.split("/"))
            if 0 < done < total:
                return False
        if self._n_params is None:
            self._n_params = int(self._lib.llama_model_n_params(self._model))
        return rows_spared * self.n_vocab * self.n_embd >= SPLIT_DECODE_ROWS * self._n_params

    def _pack(self, lengths: list[int]) -> Iterable[list[int]]:
        """Groups of prompt indices, in order, whose total tokens fit one batch."""
        limit = self.prompt_limit
        group: list[int] = []
        used = 0
        for i, n in enumerate(lengths):
            if group and (used + n > limit or len(group) >= self.n_seq_max):
                yield group
                group, used = [], 0
            group.append(i)
            used += n
        if group:
            yield group

    def _decode_fresh(self, token_arrays: Sequence[np.ndarray], is_output: Callable[[int, int], bool]) -> None:
        """One llama_decode of the arrays, each its own sequence from position 0, on a cleared cache;
        `is_output(pos, length)` marks the rows whose logits llama.cpp computes."""
        self._lib.llama_memory_clear(self._mem, True)
        self._decode_batch(token_arrays, 0, is_output)

    def _decode_batch(self, token_arrays: Sequence[np.ndarray], start: int | Sequence[int],
                      is_output: Callable[[int, int], bool]) -> None:
        """One llama_decode of the arrays, array s into sequence s at positions start… (one start for all, or
        one per array), after what the cache holds; `is_output(pos, length)` (pos counted from 0 in the
        array) marks the output rows. Empty arrays keep their sequence number and add no row."""
        lib = self._lib
        lengths = [len(t) for t in token_arrays]
        starts = [start] * len(lengths) if isinstance(start, int) else [int(s) for s in start]
        total = sum(lengths)
        batch = lib.llama_batch_init(total, 0, 1)
        try:
            # whole columns through NumPy views of the batch's arrays: no Python loop over tokens but seq_id
            np.ctypeslib.as_array(batch.token, shape=(total,))[:] = np.concatenate(
                [np.asarray(t, dtype=np.int32) for t in token_arrays])
            np.ctypeslib.as_array(batch.pos, shape=(total,))[:] = np.concatenate(
                [np.arange(s, s + n, dtype=np.int32) for s, n in zip(starts, lengths)])
            np.ctypeslib.as_array(batch.n_seq_id, shape=(total,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(total,))[:] = [
                bool(is_output(pos, n)) for n in lengths for pos in range(n)]
            row = 0
            for seq, n in enumerate(lengths):
                for r in range(row, row + n):
                    batch.seq_id[r][0] = seq
                row += n
            batch.n_tokens = total
            self._hidden_rows = None
            self._llama_decode(batch)
        finally:
            lib.llama_batch_free(batch)

    def _group_outputs(self, token_arrays: Sequence[np.ndarray], all_outputs: bool):
        """(logits, hidden) at each array's last row of the decode just done."""
        lib = self._lib
        last_rows = list(np.cumsum([len(t) for t in token_arrays]) - 1)
        total = sum(len(t) for t in token_arrays)
        # result_norm holds one row per output token, in batch order.
        n_outputs = total if all_outputs else len(last_rows)
        out = []
        for seq, r in enumerate(last_rows):
            lp = lib.llama_get_logits_ith(self._ctx, int(r))
            logits = np.ctypeslib.as_array(lp, shape=(self.n_vocab,)).copy()
            hidden = None
            if self.hidden_states:
                if self._hidden_rows is None or len(self._hidden_rows) != n_outputs:
                    raise ProbeError("llama.cpp did not hand over result_norm for this batch")
                hidden = self._hidden_rows[r if all_outputs else seq].copy()
            out.append((logits, hidden))
        return out


# The prefix's own decode costs about one pass over the weights, so sharing is worth it only when it
# saves enough token rows; 32 is a guess (a pass over the weights costs a few dozen tokens' compute on
# CPU), not tuned.
MIN_SHARED_ROWS = 32
# The same guess for Engine.run's last tokens decoded apart: one more decode costs about this many rows
# of the whole model.
SPLIT_DECODE_ROWS = 32

# What on_batch's may_stop tells a probe about the decode to come. STOP_ANYWHERE: nothing of it is read
# after the probe's last tensor (no outputs, and a later decode stops where this one does).
# STOP_AFTER_KV: no outputs are read, but a later decode reads its KV cache at every layer, so the graph
# may end only past the last layer's attention. None: the outputs are read; the graph runs whole.
STOP_ANYWHERE = "anywhere"
STOP_AFTER_KV = "after_kv"


def common_prefix_length(token_arrays: Sequence[np.ndarray]) -> int:
    """How many leading tokens every array shares, leaving each at least one token of its own."""
    shortest = min(len(t) for t in token_arrays)
    limit = shortest - 1
    if limit <= 0:
        return 0
    stacked = np.stack([np.asarray(t[:limit]) for t in token_arrays])
    differs = np.flatnonzero(np.any(stacked != stacked[0], axis=0))
    return int(differs[0]) if len(differs) else limit


_LOADED_TYPE_RE = re.compile(r"- type\s+(\w+):\s+(\d+) tensors")


def _loaded_types_from_log() -> dict[str, int]:
    """The tensor types llama.cpp's loader reports for the model it just loaded."""
    types: dict[str, int] = {}
    for _level, text in _log_lines:
        m = _LOADED_TYPE_RE.search(text)
        if m:
            types[m.group(1).upper()] = int(m.group(2))
    return types


_OFFLOAD_RE = re.compile(r"offloaded (\d+/\d+) layers to GPU")
# e.g. "llama_kv_cache:        CPU KV buffer size =    16.88 MiB", "sched_reserve:      CUDA0 compute buffer size = …"
_BUFFER_RE = re.compile(r"(\S+)\s+(KV|output|compute) buffer size =\s*([\d.]+) MiB")


def _offload_from_log() -> str | None:
    for _level, text in reversed(_log_lines):
        m = _OFFLOAD_RE.search(text)
        if m:
            return m.group(1)
    return None
