"""A run directory: the unit of resumption and comparison.

    RUN_DIR/manifest.json        what produced it (model hash, quant, task, data hash, definitions, versions, backend)
    RUN_DIR/chunks/NNNNN.npz     finished examples, written atomically as the run goes (resume reads them)
    RUN_DIR/predictions.parquet  one row per example (written at the end)
    RUN_DIR/logits.npy           float16 next-token logits at the answer position, (n, n_vocab)
    RUN_DIR/hidden.npy           float32 final hidden state (result_norm) at the answer position, (n, n_embd)
    RUN_DIR/metrics.json         metrics with bootstrap intervals and their definitions
    RUN_DIR/reliability.png      reliability diagram
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import ProbeError
from ..fsutil import atomic_output



def write_json(path: Path, data: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{path} is not valid JSON ({exc.__class__.__name__}); delete it or rerun with --force") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_npz(path: Path, reuse: Path | None = None, **arrays: np.ndarray) -> None:
    """Write arrays to an .npz file atomically. `reuse`: a file no longer wanted (an old checkpoint) whose
    storage the new file overwrites: fresh pages cost more than the writing (on the project's 2-core
    machine a demo neuron state, 113 MB, took 260–330 ms as a new file and 51–56 ms over an old one)."""
    with atomic_output(path) as tmp:
        recycled = False
        if reuse is not None:
            with contextlib.suppress(FileNotFoundError):
                os.replace(reuse, tmp)  # it leaves its name at once: never a half-written file under it
                recycled = True
        with open(tmp, "r+b" if recycled else "wb") as f:
            np.savez(f, **arrays)
            f.truncate()


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


@contextlib.contextmanager
def directory_lock(folder: Path) -> Iterator[None]:
    """Refuse a second writer on the same directory (an flock held for the run's lifetime)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder else ""
            raise ProbeError(f"{folder} is in use by another ggml-probe run{who}; wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
