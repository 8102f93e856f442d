"""Faster passes (issue 14): a shared prompt prefix decoded once, batched eval by default, the
top-activation pre-selection. Each against the path it replaces, computed independently."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ggml_probe.analysis.neurons import _best_rows
from ggml_probe.engine.ffn import DEFINITIONS
from ggml_probe.engine.model import MIN_SHARED_ROWS, STOP_AFTER_KV, common_prefix_length

# logits of a packed or prefix-shared batch against one prompt per decode: llama.cpp's CPU kernels
# depend on the batch layout (test_engine's BATCH_NOISE_*; measured here on the demo F16 at 20 BoolQ
# prompts: 0.068 in a logit with the prefix shared by 16 prompts)
LAYOUT_NOISE_LOGIT = 0.2
LAYOUT_NOISE_LABEL_P = 0.005


def test_common_prefix_length_leaves_every_prompt_a_token():
    a, b, c = np.array([1, 2, 3, 4]), np.array([1, 2, 3, 9, 9]), np.array([1, 2, 3])
    assert common_prefix_length([a, b]) == 3
    assert common_prefix_length([a, b, c]) == 2  # c keeps its last token to itself
    assert common_prefix_length([a, np.array([7, 2, 3, 4])]) == 0
    assert common_prefix_length([a, a.copy()]) == 3
    for arrays in ([a, b], [b, a, c], [a, a]):  # against os.path.commonprefix on the lists
        expect = min(len(os.path.commonprefix([list(t) for t in arrays])), min(map(len, arrays)) - 1)
        assert common_prefix_length(arrays) == expect


def test_best_rows_is_the_stable_sort_with_ties():
    rng = np.random.default_rng(3)
    for trial in range(60):
        n, m, k = int(rng.integers(11, 200)), int(rng.integers(1, 40)), int(rng.integers(1, 11))
        x = rng.standard_normal((n, m))
        if trial % 3 == 0:
            x = np.round(x, 1)  # many ties, some at the k-th place
        if trial % 4 == 0:
            x[:, 0] = 0.0  # a column of equal values
        np.testing.assert_array_equal(_best_rows(x, k), np.argsort(-x, axis=0, kind="stable")[:k])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import neurons_tiny

    from ggml_probe.models.convert import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("passes-tiny")
    neurons_tiny.build_hf(root / "hf")
    return convert_hf_to_gguf(root / "hf", root / "tiny-f32.gguf", outtype="f32")


INSTRUCTION = "Respond with True or False only.\n"
QUESTIONS = ["is the sky blue", "do fish fly", "can a dog read 12345 books", "is water wet",
             "are cats mammals", "is zero odd", "does the sun rise in the west"]


def _tiny_pass(gguf, share: bool):
    """Every prompt's FFN rows as the consumer got them, the on_batch calls, the statistics, the logits."""
    from ggml_probe.engine.model import Engine
    from ggml_probe.engine.probes import FFNCapture, ProbeSet, run_checked
    from ggml_probe.pipeline.neuron_stats import NeuronProbe

    rows: dict = {}
    layouts: list = []

    def keep(layer, definition, values, layout):
        layouts.append((layer, definition, layout.row_prompt.tolist(), layout.row_pos.tolist()))
        for p in layout.prompt_indices:
            rows[(definition, layer, p)] = values[layout.row_prompt == p].copy()

    capture = FFNCapture(gguf, keep, layers="all")
    stats = NeuronProbe(gguf, "all", redundancy=True, top_k=3)
    probes = ProbeSet([capture, stats])
    calls: list = []

    def on_batch(indices, arrays, **where):
        calls.append((list(indices), [len(a) for a in arrays], where))
        original(indices, arrays, **where)

    probes.on_batch, original = on_batch, probes.on_batch
    with Engine(gguf, n_ctx=512, n_threads=1, n_seq_max=4, kv_type=0, hidden_states=True,
                eval_callback=probes.eval_callback) as engine:
        tokens = [engine.tokenize(INSTRUCTION + q) for q in QUESTIONS]
        results = run_checked(engine, probes, tokens, share_prefix=share)
        split = engine.split_pays
    return {"split": split, "rows": rows, "layouts": layouts, "acc": stats.finish(), "calls": calls, "tokens": tokens,
            "logits": np.stack([r.logits for r in results]), "hidden": np.stack([r.hidden for r in results]),
            "n_tokens": [r.n_tokens for r in results]}


@pytest.mark.slow
def test_a_shared_prefix_counts_every_prompts_tokens_as_the_unshared_pass(tiny):
    whole, shared = _tiny_pass(tiny, False), _tiny_pass(tiny, True)
    tokens = whole["tokens"]
    # the prefix really was shared: per group of four, the instruction's tokens once, then the rests
    groups = [list(range(0, 4)), list(range(4, 7))]
    expect_calls = []
    for g in groups:
        n = min(len(os.path.commonprefix([list(tokens[i]) for i in g])), min(len(tokens[i]) for i in g) - 1)
        assert n >= 8  # the instruction is most of it
        if n * (len(g) - 1) >= MIN_SHARED_ROWS:  # the prefix's KV is read at every layer: may stop after it
            expect_calls.append((g, [n], {"shared": True, "may_stop": STOP_AFTER_KV}))
            rests = [len(tokens[i]) - n for i in g]
        else:  # too little to save for a decode of its own
            rests, n = [len(tokens[i]) for i in g], 0
        if shared["split"](sum(rests) - len(g)):  # every last token apart, after the rows before it
            expect_calls += [(g, [r - 1 for r in rests], {"start": n, "may_stop": STOP_AFTER_KV} if n else
                              {"may_stop": STOP_AFTER_KV}), (g, [1] * len(g), {"starts": [n + r - 1 for r in rests]})]
        else:
            expect_calls.append((g, rests, {"start": n} if n else {}))
    assert expect_calls[0][2]["shared"]  # the first group at least was shared
    assert shared["calls"] == expect_calls
    assert [c[0] for c in whole["calls"]] == [
        g for g in groups for _ in range(2 if whole["split"](sum(len(tokens[i]) - 1 for i in g)) else 1)]
    # the consumer saw the same rows, prompt by prompt and position by position, as without sharing
    assert shared["layouts"] == whole["layouts"]
    assert shared["rows"].keys() == whole["rows"].keys()
    for key, values in whole["rows"].items():
        assert values.shape == shared["rows"][key].shape
        np.testing.assert_allclose(shared["rows"][key], values, rtol=1e-4, atol=1e-4)
    a, b = whole["acc"], shared["acc"]
    assert a.n_prompts == b.n_prompts == len(QUESTIONS)
    for key in a.stats:
        sa, sb = a.stats[key], b.stats[key]
        assert sa.count == sb.count == sum(len(t) for t in tokens)
        np.testing.assert_array_equal(sa.n_pos, sb.n_pos)
        np.testing.assert_array_equal(sa.dead(0.1), sb.dead(0.1))
        np.testing.assert_allclose(sb.mean, sa.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sb.variance, sa.variance, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sb.maxabs, sa.maxabs, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.correlation(*key), a.correlation(*key), atol=1e-4)
        np.testing.assert_allclose(b.top[key].value, a.top[key].value, rtol=1e-4, atol=1e-5)
    assert shared["n_tokens"] == whole["n_tokens"]
    np.testing.assert_allclose(shared["logits"], whole["logits"], atol=1e-3)
    np.testing.assert_allclose(shared["hidden"], whole["hidden"], atol=1e-3)


def _boolq(path, n):
    rows = [json.loads(line) for line in path.open()][:n]
    return [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows]


@pytest.mark.slow
def test_shared_prefix_logits_agree_with_one_prompt_per_decode_on_the_demo(demo_ladder, boolq_path):
    from ggml_probe.analysis.scoring import label_logits, log_softmax
    from ggml_probe.engine.model import Engine
    from ggml_probe.pipeline.evaluation import label_tokens_for

    prompts = _boolq(boolq_path, 20)
    out = {}
    for n_seq, share in ((1, False), (16, True)):
        with Engine(demo_ladder["F16"], n_ctx=2048, n_seq_max=n_seq, hidden_states=False) as engine:
            lt = label_tokens_for(engine, ["True", "False"], prompts[0])
            tokens = [engine.tokenize(p) for p in prompts]
            out[share] = np.stack([r.logits for r in engine.run(tokens, share_prefix=share)])
    shared, alone = out[True], out[False]
    assert np.abs(shared - alone).max() < LAYOUT_NOISE_LOGIT
    p_shared, p_alone = (np.exp(log_softmax(label_logits(x, lt))) for x in (shared, alone))
    assert np.abs(p_shared - p_alone).max() < LAYOUT_NOISE_LABEL_P
    clear = np.abs(p_alone[:, 0] - p_alone[:, 1]) > 2 * LAYOUT_NOISE_LABEL_P
    assert clear.sum() >= 15 and np.array_equal(p_shared.argmax(1)[clear], p_alone.argmax(1)[clear])


@pytest.mark.slow
def test_eval_is_batched_by_default_and_agrees_with_batch_1(demo_ladder, boolq_path, tmp_path):
    """On the F16 file: the shipped Q4_1's logits move more with the layout (README, engine notes; here
    up to 0.025 in a label probability over these 40 prompts)."""
    import pandas as pd
    from click.testing import CliRunner

    from ggml_probe.cli import cli
    from ggml_probe.pipeline.tokens import decoded_tokens

    runner = CliRunner()
    base = ["eval", str(demo_ladder["F16"]), "--task", "boolq", "--data", str(boolq_path), "--limit", "40", "-q"]
    default = runner.invoke(cli, [*base, "-o", str(tmp_path / "default")])
    single = runner.invoke(cli, [*base, "--batch", "1", "-o", str(tmp_path / "single")])
    assert default.exit_code == 0 and single.exit_code == 0, default.output + single.output
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["identity"]["batch_prompts"] == 32 and manifest["identity"]["share_prefix"] is True
    assert "batch_prompts" not in json.loads((tmp_path / "single" / "manifest.json").read_text())["identity"]
    # the same tokens decoded, exactly; the answers within the layout noise
    for a, b in zip(decoded_tokens(tmp_path / "default"), decoded_tokens(tmp_path / "single")):
        np.testing.assert_array_equal(a, b)
    d = pd.read_parquet(tmp_path / "default" / "predictions.parquet")
    s = pd.read_parquet(tmp_path / "single" / "predictions.parquet")
    assert (d["n_tokens"] == s["n_tokens"]).all()
    assert np.abs(d["p_True"] - s["p_True"]).max() < LAYOUT_NOISE_LABEL_P
    clear = (s["p_True"] - s["p_False"]).abs() > 2 * LAYOUT_NOISE_LABEL_P
    assert clear.sum() >= 30 and (d["pred"][clear] == s["pred"][clear]).all()


def test_sequences_are_capped_at_a_batch_s_rows(demo_path):
    """--batch 32 with a tiny --ctx: llama.cpp asserts (aborts the process) when a context allows more
    sequences than a batch has rows; the engine caps them instead."""
    from ggml_probe.engine.model import Engine

    with Engine(demo_path, n_ctx=16, n_seq_max=32, n_threads=1, hidden_states=False) as engine:
        assert engine.n_seq_max == 16 and engine.n_batch == 16
        (res,) = engine.run([engine.tokenize("Is the sky blue?")])
        assert np.isfinite(res.logits).all()


def _capture_run(gguf, layers, *, logits: bool, last_tokens_apart: bool | None = None, share: bool = False):
    """Every prompt's FFN rows (keyed (definition, layer, prompt)), the results, and per decode what
    on_batch was told and the graph tensors llama.cpp offered (names, in the order asked), for one
    run_checked of FFNCapture."""
    from ggml_probe.engine.model import Engine
    from ggml_probe.engine.probes import FFNCapture, run_checked

    rows: dict = {}

    def keep(layer, definition, values, layout):
        for p in layout.prompt_indices:
            rows.setdefault((definition, layer, p), []).append(values[layout.row_prompt == p].copy())

    asked: list[tuple[dict, list[str]]] = []

    class Recording(FFNCapture):  # the capture as users run it, noting what each decode was told and offered
        def on_batch(self, indices, arrays, **where):
            asked.append((where, []))
            super().on_batch(indices, arrays, **where)

        def eval_callback(self, t, ask):
            if ask:
                asked[-1][1].append(self.reader.name(t))
            return super().eval_callback(t, ask)

    probe = Recording(gguf, keep, layers=layers)
    with Engine(gguf, n_ctx=512, n_threads=1, n_seq_max=4, kv_type=0, hidden_states=True,
                eval_callback=probe.eval_callback) as engine:
        engine.last_tokens_apart = last_tokens_apart
        tokens = [engine.tokenize(INSTRUCTION + q) for q in QUESTIONS]
        results = run_checked(engine, probe, tokens, share_prefix=share, logits=logits)
    joined = {k: np.concatenate(v) for k, v in rows.items()}
    return joined, results, asked


@pytest.mark.slow
def test_a_pass_that_reads_no_logits_ends_each_graph_after_its_last_tensor(tiny):
    from ggml_probe.engine.ffn import model_ffn

    n_layer = model_ffn(tiny).n_layer
    for layers, share in (("0", False), ("all", False), ("all", True)):
        full, full_results, full_asked = _capture_run(tiny, layers, logits=True, last_tokens_apart=False, share=share)
        cut, cut_results, cut_asked = _capture_run(tiny, layers, logits=False, share=share)
        # the same decodes, each ended where the probe had what it wanted: no output matrix, and with
        # layer 0 alone nothing of the next layer; with logits, only a shared prefix's decode ends early
        assert len(cut_asked) == len(full_asked)
        assert all(("result_output" in names) != bool(where.get("shared")) for where, names in full_asked)
        assert not any("result_output" in names for _, names in cut_asked)
        if layers == "0":
            assert not any(name.endswith(f"-{n_layer - 1}") for _, names in cut_asked for name in names)
        assert all(r.logits is None for r in cut_results)
        # what the probe read is what the whole graph computes, to the bit
        assert cut.keys() == full.keys() and len(cut) == len(QUESTIONS) * len(DEFINITIONS) * (
            1 if layers == "0" else n_layer)
        for key, values in full.items():
            np.testing.assert_array_equal(cut[key], values)


@pytest.mark.slow
def test_last_tokens_decoded_apart_give_the_same_logits_and_neurons(tiny):
    from ggml_probe.engine.ffn import model_ffn

    n_layer = model_ffn(tiny).n_layer
    for share in (False, True):
        whole, whole_results, whole_asked = _capture_run(tiny, "all", logits=True, last_tokens_apart=False, share=share)
        apart, apart_results, apart_asked = _capture_run(tiny, "all", logits=True, last_tokens_apart=True, share=share)
        # per group, the rows before the last tokens (ended after the last layer's FFN, so no output
        # matrix), then the last tokens with it
        with_output = [names for _, names in apart_asked if "result_output" in names]
        assert len(with_output) == 2 and len(apart_asked) == len(whole_asked) + 2
        assert all(f"ffn_up-{n_layer - 1}" in names for _, names in apart_asked)
        # every prompt's rows, position by position, and its last logits as one decode gives them (F32
        # weights and KV: only the kernels' batch shapes differ)
        assert apart.keys() == whole.keys()
        for key, values in whole.items():
            np.testing.assert_allclose(apart[key], values, rtol=1e-5, atol=1e-5)
        for a, w in zip(apart_results, whole_results):
            assert a.n_tokens == w.n_tokens
            np.testing.assert_allclose(a.logits, w.logits, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(a.hidden, w.hidden, rtol=1e-5, atol=1e-5)


def test_only_ffn_tensors_of_the_last_layer_let_a_capture_end_graphs_past_its_attention(tiny):
    """A graph may end early before a later decode reads its KV only past the last layer's attention:
    the last layer's FFN tensors are, its attention's inputs (attn_norm) are not."""
    from ggml_probe.engine.ffn import model_ffn
    from ggml_probe.engine.probes import FFNCapture

    last = model_ffn(tiny).n_layer - 1
    assert FFNCapture(tiny, lambda *a: None, layers="all").reaches_last_layer
    assert not FFNCapture(tiny, lambda *a: None, layers=[0]).reaches_last_layer
    assert not FFNCapture(tiny, lambda *a: None, layers=[0], extra=[f"attn_norm-{last}"]).reaches_last_layer
    assert FFNCapture(tiny, lambda *a: None, layers=[0], extra=[f"ffn_norm-{last}"]).reaches_last_layer


@pytest.mark.slow
def test_a_stop_allowed_by_one_run_is_not_carried_into_a_run_without_on_batch(tiny):
    """A library caller's Engine.run(logits=False, on_batch=probe.on_batch) lets the probe end each graph after
    its tensor; a later run on the same engine without on_batch decodes whole graphs again: later tensors are
    offered, and the logits are a fresh engine's."""
    from ggml_probe.engine.ffn import model_ffn
    from ggml_probe.engine.model import Engine
    from ggml_probe.engine.probes import Probe

    n_layer = model_ffn(tiny).n_layer
    offered: list[str] = []

    class FirstLayerUp(Probe):  # reads nothing; may end a graph after layer 0's FFN up-projection
        def wants(self, name):
            offered.append(name)
            return name == "ffn_up-0"

        def handle(self, t, name):
            pass

        def stop_names(self):
            return ["ffn_up-0"]

    probe = FirstLayerUp()
    kwargs = dict(n_ctx=512, n_threads=1, kv_type=0, hidden_states=True)
    with Engine(tiny, eval_callback=probe.eval_callback, **kwargs) as engine:
        tokens = [engine.tokenize(INSTRUCTION + QUESTIONS[0])]
        engine.run(tokens, logits=False, on_batch=probe.on_batch)  # directly, not through run_checked
        probe.check()
        assert "ffn_up-0" in offered and not any(n.endswith(f"-{n_layer - 1}") or n == "result_output" for n in offered)
        offered.clear()
        after = engine.run(tokens)
        probe.check()
    assert f"ffn_up-{n_layer - 1}" in offered and "result_output" in offered
    with Engine(tiny, **kwargs) as fresh:
        expected = fresh.run(tokens)
    np.testing.assert_array_equal(after[0].logits, expected[0].logits)
    np.testing.assert_array_equal(after[0].hidden, expected[0].hidden)


def track_decoding(engine) -> list[bool]:
    """Wraps the engine's llama_decode: the returned flag ([0]) is True while a decode runs."""
    decoding = [False]
    decode = engine._llama_decode

    def marked(batch):
        decoding[0] = True
        try:
            decode(batch)
        finally:
            decoding[0] = False

    engine._llama_decode = marked
    return decoding


@pytest.mark.slow
def test_the_capture_consumes_between_decodes_and_past_its_cap_inside_them(tiny, monkeypatch):
    """FFNCapture copies tensors out in the callback and hands them to its consumer before the next decode
    (or when the run settles); past _DEFERRED_BYTES it hands them over at once. Both give the consumer the
    same rows, in the same order, and the statistics are the same."""
    from ggml_probe.engine import probes as probes_module
    from ggml_probe.engine.model import Engine
    from ggml_probe.engine.probes import FFNCapture, ProbeSet, run_checked
    from ggml_probe.pipeline.neuron_stats import NeuronProbe

    def run(cap_bytes):
        monkeypatch.setattr(probes_module, "_DEFERRED_BYTES", cap_bytes)
        seen, inside = [], []

        def keep(layer, definition, values, layout):
            seen.append((layer, definition, layout.row_prompt.tolist(), layout.row_pos.tolist(), values.copy()))
            inside.append(decoding[0])

        stats = NeuronProbe(tiny, "all", redundancy=True, top_k=3)
        probes = ProbeSet([FFNCapture(tiny, keep, layers="all"), stats])
        with Engine(tiny, n_ctx=512, n_threads=1, n_seq_max=4, kv_type=0, eval_callback=probes.eval_callback) as engine:
            decoding = track_decoding(engine)
            tokens = [engine.tokenize(INSTRUCTION + q) for q in QUESTIONS]
            run_checked(engine, probes, tokens, share_prefix=True)
        return seen, inside, stats.finish()

    deferred, deferred_inside, a = run(64 << 20)
    at_once, at_once_inside, b = run(0)
    assert deferred and not any(deferred_inside)  # every consumer call between decodes
    assert all(at_once_inside)  # past the cap: inside the callback, as the tensor came
    assert [s[:4] for s in deferred] == [s[:4] for s in at_once]
    for x, y in zip(deferred, at_once):
        np.testing.assert_array_equal(x[4], y[4])
    for key in a.stats:
        np.testing.assert_array_equal(a.stats[key].mean, b.stats[key].mean)
        np.testing.assert_array_equal(a.correlation(*key), b.correlation(*key))
        np.testing.assert_array_equal(a.top[key].value, b.top[key].value)
