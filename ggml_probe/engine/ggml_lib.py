"""The few libggml functions the engine needs, declared with ctypes.

llama-cpp-python loads libggml but binds none of these (design.md): tensor access for the eval
callback, and backend device enumeration for the run manifest.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def libggml() -> Any:
    from llama_cpp._ggml import libggml as lib  # loads the shared libraries: on first use, not at CLI start

    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    signatures = {
        "ggml_get_name": ([vp], ctypes.c_char_p),
        "ggml_nelements": ([vp], ctypes.c_int64),
        "ggml_nrows": ([vp], ctypes.c_int64),
        "ggml_nbytes": ([vp], sz),
        "ggml_is_contiguous": ([vp], ctypes.c_bool),
        "ggml_op_desc": ([vp], ctypes.c_char_p),
        "ggml_backend_tensor_get": ([vp, vp, sz, sz], None),
        "ggml_backend_tensor_set": ([vp, vp, sz, sz], None),
        "ggml_backend_dev_count": ([], sz),
        "ggml_backend_dev_get": ([sz], vp),
        "ggml_backend_dev_name": ([vp], ctypes.c_char_p),
        "ggml_backend_dev_description": ([vp], ctypes.c_char_p),
        "ggml_backend_dev_type": ([vp], ctypes.c_int),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    return lib


# enum ggml_backend_dev_type
_DEV_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}

# The first field of struct ggml_tensor is `enum ggml_type type`.
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26


def tensor_type(t: int) -> int:
    return ctypes.cast(t, ctypes.POINTER(ctypes.c_int32))[0]


class TensorHead(ctypes.Structure):
    """The leading fields of struct ggml_tensor (ggml.h), up to its sources, in declaration order."""

    _fields_ = [
        ("type", ctypes.c_int32),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int32),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
    ]


def tensor_head(t: int) -> TensorHead:
    """A view of tensor t's type, shape (ne, innermost first), strides and source pointers."""
    return TensorHead.from_address(t)


def tensor_shape(t: int) -> tuple[int, int, int, int]:
    """ggml's ne[0..3]: ne[0] is the innermost (contiguous) dimension."""
    return tuple(TensorHead.from_address(t).ne)  # type: ignore[return-value]


def devices() -> list[dict[str, str]]:
    """Every backend device llama.cpp's ggml was built with (CPU, CUDA, Metal, ...)."""
    lib = libggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        out.append({
            "name": (lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
            "description": (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            "type": _DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "?"),
        })
    return out


def device_memory() -> list[dict[str, Any]]:
    """Free and total memory of every backend device, in bytes, as ggml reports it now
    (ggml_backend_dev_memory: a GPU's VRAM; the CPU device reports the host's memory)."""
    lib = libggml()
    fn = lib.ggml_backend_dev_memory
    fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    fn.restype = None
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        fn(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({"name": (lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                    "type": _DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "?"),
                    "free": int(free.value), "total": int(total.value)})
    return out


class ThreadpoolParams(ctypes.Structure):
    """struct ggml_threadpool_params (ggml.h; GGML_MAX_N_THREADS = 512)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),  # enum ggml_sched_priority, 0 = normal
        ("poll", ctypes.c_uint32),  # 0: no polling … 100: aggressive
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def threadpool_new(n_threads: int, poll: int = 50) -> int | None:
    """A persistent CPU threadpool (ggml_threadpool_new with ggml's default parameters, the given poll
    level), or None where the CPU backend's functions are not reachable (a build that loads backends
    dynamically). Free it with threadpool_free after detaching it from every context."""
    lib = libggml()
    try:
        init, new = lib.ggml_threadpool_params_init, lib.ggml_threadpool_new
    except AttributeError:
        return None
    init.argtypes, init.restype = [ctypes.POINTER(ThreadpoolParams), ctypes.c_int], None
    new.argtypes, new.restype = [ctypes.POINTER(ThreadpoolParams)], ctypes.c_void_p
    params = ThreadpoolParams()
    init(ctypes.byref(params), int(n_threads))
    params.poll = int(poll)
    return new(ctypes.byref(params)) or None


def threadpool_free(threadpool: int) -> None:
    fn = libggml().ggml_threadpool_free
    fn.argtypes, fn.restype = [ctypes.c_void_p], None
    fn(threadpool)
