"""Loading llama.cpp once, capturing its log, and the few library-level calls (quantize, versions).

llama.cpp reports most failures only through its log (e.g. 'failed to load model'), so every
line is captured into a ring buffer; callers turn the last error lines into a one-line message.
Set GGML_PROBE_VERBOSE=1 to see llama.cpp's log on stderr.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

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


@dataclass(frozen=True)
class CpuBudget:
    """What this process may use of the machine's CPUs (Linux; elsewhere what os.cpu_count() says)."""

    allowed: int  # CPUs in the affinity mask (taskset, a container's cpuset)
    quota: int | None  # the cgroup CPU quota in whole CPUs (rounded down, at least 1); None: no quota
    physical: int  # physical cores among the allowed CPUs; os.cpu_count() where /proc/cpuinfo does not say

    @property
    def threads(self) -> int:
        # llama.cpp's threads spin at barriers: a second hyperthread of a core or a thread beyond the
        # quota slows it down, so none of the three is exceeded.
        return max(1, min(self.allowed, self.physical, self.quota or self.allowed))


def cpu_budget(*, cpuinfo: Path = Path("/proc/cpuinfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
               self_cgroup: str | None = None) -> CpuBudget:
    """The CPUs this process may run on: affinity, cgroup quota (v2 cpu.max or v1 cfs files, the
    process's own cgroup and its parents, the tightest wins) and the physical cores among them.

    The paths and the text of /proc/self/cgroup can be given, to read another machine's files.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cpus = list(range(os.cpu_count() or 1))
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            self_cgroup = ""
    return CpuBudget(allowed=len(cpus), quota=_cgroup_quota(cgroup_root, self_cgroup),
                     physical=_physical_cores(cpuinfo, set(cpus)) or os.cpu_count() or len(cpus))


def default_threads() -> int:
    """The thread count used when none is given (llama.cpp's contexts and quantizer)."""
    return cpu_budget().threads


def _physical_cores(cpuinfo: Path, allowed: set[int]) -> int | None:
    """Distinct (physical id, core id) pairs of the allowed processors in /proc/cpuinfo; None when it
    does not name them (e.g. ARM) or cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" not in fields:
            continue
        if "core id" not in fields:
            return None
        if int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _cgroup_quota(root: Path, self_cgroup: str) -> int | None:
    """The tightest CPU quota over the process's cgroup and its parents, in whole CPUs."""
    v1_path = v2_path = None
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "cpu" in parts[1].split(","):
            v1_path = parts[2]
    quotas: list[float] = []
    for bases, path, read in (((root, root / "unified"), v2_path, _read_cpu_max),
                              ((root / "cpu", root / "cpu,cpuacct"), v1_path, _read_cfs)):
        if path is None:
            continue
        rel = Path(path.lstrip("/"))
        for base in bases:
            for folder in [base / p for p in (rel, *rel.parents)]:
                q = read(folder)
                if q is not None:
                    quotas.append(q)
    if not quotas:
        return None
    return max(1, int(min(quotas)))


def _read_cpu_max(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _read_cfs(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


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
    tensor_types: Sequence[tuple[str, int]] = (),
    output_tensor_type: int | None = None,
    token_embedding_type: int | None = None,
    pure: bool = False,
    dry_run: bool = False,
) -> QuantizePlan:
    """Run llama.cpp's own quantizer (llama_model_quantize) in-process.

    `imatrix` maps tensor names to per-input-channel importance (mean of squared activations,
    what llama-quantize passes). `metadata` string key-values are written into the output file.
    `tensor_types`: (regex, ggml type) overrides, the first pattern found in a tensor's name wins
    (llama-quantize's --tensor-type); `dry_run` writes nothing. Returns the type llama.cpp chose for
    every tensor and its fallbacks, read from its log (the only place it reports them).
    Raises ProbeError with llama.cpp's own error line on failure.
    """
    lib = llama()
    params = lib.llama_model_quantize_default_params()
    params.nthread = nthread if nthread > 0 else default_threads()  # llama.cpp's 0 means every logical CPU
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.pure = pure
    params.dry_run = dry_run
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type

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
    if tensor_types:
        patterns = (lib.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, ggml_type) in enumerate(tensor_types):
            pattern_b = pattern.encode()
            keep_alive.append(pattern_b)
            patterns[i].pattern = pattern_b
            patterns[i].type = ggml_type
        patterns[len(tensor_types)].pattern = None  # terminator
        keep_alive.append(patterns)
        params.tt_overrides = patterns

    clear_log()
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ProbeError(f"llama.cpp could not quantize {src.name}: {last_error('unknown error')}")
    return parse_quantize_log("".join(text for _, text in _log_lines))


@dataclass
class QuantizePlan:
    """What llama_model_quantize chose, as its log says: the type of every tensor, and the fallbacks."""

    types: dict[str, str]  # tensor name → ggml type name (upper case, e.g. Q5_0)
    fallbacks: dict[str, tuple[str, str]]  # tensor name → (type asked for, type used)


# llama-quant.cpp's lines: "[  12/ 272] blk.0.ffn_down.weight - [ 1536, 576, 1, 1], type = f16, size = 1.69 MiB -> 0.69 MiB (q6_K)"
# in a dry run (the new type in parentheses, only when it changes), "..., type = f16, converting to q6_K .. size = ..."
# when writing, and "warning: NAME - ncols 576 not divisible by 256 (required for type q4_K) -> falling back to q5_0".
_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+),(.*)$", re.MULTILINE)
_NEW_TYPE = re.compile(r"converting to (\w+)|\((\w+)\)\s*$")
_FALLBACK_LINE = re.compile(r"warning: (\S+)\s+- ncols.*\(required for type\s*(\w+)\).*?falling back to\s*(\w+)")


def parse_quantize_log(text: str) -> QuantizePlan:
    types = {}
    for m in _TENSOR_LINE.finditer(text):
        new = _NEW_TYPE.search(m[3])
        types[m[1]] = ((new[1] or new[2]) if new else m[2]).upper()
    fallbacks = {m[1]: (m[2].upper(), m[3].upper()) for m in _FALLBACK_LINE.finditer(text)}
    return QuantizePlan(types, fallbacks)
