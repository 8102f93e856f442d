"""ggml_probe.models.synthetic: random-weight llama GGUF files of a requested shape with a real tokenizer.

Checked against independent readings: gguf-py's reader (hyperparameters, tensor shapes and types, the
tokenizer copied byte for byte), llama.cpp loading it (its parameter count, its tokenizer against
transformers'), and llama.cpp's logits for a first token against a NumPy forward pass over the weights
as gguf-py reads them. Tiny shapes only; the 1B is built by scripts/synthetic_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggml_probe.engine.model import Engine
from ggml_probe.models.synthetic import SHAPES, LlamaShape, write_llama_gguf
from real_vocab_tiny import HFTokenizer, vocab_path

SHAPE = LlamaShape(n_layer=2, n_embd=128, n_ff=320, n_head=4, n_head_kv=2, n_ctx=256)
TEXT = "The quick brown fox jumps over the lazy dog, and the library opens at nine."


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "tiny-F16.gguf"
    return write_llama_gguf(path, vocab_path("llama-spm"), SHAPE, outtype="f16", seed=5)


def _field(reader, key):
    f = reader.fields[key]
    if len(f.data) == 1 and f.types[0].name != "STRING":
        return f.parts[f.data[0]].tolist()[0]
    return [bytes(f.parts[i]).decode() for i in f.data]


@pytest.mark.slow  # gguf-py's reader: ~30 s over a 32k vocabulary on a loaded machine
def test_gguf_py_reads_back_the_requested_shape_and_the_copied_tokenizer(spm_model):
    import gguf

    r = gguf.GGUFReader(str(spm_model))
    vocab = gguf.GGUFReader(str(vocab_path("llama-spm")))
    assert _field(r, "general.architecture") == ["llama"]
    for key, want in (("llama.block_count", 2), ("llama.embedding_length", 128), ("llama.feed_forward_length", 320),
                      ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2),
                      ("llama.context_length", 256), ("llama.rope.dimension_count", 32), ("general.file_type", 1)):
        assert _field(r, key) == want, key
    # every tokenizer key of the vocabulary file, equal value for value
    tok_keys = sorted(k for k in vocab.fields if k.startswith("tokenizer."))
    assert tok_keys and tok_keys == sorted(k for k in r.fields if k.startswith("tokenizer."))
    for k in tok_keys:
        a, b = vocab.fields[k], r.fields[k]
        assert [bytes(a.parts[i]) for i in a.data] == [bytes(b.parts[i]) for i in b.data], k
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].data)
    assert n_vocab == 32000
    shapes = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name) for t in r.tensors}
    assert shapes["token_embd.weight"] == ((128, n_vocab), "F16")  # ggml order: columns first
    assert shapes["output.weight"] == ((128, n_vocab), "F16")
    assert shapes["blk.1.attn_k.weight"] == ((128, 64), "F16")  # 2 KV heads × 32
    assert shapes["blk.1.ffn_gate.weight"] == ((128, 320), "F16")
    assert shapes["blk.1.ffn_down.weight"] == ((320, 128), "F16")
    assert shapes["blk.0.attn_norm.weight"] == ((128,), "F32")
    assert len(shapes) == 2 + 1 + 9 * 2
    assert sum(int(t.n_elements) for t in r.tensors) == SHAPE.n_params(n_vocab)
    # N(0, 0.02²) weights, norms 1
    w = np.asarray(r.get_tensor(list(shapes).index("blk.0.ffn_up.weight")).data, dtype=np.float64)
    assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    assert np.all(np.asarray(r.get_tensor(list(shapes).index("output_norm.weight")).data) == 1)


@pytest.mark.slow
def test_f32_and_f16_of_one_seed_hold_the_same_weights(spm_model, tmp_path):
    import gguf

    f32 = write_llama_gguf(tmp_path / "tiny-F32.gguf", vocab_path("llama-spm"), SHAPE, outtype="f32", seed=5)
    a, b = gguf.GGUFReader(str(f32)), gguf.GGUFReader(str(spm_model))
    assert _field(a, "general.file_type") == 0
    for ta, tb in zip(a.tensors, b.tensors):  # the same draws, each rounded once to its type
        x, y = np.asarray(ta.data, dtype=np.float64), np.asarray(tb.data, dtype=np.float64)
        assert ta.name == tb.name and x.shape == y.shape
        assert np.all(np.abs(x - y) <= np.abs(x) * 2.0 ** -11 + 2.0 ** -25), ta.name
    other = write_llama_gguf(tmp_path / "seed6.gguf", vocab_path("llama-spm"), SHAPE, outtype="f16", seed=6)
    assert other.read_bytes() != spm_model.read_bytes()
    with pytest.raises(ValueError, match="outtype"):
        write_llama_gguf(tmp_path / "x.gguf", vocab_path("llama-spm"), SHAPE, outtype="q8_0")


def _rms(x, eps=1e-5):
    return x / np.sqrt(np.mean(x * x) + eps)


def _numpy_first_token_logits(path, token: int) -> np.ndarray:
    """A llama's logits for a single token at position 0, in float64 from gguf-py's reading of the
    weights: attention over one position returns that position's V (rope at position 0 is the identity)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    w = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    x = w["token_embd.weight"][token]
    group = SHAPE.n_head // SHAPE.n_head_kv
    for layer in range(SHAPE.n_layer):
        blk = f"blk.{layer}."
        h = _rms(x) * w[blk + "attn_norm.weight"]
        v = (w[blk + "attn_v.weight"] @ h).reshape(SHAPE.n_head_kv, SHAPE.head_dim)
        x = x + w[blk + "attn_output.weight"] @ np.repeat(v, group, axis=0).reshape(-1)
        h = _rms(x) * w[blk + "ffn_norm.weight"]
        gate = w[blk + "ffn_gate.weight"] @ h
        x = x + w[blk + "ffn_down.weight"] @ (gate / (1 + np.exp(-gate)) * (w[blk + "ffn_up.weight"] @ h))
    return w["output.weight"] @ (_rms(x) * w["output_norm.weight"])


@pytest.mark.slow  # gguf-py reading the weights, transformers building the tokenizer
def test_llama_cpp_loads_it_tokenizes_as_transformers_and_computes_numpys_logits(spm_model):
    with Engine(spm_model, n_ctx=64, n_threads=2, gpu_layers=0, hidden_states=False) as e:
        assert e.n_vocab == 32000
        _, n_params = e.model_size()
        assert n_params == SHAPE.n_params(32000)
        tokens = e.tokenize(TEXT)
        assert list(tokens[1:]) == HFTokenizer(vocab_path("llama-spm")).ids(TEXT)[-(len(tokens) - 1):]
        first = e.decode_at(tokens[:1], 0, outputs="all")[0].astype(np.float64)
        e.clear_cache()
        every = e.decode_at(tokens, 0, outputs="all")
    ref = _numpy_first_token_logits(spm_model, int(tokens[0]))
    # F16 weights, activations rounded to F16 inside ggml's matmuls: a few 1e-3 of the logits' spread
    assert np.abs(first - ref).max() < 0.01 * ref.std()
    assert first.argmax() == ref.argmax()
    # the random weights keep a whole prompt's logits finite and O(1)
    assert np.isfinite(every).all() and 0.1 < every.std() < 10


def test_the_1b_shape_is_a_1b_llama():
    shape = SHAPES["1b"]
    assert (shape.n_layer, shape.n_embd, shape.n_ff, shape.n_head_kv) == (16, 2048, 8192, 8)
    assert 1.0e9 < shape.n_params(32000) < 1.2e9
