"""What every attribution method returns: per layer, attributions and (for integrals) completeness."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..analysis.salient import summarise_salient

# An example's integral has converged when Σ attr is within this of the real change (nats)...
COMPLETENESS_ABS = 0.01
# ...plus this fraction of the real change's size.
COMPLETENESS_REL = 0.05


def converged(error: np.ndarray, real_change: np.ndarray) -> np.ndarray:
    return np.abs(error) <= COMPLETENESS_ABS + COMPLETENESS_REL * np.abs(real_change)


@dataclass
class LayerAttribution:
    layer: int
    attributions: np.ndarray  # (n_prompts, n_ff), summed over positions
    real_change: np.ndarray | None  # (n_prompts,) f(a) − f(b): the layer's act swapped for the baseline's
    completeness_error: np.ndarray | None  # (n_prompts,) Σ attr − real_change; None: not an integral (dla)

    @property
    def converged(self) -> np.ndarray | None:
        if self.completeness_error is None:
            return None
        return converged(self.completeness_error, self.real_change)

    def salient(self, threshold: float = 0.7):
        return summarise_salient(self.attributions, threshold)


@dataclass
class Attribution:
    method: str
    target_tokens: np.ndarray  # (n_prompts,)
    target_logprob: np.ndarray  # (n_prompts,) log p(target | prompt) from the attributing model
    layers: dict[int, LayerAttribution] = field(default_factory=dict)
    n_points: int = 50
    seconds: float = 0.0
    llama_real_change: np.ndarray | None = None  # exact method: the swap done inside llama.cpp, as a check
