"""Loading llama.cpp once, capturing its log, and the few library-level calls (quantize, versions).

llama.cpp reports most failures only through its log (e.g. 'failed to load model'), so every
line is captured into a ring buffer; callers turn the last error lines into a one-line message.
Set GGML_PROBE_VERBOSE=1 to see llama.cpp's log on stderr.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ProbeError

_LEVELS = {0: "none", 1: "info", 2: "warn", 3: "error", 4: "debug", 5: "cont"}

_lock = threading.Lock()
_llama: Any = None
_log_lines: collections.deque[tuple[str, str]] = collections.deque(maxlen=5000)
_log_callback_ref: Any = None  # keeps the CFUNCTYPE alive as long as llama.cpp may call it
_last_level = "info"


def llama() -> Any:
    """The llama_cpp module, with the backend initialised and the log captured (idempotent)."""
    global _llama, _log_callback_ref
    if _llama is not None:
        return _llama
    with _lock:
        if _llama is not None:
            return _llama
        import llama_cpp

        verbose = os.environ.get("GGML_PROBE_VERBOSE", "") not in ("", "0")

        @llama_cpp.llama_log_callback
        def _on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            global _last_level
            name = _LEVELS.get(level, "info")
            if name == "cont":
                name = _last_level
            _last_level = name
            line = text.decode("utf-8", errors="replace")
            _log_lines.append((name, line))
            if verbose:
                sys.stderr.write(line)

        _log_callback_ref = _on_log
        llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _llama = llama_cpp
        return _llama


def clear_log() -> None:
    _log_lines.clear()


def log_errors(limit: int = 3) -> list[str]:
    """The last error (or failing warning) lines llama.cpp logged, stripped."""
    lines = [text.strip() for level, text in _log_lines if level in ("error", "warn") and text.strip()]
    return lines[-limit:]


def last_error(default: str) -> str:
    errors = log_errors(1)
    return errors[0] if errors else default


def versions() -> dict[str, str]:
    """llama-cpp-python version and llama.cpp's build/system info (for run manifests)."""
    lib = llama()
    info = lib.llama_print_system_info()
    return {
        "llama_cpp_python": getattr(lib, "__version__", "unknown"),
        "llama_cpp_system_info": info.decode("utf-8", errors="replace").strip() if info else "",
        "gpu_offload_supported": str(bool(lib.llama_supports_gpu_offload())),
    }


def quantize_file(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    allow_requantize: bool = False,
    nthread: int = 0,
    imatrix: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Run llama.cpp's own quantizer (llama_model_quantize) in-process.

    `imatrix` maps tensor names to per-input-channel importance (mean of squared activations,
    what llama-quantize passes). `metadata` string key-values are written into the output file.
    Raises ProbeError with llama.cpp's own error line on failure.
    """
    lib = llama()
    params = lib.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.allow_requantize = allow_requantize

    keep_alive: list[Any] = []  # ctypes buffers must outlive the call
    if imatrix:
        entries = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(arr)
            name_b = name.encode()
            keep_alive.append(name_b)
            entries[i].name = name_b
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # terminator
        keep_alive.append(entries)
        params.imatrix = entries
    if metadata:
        overrides = (lib.llama_model_kv_override * (len(metadata) + 1))()
        for i, (key, value) in enumerate(metadata.items()):
            overrides[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_STR
            overrides[i].key = key.encode()[:127]
            overrides[i].value.val_str = value.encode()[:127]
        overrides[len(metadata)].key = b""  # terminator: key[0] == 0
        keep_alive.append(overrides)
        params.kv_overrides = overrides

    clear_log()
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ProbeError(f"llama.cpp could not quantize {src.name}: {last_error('unknown error')}")
