"""Every architecture family, proven on a tiny random-weight model built with transformers.

Per family: a 2-layer, hidden-64 model (random weights large enough that norms, soft-caps and attention
visibly shape the logits), saved, converted to GGUF at F32 by `convert`, then

- llama.cpp's logits equal transformers' (the conversion is right),
- the captured `act` / `down_in` equal transformers' hooks on the MLP's activation / down_proj's input,
- `ig` (torch on the GGUF's weights) equals integrated gradients by autograd on the transformers model,
- the exact last layer (llama.cpp passes + closed form) agrees with `ig` (Spearman ≥ 0.999),
- `dla` at the last layer equals autograd through the transformers model's head,
- the ablation check (neurons zeroed inside llama.cpp) equals the same ablation in transformers.

Sequences are longer than the sliding window (8) so that Gemma 2/3's local attention matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from test_convert import byte_level_tokenizer, llama_logits, randomise, sentencepiece_tokenizer, set_rope

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ggml_probe.attribution import attribute  # noqa: E402
from ggml_probe.attribution.ablation import ablation_effect  # noqa: E402
from ggml_probe.analysis.salient import integrated_gradients as closed_form_ig  # noqa: E402
from ggml_probe.attribution.exact import last_layer_attribution  # noqa: E402
from ggml_probe.attribution.passes import read_last_layer_head  # noqa: E402
from ggml_probe.attribution.ig import integrated_gradients  # noqa: E402
from ggml_probe.attribution.torch_model import TorchModel  # noqa: E402
from ggml_probe.models.convert import convert_hf_to_gguf  # noqa: E402

HIDDEN, N_FF, N_LAYER, WINDOW = 64, 96, 2, 8
FAMILIES = ("mistral", "gemma", "gemma2", "gemma3", "phi3", "phi2", "qwen2", "qwen3")
# the families every attribution test covers
ATTRIBUTED = ("mistral", "gemma", "gemma2", "gemma3", "phi3", "phi2", "qwen2", "qwen3")
QUICK = ("gemma2",)  # the quick subset's family; the others are slow-marked


def family_params(families=FAMILIES):
    return [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in families]


def _config(family: str, n_vocab: int, tokenizer):
    common = dict(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh",
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    if family == "mistral":  # llama.cpp runs Mistral as llama; SentencePiece vocabulary
        config = transformers.MistralConfig(head_dim=16, sliding_window=None, bos_token_id=1, eos_token_id=2,
                                            tie_word_embeddings=False, **common)
        set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
        return config, transformers.MistralForCausalLM
    if family == "gemma":
        config = transformers.GemmaConfig(**gemma, **common)
        set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
        return config, transformers.GemmaForCausalLM
    if family == "gemma2":
        # soft-caps small enough to bend these random logits and attention scores
        config = transformers.Gemma2Config(sliding_window=WINDOW, attn_logit_softcapping=5.0,
                                           final_logit_softcapping=5.0, **gemma, **common)
        set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
        return config, transformers.Gemma2ForCausalLM
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(sliding_window=WINDOW, layer_types=["sliding_attention",
                                                                                   "full_attention"], **gemma, **common)
        config.rope_parameters = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "default", "rope_theta": 1000.0}}
        config.architectures = ["Gemma3ForCausalLM"]
        return config, transformers.Gemma3ForCausalLM
    if family == "phi3":  # fused qkv_proj and gate_up_proj; partial rotary
        config = transformers.Phi3Config(sliding_window=None, partial_rotary_factor=0.5, tie_word_embeddings=False,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=2, **common)
        set_rope(config, {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5})
        return config, transformers.Phi3ForCausalLM
    if family == "phi2":  # LayerNorm with biases, parallel attention and FFN, partial rotary, lm_head bias
        config = transformers.PhiConfig(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=N_FF,
                                        num_hidden_layers=N_LAYER, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=256, layer_norm_eps=1e-5, hidden_act="gelu_new",
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        set_rope(config, {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5})
        return config, transformers.PhiForCausalLM
    if family == "qwen2":  # q/k/v biases, NEOX rope, untied output
        config = transformers.Qwen2Config(use_sliding_window=False, tie_word_embeddings=False, **common)
        set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
        return config, transformers.Qwen2ForCausalLM
    if family == "qwen3":  # per-head q/k RMSNorms, no biases, head_dim ≠ hidden / heads (as Qwen3-0.6B), tied
        config = transformers.Qwen3Config(head_dim=32, use_sliding_window=False, tie_word_embeddings=True, **common)
        set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
        return config, transformers.Qwen3ForCausalLM
    raise ValueError(family)


@dataclass
class Family:
    name: str
    hf: Path
    gguf: Path
    model_class: type
    token_ids: list[int]
    reference_logits: np.ndarray  # transformers float32 at every position (with llama.cpp's CPU GELU)

    def load(self, dtype=None, ggml_gelu: bool = False):
        model = self.model_class.from_pretrained(self.hf, dtype=dtype or torch.float64,
                                                 attn_implementation="eager").eval()
        if ggml_gelu and self.name in GELU_FAMILIES:
            for layer in model.model.layers:
                setattr(layer.mlp, "act_fn" if hasattr(layer.mlp, "act_fn") else "activation_fn", GGMLTableGELU())
        return model


GELU_FAMILIES = {"gemma", "gemma2", "gemma3", "phi2"}


def act_module(mlp):
    """The MLP's activation module (Phi-3 calls it activation_fn)."""
    return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn


def down_module(mlp):
    """The MLP's down projection (Phi-2 calls it fc2, with a bias)."""
    return mlp.down_proj if hasattr(mlp, "down_proj") else mlp.fc2


def final_norm(model):
    """The final norm (Phi-2: a LayerNorm called final_layernorm)."""
    return model.model.norm if hasattr(model.model, "norm") else model.model.final_layernorm


def captured_act(family: str):
    """act as ggml-probe reads it from llama.cpp: the activation function applied here in float64 to the
    captured gate (exact GELU or SiLU); for Phi-2, without a gate, llama.cpp's own GELU output (its table)."""
    if family == "phi2":
        return GGMLTableGELU()
    if family in GELU_FAMILIES:
        return lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    return torch.nn.functional.silu


class GGMLTableGELU(torch.nn.Module):
    """GELU as llama.cpp's CPU backend computes it (ggml-cpu/vec.h, GGML_GELU_FP16): the input rounded to
    fp16, looked up in a table of fp16-rounded tanh-GELU values; x ≤ −10 → 0, x ≥ 10 → x. Its error
    (~1e-3 relative) is llama.cpp's, so a reference that compares llama.cpp's GEGLU output or logits
    at 1e-4 must use it; `act` is computed by ggml-probe from the captured gate in float64 and is
    compared with transformers' exact GELU instead."""

    def forward(self, x):
        x32 = x.to(torch.float16).to(torch.float32)
        y = 0.5 * x32 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * x32 * (1.0 + 0.044715 * x32 * x32)))
        y = y.to(torch.float16).to(torch.float32)
        y = torch.where(x <= -10.0, torch.zeros_like(y), torch.where(x >= 10.0, x.to(torch.float32), y))
        return y.to(x.dtype)


def build(family: str, root: Path) -> Family:
    # llama.cpp gives special tokens of models *named* phi3 / phi-3 attributes by looking up "<|endoftext|>",
    # which this tiny SentencePiece vocabulary lacks (llama-vocab.cpp): the phi3 folder is named otherwise
    folder = root / ("tiny-p3" if family == "phi3" else f"tiny-{family}")
    # SentencePiece where the real models use it (llama.cpp also refuses a phi3 file with a BPE vocabulary)
    spm = family in ("mistral", "phi3")
    tokenizer = sentencepiece_tokenizer(folder) if spm else byte_level_tokenizer(
        "qwen2" if family.startswith("qwen") else "smollm")
    config, model_class = _config(family, len(tokenizer), tokenizer)
    torch.manual_seed(0)
    model = model_class(config).eval()
    randomise(model, seed=FAMILIES.index(family))
    if family in ("gemma", "gemma2", "gemma3"):
        # the tied embedding makes the logits ~10× the untied ones: a final norm of (1 + w) ≈ 0.2 keeps the
        # answer's probability (and Gemma 2's soft-cap) out of saturation, where every gradient vanishes
        with torch.no_grad():
            model.model.norm.weight.copy_(-0.8 + 0.05 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gguf_path = convert_hf_to_gguf(folder, root / f"tiny-{family}-f32.gguf", outtype="f32")
    ids = [int(i) for i in np.random.default_rng(1).integers(3, len(tokenizer), size=20)]
    fam = Family(family, folder, gguf_path, model_class, ids, np.zeros(0))
    with torch.no_grad():
        fam.reference_logits = fam.load(torch.float32, ggml_gelu=True)(torch.tensor([ids])).logits[0].numpy()
    return fam


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    built: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in built:
            built[name] = build(name, root)
        return built[name]

    return get


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------ conversion


@pytest.mark.parametrize("family", family_params())
def test_converted_logits_equal_transformers(families, family):
    fam = families(family)
    ours = llama_logits(fam.gguf, fam.token_ids)
    ref = fam.reference_logits
    assert ref.std() > 1.0 and np.abs(ref[1:] - ref[:-1]).max() > 1.0  # the comparison means something
    diff = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"{family}: f32 max |llama.cpp − transformers| logits / max |logit| = {diff:.3g} "
          f"(logit std {ref.std():.2f}, max {np.abs(ref).max():.1f})")
    # f32 throughout; what is left is f32 rounding, and for GELU models fp16-table entries that round
    # the other way where f32 gate values differ in their last bits
    assert diff < 2e-4


# ------------------------------------------------------------------ neuron capture


def transformers_ffn(model, token_ids: list[int], exact_act) -> dict[str, dict[int, np.ndarray]]:
    """act = exact_act(mlp.act_fn's input) (transformers' own activation function, in float64) and
    down_in = down_proj's input, per layer, (tokens, n_ff)."""
    out: dict[str, dict[int, np.ndarray]] = {"act": {}, "down_in": {}}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(act_module(layer.mlp).register_forward_hook(
            lambda _m, inp, _o, i=i: out["act"].__setitem__(i, exact_act(inp[0][0].double()).numpy().copy())))
        hooks.append(down_module(layer.mlp).register_forward_pre_hook(
            lambda _m, inp, i=i: out["down_in"].__setitem__(i, inp[0][0].double().numpy().copy())))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for h in hooks:
        h.remove()
    return out


def llama_capture(gguf_path: Path, token_ids: list[int]) -> dict:
    from ggml_probe.engine.model import Engine
    from ggml_probe.engine.probes import FFNCapture, run_checked

    got: dict = {}

    def keep(layer, definition, values, layout):
        got[(definition, layer)] = values[: len(token_ids)].copy()

    capture = FFNCapture(gguf_path, keep, layers="all")
    with Engine(gguf_path, n_ctx=128, n_threads=2, kv_type=0, hidden_states=False,
                eval_callback=capture.eval_callback) as engine:
        run_checked(engine, capture, [np.asarray(token_ids, dtype=np.int32)])
    return got


@pytest.mark.parametrize("family", family_params())
def test_captured_neurons_equal_transformers_hooks(families, family):
    """Every layer, every token, both definitions, against transformers run with llama.cpp's CPU GELU
    (so that later layers see the same inputs): down_in = its GEGLU/SwiGLU output; act = transformers'
    own activation function (exact tanh-GELU, SiLU) of its gate, as ggml-probe defines act."""
    fam = families(family)
    got = llama_capture(fam.gguf, fam.token_ids)
    model = fam.load(torch.float32, ggml_gelu=True)
    ref = transformers_ffn(model, fam.token_ids, captured_act(family))
    worst = 0.0
    for definition in ("act", "down_in"):
        for layer in range(N_LAYER):
            ours, theirs = got[(definition, layer)], ref[definition][layer]
            assert ours.shape == theirs.shape == (len(fam.token_ids), N_FF)
            assert np.abs(theirs).max() > 1.0
            rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
            worst_el = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
            worst = max(worst, rel)
            assert rel <= 1e-4, (definition, layer, rel)
            # element-wise: llama.cpp's table GELU (down_in of GELU models; Phi-2's act is the same tensor) can
            # look up the neighbouring fp16 entry where the f32 input differs from transformers' in its last bits
            # (which CPU kernels decide): one fp16 ulp, at most 2^-10 of the value, so of the largest one; such
            # flips stay rare, everything else within 1e-4
            table_gelu = family in GELU_FAMILIES and (definition == "down_in" or family == "phi2")
            off = np.abs(ours - theirs) > 1e-4 * np.abs(theirs).max()
            print(f"{family} {definition} {layer}: worst {worst_el:.2e}, {int(off.sum())} of {off.size} past 1e-4")
            assert worst_el <= (2.0 ** -10 + 1e-4 if table_gelu else 1e-4), (definition, layer, worst_el)
            assert off.mean() <= (0.01 if table_gelu else 0.0), (definition, layer, int(off.sum()))
    print(f"{family}: captured act/down_in ‖llama.cpp − transformers‖ / ‖x‖ ≤ {worst:.2e}")
    if family != "phi2":  # without a gate, act and down_in are the same tensor
        assert np.abs(got[("act", 1)] - got[("down_in", 1)]).max() > 0.1  # two different things


# ------------------------------------------------------------------ ig: the torch model and the integral


@pytest.mark.parametrize("family", family_params(ATTRIBUTED))
def test_torch_model_equals_transformers(families, family):
    """The GGUF's weights in ggml-probe's torch forward pass against transformers (float64, exact GELU):
    embedding scale, post-norms, soft-caps, sliding windows, per-layer rope bases, tied output."""
    fam = families(family)
    tm = TorchModel(fam.gguf, device="cpu", dtype="float64")
    model = fam.load()
    for n in (len(fam.token_ids), 7):  # longer and shorter than the sliding window
        ours, _ = tm.run(fam.token_ids[:n])
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([fam.token_ids[:n]])).logits[0, -1], -1).numpy()
        # float64 both sides; transformers computes its rope frequencies in float32 (as in test_attribution)
        assert np.abs(ours.numpy() - ref).max() < 1e-4, (n, np.abs(ours.numpy() - ref).max())


def transformers_layer_ig(model, token_ids: list[int], layer: int, target: int, n_points: int = 50) -> np.ndarray:
    """Captum's LayerIntegratedGradients on one layer's act_fn output by plain autograd on transformers:
    the act replaced at every position along the straight path from the all-token-0 prompt's act,
    summed over positions."""
    act_fn = act_module(model.model.layers[layer].mlp)
    seen = {}
    handle = act_fn.register_forward_hook(lambda _m, _i, out: seen.__setitem__("act", out.detach().clone()))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
        a = seen["act"][0]
        model(torch.zeros((1, len(token_ids)), dtype=torch.long))
        b = seen["act"][0]
    handle.remove()
    x, w = np.polynomial.legendre.leggauss(n_points)
    alphas, weights = torch.tensor((x + 1) / 2, dtype=a.dtype), torch.tensor(w / 2, dtype=a.dtype)
    points = (b[None] + alphas[:, None, None] * (a - b)[None]).requires_grad_(True)
    handle = act_fn.register_forward_hook(lambda _m, _i, _o: points)
    logp = torch.log_softmax(model(torch.tensor([token_ids] * n_points)).logits[:, -1], dim=-1)[:, target]
    logp.sum().backward()
    handle.remove()
    return ((a - b) * (weights[:, None, None] * points.grad).sum(0)).sum(0).numpy()


@pytest.mark.parametrize("family", family_params(ATTRIBUTED))
def test_ig_equals_autograd_on_transformers(families, family):
    fam = families(family)
    ids = fam.token_ids[:12]
    tm = TorchModel(fam.gguf, device="cpu", dtype="float64")
    ours = integrated_gradients(fam.gguf, [np.array(ids)], [0, 1], model=tm, n_points=50)
    target = int(ours.target_tokens[0])
    model = fam.load()
    for layer in (0, 1):
        ref = transformers_layer_ig(model, ids, layer, target)
        got = ours.layers[layer].attributions[0]
        assert np.abs(ref).max() > 1e-4  # float64 on both sides: far above rounding
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        print(f"{family} layer {layer}: ig max |ours − autograd| / max |attr| = "
              f"{np.abs(got - ref).max() / np.abs(ref).max():.2e}")


# ------------------------------------------------------------------ exact last layer, dla, ablation

PROMPT_SLICES = (slice(0, 12), slice(4, 20))  # two prompts, one longer than the sliding window


@pytest.mark.parametrize("family", family_params(ATTRIBUTED))
def test_exact_last_layer_agrees_with_ig(families, family):
    """The closed form from llama.cpp's passes (final norm, post-FFN norm, soft-cap, tied output as the
    GGUF holds them) against the torch integral on the same file and target."""
    fam = families(family)
    prompts = [np.array(fam.token_ids[s], dtype=np.int32) for s in PROMPT_SLICES]
    ig = attribute("ig", fam.gguf, prompts, [-1], threads=2, device="cpu")
    # an f32 KV cache, so that f32 weights mean f32 all through llama.cpp
    exact = last_layer_attribution(fam.gguf, prompts, targets=list(ig.target_tokens), n_threads=2, kv_type=0)
    last = N_LAYER - 1
    assert exact.layer == last
    tm = TorchModel(fam.gguf, device="cpu", dtype="float64")
    head = read_last_layer_head(fam.gguf, last)
    for p in range(len(prompts)):
        a, e = ig.layers[last].attributions[p], exact.attributions[p]
        rho = spearman(a, e)
        big = np.abs(e) > 0.01 * np.abs(e).max()
        rho_big = spearman(a[big], e[big])
        # the closed form fed the torch model's own last-layer state: the formula alone, no llama.cpp
        _, state = tm.run(prompts[p], keep=[last])
        _, base = tm.run(np.zeros_like(prompts[p]), keep=[last])
        closed = closed_form_ig(head, state[last].act[-1].numpy(), base[last].act[-1].numpy(),
                                state[last].up[-1].numpy(), state[last].residual[-1].numpy(),
                                int(ig.target_tokens[p])).attributions
        rho_closed = spearman(a, closed)
        print(f"{family} prompt {p}: exact vs ig Spearman {rho:.6f} (|attr| > 1% of max: {rho_big:.6f}), "
              f"max |Δ| / max |attr| {np.abs(a - e).max() / np.abs(e).max():.2e}; closed form on torch's "
              f"state vs ig: Spearman {rho_closed:.6f}, max |Δ| / max {np.abs(a - closed).max() / np.abs(a).max():.1e}")
        assert np.abs(e).max() > 1e-4
        assert rho_closed >= 0.999 and np.abs(a - closed).max() < 1e-4 * np.abs(a).max()  # ig runs in f32
        assert rho_big >= 0.999
        # Gemma: llama.cpp's fp16-table GELU in the earlier layer moves the last layer's inputs by
        # ~1e-4, enough to reorder neurons whose attributions are ~1e-3 of the largest
        assert rho >= (0.998 if family == "gemma" else 0.999)
        # llama.cpp computes GELU by fp16 table (earlier layers' outputs differ by ~1e-4); torch is exact f32
        assert np.abs(a - e).max() < 0.01 * np.abs(e).max()
    if family in GELU_FAMILIES:
        # what moves exact from ig is the model, not the method: autograd IG on transformers running
        # llama.cpp's fp16-table GELU before the last layer (in the last one exact applies exact GELU to the
        # captured gate, except Phi-2's, whose act is llama.cpp's GELU output) agrees on every neuron
        model = fam.load(ggml_gelu=True)
        if family != "phi2":
            model.model.layers[last].mlp.act_fn = torch.nn.GELU(approximate="tanh")
        for p in range(len(prompts)):
            ref = transformers_layer_ig(model, [int(t) for t in prompts[p]], last, int(ig.target_tokens[p]))
            rho_table = spearman(ref, exact.attributions[p])
            print(f"{family} prompt {p}: exact vs autograd IG with llama.cpp's GELU table before the last layer: "
                  f"Spearman {rho_table:.6f}, max |Δ| / max "
                  f"{np.abs(ref - exact.attributions[p]).max() / np.abs(ref).max():.1e}")
            assert rho_table >= 0.999 and np.abs(ref - exact.attributions[p]).max() < 1e-5 * np.abs(ref).max()
    assert np.abs(exact.completeness_error).max() < 1e-3  # the quadrature converged
    # completeness against llama.cpp itself: the act swap inside llama.cpp changes log p by Σ attributions
    np.testing.assert_allclose(exact.attributions.sum(axis=1), exact.real_change,
                               atol=0.01 * np.abs(exact.real_change).max() + 1e-4)


@pytest.mark.parametrize("family", family_params(ATTRIBUTED))
def test_dla_equals_direct_autograd_on_transformers(families, family):
    """(a − b) ⊙ ∂log p/∂a through only the layer's own down_proj (and post-FFN norm), the final norm,
    lm_head and the soft-cap, by autograd on transformers' modules, for every layer."""
    fam = families(family)
    ids = fam.token_ids[:12]
    # through the dispatcher users run; an f32 KV cache, so that f32 weights mean f32 all through llama.cpp
    ours = attribute("dla", fam.gguf, [np.array(ids, dtype=np.int32)], list(range(N_LAYER)), threads=2, kv_type=0)
    model = fam.load(ggml_gelu=True)
    seen: dict = {}
    hooks = [final_norm(model).register_forward_pre_hook(lambda _m, i: seen.__setitem__("r", i[0][0, -1].clone()))]
    for L, layer in enumerate(model.model.layers):
        hooks.append(act_module(layer.mlp).register_forward_hook(
            lambda _m, i, _o, L=L: seen.__setitem__(("gate", L), i[0][0, -1].clone())))
        if hasattr(layer.mlp, "up_proj"):
            hooks.append(layer.mlp.up_proj.register_forward_hook(
                lambda _m, _i, o, L=L: seen.__setitem__(("up", L), o[0, -1].clone())))
        elif family == "phi2":  # ungated: act ⊙ 1
            seen[("up", L)] = torch.ones(N_FF, dtype=torch.float64)
        else:  # Phi-3: gate_up_proj's output is [gate | up]
            hooks.append(layer.mlp.gate_up_proj.register_forward_hook(
                lambda _m, _i, o, L=L: seen.__setitem__(("up", L), o[0, -1].chunk(2, dim=-1)[1].clone())))
    exact_act = captured_act(family)
    with torch.no_grad():
        model(torch.zeros((1, len(ids)), dtype=torch.long))
        base = {L: exact_act(seen[("gate", L)]) for L in range(N_LAYER)}
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    cap = getattr(model.config, "final_logit_softcapping", None)
    for L in range(N_LAYER):
        mlp, layer = model.model.layers[L].mlp, model.model.layers[L]
        post = getattr(layer, "post_feedforward_layernorm", None)

        def contribution(act):
            out = down_module(mlp)(act * seen[("up", L)])
            return post(out) if post is not None else out

        a = exact_act(seen[("gate", L)]).clone().requires_grad_(True)
        with torch.no_grad():
            rest = seen["r"] - contribution(a)
        z = model.lm_head(final_norm(model)(rest + contribution(a)))
        if cap:
            z = cap * torch.tanh(z / cap)
        target = int(ours.target_tokens[0])
        torch.log_softmax(z, -1)[target].backward()
        ref = ((a - base[L]) * a.grad).detach().numpy()
        got = ours.layers[L].attributions[0]
        assert np.abs(ref).max() > 1e-4
        print(f"{family} layer {L}: dla max |ours − autograd| / max = {np.abs(got - ref).max() / np.abs(ref).max():.2e}")
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())  # f32 llama.cpp, float64 torch
        assert spearman(got, ref) > 0.999


@pytest.mark.parametrize("family", family_params(ATTRIBUTED))
def test_ablation_equals_transformers(families, family):
    """Last-layer neurons zeroed inside llama.cpp (down_in := 0) against the same columns zeroed in
    transformers' down_proj input: the same change of the answer's log-probability."""
    fam = families(family)
    prompts = [fam.token_ids[s] for s in PROMPT_SLICES]
    last, neurons = N_LAYER - 1, list(range(0, N_FF, 3))
    res = ablation_effect(fam.gguf, [np.array(p, dtype=np.int32) for p in prompts], last, neurons,
                          n_threads=2, kv_type=0)
    assert res.patched_tensors > 0
    model = fam.load(torch.float32, ggml_gelu=True)

    def zero(_m, inp):
        x = inp[0].clone()
        x[..., neurons] = 0.0
        return (x,)

    for p, toks in enumerate(prompts):
        target = int(res.target_tokens[p])
        with torch.no_grad():
            clean = torch.log_softmax(model(torch.tensor([toks])).logits[0, -1], -1)[target]
            handle = down_module(model.model.layers[last].mlp).register_forward_pre_hook(zero)
            patched = torch.log_softmax(model(torch.tensor([toks])).logits[0, -1], -1)[target]
            handle.remove()
        ref = float(patched - clean)
        print(f"{family} prompt {p}: ablation Δlog p llama.cpp {res.delta[p]:+.6f} transformers {ref:+.6f}")
        assert abs(ref) > 1e-4  # the ablation changes the answer measurably
        assert abs(res.delta[p] - ref) < 0.01 * abs(ref) + 2e-6  # f32 log-probabilities on both sides


# ------------------------------------------------------------------ the whole study


@pytest.mark.parametrize("family", family_params(ATTRIBUTED))
def test_study_runs_end_to_end(families, family, tmp_path, boolq_path):
    """`ggml-probe study` on the family's converted file: a level built from it, eval, neurons at both
    layers, the exact salient neurons with their ablation check, the text KLD and the report."""
    import json

    from click.testing import CliRunner

    from ggml_probe.cli import cli

    fam = families(family)
    out = tmp_path / "study"
    args = ["study", str(fam.gguf), "--quants", "F16", "--task", "boolq", "--data", str(boolq_path), "--limit", "3",
            "--layers", "0,-1", "--salient-examples", "2", "--ablate-top", "2", "--threads", "2", "-o", str(out), "-q"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    study = json.loads((out / "study.json").read_text())
    neurons = study["tasks"]["boolq"]["neurons"]["F16"]
    assert neurons["layers"] == [0, N_LAYER - 1] and neurons["n_ff"] == N_FF and neurons["tokens"] > 0
    salient = json.loads((out / "runs" / "boolq" / "F16" / "salient.json").read_text())
    assert salient["method"] == "exact"
    last = salient["layers"][str(N_LAYER - 1)]
    assert last["converged"] and last["count"] > 0 and "ablation" in last
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


@pytest.mark.slow
def test_phi2_fused_qkv_as_llama_cpp_writes_it(tmp_path):
    """Real Phi-2 GGUFs (llama.cpp's converter) hold one attn_qkv weight and bias, unlike `convert`'s
    separate q/k/v: the torch model splits both. Against llama.cpp's own log-probabilities on such a file
    (F16 matrices, which llama.cpp multiplies with fp16-rounded activations: ~3e-4 here; a missing q
    bias alone moves them 3e-3), and the exact last layer against ig on it."""
    import validate_tiny_gguf as tiny

    path = tiny.write_tiny_model(tmp_path / "tiny-phi2-fused.gguf", tiny.self_made_vocab(), "phi2")
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 200, size=16)]
    logits = llama_logits(path, ids)
    tm = TorchModel(path, device="cpu", dtype="float64")
    for n in (16, 7):
        ours, _ = tm.run(ids[:n])
        ref = torch.log_softmax(torch.tensor(logits[n - 1], dtype=torch.float64), -1).numpy()
        assert np.abs(ref - ref.mean()).max() > 0.5  # the comparison means something
        err = float(np.abs(ours.numpy() - ref).max())
        print(f"phi2 fused qkv, {n} tokens: max |log p torch − llama.cpp| = {err:.2e}")
        assert err < 1e-3
    prompts = [np.array(ids[:12], np.int32), np.array(ids[4:], np.int32)]
    ig = attribute("ig", path, prompts, [-1], threads=2, device="cpu")
    exact = last_layer_attribution(path, prompts, targets=list(ig.target_tokens), n_threads=2, kv_type=0)
    for p in range(len(prompts)):
        rho = spearman(ig.layers[tiny.N_LAYER - 1].attributions[p], exact.attributions[p])
        print(f"phi2 fused qkv prompt {p}: exact vs ig Spearman {rho:.6f}")
        assert rho >= 0.999
    np.testing.assert_allclose(exact.attributions.sum(axis=1), exact.real_change,
                               atol=0.01 * np.abs(exact.real_change).max())
