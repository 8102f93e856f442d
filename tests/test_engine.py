"""The engine against llama.cpp's own high-level API and against the model's weights."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from ggml_probe.analysis.scoring import label_logits, log_softmax
from ggml_probe.engine.model import Engine
from ggml_probe.errors import BadModelFile
from ggml_probe.pipeline.evaluation import label_tokens_for


@pytest.fixture(scope="module")
def boolq_prompts(boolq_path):
    rows = [json.loads(line) for line in boolq_path.open()][:6]
    return [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows]


def test_label_probabilities_equal_llama_cpp_high_level_api(demo_path, boolq_prompts):
    import llama_cpp

    with Engine(demo_path, n_ctx=512) as engine:
        lt = label_tokens_for(engine, ["True", "False"])
        tokens = [engine.tokenize(p) for p in boolq_prompts]
        ours = np.stack([r.logits for r in engine.run(tokens)])
    ref_model = llama_cpp.Llama(model_path=str(demo_path), n_ctx=512, logits_all=True, verbose=False)
    theirs = []
    for p, toks in zip(boolq_prompts, tokens):
        assert ref_model.tokenize(p.encode(), add_bos=True, special=True) == list(toks)
        ref_model.reset()
        ref_model.eval(list(toks))
        theirs.append(np.array(ref_model.scores[ref_model.n_tokens - 1]))
    theirs = np.stack(theirs)
    p_ours = np.exp(log_softmax(label_logits(ours, lt)))
    p_theirs = np.exp(log_softmax(label_logits(theirs, lt)))
    assert np.abs(p_ours - p_theirs).max() < 1e-4
    assert np.abs(ours - theirs).max() < 1e-3  # same decode path: identical up to float noise
    assert p_ours.std() > 0.001  # the prompts really differ


def test_hidden_state_is_the_final_norm_output(demo_ladder, boolq_prompts):
    """logits = W_out · result_norm (tied embeddings: W_out is token_embd)."""
    path = demo_ladder["F16"]
    with Engine(path, n_ctx=512) as engine:
        res = engine.run([engine.tokenize(p) for p in boolq_prompts[:3]])
    reader = gguf.GGUFReader(path)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    w = gguf.quants.dequantize(np.asarray(emb.data), emb.tensor_type).astype(np.float64)  # (n_vocab, n_embd)
    for r in res:
        assert r.hidden is not None and r.hidden.shape == (576,)
        predicted = w @ r.hidden.astype(np.float64)
        # llama.cpp rounds the hidden state to F16 for this matmul: allow that rounding, no more.
        assert np.abs(predicted - r.logits).max() < 2e-3 * np.abs(r.logits).max()


def test_long_prompts_are_truncated_from_the_left_and_counted(demo_path):
    with Engine(demo_path, n_ctx=32) as engine:
        long = engine.tokenize("one two three four five six seven eight nine ten " * 6)
        assert len(long) > 32
        res = engine.run([long])[0]
        assert res.n_tokens == 32 and res.truncated == len(long) - 32
        direct = engine.run([long[-32:]])[0]
    assert np.array_equal(res.logits, direct.logits)


def test_single_and_separate_decodes_agree_exactly(demo_path, boolq_prompts):
    with Engine(demo_path, n_ctx=512) as engine:
        toks = [engine.tokenize(p) for p in boolq_prompts[:3]]
        together = engine.run(toks)
        alone = [engine.run([t])[0] for t in toks]
    for a, b in zip(together, alone):
        assert np.array_equal(a.logits, b.logits)


def test_eval_callback_sees_the_graph_and_keeps_logits(demo_path, boolq_prompts):
    from ggml_probe.engine.ggml_lib import libggml

    lib = libggml()
    asked: list[str] = []

    def callback(t: int, ask: bool) -> bool:
        name = lib.ggml_get_name(t).decode()
        if ask:
            asked.append(name)
            return name == "result_output"
        return True

    with Engine(demo_path, n_ctx=512, eval_callback=callback) as engine:
        hooked = engine.run([engine.tokenize(boolq_prompts[0])])[0]
        info = engine.info()
    with Engine(demo_path, n_ctx=512) as engine:
        plain = engine.run([engine.tokenize(boolq_prompts[0])])[0]
    assert {"ffn_gate-0", "ffn_swiglu-29", "l_out-29", "result_output"} <= set(asked)
    assert np.array_equal(hooked.logits, plain.logits)
    assert info.n_layer == 30 and info.n_embd == 576 and info.n_vocab == 49152
    assert any(d["type"] == "CPU" for d in info.devices)


def test_engine_refuses_a_corrupt_file_before_llama_cpp_sees_it(demo_path, tmp_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(demo_path.read_bytes()[: 5_000_000])
    bad.write_bytes(bytes(data))
    with pytest.raises(BadModelFile, match="truncated"):
        Engine(bad)
