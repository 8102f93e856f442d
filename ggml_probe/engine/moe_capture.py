"""Mixture-of-experts FFNs in llama.cpp's graph: which experts each token was routed to, and each routed
expert's neurons.

llama.cpp's build_moe_ffn (src/llama-graph.cpp, vendored with llama-cpp-python 0.3.36) names, per layer L:
  ffn_moe_argsort-L  I32 [n_expert, n_tokens]: every expert, best first (ffn_moe_topk-L is a view of
                     its first n_expert_used, not contiguous: the argsort is read instead)
  ffn_moe_gate-L     F32 [n_ff_exp, n_expert_used, n_tokens]: each selected expert's gate projection
  ffn_moe_swiglu-L   F32 [n_ff_exp, n_expert_used, n_tokens]: SiLU(gate) · up, the input of the
                     expert's down projection
Slot j of token t belongs to expert argsort[t, j]. The two neuron definitions are the dense ones
(engine.ffn): `act` = SiLU(ffn_moe_gate) computed here in float64, `down_in` = ffn_moe_swiglu.

Typical use:

    capture = MoECapture(model_path, consumer, on_routing, layers="all")
    with Engine(model_path, eval_callback=capture.eval_callback) as engine:
        run_checked(engine, capture, token_arrays)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import BadModelFile, ProbeError, UnsupportedArchitecture
from ..formats.gguf import validate_gguf
from ..layerspec import resolve_layers
from .ffn import ACT_FUNCTIONS, DEFINITIONS, MOE_ACT, SUPPORTED_MOE_TEXT, check_definitions
from .probes import BatchLayout, DeferredCapture, TensorReader


@dataclass(frozen=True)
class ModelMoE:
    """What the capture needs to know about a mixture-of-experts GGUF model."""

    path: str
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_ff: int  # one expert's FFN width
    n_embd: int
    act_fn: str


def _field_int(value) -> int | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedArchitecture("per-layer expert settings differ between layers; not supported")
        value = value[0]
    return int(value)


@lru_cache(maxsize=16)
def _model_moe_cached(path: str, mtime: float) -> ModelMoE | None:
    summary = validate_gguf(path, for_llama=False)
    arch = summary.architecture
    if not arch:
        raise BadModelFile(f"{path}: no general.architecture in the GGUF metadata")
    n_expert = _field_int(summary.value(f"{arch}.expert_count"))
    if not n_expert:
        return None
    if arch not in MOE_ACT:
        raise UnsupportedArchitecture(f"{arch}: the per-expert neuron capture supports mixture-of-experts models of "
                                      f"{SUPPORTED_MOE_TEXT}")
    names = {t.name for t in summary.tensors}
    if any("_shexp." in n for n in names):
        raise UnsupportedArchitecture(f"{arch}: shared experts are not supported by the per-expert neuron capture")
    n_ff = _field_int(summary.value(f"{arch}.expert_feed_forward_length")) or \
        _field_int(summary.value(f"{arch}.feed_forward_length"))
    n_layer = _field_int(summary.value(f"{arch}.block_count"))
    n_used = _field_int(summary.value(f"{arch}.expert_used_count"))
    if n_layer is None or n_ff is None or not n_used:
        raise BadModelFile(f"{path}: missing {arch}.block_count, feed_forward_length or expert_used_count")
    return ModelMoE(path, arch, n_layer, n_expert, n_used, n_ff,
                    _field_int(summary.value(f"{arch}.embedding_length")) or 0, MOE_ACT[arch])


def model_moe(path: str | os.PathLike) -> ModelMoE | None:
    """The model's experts (metadata only), or None for a dense model."""
    p = Path(path)
    return _model_moe_cached(str(p.resolve()), p.stat().st_mtime)


# consumer(layer, definition, values (n_tokens, n_expert_used, n_ff) float64, experts (n_tokens,
# n_expert_used) int64, layout); on_routing(layer, experts, layout) once per layer and batch.
ExpertConsumer = Callable[[int, str, np.ndarray, np.ndarray, BatchLayout], None]
RoutingConsumer = Callable[[int, np.ndarray, BatchLayout], None]


class MoECapture(DeferredCapture):
    """Hands each chosen layer's routed experts and their neurons to a consumer, batch by batch.

    Runs with all_outputs=True when it reads the last layer: that layer's FFN then covers every token. A
    shared prefix is not handled (shares_prefix False): run_checked decodes each prompt whole. The
    consumers run between decodes (DeferredCapture), a layer's routing before its neurons.
    """

    def __init__(self, model_path: str | os.PathLike, consumer: ExpertConsumer, on_routing: RoutingConsumer,
                 layers: str | Sequence[int] = "all", definitions: Sequence[str] = DEFINITIONS) -> None:
        super().__init__()
        model = model_moe(model_path)
        if model is None:
            raise ProbeError(f"{model_path}: not a mixture-of-experts model (no expert_count in its metadata)")
        self.model = model
        self.layers = resolve_layers(layers, model.n_layer)
        self.definitions = check_definitions(definitions)
        self.consumer = consumer
        self.on_routing = on_routing
        self.wanted: dict[str, tuple[str, int]] = {}  # graph name → (what, layer)
        sources = {"act": "ffn_moe_gate", "down_in": "ffn_moe_swiglu"}
        for layer in self.layers:
            self.wanted[f"ffn_moe_argsort-{layer}"] = ("routing", layer)
            for d in self.definitions:
                self.wanted[f"{sources[d]}-{layer}"] = (d, layer)
        self._experts: dict[int, np.ndarray] = {}  # this batch's routing per layer

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.wanted)

    def stop_names(self) -> Sequence[str]:
        return self.tensor_names

    @property
    def reaches_last_layer(self) -> bool:
        return self.model.n_layer - 1 in self.layers  # its FFN tensors follow the layer's attention

    @property
    def needs_all_outputs(self) -> bool:
        return self.reaches_last_layer

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def _copy_out(self, t: int, name: str, layout: BatchLayout) -> np.ndarray:
        what, _ = self.wanted[name]
        k = self.model.n_expert_used
        if what == "routing":
            experts = read_routing(self.reader, t, self.model)
            if len(experts) != layout.n_rows:
                raise ProbeError(f"{name} holds {len(experts)} tokens for a batch of {layout.n_rows}: "
                                 "run the engine with all_outputs=True")
            return experts
        raw = self.reader.read_new(t)
        if raw.shape != (layout.n_rows * k, self.model.n_ff):
            raise ProbeError(f"{name} holds {raw.shape} for {layout.n_rows} tokens × {k} experts × "
                             f"{self.model.n_ff} neurons")
        return raw

    def _consume(self, name: str, copied: np.ndarray, layout: BatchLayout) -> None:
        what, layer = self.wanted[name]
        if what == "routing":
            self._experts[layer] = copied
            self.on_routing(layer, copied, layout)
            return
        experts = self._experts.get(layer)
        if experts is None or len(experts) != layout.n_rows:
            raise ProbeError(f"{name} arrived before this batch's ffn_moe_argsort-{layer}")
        values = copied.reshape(layout.n_rows, self.model.n_expert_used, self.model.n_ff)
        values = ACT_FUNCTIONS[self.model.act_fn](values) if what == "act" else values.astype(np.float64)
        self.consumer(layer, what, values, experts, layout)


def read_routing(reader: TensorReader, t: int, model: ModelMoE) -> np.ndarray:
    """ffn_moe_argsort-L as each token's routed experts, best first: (n_tokens, n_expert_used) int64."""
    order = reader.read_i32(t)
    if order.shape[1] != model.n_expert:
        raise ProbeError(f"{reader.name(t)} orders {order.shape[1]} experts; the model has {model.n_expert}")
    return order[:, : model.n_expert_used].astype(np.int64)
