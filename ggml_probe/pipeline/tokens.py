"""The token arrays a run decodes: made once per example, kept in the run's checkpoints.

An example's tokens come from its task's template fitted to the context (tasks.TaskSpec.fit: the
template stays whole, the longest field is cut), and each checkpoint stores the arrays it decoded,
so whatever points into them later (top-activating tokens and their contexts) reads the very
tokens the model saw, not a fresh tokenization of the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ProbeError
from ..tasks import Example, FittedPrompt, TaskSpec, Tokenizer

CHUNKS = "chunks"


def example_tokens(tokenizer: Tokenizer, spec: TaskSpec, example: Example, limit: int) -> FittedPrompt:
    """The tokens decoded for one example, at most `limit` (the engine's prompt limit)."""
    return spec.fit(example.fields, tokenizer, limit)


def pack_tokens(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The arrays of a checkpoint, concatenated (their lengths are the checkpoint's n_tokens)."""
    return np.concatenate([np.asarray(a, dtype=np.int32) for a in arrays]) if arrays else np.zeros(0, np.int32)


def decoded_tokens(run_dir: Path) -> list[np.ndarray]:
    """Every example's decoded token array, by run position, from the run's checkpoints."""
    by_position: dict[int, np.ndarray] = {}
    for f in sorted((Path(run_dir) / CHUNKS).glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            if "tokens" not in z.files:
                raise ProbeError(f"{f} does not record the tokens it decoded (made by an older ggml-probe); "
                                 "rerun with --force")
            lengths = z["n_tokens"]
            parts = np.split(z["tokens"], np.cumsum(lengths)[:-1]) if len(lengths) else []
            for pos, arr in zip(z["positions"], parts):
                by_position[int(pos)] = arr
    if sorted(by_position) != list(range(len(by_position))):
        raise ProbeError(f"{run_dir}: checkpoints do not cover every example exactly once; rerun with --force")
    return [by_position[i] for i in range(len(by_position))]
