"""Subprocess worker for tests/test_corrupt.py: validate a GGUF, then load it in llama.cpp and decode.

Runs as `python validate_worker.py [--unguarded]`, one JSON request per stdin line
({"path": "..."}), one JSON reply per stdout line. A llama.cpp abort or segfault kills this
process, which is the point: the parent sees a dead worker and knows which file did it.

Guarded mode (the way ggml-probe opens files): validate_gguf first; a rejected file is never
given to llama.cpp. The reply {"stage": "validated"} is sent before loading, so the parent can
tell a crash inside llama.cpp from one inside the validator.
Unguarded mode: give the file straight to llama.cpp, to learn what it would have done.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from pathlib import Path

# Replies go to a private copy of stdout; the process's fd 1 is pointed at stderr, so that what
# llama.cpp or a crash handler prints cannot be mistaken for a reply.
_replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
# An abort should just end the process: no gdb attaching to print a backtrace.
os.environ["GGML_NO_BACKTRACE"] = "1"

# Runaway allocations from a corrupt size become a failed malloc, not a machine out of memory.
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ggml_probe.errors import BadModelFile  # noqa: E402
from ggml_probe.formats.gguf import validate_gguf  # noqa: E402

PROMPT = b"Hello world, the answer is 42."
GGML_LOG_LEVEL_ERROR = 4


def reply(**fields) -> None:
    _replies.write(json.dumps(fields) + "\n")
    _replies.flush()


class LlamaRunner:
    def __init__(self) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.errors: list[str] = []
        llama_cpp.llama_backend_init()

        @llama_cpp.llama_log_callback
        def on_log(level, text, _user_data):
            if level == GGML_LOG_LEVEL_ERROR and text:
                self.errors.append(text.decode("utf-8", "replace").strip())

        self._on_log = on_log  # keep the callback alive as long as llama.cpp may call it
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))

    def load_and_decode(self, path: str) -> dict:
        lib = self.lib
        self.errors.clear()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(path.encode(), model_params)
        if not model:
            return {"loaded": False, "error": self._error()}
        context = None
        try:
            vocab = lib.llama_model_get_vocab(model)
            n_vocab = lib.llama_vocab_n_tokens(vocab)
            context_params = lib.llama_context_default_params()
            context_params.n_ctx = 64
            context_params.n_batch = 64
            context_params.n_ubatch = 64
            context_params.n_threads = 1
            context_params.n_threads_batch = 1
            context = lib.llama_init_from_model(model, context_params)
            if not context:
                return {"loaded": True, "decoded": False, "error": self._error() or "no context"}
            tokens = (lib.llama_token * 64)()
            n_tokens = lib.llama_tokenize(vocab, PROMPT, len(PROMPT), tokens, 64, False, False)
            if n_tokens <= 0:
                return {"loaded": True, "decoded": False, "error": f"tokenize returned {n_tokens}"}
            batch = lib.llama_batch_get_one(tokens, n_tokens)
            status = lib.llama_decode(context, batch)
            if status != 0:
                return {"loaded": True, "decoded": False, "error": self._error() or f"decode returned {status}"}
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(context, -1), shape=(n_vocab,))
            return {"loaded": True, "decoded": True, "n_vocab": int(n_vocab), "n_tokens": int(n_tokens),
                    "finite": bool(np.isfinite(logits).all()), "argmax": int(np.argmax(logits))}
        finally:
            if context:
                lib.llama_free(context)
            lib.llama_model_free(model)

    def _error(self) -> str:
        return " | ".join(self.errors[-3:])


def main() -> None:
    unguarded = "--unguarded" in sys.argv
    runner = LlamaRunner()
    reply(stage="ready")
    for line in sys.stdin:
        path = json.loads(line)["path"]
        if not unguarded:
            try:
                validate_gguf(path)
            except BadModelFile as problem:
                reply(stage="done", verdict="rejected", message=str(problem))
                continue
            reply(stage="validated")
        reply(stage="done", verdict="passed" if not unguarded else "unguarded", **runner.load_and_decode(path))


if __name__ == "__main__":
    main()
