"""Shared pieces of the reference study's own stack (transformers fp32 + forward hooks + Captum IG).

Used by scripts/paper_stack.py (timing) and scripts/validate_attribution.py (fidelity). Everything
runs on the demo model's F16 GGUF, which transformers dequantizes to fp32, so both stacks see the
same weights. torch, transformers and captum are imported inside the functions (optional extras).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# transformers' GGUF dequantizer draws a tqdm bar; tqdm reads this when it is first imported
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
BOOLQ = Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared")) / "data" / "boolq_validation.jsonl"
PAPER_TEMPLATE = "Respond with True or False only.\n{question}\nAnswer:"
PAPER_LAYERS = (0, 14, 29)
F16_DIR = Path(os.environ.get("GGML_PROBE_BENCH_DIR", "/tmp/ggml-probe-bench"))


def boolq_prompts(n: int, path: Path = BOOLQ) -> list[str]:
    """The first n BoolQ validation questions in the paper's question-only template."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return [PAPER_TEMPLATE.format(question=r["question"]) for r in rows]


def demo_f16(out_dir: Path = F16_DIR) -> Path:
    """The demo model as an F16 GGUF (made once with ggml-probe's quantizer, then reused)."""
    from ggml_probe.models.quantize import quantize_ladder
    from ggml_probe.models.store import demo_model_path

    out_dir.mkdir(parents=True, exist_ok=True)
    (res,) = quantize_ladder(demo_model_path(), ["F16"], out_dir=out_dir, allow_requantize=True, skip_existing=True)
    return Path(res.path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def versions() -> dict:
    import captum
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "captum": captum.__version__}


def load_transformers(gguf_path: Path, threads: int):
    """(model, tokenizer) from a GGUF file through transformers' own GGUF loader, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)  # IG needs gradients w.r.t. the layer output only
    return model, tokenizer


def act_module(model, layer: int):
    """The act neurons of a layer: the output of the MLP's activation, SiLU(gate) for llama."""
    return model.model.layers[layer].mlp.act_fn


def encode(tokenizer, prompt: str):
    import torch

    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def last_logprobs(model, input_ids):
    """log p(· | prompt) at the last position, shape (batch, vocab)."""
    import torch

    logits = model(input_ids=input_ids, use_cache=False).logits[:, -1, :]
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class CaptumLayerIG:
    layer: int
    target: int
    attributions: np.ndarray  # (n_ff,): summed over positions (only the last reaches the answer at the last layer)
    per_position: np.ndarray  # (seq, n_ff)
    logprob_input: float  # log p(target | prompt)
    logprob_swapped: float  # log p(target | prompt, this layer's act := the baseline's at every position)
    seconds: float

    @property
    def real_change(self) -> float:
        return self.logprob_input - self.logprob_swapped

    @property
    def completeness_error(self) -> float:
        return float(self.attributions.sum()) - self.real_change


def captum_layer_ig(model, input_ids, layer: int, target: int | None = None, n_steps: int = 50,
                    internal_batch_size: int | None = None) -> CaptumLayerIG:
    """Captum's LayerIntegratedGradients on one layer's act output, the paper's setting.

    Baseline: every token id 0; target: log p(answer token) at the last position, the answer being
    the model's own argmax unless given. Completeness is measured against the real change of the
    target log-prob when this layer's act is replaced by the baseline run's (the path's start point).
    """
    import torch
    from captum.attr import LayerIntegratedGradients

    module = act_module(model, layer)
    baseline_ids = torch.zeros_like(input_ids)
    with torch.no_grad():
        lp = last_logprobs(model, input_ids)[0]
    if target is None:
        target = int(lp.argmax())

    def forward(ids):
        return last_logprobs(model, ids)

    t0 = time.perf_counter()
    lig = LayerIntegratedGradients(forward, module)
    attr = lig.attribute(input_ids, baselines=baseline_ids, target=target, n_steps=n_steps,
                         method="gausslegendre", internal_batch_size=internal_batch_size)
    seconds = time.perf_counter() - t0
    per_position = attr.detach()[0].double().numpy()

    # The path's start point: this layer's act taken from the all-token-0 run, everything else the prompt's.
    captured = {}
    h = module.register_forward_hook(lambda m, i, o: captured.__setitem__("act", o.detach().clone()))
    with torch.no_grad():
        model(input_ids=baseline_ids, use_cache=False)
    h.remove()
    h = module.register_forward_hook(lambda m, i, o: captured["act"])
    with torch.no_grad():
        lp_swapped = last_logprobs(model, input_ids)[0]
    h.remove()
    return CaptumLayerIG(layer, target, per_position.sum(axis=0), per_position, float(lp[target]),
                         float(lp_swapped[target]), seconds)
