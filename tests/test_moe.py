"""Mixture of experts (Mixtral, Qwen3-MoE), proven on tiny random-weight models built with transformers.

2 layers, hidden 64, 4 experts of FFN width 32, 2 used per token; saved in the hub's per-expert layout,
converted to GGUF at F32 by `convert` (llama.cpp runs it as llama with ffn_*_exps tensors), then

- llama.cpp's logits equal transformers' (the conversion is right),
- the captured routing equals transformers' router choices, and each routed expert's `act` / `down_in`
  equal transformers' hooks on the experts' activation function, grouped by the router's top-k,
- the same for Qwen3-MoE (llama.cpp's qwen3moe: qwen3's q/k norms, softmax router, renormalised top-k, the
  expert width from moe_intermediate_size), and its importance matrix follows the same MUL_MAT_ID rule,
- `neurons` (through click) writes per-expert statistics equal to the same statistics computed in NumPy
  from transformers' activations on the tokens the run decoded, and routing counts equal the router's,
- `study` runs end to end, salient neurons declared unsupported in one line,
- the importance matrix (collect_imatrix, eval --imatrix-out) equals llama-imatrix's rule read from the graph
  (MUL_MAT, and MUL_MAT_ID per routed expert), and llama.cpp's quantizer takes each expert's row of it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from test_convert import llama_logits, randomise, sentencepiece_tokenizer, set_rope
from test_passes import track_decoding

import gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ggml_probe.analysis.experts import ExpertAccumulator  # noqa: E402
from ggml_probe.engine import probes as probes_module  # noqa: E402
from ggml_probe.engine.ggml_lib import libggml, tensor_head  # noqa: E402
from ggml_probe.engine.imatrix_capture import collect_imatrix  # noqa: E402
from ggml_probe.engine.model import Engine  # noqa: E402
from ggml_probe.engine.moe_capture import MoECapture, model_moe  # noqa: E402
from ggml_probe.engine.probes import BatchLayout, TensorReader, run_checked  # noqa: E402
from ggml_probe.errors import ProbeError, UnsupportedArchitecture  # noqa: E402
from ggml_probe.formats.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix  # noqa: E402
from ggml_probe.models.convert import convert_hf_to_gguf  # noqa: E402
from ggml_probe.models.quantize import quantize_ladder  # noqa: E402
from ggml_probe.pipeline.evaluation import EvalConfig, NeuronSettings, evaluate  # noqa: E402
from ggml_probe.pipeline.imatrix import collect_task_imatrix  # noqa: E402

HIDDEN, N_FF, N_LAYER, N_EXPERT, N_USED = 64, 32, 2, 4, 2


@dataclass
class TinyMoE:
    hf: Path
    gguf: Path
    token_ids: list[int]
    model_class: str = "MixtralForCausalLM"

    def load(self):
        # the eager experts loop: one act_fn call per routed expert, which the hooks below read
        return getattr(transformers, self.model_class).from_pretrained(self.hf, dtype=torch.float32,
                                                                       experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def build_moe(tmp_path_factory) -> Callable[[str], TinyMoE]:
    """Each family's tiny model built once per module: "mixtral" or "qwen3moe"."""
    pytest.importorskip("sentencepiece")
    built: dict[str, TinyMoE] = {}
    builders = {"mixtral": _tiny_mixtral, "qwen3moe": _tiny_qwen3moe}

    def build(family: str) -> TinyMoE:
        if family not in built:
            built[family] = builders[family](tmp_path_factory.mktemp(family))
        return built[family]

    return build


@pytest.fixture(scope="module")
def moe(request, build_moe) -> TinyMoE:
    """The tiny Mixtral, or the family a test names with parametrize("moe", [...], indirect=True)."""
    return build_moe(getattr(request, "param", "mixtral"))


@pytest.fixture(scope="module")
def qwen3moe(build_moe) -> TinyMoE:
    return build_moe("qwen3moe")


BOTH_FAMILIES = pytest.mark.parametrize("moe", ["mixtral", "qwen3moe"], indirect=True)


def _tiny_mixtral(root: Path) -> TinyMoE:
    folder = root / "tiny-mixtral"
    tokenizer = sentencepiece_tokenizer(folder)
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        num_local_experts=N_EXPERT, num_experts_per_tok=N_USED, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    randomise(model, seed=7)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gguf_path = convert_hf_to_gguf(folder, root / "tiny-mixtral-f32.gguf", outtype="f32")
    ids = [int(i) for i in np.random.default_rng(1).integers(3, len(tokenizer), size=24)]
    return TinyMoE(folder, gguf_path, ids)


def transformers_experts(model, token_ids: list[int]) -> tuple[dict[int, np.ndarray], dict[tuple[str, int], dict]]:
    """The router's top-k per layer (tokens, k), and per (definition, layer) {(token, expert): row}:
    act = SiLU of the input of the experts' act_fn (in float64), down_in = act_fn's output × the up
    projection (the input of the expert's down projection), each call of act_fn being one routed expert
    over its tokens in transformers' own order (experts ascending; per expert by top-k slot, then token)."""
    routing: dict[int, np.ndarray] = {}
    calls: dict[int, list] = {}
    states: dict[int, np.ndarray] = {}
    hooks = []

    def start(i: int, hidden: np.ndarray) -> None:  # a pre-hook returning None leaves the arguments alone
        states[i], calls[i] = hidden, []

    for i, layer in enumerate(model.model.layers):
        moe = layer.mlp
        hooks.append(moe.gate.register_forward_hook(
            lambda _m, _i, out, i=i: routing.__setitem__(i, out[2].numpy().copy())))
        hooks.append(moe.experts.register_forward_pre_hook(
            lambda _m, inp, i=i: start(i, inp[0].double().numpy().copy())))
        hooks.append(moe.experts.act_fn.register_forward_hook(
            lambda _m, inp, out, i=i: calls[i].append((inp[0].double().numpy().copy(), out.double().numpy().copy()))))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for h in hooks:
        h.remove()
    out: dict[tuple[str, int], dict] = {}
    for i, layer in enumerate(model.model.layers):
        top = routing[i]
        up_w = layer.mlp.experts.gate_up_proj.detach().double().numpy()[:, N_FF:]  # [gate | up] per expert
        acts, downs = {}, {}
        for e, (gate_in, act_out) in zip(np.unique(top), calls[i]):
            slots, tokens = np.nonzero((top == e).T)  # torch.where(expert_mask[e]): slot-major, as transformers
            up = states[i][tokens] @ up_w[e].T
            for row, t in enumerate(tokens):
                acts[(int(t), int(e))] = torch.nn.functional.silu(torch.from_numpy(gate_in[row])).numpy()
                downs[(int(t), int(e))] = act_out[row] * up[row]
        out[("act", i)], out[("down_in", i)] = acts, downs
    return routing, out


def test_model_moe_reads_the_experts(moe):
    m = model_moe(moe.gguf)
    assert (m.arch, m.n_layer, m.n_expert, m.n_expert_used, m.n_ff) == ("llama", N_LAYER, N_EXPERT, N_USED, N_FF)


def test_router_stays_f32_at_f16(moe, tmp_path):
    """llama.cpp's converter writes ffn_gate_inp F32 whatever the outtype (and llama-quantize leaves it): a
    rounded router changes the routing. The other 2-D weights follow the outtype."""
    import gguf

    path = convert_hf_to_gguf(moe.hf, tmp_path / "tiny-mixtral-f16.gguf", outtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    routers = [n for n in types if n.endswith("ffn_gate_inp.weight")]
    assert sorted(routers) == [f"blk.{i}.ffn_gate_inp.weight" for i in range(N_LAYER)]
    assert {types[n] for n in routers} == {gguf.GGMLQuantizationType.F32}
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16


def _logits_difference(built, family: str) -> float:
    """max |llama.cpp − transformers| over the F32 file's logits, relative to the largest logit."""
    with torch.no_grad():
        ref = built.load()(torch.tensor([built.token_ids])).logits[0].numpy()
    ours = llama_logits(built.gguf, built.token_ids)
    assert ref.std() > 1.0 and np.abs(ref[1:] - ref[:-1]).max() > 1.0  # the comparison means something
    diff = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"{family}: f32 max |llama.cpp − transformers| logits / max |logit| = {diff:.3g}")
    return diff


def test_converted_logits_equal_transformers(moe):
    assert _logits_difference(moe, "mixtral") < 2e-4


def test_captured_experts_equal_transformers_hooks(moe, monkeypatch):
    """Every layer, every token, every routed expert, both definitions; the routing itself in order. Decoded
    whole, and with the last token apart (Engine.run: the rows before it end their graph after the last
    layer's FFN), which hands the rows over in two pieces. The consumers run between decodes, or inside them
    once the copies held back pass the capture's cap (_DEFERRED_BYTES; 0 here): the same values either way."""
    routing, ref = transformers_experts(moe.load(), moe.token_ids)
    for last_tokens_apart in (False, True):
        assert not any(_check_capture_against_transformers(moe, routing, ref, last_tokens_apart))
    monkeypatch.setattr(probes_module, "_DEFERRED_BYTES", 0)
    assert all(_check_capture_against_transformers(moe, routing, ref, True))


def _check_capture_against_transformers(moe, routing, ref, last_tokens_apart: bool) -> list[bool]:
    """Checks the capture; returns, per consumer call, whether it came inside a decode."""
    parts: dict = {}
    route_parts: dict = {}
    inside: list[bool] = []

    def keep(layer, d, v, e, _lay):
        inside.append(decoding[0])
        parts.setdefault((d, layer), []).append((v.copy(), e.copy()))

    def keep_routing(layer, e, _lay):
        inside.append(decoding[0])
        route_parts.setdefault(layer, []).append(e.copy())

    capture = MoECapture(moe.gguf, keep, keep_routing, layers="all")
    with Engine(moe.gguf, n_ctx=128, n_threads=2, kv_type=0, hidden_states=False,
                eval_callback=capture.eval_callback) as engine:
        engine.last_tokens_apart = last_tokens_apart
        decoding = track_decoding(engine)
        run_checked(engine, capture, [np.asarray(moe.token_ids, dtype=np.int32)])
    assert all(len(p) == (2 if last_tokens_apart else 1) for p in route_parts.values())
    got = {key: (np.concatenate([v for v, _ in p]), np.concatenate([e for _, e in p])) for key, p in parts.items()}
    routes = {layer: np.concatenate(p) for layer, p in route_parts.items()}
    worst = 0.0
    for layer in range(N_LAYER):
        assert np.array_equal(routes[layer], routing[layer])  # same experts, best first
        assert len(np.unique(routing[layer])) > 1  # the router really routes
        for definition in ("act", "down_in"):
            values, experts = got[(definition, layer)]
            assert values.shape == (len(moe.token_ids), N_USED, N_FF)
            assert np.array_equal(experts, routing[layer])
            ours = np.stack([values[t, j] for t in range(len(moe.token_ids)) for j in range(N_USED)])
            theirs = np.stack([ref[(definition, layer)][(t, int(experts[t, j]))]
                               for t in range(len(moe.token_ids)) for j in range(N_USED)])
            assert np.abs(theirs).max() > 1.0
            rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
            worst = max(worst, rel)
            assert rel <= 1e-4, (definition, layer, rel)
            assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) <= 1e-4
    print(f"{model_moe(moe.gguf).arch} (last token apart: {last_tokens_apart}): captured per-expert act/down_in ‖llama.cpp − transformers‖ "
          f"/ ‖x‖ ≤ {worst:.2e}")
    assert inside
    return inside


def test_expert_accumulator_counts_routed_tokens_and_round_trips(tmp_path):
    """The accumulator against NumPy on made-up routing: per-expert moments over that expert's rows only,
    routing counts, dead ids in flat numbering; its saved state reads back identical."""
    rng = np.random.default_rng(0)
    n_tok, n_exp, k, n_ff = 40, 5, 2, 3
    experts = np.stack([rng.choice(n_exp - 1, size=k, replace=False) for _ in range(n_tok)])  # expert 4 unrouted
    values = rng.normal(size=(n_tok, k, n_ff))
    values[:, :, 1] *= 0.01  # neuron 1 of every expert nearly silent: dead at tau 0.1
    layout = BatchLayout.build([0, 1], [np.zeros(25), np.zeros(15)])
    acc = ExpertAccumulator([3], ["act"], n_exp, k, n_ff, top_k=4)
    acc.update_routing(3, experts, layout)
    acc.update(3, "act", values, experts, layout)
    stats = acc.stats[("act", 3)]
    for e in range(n_exp - 1):
        rows = values[experts == e]
        np.testing.assert_allclose(stats.mean[e * n_ff:(e + 1) * n_ff], rows.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.variance[e * n_ff:(e + 1) * n_ff], rows.var(axis=0), rtol=1e-12)
        best = np.argmax(rows[:, 0])
        t, j = np.argwhere(experts == e)[best]
        assert acc.top[("act", 3)].for_neuron(e * n_ff)[0] == (values[t, j, 0], int(layout.row_prompt[t]),
                                                               int(layout.row_pos[t]))
    assert acc.routed[3].tolist() == np.bincount(experts.ravel(), minlength=n_exp).tolist()
    assert acc.first[3].tolist() == np.bincount(experts[:, 0], minlength=n_exp).tolist()
    assert stats.dead(0.1).tolist() == [e * n_ff + 1 for e in range(n_exp - 1)]  # the unrouted expert: not dead
    assert stats.routed.tolist()[-1] == 0 and not stats.seen[-n_ff:].any()
    back = ExpertAccumulator.load(acc.save(tmp_path / "state.npz"))
    assert back.routed[3].tolist() == acc.routed[3].tolist() and back.tokens == acc.tokens
    np.testing.assert_array_equal(back.stats[("act", 3)].mean, stats.mean)
    assert back.top[("act", 3)].for_neuron(2 * n_ff) == acc.top[("act", 3)].for_neuron(2 * n_ff)
    prompt, pos, sets = back.routes(3)  # each token's top-k set, by (prompt, position)
    assert prompt.tolist() == layout.row_prompt.tolist() and pos.tolist() == layout.row_pos.tolist()
    assert np.array_equal(sets, np.sort(experts, axis=1))


def test_unrouted_expert_is_nan_in_every_field_and_left_out_of_drift():
    """neuron_stats.npz's arrays of an MoE layer: NumPy's min/max/max|a|/mean/var over each routed expert's
    rows, NaN in every field for the expert no token was routed to; drift leaves those neurons out, and
    they are not dead at any tau."""
    from ggml_probe.analysis.neurons import activation_drift
    from ggml_probe.pipeline.expert_stats import expert_stat_arrays

    rng = np.random.default_rng(3)
    n_tok, n_exp, k, n_ff = 30, 4, 2, 5
    experts = np.stack([rng.choice(n_exp - 1, size=k, replace=False) for _ in range(n_tok)])  # expert 3 unrouted
    values = rng.normal(size=(n_tok, k, n_ff))
    layout = BatchLayout.build([0], [np.zeros(n_tok)])
    acc = ExpertAccumulator([0], ["act"], n_exp, k, n_ff, top_k=0)
    acc.update_routing(0, experts, layout)
    acc.update(0, "act", values, experts, layout)
    arrays = expert_stat_arrays(acc.stats[("act", 0)])
    assert sorted(arrays) == ["max", "maxabs", "mean", "min", "var"]
    for e in range(n_exp - 1):
        rows, sl = values[experts == e], slice(e * n_ff, (e + 1) * n_ff)
        for name, want in (("mean", rows.mean(0)), ("var", rows.var(0)), ("min", rows.min(0)), ("max", rows.max(0)),
                           ("maxabs", np.abs(rows).max(0))):
            np.testing.assert_allclose(arrays[name][sl], want, rtol=1e-12)
    for name, a in arrays.items():
        assert np.isnan(a[-n_ff:]).all(), name
    assert acc.stats[("act", 0)].dead(1e9).tolist() == list(range((n_exp - 1) * n_ff))
    drift = activation_drift(arrays["mean"], arrays["var"], arrays["mean"] + 0.5 * np.sqrt(arrays["var"]))
    assert drift["excluded"] == n_ff and drift["neurons"] == (n_exp - 1) * n_ff
    assert drift["mean"] == pytest.approx(0.5)


def test_routing_agreement_equals_numpy():
    """The share of tokens with the reference's top-k set, against a per-token loop: tokens matched by
    (prompt, position) whatever their order, only in both runs, only in the prompts given."""
    from ggml_probe.analysis.experts import routing_agreement

    rng = np.random.default_rng(5)
    n_exp, k = 8, 2

    def run(n_prompts, drop):
        keys = [(p, t) for p in range(n_prompts) for t in range(int(rng.integers(3, 9)))]
        keys = [key for key in keys if rng.random() > drop]
        sets = np.sort(np.stack([rng.choice(n_exp, size=k, replace=False) for _ in keys]), axis=1)
        order = rng.permutation(len(keys))
        return ([keys[i] for i in order], sets[order])

    (ref_keys, ref_sets), (keys, sets) = run(12, 0.0), run(12, 0.2)
    # most of the level's tokens keep the reference's set, as a mild quantization would
    ref_by = dict(zip(ref_keys, map(tuple, ref_sets)))
    sets = np.array([ref_by[key] if rng.random() < 0.7 and key in ref_by else s for key, s in zip(keys, map(tuple, sets))])

    def arrays(keys, sets):
        return (np.array([p for p, _ in keys]), np.array([t for _, t in keys]), sets)

    for prompts in (None, [0, 2, 3, 7, 11]):
        level_by = dict(zip(keys, map(tuple, sets)))
        common = [key for key in ref_by if key in level_by and (prompts is None or key[0] in prompts)]
        want = sum(ref_by[key] == level_by[key] for key in common) / len(common)
        got = routing_agreement(arrays(ref_keys, ref_sets), arrays(keys, sets), prompts)
        assert got["tokens"] == len(common) and got["share"] == pytest.approx(want, abs=1e-15)
        assert 0.5 < got["share"] < 1.0  # some changed, most kept
    assert routing_agreement(arrays(ref_keys, ref_sets), arrays(keys, sets), [99]) == {"share": None, "tokens": 0}


@BOTH_FAMILIES
@pytest.mark.slow
def test_neurons_command_per_expert_statistics(moe, tmp_path, boolq_path):
    """`ggml-probe neurons` on the MoE file: routing counts equal transformers' router on the tokens the run
    decoded; each expert neuron's mean and max |a| over its routed tokens equal NumPy's on transformers'
    activations (within the F16 KV cache's rounding); dead neurons (tau near the median max |a|, so that
    about half are) are the same set."""
    from click.testing import CliRunner

    from ggml_probe.cli import cli
    from ggml_probe.pipeline.tokens import decoded_tokens

    model = moe.load()
    out = tmp_path / "run"
    base = ["neurons", str(moe.gguf), "--task", "boolq", "--data", str(boolq_path), "--limit", "3",
            "--layers", "all", "--threads", "2", "-q"]
    res = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "first")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "tokens routed to each of 4 experts" in res.output and "salient neurons (exact, ig, dla)" in res.output
    tokens = decoded_tokens(tmp_path / "first")
    routed = {layer: np.zeros(N_EXPERT, np.int64) for layer in range(N_LAYER)}
    rows: dict[tuple[int, int], list] = {}
    sets: dict[int, list] = {layer: [] for layer in range(N_LAYER)}  # per token, by prompt and position
    for toks in tokens:
        routing, ref = transformers_experts(model, [int(t) for t in toks])
        for layer in range(N_LAYER):
            sets[layer].append(np.sort(routing[layer], axis=1))
            routed[layer] += np.bincount(routing[layer].ravel(), minlength=N_EXPERT)
            for (_t, e), row in ref[("act", layer)].items():
                rows.setdefault((layer, e), []).append(row)
    maxabs = {key: np.abs(np.stack(v)).max(axis=0) for key, v in rows.items()}
    # tau in the widest gap between neighbouring max |a| around the median: about half the neurons are dead,
    # and none lies within rounding of the threshold
    v = np.sort(np.concatenate(list(maxabs.values())))
    mid = len(v) // 2
    gap = mid - 20 + int(np.argmax(np.diff(v[mid - 20:mid + 21])))
    tau = float((v[gap] + v[gap + 1]) / 2)
    res = CliRunner().invoke(cli, [*base, "--tau", f"{tau:.9g}", "-o", str(out), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    nj = json.loads((out / "neurons.json").read_text())
    stats = np.load(out / "neuron_stats.npz")
    assert nj["experts"]["n_expert"] == N_EXPERT and nj["experts"]["n_expert_used"] == N_USED
    n_dead, worst = 0, 0.0
    for entry in (e for e in nj["layers"] if e["definition"] == "act"):
        layer = entry["layer"]
        r = nj["experts"]["layers"][str(layer)]
        assert r["routed"] == routed[layer].tolist() and r["tokens"] == sum(len(t) for t in tokens)
        assert entry["n_ff"] == N_EXPERT * N_FF
        mean, top = stats[f"act/{layer}/mean"], stats[f"act/{layer}/maxabs"]
        dead = []
        for e in range(N_EXPERT):
            ref_rows = np.stack(rows[(layer, e)])
            sl = slice(e * N_FF, (e + 1) * N_FF)
            # the run's KV cache is llama.cpp's default F16 (the capture test above runs F32 throughout at 1e-4)
            assert np.linalg.norm(mean[sl] - ref_rows.mean(axis=0)) <= 2e-3 * np.linalg.norm(ref_rows.mean(axis=0))
            assert np.abs(top[sl] - maxabs[(layer, e)]).max() <= 2e-3 * maxabs[(layer, e)].max()
            worst = max(worst, float(np.linalg.norm(mean[sl] - ref_rows.mean(axis=0)) / np.linalg.norm(ref_rows.mean(axis=0))))
            dead += [e * N_FF + i for i in np.flatnonzero(maxabs[(layer, e)] < tau)]
            assert r["dead_per_expert"]["act"][e] == int(np.sum(maxabs[(layer, e)] < tau))
        assert entry["dead_ids"] == dead
        n_dead += len(dead)
        # each token's top-k set as transformers' router chose it, by (prompt, position)
        assert np.array_equal(stats[f"routing/{layer}/sets"], np.concatenate(sets[layer]))
        assert stats[f"routing/{layer}/prompt"].tolist() == [i for i, t in enumerate(tokens) for _ in t]
        assert stats[f"routing/{layer}/pos"].tolist() == [p for t in tokens for p in range(len(t))]
    # the two runs decoded the same tokens with the same model: every token keeps its experts
    from ggml_probe.pipeline.neurons import compare_neurons

    compared = compare_neurons(tmp_path / "first", out)
    for layer in range(N_LAYER):
        assert compared[f"act/{layer}"]["routing_agreement"] == {"share": 1.0, "tokens": sum(len(t) for t in tokens)}
        assert compared[f"act/{layer}"]["drift"]["tokens"] == "each level's own routed tokens"
        assert compared[f"act/{layer}"]["drift"]["max"] < 1e-6
    assert nj["experts"]["drift"].startswith("over each level's own routed tokens")
    print(f"{model_moe(moe.gguf).arch}: per-expert act means ‖run − transformers‖ / ‖mean‖ ≤ {worst:.2e} (F16 KV cache); "
          f"{n_dead} of {N_LAYER * N_EXPERT * N_FF} neurons dead at tau {tau:.4g}, the same set")
    assert 0 < n_dead < N_LAYER * N_EXPERT * N_FF  # the threshold splits the neurons
    assert "experts" in json.dumps(json.loads(res.output))  # --json carries the section too


@BOTH_FAMILIES
@pytest.mark.slow
def test_study_runs_end_to_end_without_salient_neurons(moe, tmp_path, boolq_path):
    """`ggml-probe study` on the MoE file: a level built from it, eval, per-expert neurons, the text KLD and the
    report; salient neurons are declared unsupported in one line, and nothing else is missing."""
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    out = tmp_path / "study"
    args = ["study", str(moe.gguf), "--quants", "F16,Q8_0", "--task", "boolq", "--data", str(boolq_path), "--limit", "3",
            "--layers", "0,-1", "--threads", "2", "-o", str(out)]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "boolq F16: mixture of experts: salient neurons (exact, ig, dla) and the ablation check are not " \
           "supported" in " ".join(res.output.split())
    study = json.loads((out / "study.json").read_text())
    neurons = study["tasks"]["boolq"]["neurons"]["F16"]
    assert neurons["layers"] == [0, N_LAYER - 1] and neurons["n_ff"] == N_EXPERT * N_FF and neurons["tokens"] > 0
    assert "salient" not in neurons and "\n" not in neurons["salient_note"]
    routed = neurons["experts"]["layers"]["1"]["routed"]
    assert sum(routed) == N_USED * neurons["tokens"]
    assert not (out / "runs" / "boolq" / "F16" / "salient.json").exists()
    assert (out / "report.html").is_file() and "salient neurons (exact, ig, dla)" in (out / "report.md").read_text()
    # Q8_0 against F16: per layer, the share of tokens keeping their top-k experts, against a per-token loop
    # over the two runs' recorded routing
    compared = study["tasks"]["boolq"]["neuron_comparison"]["Q8_0"]
    runs = {lvl: np.load(out / "runs" / "boolq" / lvl / "neuron_stats.npz") for lvl in ("F16", "Q8_0")}
    for layer in (0, N_LAYER - 1):
        by = {lvl: {(int(p), int(t)): tuple(e) for p, t, e in zip(*(z[f"routing/{layer}/{n}"] for n in ("prompt", "pos", "sets")))}
              for lvl, z in runs.items()}
        same = [by["F16"][key] == by["Q8_0"][key] for key in by["F16"]]
        got = compared["routing_agreement"][str(layer)]
        assert got["tokens"] == len(same) == neurons["tokens"] and got["share"] == pytest.approx(np.mean(same), abs=1e-12)
        assert compared["drift"][str(layer)]["tokens"] == "each level's own routed tokens"
        print(f"{model_moe(moe.gguf).arch} study: Q8_0 vs F16 layer {layer}: routing agreement {got['share']:.4f} over {got['tokens']} tokens")
    assert "routing agreement" in (out / "report.md").read_text()


def test_eval_neurons_json_carries_the_experts(moe, tmp_path, boolq_path):
    """`eval --neurons --json`: the same per-expert pass; the JSON says how often each expert was routed and why
    there are no salient neurons."""
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    args = ["eval", str(moe.gguf), "--neurons", "--task", "boolq", "--data", str(boolq_path), "--limit", "2",
            "--layers", "-1", "--threads", "2", "-o", str(tmp_path / "run"), "--json"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    level = next(iter(json.loads(res.output)["neurons"].values()))
    routing = level["experts"]["layers"][str(N_LAYER - 1)]
    assert sum(routing["routed"]) == N_USED * routing["tokens"] and routing["tokens"] == level["tokens"] > 0
    assert "salient" not in level and level["salient_note"].startswith("mixture of experts")


def test_other_mixture_of_experts_families_are_refused_in_one_line(tmp_path, boolq_path):
    """An MoE family the capture does not know (here a qwen2moe header: shared experts) stops `neurons` with one
    line naming what is supported, before any decoding."""
    import gguf
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    path = tmp_path / "qwen2moe.gguf"
    writer = gguf.GGUFWriter(str(path), arch="qwen2moe")
    writer.add_block_count(1)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    args = ["neurons", str(path), "--task", "boolq", "--data", str(boolq_path), "--limit", "1", "-q", "-o", str(tmp_path / "r")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert ("qwen2moe: the per-expert neuron capture supports mixture-of-experts models of llama (Mixtral), "
            "qwen3moe (Qwen3-MoE)") in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_dense_analyses_name_the_supported_moe_architectures():
    """A dense-only analysis refusing an MoE model tells Mixtral (llama) and Qwen3-MoE it gets per-expert
    statistics, and tells other MoE families (qwen2moe) which architectures do."""
    from ggml_probe.engine.ffn import SUPPORTED_MOE_ARCHITECTURES, ffn_names
    from ggml_probe.errors import UnsupportedArchitecture

    assert SUPPORTED_MOE_ARCHITECTURES == ("llama", "qwen3moe")
    with pytest.raises(UnsupportedArchitecture, match=r"^llama: .*llama's experts get per-expert neuron statistics"):
        ffn_names("llama", ["blk.0.ffn_gate_exps.weight"])
    with pytest.raises(UnsupportedArchitecture, match=r"^qwen3moe: .*qwen3moe's experts get per-expert neuron"):
        ffn_names("qwen3moe", ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_up_exps.weight"])
    with pytest.raises(UnsupportedArchitecture) as err:
        ffn_names("qwen2moe", ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_up_exps.weight"])
    assert "per-expert neuron statistics support only llama (Mixtral), qwen3moe (Qwen3-MoE)" in str(err.value)
    assert "qwen2moe's experts get" not in str(err.value)


def test_dense_and_expert_captures_check_definitions_alike(moe, demo_path):
    """One definitions check (engine.ffn.check_definitions) for FFNCapture and MoECapture: duplicates dropped
    in order, an unknown definition refused in one line naming the known ones."""
    from ggml_probe.engine.ffn import check_definitions
    from ggml_probe.engine.probes import FFNCapture

    assert check_definitions(["down_in", "act", "down_in"]) == ("down_in", "act")
    for make in (lambda d: FFNCapture(demo_path, lambda *a: None, [0], d),
                 lambda d: MoECapture(moe.gguf, lambda *a: None, lambda *a: None, [0], d)):
        assert make(("act", "act")).definitions == ("act",)
        for bad in (("act", "gate"), ()):
            with pytest.raises(ProbeError, match="neuron definition must be one of act, down_in") as err:
                make(bad)
            assert "\n" not in str(err.value)


@BOTH_FAMILIES
def test_trace_reads_the_moe_ffn_output(moe):
    """The divergence trace's ffn_out of an MoE block is the experts' weighted sum (ffn_moe_out): the block's
    residual stream is its FFN input plus that output, and on Mixtral (llama's graph names attn_out; qwen3moe's
    does not) the previous block's stream plus its attention and FFN outputs."""
    from ggml_probe.engine.trace import TensorCapture

    llama = model_moe(moe.gguf).arch == "llama"
    names = ["ffn_inp-1", "ffn_out-1", "l_out-1"] + (["l_out-0", "attn_out-1"] if llama else [])
    capture = TensorCapture(names)
    with Engine(moe.gguf, n_ctx=128, n_threads=2, kv_type=0, hidden_states=False,
                eval_callback=capture.eval_callback) as engine:
        run_checked(engine, capture, [np.asarray(moe.token_ids, dtype=np.int32)], all_outputs=True)
    assert capture.missing() == []
    t = {n: capture.tensors[n].astype(np.float64) for n in names}
    assert np.abs(t["ffn_out-1"]).max() > 0.1
    np.testing.assert_allclose(t["ffn_inp-1"] + t["ffn_out-1"], t["l_out-1"], rtol=0, atol=1e-5)
    if llama:
        np.testing.assert_allclose(t["l_out-0"] + t["attn_out-1"] + t["ffn_out-1"], t["l_out-1"], rtol=0, atol=1e-5)


@BOTH_FAMILIES
def test_probe_state_resumes_exactly(moe, tmp_path):
    """A run resumed from the saved state after its first prompts (as evaluate does chunk by chunk) ends with
    the statistics and routing counts of one uninterrupted pass."""
    from ggml_probe.pipeline.expert_stats import ExpertNeuronProbe

    prompts = [np.asarray(moe.token_ids[:n], dtype=np.int32) for n in (24, 17, 9)]

    def run(probe, chunk, offset):
        probe.prompt_offset = offset
        with Engine(moe.gguf, n_ctx=128, n_threads=2, hidden_states=False, eval_callback=probe.eval_callback) as engine:
            run_checked(engine, probe, chunk)

    whole = ExpertNeuronProbe(moe.gguf, "all", ("act", "down_in"), top_k=3)
    run(whole, prompts, 0)
    first = ExpertNeuronProbe(moe.gguf, "all", ("act", "down_in"), top_k=3)
    run(first, prompts[:1], 0)
    first.save(tmp_path / "state.npz")
    other = ExpertNeuronProbe(moe.gguf, "all", ("act", "down_in"), top_k=5)  # another --top-k: refused
    with pytest.raises(ProbeError, match=r"top_k 3 \(this run: 5\)") as err:
        other.restore(tmp_path / "state.npz")
    assert "\n" not in str(err.value)
    resumed = ExpertNeuronProbe(moe.gguf, "all", ("act", "down_in"), top_k=3)
    resumed.restore(tmp_path / "state.npz")
    run(resumed, prompts[1:], 1)
    a, b = whole.finish(), resumed.finish()
    for layer in range(N_LAYER):
        assert a.routed[layer].tolist() == b.routed[layer].tolist() and a.tokens[layer] == b.tokens[layer] == 50
        for x, y in zip(a.routes(layer), b.routes(layer)):  # each token's experts survive the saved state
            assert np.array_equal(x, y) and len(x) == 50
        for d in ("act", "down_in"):
            # another batch layout may round differently in the last bits (f32 inside llama.cpp)
            np.testing.assert_allclose(b.stats[(d, layer)].mean, a.stats[(d, layer)].mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b.stats[(d, layer)].maxabs, a.stats[(d, layer)].maxabs, rtol=1e-5)
            for j in range(0, N_EXPERT * N_FF, 7):
                top_a, top_b = a.top[(d, layer)].for_neuron(j), b.top[(d, layer)].for_neuron(j)
                assert [r[1:] for r in top_b] == [r[1:] for r in top_a]  # the same (prompt, position)s
                np.testing.assert_allclose([r[0] for r in top_b], [r[0] for r in top_a], rtol=1e-5)


def _mul_mat_rule(moe, prompts) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """llama-imatrix's collect_imatrix (tools/imatrix/imatrix.cpp), independent of graph names: every MUL_MAT
    and MUL_MAT_ID whose src0 is a blk.* weight. MUL_MAT: src1's rows squared and summed, one count per row.
    MUL_MAT_ID: for slot idx of token row, ids (src[2], a strided view: read through its strides) names the
    expert; src1[row, idx % ne1] is squared into that expert's row of sums and counted once for it."""
    lib, reader = libggml(), TensorReader()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def callback(t, ask):
        head = tensor_head(t)
        op = lib.ggml_op_desc(t)
        if op not in (b"MUL_MAT", b"MUL_MAT_ID") or not head.src[0]:
            return False
        weight = reader.name(head.src[0])
        if not weight.startswith("blk."):
            return False
        if ask:
            return True
        x = reader.read(head.src[1], "ref").astype(np.float64)
        if op == b"MUL_MAT":
            s, c = (x * x).sum(axis=0)[None, :], np.array([len(x)])
        else:
            n_as, (ne0, ne1, ne2, _) = tensor_head(head.src[0]).ne[2], tensor_head(head.src[1]).ne
            x = x.reshape(ne2, ne1, ne0)
            ids = tensor_head(head.src[2])
            raw = np.empty(lib.ggml_nbytes(head.src[2]), dtype=np.uint8)
            lib.ggml_backend_tensor_get(head.src[2], raw.ctypes.data, 0, raw.nbytes)
            s, c = np.zeros((n_as, ne0)), np.zeros(n_as, dtype=np.int64)
            for idx in range(ids.ne[0]):
                for row in range(ids.ne[1]):
                    at = row * ids.nb[1] + idx * ids.nb[0]
                    ex = int(raw[at: at + 4].view(np.int32)[0])
                    s[ex] += x[row, idx % ne1] ** 2
                    c[ex] += 1
        sums[weight] = sums.get(weight, 0.0) + s
        counts[weight] = counts.get(weight, 0) + c
        return True

    with Engine(moe.gguf, n_ctx=128, n_threads=1, hidden_states=False, eval_callback=callback) as engine:
        for p in prompts:
            engine.run([p], all_outputs=True)
    return sums, counts


def test_collected_imatrix_equals_the_mul_mat_id_rule(moe, tmp_path):
    """Mixtral's experts (ffn_*_exps, MUL_MAT_ID) get one row of sums and one count per expert from the rows
    routed to it, the router (ffn_gate_inp) a plain entry over every token; no dense ffn_gate/up/down is named.
    Written as llama-imatrix writes it, llama.cpp's quantizer reads each expert's row for that expert."""
    prompts = [np.asarray(moe.token_ids[:n], dtype=np.int32) for n in (24, 17, 9)]
    im = collect_imatrix(moe.gguf, prompts, datasets=["ids"], n_ctx=128, n_threads=1)
    ref_sums, ref_counts = _mul_mat_rule(moe, prompts)
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                 "ffn_down_exps"]
    assert set(im.entries) == set(ref_sums) == {f"blk.{i}.{w}.weight" for i in range(N_LAYER) for w in per_layer}
    for name, entry in im.entries.items():
        np.testing.assert_allclose(entry.sums, ref_sums[name], rtol=1e-9, err_msg=name)
        assert entry.counts.tolist() == ref_counts[name].tolist(), name
    down = im.entries["blk.1.ffn_down_exps.weight"]
    assert down.sums.shape == (N_EXPERT, N_FF) and down.counts.sum() == N_USED * 50 and (down.counts > 0).all()
    assert im.entries["blk.1.ffn_gate_inp.weight"].counts.tolist() == [50]

    # written in llama-imatrix's layout ([n_per_row, n_expert] sums, [1, n_expert] counts), quantized from the file
    written = write_imatrix(tmp_path / "moe.imatrix.gguf", im)
    shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(written).tensors}
    assert shapes["blk.1.ffn_down_exps.weight.in_sum2"] == [N_FF, N_EXPERT]
    assert shapes["blk.1.ffn_down_exps.weight.counts"] == [1, N_EXPERT]
    ours = quantize_ladder(moe.gguf, ["Q4_0"], out_dir=tmp_path / "ours", imatrix=written)[0]
    plain = quantize_ladder(moe.gguf, ["Q4_0"], out_dir=tmp_path / "plain")[0]
    # one expert's row changed in the down stack's entry: that expert's matrix alone is quantized otherwise
    changed = Imatrix({n: ImatrixEntry(e.sums.copy(), e.counts) for n, e in read_imatrix(written).entries.items()})
    changed.entries["blk.1.ffn_down_exps.weight"].sums[2, ::3] *= 1e4
    moved = quantize_ladder(moe.gguf, ["Q4_0"], out_dir=tmp_path / "moved", imatrix=changed.mean_squares())[0]
    a, b, c = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(r.path).tensors} for r in (plain, ours, moved))
    for layer in range(N_LAYER):
        for w in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            name = f"blk.{layer}.{w}.weight"
            assert b[name].shape[0] == N_EXPERT  # (expert, row, bytes)
            for e in range(N_EXPERT):  # every expert's matrix was quantized with its importance
                assert not np.array_equal(a[name][e], b[name][e]), (name, e)
    assert [np.array_equal(b["blk.1.ffn_down_exps.weight"][e], c["blk.1.ffn_down_exps.weight"][e])
            for e in range(N_EXPERT)] == [True, True, False, True]
    assert all(np.array_equal(b[n], c[n]) for n in b if n != "blk.1.ffn_down_exps.weight")


class _Interrupted(Exception):
    pass


@BOTH_FAMILIES
def test_eval_imatrix_out_on_the_experts_resumes(moe, tmp_path, boolq_path):
    """`eval --imatrix-out` on Mixtral and Qwen3-MoE, stopped after its first chunk and resumed, writes the matrix
    `imatrix collect` computes from the same fitted prompts: per expert sums and counts."""
    out = tmp_path / "run.imatrix.gguf"
    config = EvalConfig(task="boolq", data_path=str(boolq_path), limit=4, n_ctx=128, threads=1, chunk_size=2,
                        n_boot=10, batch_prompts=1, imatrix_out=str(out), state_every_s=0)

    def stop_after_first_chunk(done, total):
        if done == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        evaluate(moe.gguf, config, tmp_path / "run", progress=stop_after_first_chunk)
    assert not out.exists()
    summary = evaluate(moe.gguf, config, tmp_path / "run", resume=True)
    assert summary.resumed_examples == 2
    ref, _ = collect_task_imatrix(moe.gguf, config)
    got = read_imatrix(out)
    assert set(got.entries) == set(ref.entries) and "blk.0.ffn_down_exps.weight" in got.entries
    for name, e in ref.entries.items():
        assert got.entries[name].counts.tolist() == e.counts.tolist(), name
        np.testing.assert_array_equal(got.entries[name].sums, e.sums.astype(np.float32), err_msg=name)
    tokens = ref.entries["blk.0.attn_q.weight"].counts[0]
    assert summary.manifest["imatrix"]["tokens"] == tokens and ref.entries["blk.0.ffn_up_exps.weight"].counts.sum() \
        == N_USED * tokens
    out.unlink()  # a finished run asked again rebuilds the file from its saved per-expert sums
    evaluate(moe.gguf, config, tmp_path / "run", resume=True)
    np.testing.assert_array_equal(read_imatrix(out).entries["blk.1.ffn_down_exps.weight"].sums,
                                  got.entries["blk.1.ffn_down_exps.weight"].sums)

    # beside the per-expert neuron pass (both read ffn_moe_argsort of the same decode): the same matrix
    both = tmp_path / "both.imatrix.gguf"
    evaluate(moe.gguf, replace(config, imatrix_out=str(both), neurons=NeuronSettings(
        layers="-1", definitions=("act",), redundancy=False, top_k=0)), tmp_path / "both")
    assert (tmp_path / "both" / "neuron_stats.npz").exists()
    for name, e in read_imatrix(both).entries.items():
        assert e.counts.tolist() == got.entries[name].counts.tolist(), name
        np.testing.assert_array_equal(e.sums, got.entries[name].sums, err_msg=name)


def test_imatrix_of_other_expert_families_is_refused_in_one_line(tmp_path):
    """A mixture of experts the imatrix probe cannot follow (a qwen2moe header: shared experts) is refused before
    any decoding, naming what is supported."""
    path = tmp_path / "qwen2moe.gguf"
    writer = gguf.GGUFWriter(str(path), arch="qwen2moe")
    writer.add_block_count(1)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitecture) as err:
        collect_imatrix(path, ["a"])
    assert str(err.value) == ("a mixture of experts of qwen2moe: imatrix collection supports llama, qwen2, qwen3 and "
                              "mixtures of experts of llama (Mixtral), qwen3moe (Qwen3-MoE)")


# --------------------------------------------------------------------------- Qwen3-MoE

# The dense width (intermediate_size, unused by a Qwen3-MoE whose every layer is sparse) differs from the experts'
# (moe_intermediate_size = N_FF): llama.cpp must take the expert width from expert_feed_forward_length.
QWEN3MOE_DENSE_FF = 96


def _tiny_qwen3moe(root: Path) -> TinyMoE:
    folder = root / "tiny-qwen3moe"
    tokenizer = sentencepiece_tokenizer(folder)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=QWEN3MOE_DENSE_FF, moe_intermediate_size=N_FF,
        num_hidden_layers=N_LAYER, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-6, num_experts=N_EXPERT, num_experts_per_tok=N_USED,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    set_rope(config, {"rope_theta": 10000.0, "rope_type": "default"})
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    randomise(model, seed=11)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gguf_path = convert_hf_to_gguf(folder, root / "tiny-qwen3moe-f32.gguf", outtype="f32")
    ids = [int(i) for i in np.random.default_rng(2).integers(3, len(tokenizer), size=24)]
    return TinyMoE(folder, gguf_path, ids, "Qwen3MoeForCausalLM")


def test_qwen3moe_converts_with_llama_cpps_keys(qwen3moe, tmp_path):
    """The file carries what llama.cpp's qwen3moe loader reads (expert count, used count, expert width apart from
    the dense width, per-head q/k norms); at f16 the router stays F32 as for Mixtral."""
    m = model_moe(qwen3moe.gguf)
    assert (m.arch, m.n_layer, m.n_expert, m.n_expert_used, m.n_ff) == ("qwen3moe", N_LAYER, N_EXPERT, N_USED, N_FF)
    reader = gguf.GGUFReader(qwen3moe.gguf)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("qwen3moe.")}
    assert fields["qwen3moe.expert_feed_forward_length"] == N_FF
    assert fields["qwen3moe.feed_forward_length"] == QWEN3MOE_DENSE_FF
    assert (fields["qwen3moe.expert_count"], fields["qwen3moe.expert_used_count"]) == (N_EXPERT, N_USED)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q_norm.weight"] == shapes["blk.0.attn_k_norm.weight"] == (16,)
    assert shapes["blk.1.ffn_gate_exps.weight"] == (HIDDEN, N_FF, N_EXPERT)  # ggml order: ne0 first
    assert shapes["blk.1.ffn_down_exps.weight"] == (N_FF, HIDDEN, N_EXPERT)

    f16 = convert_hf_to_gguf(qwen3moe.hf, tmp_path / "tiny-qwen3moe-f16.gguf", outtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(f16).tensors}
    assert {types[f"blk.{i}.ffn_gate_inp.weight"] for i in range(N_LAYER)} == {gguf.GGMLQuantizationType.F32}
    assert types["blk.0.ffn_up_exps.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16

    # the hub's Qwen3-30B-A3B config.json spells the expert count num_experts (transformers 5 writes num_local_experts)
    hub = tmp_path / "hub-config"
    shutil.copytree(qwen3moe.hf, hub)
    config = json.loads((hub / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    (hub / "config.json").write_text(json.dumps(config))
    again = convert_hf_to_gguf(hub, tmp_path / "hub-f32.gguf", outtype="f32")
    assert gguf.GGUFReader(again).fields["qwen3moe.expert_count"].contents() == N_EXPERT


def test_qwen3moe_logits_equal_transformers(qwen3moe):
    assert _logits_difference(qwen3moe, "qwen3moe") < 2e-5


def test_qwen3moe_captured_experts_equal_transformers_hooks(qwen3moe):
    """Routing (softmax then top-k: llama.cpp's argsort of the probabilities, transformers' topk) and each routed
    expert's act / down_in, decoded whole and with the last token apart. The top-k renormalisation
    (norm_topk_prob) weighs the experts' outputs after down_in: the logits test covers it."""
    routing, ref = transformers_experts(qwen3moe.load(), qwen3moe.token_ids)
    for last_tokens_apart in (False, True):
        _check_capture_against_transformers(qwen3moe, routing, ref, last_tokens_apart)


def test_qwen3moe_imatrix_equals_the_mul_mat_id_rule(qwen3moe):
    """The imatrix probe's MoE feeds hold for qwen3moe's graph: every blk.* MUL_MAT / MUL_MAT_ID input, per expert."""
    prompts = [np.asarray(qwen3moe.token_ids[:n], dtype=np.int32) for n in (24, 11)]
    im = collect_imatrix(qwen3moe.gguf, prompts, datasets=["ids"], n_ctx=128, n_threads=1)
    ref_sums, ref_counts = _mul_mat_rule(qwen3moe, prompts)
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                 "ffn_down_exps"]
    assert set(im.entries) == set(ref_sums) == {f"blk.{i}.{w}.weight" for i in range(N_LAYER) for w in per_layer}
    for name, entry in im.entries.items():
        np.testing.assert_allclose(entry.sums, ref_sums[name], rtol=1e-9, err_msg=name)
        assert entry.counts.tolist() == ref_counts[name].tolist(), name
    down = im.entries["blk.1.ffn_down_exps.weight"]
    assert down.sums.shape == (N_EXPERT, N_FF) and down.counts.sum() == N_USED * 35


def test_qwen3moe_eval_neurons_json_carries_the_experts(qwen3moe, tmp_path, boolq_path):
    """`eval --neurons --json` through the CLI on qwen3moe: every layer's routing counts the run's tokens."""
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    args = ["eval", str(qwen3moe.gguf), "--neurons", "--task", "boolq", "--data", str(boolq_path), "--limit", "2",
            "--layers", "all", "--threads", "2", "-o", str(tmp_path / "run"), "--json"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    level = next(iter(json.loads(res.output)["neurons"].values()))
    for layer in range(N_LAYER):
        routing = level["experts"]["layers"][str(layer)]
        assert sum(routing["routed"]) == N_USED * routing["tokens"] and routing["tokens"] == level["tokens"] > 0
    assert "salient" not in level and level["salient_note"].startswith("mixture of experts")


def test_qwen3moe_settings_llama_cpp_cannot_run_are_refused(tmp_path):
    """norm_topk_prob false and dense layers among the experts change what llama.cpp's qwen3moe graph computes:
    refused in one line before any tensor is read."""
    base = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4,
            "num_experts_per_tok": 2, "norm_topk_prob": True}
    for i, (change, message) in enumerate((({"norm_topk_prob": False}, "norm_topk_prob false is not supported"),
                                           ({"mlp_only_layers": [1]}, "dense layers among the experts"),
                                           ({"decoder_sparse_step": 2}, "dense layers among the experts"))):
        folder = tmp_path / f"config{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ProbeError, match=message) as err:
            convert_hf_to_gguf(folder, tmp_path / "x.gguf", outtype="f32")
        assert "\n" not in str(err.value)
