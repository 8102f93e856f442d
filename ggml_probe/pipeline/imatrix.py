"""`imatrix collect`: an importance matrix from a task's prompts, fitted to the context as an eval run
fits them (pipeline.tokens: the template stays whole, the longest field is cut), so the matrix counts
the tokens an eval run of the same task and --ctx decodes; the engine gets token arrays.

    from ggml_probe.pipeline.evaluation import EvalConfig
    from ggml_probe.pipeline.imatrix import collect_task_imatrix

    im, data = collect_task_imatrix("model.gguf", EvalConfig(task="boolq", limit=200))
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ..engine.imatrix_capture import collect_imatrix
from ..engine.model import Vocab
from ..formats.imatrix import Imatrix
from ..tasks import TaskData, load_examples
from .evaluation import EvalConfig, task_spec
from .tokens import example_tokens


def task_prompt_tokens(model_path: str | os.PathLike, config: EvalConfig) -> tuple[TaskData, list[np.ndarray]]:
    """The task's examples and, per example, the tokens an eval run with this config decodes: fitted
    to n_ctx tokens, the engine's prompt limit (Engine.prompt_limit, its batch being the context)."""
    spec = task_spec(config)
    data = load_examples(spec, data_path=config.data_path, limit=config.limit, on_bad_row=config.on_bad_row,
                         seed=config.seed)
    with Vocab(model_path) as vocab:
        tokens = [example_tokens(vocab, spec, ex, config.n_ctx).tokens for ex in data.examples]
    return data, tokens


def collect_task_imatrix(model_path: str | os.PathLike, config: EvalConfig,
                         progress: Callable[[int, int], None] | None = None) -> tuple[Imatrix, TaskData]:
    """The importance matrix of the task's fitted prompts (one decode each), and the data it came from."""
    data, tokens = task_prompt_tokens(model_path, config)
    im = collect_imatrix(model_path, tokens, datasets=[data.source], n_ctx=config.n_ctx, n_threads=config.threads,
                         gpu_layers=config.gpu_layers, progress=progress)
    return im, data
