"""The paper's integrated gradients for any layer's act neurons, in torch on the GGUF's own weights.

Captum's LayerIntegratedGradients on the act output, reproduced: baseline = the all-token-0 prompt's
act of the same layer, the straight path from it to the prompt's act at every position at once, the
rest of the network fed the prompt (residual and up of that layer from the prompt), target = the
log-probability of one token at the last position, n-point Gauss–Legendre on [0, 1], attribution
summed over positions. Only the layers after the attributed one are recomputed along the path.

Completeness is checked for every example and layer: Σ attributions against f(prompt act) − f(baseline
act). Where the integral has not converged (the path through later attention can swing wildly, as
at layer 0 of the demo model), the layer is flagged instead of its salient neurons being presented.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import numpy as np

from ..analysis.salient import gauss_legendre_01
from ..engine.llama_lib import default_threads
from ..engine.model import Vocab
from ..layerspec import resolve_layers
from .torch_model import TorchModel, require_torch
from .types import Attribution, LayerAttribution

def integrated_gradients(
    model_path: str | os.PathLike,
    prompts: Sequence[str | np.ndarray],
    layers: Sequence[int],
    *,
    targets: Sequence[int] | None = None,
    n_points: int = 50,
    batch: int = 10,
    device: str = "auto",
    dtype: str = "float32",
    threads: int | None = None,
    model=None,
    progress: Callable[[int, int], None] | None = None,
) -> Attribution:
    """Integrated gradients of log p(target) w.r.t. the act neurons of each of `layers`.

    prompts: text (tokenized by llama.cpp's vocab, as the engine does) or token arrays. targets: one
    token per prompt, default the model's own answer (argmax at the last position). `batch` path
    points go through the later layers at once (memory: batch × tokens × the model's width).
    """
    torch = require_torch()
    torch.set_num_threads(int(threads) if threads else default_threads())  # the engine's default, not torch's
    t0 = time.perf_counter()
    model = model or TorchModel(model_path, device=device, dtype=dtype)
    layers = sorted(set(resolve_layers(list(layers), model.hp.n_layer)))  # negatives count from the end
    tokens = _tokens(model_path, prompts)
    alphas, weights = gauss_legendre_01(n_points)
    attr = {L: np.zeros((len(tokens), model.hp.n_ff)) for L in layers}
    real = {L: np.zeros(len(tokens)) for L in layers}
    target_tokens = np.zeros(len(tokens), np.int64)
    target_lp = np.zeros(len(tokens))
    for p, toks in enumerate(tokens):
        lp, states = model.run(toks, keep=layers)
        _, base = model.run(np.zeros_like(toks), keep=layers)
        target = int(lp.argmax()) if targets is None else int(targets[p])
        target_tokens[p], target_lp[p] = target, float(lp[target])
        for L in layers:
            a, b = states[L].act, base[L].act
            delta = a - b
            grad_sum = torch.zeros_like(a)
            for start in range(0, n_points, batch):
                al = torch.as_tensor(alphas[start:start + batch], dtype=a.dtype, device=a.device)
                wt = torch.as_tensor(weights[start:start + batch], dtype=a.dtype, device=a.device)
                path = (b[None] + al[:, None, None] * delta[None]).requires_grad_(True)
                f = model.logprob_from_act(L, states[L], path, target)
                (g,) = torch.autograd.grad((f * wt).sum(), path)
                grad_sum += g.sum(0)
            attr[L][p] = (delta * grad_sum).sum(0).double().cpu().numpy()
            with torch.no_grad():
                ends = model.logprob_from_act(L, states[L], torch.stack([a, b]), target)
            real[L][p] = float(ends[0] - ends[1])
        if progress:
            progress(p + 1, len(tokens))
    out = Attribution("ig", target_tokens, target_lp, n_points=n_points)
    for L in layers:
        out.layers[L] = LayerAttribution(L, attr[L], real[L], attr[L].sum(axis=1) - real[L])
    out.seconds = time.perf_counter() - t0
    return out


def _tokens(model_path, prompts) -> list[np.ndarray]:
    if all(not isinstance(p, str) for p in prompts):
        return [np.asarray(p, dtype=np.int64) for p in prompts]
    with Vocab(model_path) as vocab:
        return [np.asarray(vocab.tokenize(p), dtype=np.int64) if isinstance(p, str) else np.asarray(p, np.int64)
                for p in prompts]
