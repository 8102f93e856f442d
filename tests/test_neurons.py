"""Neuron statistics: streaming accumulators on arrays with known answers, and the llama.cpp capture
and patching against independent computations (transformers, a zeroed-weight GGUF, imatrix's rule)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ggml_probe.analysis import neurons as neurons_module
from ggml_probe.analysis.neurons import (
    CoMoment,
    NeuronAccumulator,
    NeuronStats,
    TopActivations,
    corr_histogram,
    correlation_groups,
    pairs_above,
    top_token_contexts,
)
from ggml_probe.errors import ProbeError, UnsupportedArchitecture

# ------------------------------------------------------------------ accumulators: known answers


def test_stats_known_values():
    x = np.array([[1.0, -2.0, 0.0], [3.0, 0.05, 0.0], [-1.0, 0.01, 0.0], [5.0, -0.09, 0.0]])
    s = NeuronStats(3)
    s.update(x)
    assert s.count == 4
    np.testing.assert_allclose(s.mean, [2.0, -0.5075, 0.0])
    np.testing.assert_allclose(s.variance[0], ((1 - 2) ** 2 + 1 + 9 + 9) / 4)  # 5.0
    np.testing.assert_array_equal(s.min, [-1.0, -2.0, 0.0])
    np.testing.assert_array_equal(s.max, [5.0, 0.05, 0.0])
    np.testing.assert_array_equal(s.maxabs, [5.0, 2.0, 0.0])
    np.testing.assert_allclose(s.fraction_positive, [0.75, 0.5, 0.0])
    np.testing.assert_allclose(s.sumsq, [36.0, 4 + 0.0025 + 0.0001 + 0.0081, 0.0])


def test_dead_is_open_interval_on_max_abs():
    x = np.zeros((5, 4))
    x[:, 0] = [0.0999, -0.0999, 0, 0, 0]  # dead
    x[:, 1] = [0.0, 0.1, 0, 0, 0]  # 0.1 itself is outside (−0.1, 0.1): alive
    x[:, 2] = [0.0, 0.0, -0.1, 0, 0]  # alive
    x[:, 3] = 0.0  # dead
    s = NeuronStats(4)
    s.update(x[:2])
    s.update(x[2:])
    np.testing.assert_array_equal(s.dead(0.1), [0, 3])
    np.testing.assert_array_equal(s.dead(0.5), [0, 1, 2, 3])


def test_streaming_equals_batch_with_large_offsets():
    rng = np.random.default_rng(0)
    # residual-like scales: means in the thousands, small spread, so naive sums would lose digits
    x = rng.normal(size=(1000, 16)) * rng.uniform(0.01, 3, 16) + rng.uniform(-5000, 5000, 16)
    x[:, 5] = 2.0 * x[:, 3] + 1.0  # exactly correlated pair
    x[:, 7] = -x[:, 2]  # anti-correlated
    s, c, c_blocked = NeuronStats(16), CoMoment(16, block_rows=1), CoMoment(16, block_rows=400)
    for chunk in np.array_split(x, [1, 7, 300, 301, 650]):
        s.update(chunk)
        c.update(chunk)
        c_blocked.update(chunk)
    np.testing.assert_allclose(c_blocked.correlation(), c.correlation(), atol=1e-10)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.variance, x.var(0), rtol=1e-9)
    np.testing.assert_array_equal(s.min, x.min(0))
    np.testing.assert_array_equal(s.max, x.max(0))
    np.testing.assert_allclose(s.sumsq, (x**2).sum(0), rtol=1e-12)
    r = c.correlation()
    np.testing.assert_allclose(r, np.corrcoef(x, rowvar=False), atol=1e-9)
    assert r[3, 5] == pytest.approx(1.0, abs=1e-9) and r[2, 7] == pytest.approx(-1.0, abs=1e-9)
    # float32 block products (the neuron pass's default): each block is centred in float64 first, so the
    # offsets cost nothing and only float32's rounding of the products remains
    c32 = CoMoment(16, block_rows=400, product_dtype=np.float32)
    for chunk in np.array_split(x, [1, 7, 300, 301, 650]):
        c32.update(chunk)
    np.testing.assert_allclose(c32.correlation(), np.corrcoef(x, rowvar=False), atol=1e-6)
    # 50 blocks: their float32 products summed over several blocks before joining the float64 sums, a
    # state read mid-stream (a checkpoint) folding what was summed so far
    many = CoMoment(16, block_rows=20, product_dtype=np.float32)
    for i, chunk in enumerate(np.array_split(x, 37)):
        many.update(chunk)
        if i == 20:
            mid = CoMoment.from_arrays(many.arrays(), product_dtype=np.float32)
            np.testing.assert_allclose(mid.correlation(), np.corrcoef(x[:mid.count], rowvar=False), atol=1e-6)
    assert many.count == len(x)
    np.testing.assert_allclose(many.correlation(), np.corrcoef(x, rowvar=False), atol=1e-6)

    # merging two halves accumulated separately gives the same as one stream
    a, b = NeuronStats(16), NeuronStats(16)
    a.update(x[:400])
    b.update(x[400:])
    a.merge(b)
    np.testing.assert_allclose(a.variance, s.variance, rtol=1e-10)
    ca, cb = CoMoment(16), CoMoment(16)
    ca.update(x[:400])
    cb.update(x[400:])
    ca.merge(cb)
    np.testing.assert_allclose(ca.correlation(), r, atol=1e-10)


def test_constant_neuron_gets_nan_correlation_and_is_left_out():
    x = np.random.default_rng(1).normal(size=(50, 3))
    x[:, 1] = 4.0
    c = CoMoment(3)
    c.update(x)
    r = c.correlation()
    assert np.isnan(r[1]).all() and np.isnan(r[:, 1]).all()
    assert corr_histogram(r).sum() == 1  # only the pair (0, 2) remains


def test_histogram_bins_threshold_and_groups_known():
    r = np.eye(5)
    pairs = {(0, 1): 0.95, (0, 2): -0.3, (0, 3): 0.05, (0, 4): 1.0, (1, 2): 0.1,
             (1, 3): 0.2999, (1, 4): 0.9, (2, 3): -0.55, (2, 4): 0.0, (3, 4): 0.89999}
    for (i, j), v in pairs.items():
        r[i, j] = r[j, i] = v
    hist = corr_histogram(r)
    # bins: 0.95→9, 0.3→3, 0.05→0, 1.0→9, 0.1→1, 0.2999→2, 0.9→9, 0.55→5, 0.0→0, 0.89999→8
    np.testing.assert_array_equal(hist, [2, 1, 1, 1, 0, 1, 0, 0, 1, 3])
    assert pairs_above(r, 0.9) == 3

    # two blocks of strongly (anti)correlated neurons and one loner
    rng = np.random.default_rng(2)
    u, v, w = rng.normal(size=(3, 400))
    x = np.stack([u, 2 * u + 0.01 * rng.normal(size=400), -u, v, v + 0.01 * rng.normal(size=400), w], axis=1)
    labels = correlation_groups(np.corrcoef(x, rowvar=False), threshold=0.3)
    assert labels.max() == 3
    assert len({labels[0], labels[1], labels[2]}) == 1 and labels[3] == labels[4] != labels[0]
    assert labels[5] not in (labels[0], labels[3])


@pytest.mark.parametrize("sparse_share", [1, 8, 10**9])
def test_top_activations_streaming_equals_sort_with_ties(monkeypatch, sparse_share):
    # 1: every batch merged entry by entry; 10**9: every batch through the per-neuron selection; 8: as shipped
    monkeypatch.setattr(neurons_module, "_SPARSE_SHARE", sparse_share)
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=(120, 6)), 1)  # rounding makes many exact ties
    row_prompt = np.repeat(np.arange(12), 10)
    row_pos = np.tile(np.arange(10), 12)
    top, backwards = TopActivations(6, k=5), TopActivations(6, k=5)
    chunks = np.array_split(np.arange(120), [3, 40, 41, 90])
    for rows in chunks:
        top.update(x[rows], row_prompt[rows], row_pos[rows])
    for rows in reversed(chunks):  # later prompts first: the general (three-key) path
        backwards.update(x[rows], row_prompt[rows], row_pos[rows])
    for j in range(6):
        order = sorted(range(120), key=lambda i: (-x[i, j], row_prompt[i], row_pos[i]))[:5]
        expected = [(x[i, j], int(row_prompt[i]), int(row_pos[i])) for i in order]
        assert top.for_neuron(j) == expected
        assert backwards.for_neuron(j) == expected
    by_abs = TopActivations(6, k=2, by="abs")
    by_abs.update(x, row_prompt, row_pos)
    j = 0
    best = sorted(range(120), key=lambda i: (-abs(x[i, j]), row_prompt[i], row_pos[i]))[:2]
    assert [v for v, _, _ in by_abs.for_neuron(j)] == [x[i, j] for i in best]  # the signed values are kept

    # wider and longer: 300 prompts of 8 tokens in batches of 40 prompts, 64 neurons, k=10, many ties
    x = np.round(rng.normal(size=(2400, 64)), 1)
    row_prompt, row_pos = np.repeat(np.arange(300), 8), np.tile(np.arange(8), 300)
    wide = TopActivations(64, k=10)
    for rows in np.array_split(np.arange(2400), 7):
        wide.update(x[rows], row_prompt[rows], row_pos[rows])
    ranks = np.lexsort((np.broadcast_to(row_pos[:, None], x.shape), np.broadcast_to(row_prompt[:, None], x.shape), -x),
                       axis=0)[:10]
    np.testing.assert_array_equal(wide.value, np.take_along_axis(x, ranks, 0))
    np.testing.assert_array_equal(wide.prompt, row_prompt[ranks])
    np.testing.assert_array_equal(wide.pos, row_pos[ranks])


class _Layout:
    def __init__(self, prompts, positions, shared_by=None):
        self.row_prompt, self.row_pos, self.shared_by = np.asarray(prompts), np.asarray(positions), shared_by


@pytest.mark.parametrize("sparse_share", [1, 10**9])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_shared_prefix_rows_count_for_every_prompt_sharing_them(monkeypatch, sparse_share, dtype, tol):
    # Groups of prompts sharing a prefix: its rows come once (layout.shared_by), then each prompt's rest.
    # Every statistic must be what NumPy gives on every prompt's whole rows, the prefix copied into each.
    monkeypatch.setattr(neurons_module, "_SPARSE_SHARE", sparse_share)
    rng = np.random.default_rng(11)
    n_ff, k = 16, 4
    acc = NeuronAccumulator([3], ["act"], n_ff, top_k=k, comoment_dtype=dtype)
    whole_rows, whole_prompt, whole_pos = [], [], []
    prompt = 0
    for group_size, n_prefix in ((6, 5), (3, 7), (1, 0)):
        prefix = np.round(rng.normal(size=(n_prefix, n_ff)) + 0.5, 1)  # rounded: ties between prefix and rests
        members = list(range(prompt, prompt + group_size))
        if n_prefix:
            acc.update(3, "act", prefix, _Layout([members[0]] * n_prefix, range(n_prefix), shared_by=members))
        for p in members:
            rest = np.round(rng.normal(size=(int(rng.integers(1, 6)), n_ff)), 1)
            acc.update(3, "act", rest, _Layout([p] * len(rest), range(n_prefix, n_prefix + len(rest))))
            whole_rows.append(np.concatenate([prefix, rest]))
            whole_prompt += [p] * (n_prefix + len(rest))
            whole_pos += list(range(n_prefix + len(rest)))
        prompt += group_size
    x, row_prompt, row_pos = np.concatenate(whole_rows), np.asarray(whole_prompt), np.asarray(whole_pos)
    key = ("act", 3)
    stats = acc.stats[key]
    assert acc.n_prompts == prompt and stats.count == len(x)
    np.testing.assert_array_equal(stats.n_pos, (x > 0).sum(axis=0))
    np.testing.assert_array_equal(stats.maxabs, np.abs(x).max(axis=0))
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.variance, x.var(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.sumsq, (x * x).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.correlation("act", 3), np.corrcoef(x, rowvar=False), rtol=0, atol=tol)
    ranks = np.lexsort((np.broadcast_to(row_pos[:, None], x.shape), np.broadcast_to(row_prompt[:, None], x.shape), -x),
                       axis=0)[:k]
    top = acc.top[key]
    np.testing.assert_array_equal(top.value, np.take_along_axis(x, ranks, 0))
    np.testing.assert_array_equal(top.prompt, row_prompt[ranks])
    np.testing.assert_array_equal(top.pos, row_pos[ranks])


def test_top_token_contexts_resolves_text():
    top = TopActivations(2, k=1)
    top.update(np.array([[0.0, 1.0], [5.0, 0.5], [1.0, 0.1]]), np.array([0, 0, 1]), np.array([0, 1, 0]))
    prompts = [[10, 11], [12]]
    rows = top_token_contexts(top, 0, prompts, lambda t: f"<{t}>", window=3)
    assert rows == [{"value": 5.0, "prompt": 0, "position": 1, "token": "<11>", "context": "<10>"}]


def _assert_comoments_close(a, b, tol, err_msg=""):
    """Co-moment matrices equal to `tol` on the correlation's scale (each entry over sqrt(c_ii·c_jj)): a
    block's float32 products carry an error of float32's rounding of Σ|x_i·x_j|, not of the sum itself."""
    scale = np.sqrt(np.outer(np.diag(a), np.diag(a)))
    np.testing.assert_allclose(np.tril(a) / scale, np.tril(b) / scale, rtol=0, atol=tol, err_msg=err_msg)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_accumulator_resume_from_npz_is_exact(tmp_path, dtype, tol):
    # float64 block products: the same sums to rounding; float32 (the default): to float32's rounding of a block
    rng = np.random.default_rng(4)
    batches = [(rng.normal(size=(n, 8)) * 3, _Layout([i] * n, range(n))) for i, n in enumerate([5, 9, 4, 7])]

    def feed(acc, part):
        for values, layout in part:
            for layer in (0, 2):
                acc.update(layer, "act", values + layer, layout)

    full = NeuronAccumulator([0, 2], ["act"], 8, top_k=3, comoment_dtype=dtype)
    feed(full, batches)
    first = NeuronAccumulator([0, 2], ["act"], 8, top_k=3, comoment_dtype=dtype)
    feed(first, batches[:2])
    path = first.save(tmp_path / "state.npz")
    resumed = NeuronAccumulator.load(path)
    feed(resumed, batches[2:])
    a, b = full.state(), resumed.state()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("/comoment.c"):  # saving folds the co-moment's row buffer: same sums, other grouping
            _assert_comoments_close(a[k], b[k], tol, err_msg=k)
        elif "/comoment." in k:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads(str(b["meta"]))["n_prompts"] == 4
    assert resumed.comoment_dtype == dtype  # a resumed run keeps its products' precision
    with pytest.raises(ProbeError, match="not a neuron-state file"):
        NeuronAccumulator.load(tmp_path / "missing.npz")


def test_redundancy_memory_budget_is_enforced():
    # an explicit request for every neuron over the budget: one line; by default an evenly spaced subset
    with pytest.raises(ProbeError, match=r"GiB .*--no-redundancy"):
        NeuronAccumulator(list(range(30)), ["act", "down_in"], 8192, memory_budget_bytes=2 << 30, redundancy_full=True)
    shrunk = NeuronAccumulator(list(range(30)), ["act", "down_in"], 8192, memory_budget_bytes=2 << 30, top_k=0)
    n = len(shrunk.redundancy_neurons)
    assert 8 * n * n * (60 + 1) <= 2 << 30 < 8 * 8192**2 * 61
    np.testing.assert_array_equal(shrunk.redundancy_neurons, np.arange(0, 8192, shrunk.redundancy_stride))
    assert "--redundancy-full" in shrunk.redundancy_plan.note()
    full = NeuronAccumulator([0], ["act"], 64, memory_budget_bytes=1, allow_large=True)
    assert full.redundancy_stride == 1 and full.redundancy_plan.note() is None
    NeuronAccumulator(list(range(30)), ["act"], 8192, redundancy=False)


# ------------------------------------------------------------------ architecture names


def test_ffn_names_per_architecture():
    from ggml_probe.engine.ffn import ffn_names

    llama = ffn_names("llama", ["blk.0.ffn_gate.weight"])
    assert (llama.act_source, llama.act_fn, llama.down_in, llama.up) == ("ffn_gate", "silu", "ffn_swiglu", "ffn_up")
    biased = ffn_names("qwen2", ["blk.0.ffn_gate.bias", "blk.0.ffn_up.bias"])
    assert (biased.act_source, biased.up) == ("ffn_gate_b", "ffn_up_b")
    gemma = ffn_names("gemma2")
    assert (gemma.act_fn, gemma.down_in) == ("gelu_tanh", "ffn_geglu")
    phi2 = ffn_names("phi2")
    assert (phi2.act_source, phi2.act_fn, phi2.down_in) == ("ffn_gelu", None, "ffn_gelu")
    with pytest.raises(UnsupportedArchitecture, match="mixture-of-experts.*supported: .*llama"):
        ffn_names("llama", ["blk.0.ffn_gate_exps.weight"])
    with pytest.raises(UnsupportedArchitecture, match="bert.*supported: gemma, gemma2, gemma3, llama, phi2"):
        ffn_names("bert")


def test_resolve_layers():
    from ggml_probe.layerspec import resolve_layers

    assert resolve_layers((0, 14, -1), 30) == [0, 14, 29]
    assert resolve_layers("0,14,-1", 30) == [0, 14, 29]
    assert resolve_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ProbeError, match="out of range"):
        resolve_layers([30], 30)


def test_activation_functions():
    from ggml_probe.engine.ffn import gelu_tanh, silu

    x = np.array([-800.0, -2.0, 0.0, 1.5, 800.0])
    np.testing.assert_allclose(silu(x), x / (1 + np.exp(-np.clip(x, -700, 700))), rtol=1e-15, atol=1e-290)
    assert np.isfinite(silu(x)).all()
    assert gelu_tanh(np.array([1.0]))[0] == pytest.approx(0.8411919906082768, rel=1e-12)


# ------------------------------------------------------------------ llama.cpp: tiny f32 model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import neurons_tiny

    from ggml_probe.models.convert import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("neurons-tiny")
    neurons_tiny.build_hf(root / "hf")
    gguf_path = convert_hf_to_gguf(root / "hf", root / "tiny-f32.gguf", outtype="f32")
    return {"root": root, "hf": root / "hf", "gguf": gguf_path}


TINY_TEXTS = ["the quick brown fox jumps over 12345 lazy dogs", "hello world it's a model",
              "quantization of the attention head neuron probe"]


def _capture_all(gguf_path, texts, layers="all", n_seq_max=1):
    from ggml_probe.engine.probes import FFNCapture, run_checked
    from ggml_probe.engine.model import Engine

    got: dict = {}

    def keep(layer, definition, values, layout):
        for p, start, n in zip(layout.prompt_indices, np.cumsum([0] + layout.lengths[:-1]), layout.lengths):
            got[(definition, layer, p)] = values[start:start + n].copy()
            assert (layout.row_prompt[start:start + n] == p).all()
            np.testing.assert_array_equal(layout.row_pos[start:start + n], np.arange(n))

    capture = FFNCapture(gguf_path, keep, layers=layers)
    with Engine(gguf_path, n_ctx=256, n_threads=1, n_seq_max=n_seq_max, kv_type=0, hidden_states=False,
                eval_callback=capture.eval_callback) as engine:
        tokens = [engine.tokenize(t) for t in texts]
        results = run_checked(engine, capture, tokens)
    return capture, tokens, got, results


@pytest.mark.slow
def test_tiny_capture_matches_transformers(tiny):
    import neurons_tiny

    # three prompts in one llama_decode: rows must be assigned to the right prompt
    capture, tokens, got, _ = _capture_all(tiny["gguf"], TINY_TEXTS, n_seq_max=3)
    assert capture.tensor_names == [f"ffn_gate-{i}" for i in range(3)] + [f"ffn_swiglu-{i}" for i in range(3)]
    worst = 0.0
    for p, toks in enumerate(tokens):
        ref = neurons_tiny.transformers_ffn(tiny["hf"], [int(t) for t in toks])
        for definition in ("act", "down_in"):
            for layer in range(neurons_tiny.N_LAYER):
                ours, theirs = got[(definition, layer, p)], ref[definition][layer]
                assert ours.shape == theirs.shape == (len(toks), neurons_tiny.N_FF)
                assert np.abs(theirs).max() > 1.0  # values large enough for the comparison to mean something
                worst = max(worst, float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
                np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0)
    print(f"tiny f32: max |llama.cpp − transformers| / max|a| = {worst:.2e}")
    # the two definitions are different things (act excludes the up projection)
    assert np.abs(got[("act", 1, 0)] - got[("down_in", 1, 0)]).max() > 0.1


@pytest.mark.slow
def test_last_layer_without_all_outputs_is_refused(tiny):
    from ggml_probe.engine.probes import FFNCapture, run_checked
    from ggml_probe.engine.model import Engine

    capture = FFNCapture(tiny["gguf"], lambda *a: None, layers=[-1])
    # hidden_states=False: with embeddings on, llama.cpp outputs every token anyway
    with Engine(tiny["gguf"], n_ctx=128, n_threads=1, hidden_states=False,
                eval_callback=capture.eval_callback) as engine:
        with pytest.raises(ProbeError, match="all_outputs=True"):
            run_checked(engine, capture, [engine.tokenize(TINY_TEXTS[0])], all_outputs=False)


@pytest.mark.slow
def test_ablation_equals_zeroed_down_column(tiny, tmp_path):
    import neurons_tiny

    from ggml_probe.engine.probes import NeuronPatch, run_checked
    from ggml_probe.attribution.ablation import ablation_effect
    from ggml_probe.engine.model import Engine
    from ggml_probe.models.convert import convert_hf_to_gguf

    layer, neurons = 1, [3, 40, 77]
    zeroed_hf = neurons_tiny.zero_down_columns(tiny["hf"], tmp_path / "hf-zeroed", layer, neurons)
    zeroed = convert_hf_to_gguf(zeroed_hf, tmp_path / "zeroed.gguf", outtype="f32")

    def logits(path, probe=None):
        kwargs = {"eval_callback": probe.eval_callback} if probe else {}
        with Engine(path, n_ctx=128, n_threads=1, kv_type=0, hidden_states=False, **kwargs) as engine:
            tokens = [engine.tokenize(t) for t in TINY_TEXTS]
            res = run_checked(engine, probe, tokens) if probe else engine.run(tokens)
        return np.stack([r.logits for r in res])

    clean = logits(tiny["gguf"])
    patch = NeuronPatch(tiny["gguf"], layer, neurons)
    patched = logits(tiny["gguf"], patch)
    reference = logits(zeroed)
    assert patch.patched == len(TINY_TEXTS)
    moved = float(np.abs(patched - clean).max())
    diff = float(np.abs(patched - reference).max())
    print(f"ablation: logits moved by {moved:.3g}; patched vs zeroed-column GGUF differ by {diff:.2e}")
    assert moved > 1e-2
    assert diff < 1e-4

    effect = ablation_effect(tiny["gguf"], TINY_TEXTS, layer, neurons, n_threads=1, n_ctx=128, kv_type=0)
    assert effect.patched_tensors == len(TINY_TEXTS)
    np.testing.assert_array_equal(effect.target_tokens, clean.argmax(axis=1))
    ref_lp = [r[t] - np.log(np.exp(r.astype(np.float64) - r.max()).sum()) - r.max()
              for r, t in zip(reference, effect.target_tokens)]
    np.testing.assert_allclose(effect.logprob_patched, ref_lp, atol=1e-4)
    assert np.abs(effect.delta).max() > 1e-3


# ------------------------------------------------------------------ llama.cpp: the demo model


def _boolq_prompts(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows]


@pytest.mark.slow
def test_demo_capture_statistics_imatrix_and_unchanged_logits(demo_path, boolq_path):
    """One pass on the demo model checks: stored arrays → batch statistics equal the streaming
    accumulators; down_in's sum of squares equals what imatrix's rule (x² of ffn_down's input, read
    from the MUL_MAT node whose weight is blk.N.ffn_down.weight) accumulates; logits with the
    callback equal logits without it."""
    from ggml_probe.analysis.neurons import NeuronAccumulator
    from ggml_probe.engine.probes import FFNCapture, TensorReader, run_checked
    from ggml_probe.engine.ggml_lib import libggml, tensor_head
    from ggml_probe.engine.model import Engine

    layers = [0, 14, 29]
    acc = NeuronAccumulator(layers, ["act", "down_in"], 1536, top_k=4)
    stored: dict = {}

    def consume(layer, definition, values, layout):
        acc.update(layer, definition, values, layout)
        stored.setdefault((definition, layer), []).append(values.copy())

    capture = FFNCapture(demo_path, consume, layers=layers)
    lib = libggml()
    reader = TensorReader()
    down_weights = {f"blk.{i}.ffn_down.weight": i for i in layers}
    imatrix = {i: np.zeros(1536, dtype=np.float32) for i in layers}
    imatrix_counts = dict.fromkeys(layers, 0)

    def callback(t, ask):
        # imatrix's own rule, next to the capture: the MUL_MAT whose src0 is ffn_down's weight, its src1 squared
        head = tensor_head(t)
        is_down = (lib.ggml_op_desc(t) == b"MUL_MAT" and head.src[0]
                   and reader.name(head.src[0]) in down_weights)
        if ask:
            return bool(capture.eval_callback(t, True) or is_down)
        if is_down:
            layer = down_weights[reader.name(head.src[0])]
            x = reader.read(head.src[1], "imatrix")
            for row in x:  # float32 accumulation, row by row, as imatrix.cpp does
                imatrix[layer] += row * row
            imatrix_counts[layer] += x.shape[0]
            return True
        return capture.eval_callback(t, False)

    with Engine(demo_path, n_ctx=512, n_threads=1, hidden_states=False) as engine:
        tokens = [engine.tokenize(p) for p in _boolq_prompts(boolq_path, 4)]
        plain = [r.logits for r in engine.run(tokens, all_outputs=True)]
    with Engine(demo_path, n_ctx=512, n_threads=1, hidden_states=False, eval_callback=callback) as engine:
        probed = [r.logits for r in run_checked(engine, capture, tokens)]
    for a, b in zip(plain, probed):
        np.testing.assert_array_equal(a, b)

    n_tokens = sum(len(t) for t in tokens)
    for (definition, layer), parts in stored.items():
        x = np.concatenate(parts)
        assert x.shape == (n_tokens, 1536)
        s = acc.stats[(definition, layer)]
        np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(s.variance, x.var(0), rtol=1e-9, atol=1e-15)
        np.testing.assert_array_equal(s.maxabs, np.abs(x).max(0))
        np.testing.assert_array_equal(s.dead(0.1), np.flatnonzero(np.abs(x).max(0) < 0.1))
        np.testing.assert_allclose(s.sumsq, (x**2).sum(0), rtol=1e-12)
        # float32 block products (CoMoment's product_dtype): 6e-7 at most seen here
        np.testing.assert_allclose(acc.correlation(definition, layer), np.corrcoef(x, rowvar=False), atol=2e-6)
        if definition == "down_in":
            assert imatrix_counts[layer] == n_tokens
            rel = np.abs(s.sumsq - imatrix[layer]) / np.maximum(s.sumsq, 1e-30)
            print(f"layer {layer}: down_in Σx² vs imatrix rule, max rel diff {rel.max():.2e}")
            np.testing.assert_allclose(s.sumsq, imatrix[layer], rtol=1e-5)
    # act is SiLU of the gate: bounded below by SiLU's minimum
    assert min(acc.stats[("act", i)].min.min() for i in layers) >= -0.2785


@pytest.mark.slow
def test_neuron_probe_resumed_run_equals_one_run(tiny, tmp_path):
    from ggml_probe.pipeline.neuron_stats import NeuronProbe
    from ggml_probe.engine.probes import run_checked
    from ggml_probe.engine.model import Engine

    def run(probe, texts, offset):
        probe.prompt_offset = offset
        with Engine(tiny["gguf"], n_ctx=128, n_threads=1, kv_type=0, hidden_states=False,
                    eval_callback=probe.eval_callback) as engine:
            tokens = [engine.tokenize(t) for t in texts]
            run_checked(engine, probe, tokens)
        return sum(len(t) for t in tokens)

    whole = NeuronProbe(tiny["gguf"], layers=[0, -1], top_k=3)
    n_tokens = run(whole, TINY_TEXTS, 0)
    first = NeuronProbe(tiny["gguf"], layers=[0, -1], top_k=3)
    run(first, TINY_TEXTS[:1], 0)
    first.save(tmp_path / "part.npz")
    resumed = NeuronProbe(tiny["gguf"], layers=[0, -1], top_k=3)
    resumed.restore(tmp_path / "part.npz")
    run(resumed, TINY_TEXTS[1:], 1)
    a, b = whole.finish().state(), resumed.finish().state()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("/comoment.c"):  # saving folds the row buffer: same sums, other blocks (float32 products)
            _assert_comoments_close(a[k], b[k], 1e-5, err_msg=k)
        elif "/comoment." in k:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert whole.accumulator.n_prompts == 3
    assert whole.accumulator.stats[("act", 2)].count == resumed.accumulator.stats[("down_in", 0)].count == n_tokens
    other = NeuronProbe(tiny["gguf"], layers=[1])
    with pytest.raises(ProbeError, match="other layers"):
        other.restore(tmp_path / "part.npz")
    # the saved state keeps 3 top tokens per neuron: a probe keeping 5 cannot continue it
    more = NeuronProbe(tiny["gguf"], layers=[0, -1], top_k=5)
    with pytest.raises(ProbeError, match=r"top_k 3 \(this run: 5\).*NeuronSettings\.top_k.*--force"):
        more.restore(tmp_path / "part.npz")
    assert more.accumulator.top_k == 5 and more.accumulator.n_prompts == 0  # nothing taken from the refused state


# ------------------------------------------------------------------ salient neurons, last layer


@pytest.mark.parametrize("phi2_head", [False, True])
def test_closed_form_gradient_matches_finite_differences(phi2_head):
    """RMSNorm head, and Phi-2's: ffn_down bias, LayerNorm with a bias, output bias."""
    from ggml_probe.analysis.salient import LastLayerHead, integrated_gradients

    rng = np.random.default_rng(5)
    head = LastLayerHead(rng.normal(size=(6, 10)), 1 + 0.3 * rng.normal(size=6), 1e-5, rng.normal(size=(30, 6)))
    if phi2_head:
        head.down_bias, head.layer_norm = rng.normal(size=6), True
        head.norm_bias, head.out_bias = rng.normal(size=6), rng.normal(size=30)
    a, b, up, r = rng.normal(size=10), rng.normal(size=10) * 0.1, rng.normal(size=10), rng.normal(size=6) * 3
    g = head.gradient(a[None], up, r, 4)[0]
    eps = 1e-6
    fd = [(head.logprob(a + eps * e, up, r, 4)[0] - head.logprob(a - eps * e, up, r, 4)[0]) / (2 * eps)
          for e in np.eye(10)]
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    res = integrated_gradients(head, a, b, up, r, 4, n_points=50)
    assert abs(res.completeness_error) < 1e-10
    assert abs(res.attributions.sum()) > 1e-3


def test_salient_sets_and_ranking():
    from ggml_probe.analysis.salient import normalised, summarise_salient

    attr = np.array([[0.1, -1.0, 0.71, 0.7, 0.0], [2.0, 0.0, 0.0, -1.5, 1.39]])
    np.testing.assert_allclose(normalised(attr[0]), [0.1, 1.0, 0.71, 0.7, 0.0])
    s = summarise_salient(attr, 0.7)
    np.testing.assert_array_equal(s.per_example[0], [1, 2])  # 0.7 itself is not above 0.7
    np.testing.assert_array_equal(s.per_example[1], [0, 3])
    np.testing.assert_array_equal(s.union, [0, 1, 2, 3])
    assert s.frequency.tolist() == [1, 1, 1, 1, 0]


@pytest.mark.slow
def test_last_layer_ig_matches_autograd_and_llama_cpp(tiny):
    import neurons_tiny

    from ggml_probe.attribution.exact import last_layer_attribution

    res = last_layer_attribution(tiny["gguf"], TINY_TEXTS, n_threads=1, n_ctx=128, kv_type=0)
    from ggml_probe.engine.model import Engine

    with Engine(tiny["gguf"], n_ctx=128, n_threads=1, hidden_states=False) as engine:
        tokens = [[int(t) for t in engine.tokenize(x)] for x in TINY_TEXTS]
    for p, toks in enumerate(tokens):
        ref = neurons_tiny.torch_last_layer_ig(tiny["hf"], toks, int(res.target_tokens[p]))
        ours = res.attributions[p]
        scale = np.abs(ref).max()
        assert scale > 1e-2
        err = np.abs(ours - ref).max() / scale
        print(f"prompt {p}: max |IG closed form − autograd| / max|attr| = {err:.2e}; "
              f"completeness {res.completeness_error[p]:.1e}, Σattr − llama.cpp change "
              f"{res.attributions[p].sum() - res.real_change[p]:.1e}")
        assert err < 1e-4
    np.testing.assert_allclose(res.closed_form_logprob, res.llama_logprob, atol=1e-4)
    assert np.abs(res.completeness_error).max() < 1e-8
    np.testing.assert_allclose(res.attributions.sum(axis=1), res.real_change, atol=1e-4)
    assert np.abs(res.real_change).max() > 0.1


@pytest.mark.slow
def test_collect_neuron_stats_keeps_global_prompt_indices(tiny):
    from ggml_probe.pipeline.neuron_stats import collect_neuron_stats

    seen = []
    acc, tokens = collect_neuron_stats(tiny["gguf"], TINY_TEXTS, layers=[-1], chunk_size=2, top_k=200,
                                       n_threads=1, n_ctx=128, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(2, 3), (3, 3)]
    assert acc.n_prompts == 3 and acc.stats[("act", 2)].count == sum(len(t) for t in tokens)
    # with k ≥ all tokens, every (prompt, position) appears once per neuron: chunk offsets are applied
    top = acc.top[("down_in", 2)]
    pairs = sorted(zip(top.prompt[:, 0].tolist(), top.pos[:, 0].tolist()))
    assert pairs[-sum(len(t) for t in tokens):] == [(p, i) for p, t in enumerate(tokens) for i in range(len(t))]
