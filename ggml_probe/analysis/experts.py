"""Streaming neuron statistics of mixture-of-experts layers: per expert, over the tokens routed to it.

Pure NumPy. Each expert's neurons get the dense path's statistics (analysis.neurons: moments, dead,
top activations), counted over the tokens the router sent to that expert only; each layer also counts
how often each expert was routed (among a token's top k, and as its first choice) and keeps each token's
top-k set (routing_agreement compares two runs' sets).

A layer's experts are also seen as one layer of n_expert · n_ff neurons, neuron id = expert · n_ff + i
(`ExpertLayerStats`, `ExpertTopActivations`), so the dense run's files (neurons.json's per-layer
entries, neuron_stats.npz) and every comparison built on them apply unchanged. An expert no token was
routed to has no statistics: its neurons are neither dead nor alive (counted as `unrouted`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ProbeError
from .neurons import NeuronStats, TopActivations, load_state, save_state


ROUTE_FIELDS = ("prompt", "pos", "sets")  # ExpertAccumulator.routes, as arrays of a state or neuron_stats.npz


def routing_agreement(ref: Sequence[np.ndarray], level: Sequence[np.ndarray],
                      prompts: Sequence[int] | None = None) -> dict[str, Any]:
    """The share of tokens routed to the same set of top-k experts in two runs of one layer.

    ref, level: (prompt, position, sorted top-k experts) per token (ExpertAccumulator.routes); tokens
    are matched by (prompt, position), only in `prompts` when given (those both runs decoded alike).
    Returns {"share": matching / compared (None when none compared), "tokens": compared}.
    """
    keyed = []
    for prompt, pos, sets in (ref, level):
        prompt, pos, sets = np.asarray(prompt, np.int64), np.asarray(pos, np.int64), np.asarray(sets)
        keep = np.isin(prompt, np.asarray(list(prompts), dtype=np.int64)) if prompts is not None else slice(None)
        keyed.append(((prompt[keep] << 32) | pos[keep], sets[keep]))
    (ref_keys, ref_sets), (keys, sets) = keyed
    _, i, j = np.intersect1d(ref_keys, keys, assume_unique=True, return_indices=True)
    if not len(i):
        return {"share": None, "tokens": 0}
    same = np.all(ref_sets[i] == sets[j], axis=1)
    return {"share": float(same.mean()), "tokens": int(len(i))}


class ExpertLayerStats:
    """One (definition, layer): a NeuronStats per expert, read as one vector of n_expert · n_ff neurons."""

    def __init__(self, n_expert: int, n_ff: int) -> None:
        self.n_ff = int(n_ff)
        self.experts = [NeuronStats(n_ff) for _ in range(n_expert)]
        self.count = 0  # tokens of the layer (each routed to n_expert_used experts)

    def _cat(self, field: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(s, field), dtype=np.float64) for s in self.experts])

    @property
    def routed(self) -> np.ndarray:
        """Tokens each expert's statistics cover."""
        return np.asarray([s.count for s in self.experts], dtype=np.int64)

    @property
    def seen(self) -> np.ndarray:
        """Per neuron: its expert was routed at least once."""
        return np.repeat(self.routed > 0, self.n_ff)

    mean = property(lambda self: self._cat("mean"))
    variance = property(lambda self: self._cat("variance"))
    min = property(lambda self: self._cat("min"))
    max = property(lambda self: self._cat("max"))
    maxabs = property(lambda self: self._cat("maxabs"))
    fraction_positive = property(lambda self: self._cat("fraction_positive"))

    def dead(self, tau: float = 0.1) -> np.ndarray:
        """Ids (expert · n_ff + i) of routed experts' neurons whose every value lies in (−tau, tau)."""
        return np.concatenate([e * self.n_ff + s.dead(tau) for e, s in enumerate(self.experts)]).astype(np.int64)

    def dead_per_expert(self, tau: float = 0.1) -> list[int]:
        return [int(len(s.dead(tau))) for s in self.experts]


class ExpertTopActivations:
    """One (definition, layer)'s top activations per expert, addressed by flat neuron id."""

    def __init__(self, n_expert: int, n_ff: int, k: int, by: str = "value") -> None:
        self.n_ff = int(n_ff)
        self.experts = [TopActivations(n_ff, k, by) for _ in range(n_expert)]

    def for_neuron(self, j: int) -> list[tuple[float, int, int]]:
        expert, i = divmod(int(j), self.n_ff)
        return self.experts[expert].for_neuron(i)


class ExpertAccumulator:
    """Per-expert neuron statistics and routing counts for several MoE layers; the state of a neuron run.

    update(layer, definition, values, experts, layout) takes values (n_tokens, n_expert_used, n_ff) and
    experts (n_tokens, n_expert_used), slot j of token t belonging to expert experts[t, j] (engine
    MoECapture's consumer); update_routing(layer, experts, layout) counts the routing once per batch.
    Redundancy (pairwise correlations) is not accumulated for experts.
    """

    redundancy = False

    def __init__(self, layers: Sequence[int], definitions: Sequence[str], n_expert: int, n_expert_used: int,
                 n_ff: int, *, top_k: int = 10, top_by: str = "value") -> None:
        self.layers = [int(x) for x in layers]
        self.definitions = list(dict.fromkeys(definitions))
        self.n_expert, self.n_expert_used, self.n_ff_expert = int(n_expert), int(n_expert_used), int(n_ff)
        self.top_k, self.top_by = int(top_k), top_by
        keys = [(d, layer) for d in self.definitions for layer in self.layers]
        self.stats = {k: ExpertLayerStats(self.n_expert, self.n_ff_expert) for k in keys}
        self.top = ({k: ExpertTopActivations(self.n_expert, self.n_ff_expert, self.top_k, top_by) for k in keys}
                    if self.top_k else {})
        self.routed = {layer: np.zeros(self.n_expert, dtype=np.int64) for layer in self.layers}  # in a token's top k
        self.first = {layer: np.zeros(self.n_expert, dtype=np.int64) for layer in self.layers}  # its first choice
        self.tokens = {layer: 0 for layer in self.layers}
        # per token, its top-k experts as a sorted set, by (prompt, position): the routing another level is
        # compared with (routing_agreement)
        self.token_routes: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
            layer: [] for layer in self.layers}
        self.n_prompts = 0

    @property
    def n_ff(self) -> int:
        """Neurons of a layer seen as one: every expert's."""
        return self.n_expert * self.n_ff_expert

    def update_routing(self, layer: int, experts: np.ndarray, layout) -> None:
        layer = int(layer)
        if layer not in self.routed:
            raise ProbeError(f"no routing counts for layer {layer}")
        experts = np.asarray(experts, dtype=np.int64)
        if experts.ndim != 2 or experts.shape[1] != self.n_expert_used:
            raise ProbeError(f"expected routing shaped (tokens, {self.n_expert_used}), got {experts.shape}")
        self.routed[layer] += np.bincount(experts.ravel(), minlength=self.n_expert)
        if len(experts):
            self.first[layer] += np.bincount(experts[:, 0], minlength=self.n_expert)
        self.tokens[layer] += len(experts)
        self.token_routes[layer].append((np.asarray(layout.row_prompt, dtype=np.int64),
                                         np.asarray(layout.row_pos, dtype=np.int64),
                                         np.sort(experts, axis=1).astype(np.int32)))
        if len(layout.row_prompt):
            self.n_prompts = max(self.n_prompts, int(np.max(layout.row_prompt)) + 1)

    def update(self, layer: int, definition: str, values: np.ndarray, experts: np.ndarray, layout) -> None:
        key = (definition, int(layer))
        if key not in self.stats:
            raise ProbeError(f"no accumulator for {definition} at layer {layer}")
        values = np.asarray(values, dtype=np.float64)
        experts = np.asarray(experts, dtype=np.int64)
        if values.shape != (*experts.shape, self.n_ff_expert):
            raise ProbeError(f"expert values {values.shape} do not match routing {experts.shape} × {self.n_ff_expert}")
        stats = self.stats[key]
        stats.count += len(experts)
        row_prompt, row_pos = np.asarray(layout.row_prompt), np.asarray(layout.row_pos)
        for e in np.unique(experts):
            rows, slots = np.nonzero(experts == e)  # a token picks an expert at most once: rows are distinct
            x = values[rows, slots]
            stats.experts[e].update(x)
            if self.top_k:
                self.top[key].experts[e].update(x, row_prompt[rows], row_pos[rows])

    # -------------------------------------------------------------- results
    def routing_summary(self, layer: int) -> dict[str, Any]:
        """How often each expert was routed at one layer: counts, shares of the token-slots, first choices."""
        routed, n = self.routed[int(layer)], self.tokens[int(layer)]
        slots = max(int(routed.sum()), 1)
        return {"tokens": int(n), "routed": [int(c) for c in routed], "first_choice": [int(c) for c in self.first[int(layer)]],
                "share": [float(c) / slots for c in routed], "unrouted": int(np.sum(routed == 0))}

    def routes(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One layer's routing per token: (prompt, position, sorted top-k experts (tokens, k)), by prompt and
        position."""
        parts = self.token_routes[int(layer)]
        if not parts:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, self.n_expert_used), np.int32))
        prompt, pos, sets = (np.concatenate(x) for x in zip(*parts))
        order = np.lexsort((pos, prompt))
        return prompt[order], pos[order], sets[order]

    # -------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        meta = {"kind": "experts", "layers": self.layers, "definitions": self.definitions, "n_expert": self.n_expert,
                "n_expert_used": self.n_expert_used, "n_ff_expert": self.n_ff_expert, "top_k": self.top_k,
                "top_by": self.top_by, "n_prompts": self.n_prompts, "format": 2}
        out: dict[str, np.ndarray] = {"meta": np.asarray(json.dumps(meta))}
        for layer in self.layers:
            out[f"routing/{layer}/routed"] = self.routed[layer]
            out[f"routing/{layer}/first"] = self.first[layer]
            out[f"routing/{layer}/tokens"] = np.asarray(self.tokens[layer])
            for name, values in zip(ROUTE_FIELDS, self.routes(layer)):
                out[f"routing/{layer}/{name}"] = values
        for (d, layer), s in self.stats.items():
            out[f"{d}/{layer}/count"] = np.asarray(s.count)
            for e, es in enumerate(s.experts):
                prefix = f"{d}/{layer}/{e}/"
                out.update({prefix + "stats." + k: v for k, v in es.arrays().items()})
                if self.top_k:
                    out.update({prefix + "top." + k: v for k, v in self.top[(d, layer)].experts[e].arrays().items()})
        return out

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "ExpertAccumulator":
        meta = json.loads(str(state["meta"]))
        if meta.get("kind") != "experts":
            raise ProbeError("not a mixture-of-experts neuron state")
        out = cls(meta["layers"], meta["definitions"], meta["n_expert"], meta["n_expert_used"], meta["n_ff_expert"],
                  top_k=0, top_by=meta["top_by"])
        out.top_k, out.n_prompts = meta["top_k"], meta["n_prompts"]

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        for layer in out.layers:
            out.routed[layer] = np.array(state[f"routing/{layer}/routed"])
            out.first[layer] = np.array(state[f"routing/{layer}/first"])
            out.tokens[layer] = int(state[f"routing/{layer}/tokens"])
            if f"routing/{layer}/sets" in state:  # format 1 states did not keep the tokens' routes
                out.token_routes[layer] = [tuple(np.array(state[f"routing/{layer}/{n}"]) for n in ROUTE_FIELDS)]
        for d in out.definitions:
            for layer in out.layers:
                key = (d, layer)
                out.stats[key].count = int(state[f"{d}/{layer}/count"])
                out.stats[key].experts = [NeuronStats.from_arrays(part(f"{d}/{layer}/{e}/stats."))
                                          for e in range(out.n_expert)]
                if out.top_k:
                    top = ExpertTopActivations(out.n_expert, out.n_ff_expert, out.top_k, out.top_by)
                    top.experts = [TopActivations.from_arrays(part(f"{d}/{layer}/{e}/top.")) for e in range(out.n_expert)]
                    out.top[key] = top
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return save_state(path, self.state())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertAccumulator":
        return load_state(path, cls.from_state, "a mixture-of-experts neuron-state file")
