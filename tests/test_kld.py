"""llama-perplexity's KLD statistics and base-file format, checked against independent NumPy computations.

The references below are written from the definitions in tools/perplexity/perplexity.cpp in plain
float64 NumPy (no shared code with ggml_probe.analysis.kld): the implementation may differ from them
only by float32 rounding and by the base file's uint16 quantization of log-probabilities.
"""

import io
from pathlib import Path

import numpy as np
import pytest

from ggml_probe.analysis.kld import KLDAccumulator, median, percentile
from ggml_probe.errors import BadModelFile
from ggml_probe.formats.kld_base import (
    KLDBaseReader, KLDBaseWriter, decode_rows, encode_rows, row_width, scored_rows,
)


def _log_softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _logits(rng, n, vocab, spread=6.0):
    # peaked rows, like a language model's: a few large logits, a long tail below the 16-nat floor
    z = rng.normal(0, spread, size=(n, vocab)).astype(np.float32)
    z[np.arange(n), rng.integers(0, vocab, n)] += 12
    return z


def _sample_next(rng, z):
    # next tokens drawn from the model's own distribution, as in real text
    p = np.exp(_log_softmax64(z))
    return np.array([rng.choice(len(row), p=row / row.sum()) for row in p])


def test_encoded_rows_decode_to_log_softmax_within_half_a_step():
    rng = np.random.default_rng(1)
    z = _logits(rng, 40, 301)
    rows = encode_rows(z)
    assert rows.shape == (40, row_width(301)) and row_width(301) == 2 * 151 + 4
    scale = rows[:, :4].copy().view(np.float32)[:, 0]
    ref = _log_softmax64(z)
    dec = decode_rows(rows, 301)
    above = ref > ref.max(axis=1, keepdims=True) - 16
    err = np.abs(dec - ref)[above]
    # one quantization step is (max − floor)/65535 ≤ 16/65535 nats; rounding costs at most half of it
    assert err.max() <= (scale.max() / 2) * 1.01 + 1e-5
    floor = (np.maximum(z.min(axis=1), z.max(axis=1) - 16) - z.max(axis=1)
             - np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)))
    assert np.allclose(dec[~above], np.broadcast_to(floor[:, None], dec.shape)[~above], atol=1e-4)


def test_statistics_equal_an_independent_float64_computation():
    rng = np.random.default_rng(2)
    n, vocab = 600, 257
    base = _logits(rng, n, vocab)
    model = base + rng.normal(0, 0.4, size=base.shape).astype(np.float32)  # a "quantized" model
    nxt = _sample_next(rng, base)
    nxt[:5] = base[:5].argmin(axis=1)  # a few next tokens far below the 16-nat floor
    acc = KLDAccumulator()
    for part in np.array_split(np.arange(n), 7):  # chunks: sums must not depend on how rows arrive
        acc.update(model[part], decode_rows(encode_rows(base[part]), vocab), nxt[part])
    got = acc.result()

    lq, lb = _log_softmax64(model), _log_softmax64(base)
    rows = np.arange(n)
    # the base's stored log p never goes below its row's floor, max(min z, max z − 16) − logsumexp z
    floor = (np.maximum(base.min(1), base.max(1) - 16) - base.max(1)
             - np.log(np.exp(base - base.max(1, keepdims=True)).sum(1)))
    nll, nll_b = -lq[rows, nxt], -np.maximum(lb[rows, nxt], floor)
    keep = lb > -16
    kld = np.where(keep, np.exp(lb) * (lb - lq), 0).sum(axis=1)
    dp = np.exp(-nll) - np.exp(-nll_b)

    def se(x):
        return np.sqrt(x.var() / (len(x) - 1))

    cov = np.cov(nll, nll_b, bias=True)[0, 1] / (n - 1)
    assert got["n_tokens"] == n
    assert got["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert got["ppl_base"] == pytest.approx(np.exp(nll_b.mean()), rel=1e-4)
    assert got["ln_ppl_ratio"] == pytest.approx(nll.mean() - nll_b.mean(), abs=2e-4)
    assert got["ln_ppl_ratio_se"] == pytest.approx(np.sqrt(se(nll) ** 2 + se(nll_b) ** 2 - 2 * cov), rel=1e-3)
    assert got["kld_mean"] == pytest.approx(kld.mean(), rel=2e-3)
    assert got["kld_mean_se"] == pytest.approx(se(kld), rel=5e-3)
    assert got["kld_max"] == pytest.approx(kld.max(), rel=2e-3)
    assert got["kld_median"] == pytest.approx(np.median(kld), rel=5e-3)
    assert got["kld_p99"] == pytest.approx(np.percentile(kld, 99), rel=5e-3)
    assert got["same_top_p"] == pytest.approx(np.mean(model.argmax(1) == base.argmax(1)), abs=1 / n)
    p = got["same_top_p"]
    assert got["same_top_p_se"] == pytest.approx(np.sqrt(p * (1 - p) / (n - 1)))
    assert got["rms_dp"] == pytest.approx(np.sqrt((dp ** 2).mean()), rel=2e-3)
    assert got["rms_dp_se"] == pytest.approx(0.5 / np.sqrt((dp ** 2).mean()) * se(dp ** 2), rel=1e-2)
    assert got["dp_mean"] == pytest.approx(dp.mean(), abs=1e-4)


def test_identical_models_have_zero_divergence_up_to_the_format_step():
    rng = np.random.default_rng(3)
    z = _logits(rng, 200, 128)
    acc = KLDAccumulator()
    acc.update(z, decode_rows(encode_rows(z), 128), _sample_next(rng, z))
    got = acc.result()
    assert got["same_top_p"] == 1.0 and got["kld_mean"] < 1e-6 and abs(got["ln_ppl_ratio"]) < 1e-4


def test_percentile_and_median_are_llama_cpps_linear_interpolation():
    v = np.sort(np.random.default_rng(4).exponential(size=1001).astype(np.float32))
    for f in (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999):
        assert percentile(v, f) == pytest.approx(np.percentile(v.astype(np.float64), 100 * f), rel=1e-5)
    assert percentile(v, 0) == v[0] and percentile(v, 1) == v[-1]
    assert median(v[:10]) == pytest.approx(0.5 * (v[4] + v[5])) and median(v) == v[500]


def test_base_file_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(5)
    n_ctx, vocab, n_chunk = 16, 33, 3
    tokens = rng.integers(0, vocab, n_ctx * n_chunk).astype(np.int32)
    chunks = [_logits(rng, scored_rows(n_ctx), vocab) for _ in range(n_chunk)]
    path = tmp_path / "base.kld"
    with open(path, "wb") as f:
        w = KLDBaseWriter(f, n_ctx, vocab, tokens)
        for c in chunks:
            w.add_chunk(c)
    # the layout llama-perplexity reads: magic, n_ctx, n_vocab, n_chunk, tokens, then nv uint16 per row
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    assert np.frombuffer(raw[8:20], dtype="<i4").tolist() == [n_ctx, vocab, n_chunk]
    assert len(raw) == 20 + 4 * tokens.size + 2 * n_chunk * scored_rows(n_ctx) * row_width(vocab)
    with KLDBaseReader(path) as r:
        assert (r.header.n_ctx, r.header.n_vocab, r.header.n_chunk) == (n_ctx, vocab, n_chunk)
        assert np.array_equal(r.header.tokens, tokens)
        for got, c in zip(r.chunks(), chunks):
            assert np.array_equal(got, encode_rows(c))


def test_corrupt_base_files_get_one_line(tmp_path):
    bad = tmp_path / "bad.kld"
    bad.write_bytes(b"not a base file at all")
    with pytest.raises(BadModelFile, match="_logits_"):
        KLDBaseReader(bad)
    buf = io.BytesIO()
    KLDBaseWriter(buf, 8, 10, np.zeros(16, np.int32))
    short = tmp_path / "short.kld"
    short.write_bytes(buf.getvalue())  # header and tokens, no log-probabilities
    with pytest.raises(BadModelFile, match="truncated"):
        KLDBaseReader(short)


# ------------------------------------------------------------------ through llama.cpp, on the demo ladder


def _boolq_text(path, n):
    import json

    with open(path) as f:
        return "\n\n".join(json.loads(line)["passage"] for _, line in zip(range(n), f))


@pytest.mark.slow
def test_kld_pipeline_equals_numpy_on_llama_cpps_logits(demo_ladder, boolq_path, tmp_path):
    from ggml_probe.engine.model import Vocab
    from ggml_probe.pipeline.kld import KLDSettings, run_kld, text_tokens
    from test_bench import _hl_logits  # llama-cpp-python's high-level Llama: an independent code path

    ctx, chunks = 128, 3
    text = _boolq_text(boolq_path, 12)
    ref, q = demo_ladder["F16"], demo_ladder["Q4_0"]
    s = KLDSettings(ctx=ctx, chunks=chunks, batch=256, threads=2, gpu_layers=0)
    res = run_kld({"F16": ref, "Q4_0": q}, ref, text, tmp_path, s)
    assert res.base_source == "computed" and res.n_chunk == chunks

    with Vocab(ref) as vocab:
        tokens = text_tokens(vocab, text, ctx, chunks)
        bos = int(vocab._lib.llama_vocab_bos(vocab._vocab))
        add_bos = bool(vocab._lib.llama_vocab_get_add_bos(vocab._vocab))
        plain = vocab.tokenize(text, add_special=False)
    # BOS only where the vocabulary adds one (SmolLM2's does not), then the text's own tokens
    assert np.array_equal(tokens, np.concatenate([[bos], plain])[:len(tokens)] if add_bos else plain[:len(tokens)])
    first = ctx // 2
    nll_q, nll_b, kld, same = [], [], [], []
    for c in range(chunks):
        chunk = tokens[c * ctx:(c + 1) * ctx].copy()
        if add_bos:
            chunk[0] = bos
        lq = _hl_logits(q, chunk, ctx)[first:ctx - 1]
        lb = _hl_logits(ref, chunk, ctx)[first:ctx - 1]
        lq = lq - np.logaddexp.reduce(lq, axis=1, keepdims=True)
        lb = lb - np.logaddexp.reduce(lb, axis=1, keepdims=True)
        nxt = chunk[first + 1:]
        rows = np.arange(len(nxt))
        nll_q.append(-lq[rows, nxt])
        nll_b.append(-lb[rows, nxt])
        kld.append(np.where(lb > -16, np.exp(lb) * (lb - lq), 0).sum(1))
        same.append(lq.argmax(1) == lb.argmax(1))
    nll_q, nll_b, kld, same = map(np.concatenate, (nll_q, nll_b, kld, same))
    got = res.models["Q4_0"]
    assert got["n_tokens"] == chunks * (ctx - 1 - first)
    # different batch layouts in llama.cpp move logits slightly: the tolerances, not bit-equality
    assert got["ppl"] == pytest.approx(np.exp(nll_q.mean()), rel=2e-3)
    assert got["ppl_base"] == pytest.approx(np.exp(nll_b.mean()), rel=2e-3)
    assert got["kld_mean"] == pytest.approx(kld.mean(), rel=0.01)
    assert abs(got["same_top_p"] - same.mean()) <= 0.01
    self_ = res.models["F16"]  # the reference against itself: only the base file's rounding is left
    assert self_["same_top_p"] == 1.0 and self_["kld_mean"] < 1e-4

    again = run_kld({"Q4_0": q}, ref, text, tmp_path, s)  # the base is reused, not recomputed
    assert again.base_source == "cached" and again.base_file == res.base_file
    assert again.models["Q4_0"]["kld_mean"] == got["kld_mean"]


@pytest.mark.slow
def test_kld_cli_json_resume_and_llama_perplexity_base(demo_ladder, boolq_path, tmp_path):
    """Through the CLI: --json keys, an interrupted run resumed by chunk to the same figures, a base file
    given back with --base, and a text too short for one chunk refused in one line."""
    import json

    from click.testing import CliRunner

    from ggml_probe.cli import cli
    from ggml_probe.pipeline import kld as kld_pipeline

    text = tmp_path / "text.txt"
    text.write_text(_boolq_text(boolq_path, 12))
    ref, q = str(demo_ladder["F16"]), str(demo_ladder["Q4_0"])
    common = ["--ref", ref, "--text", str(text), "--ctx", "64", "--chunks", "6", "--batch", "128", "--threads", "2",
              "--gpu-layers", "0", "--json"]
    runner = CliRunner()
    full = runner.invoke(cli, ["kld", q, *common, "-o", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    doc = json.loads(full.output)
    figures = doc["models"][Path(q).stem]
    for key in ("ppl", "ppl_base", "ln_ppl_ratio", "ln_ppl_ratio_se", "kld_mean", "kld_mean_se", "kld_median",
                "kld_p99", "kld_p999", "kld_max", "same_top_p", "same_top_p_se", "rms_dp", "rms_dp_se", "n_tokens"):
        assert isinstance(figures[key], (int, float)), key
    assert figures["n_tokens"] == 6 * (64 - 1 - 32)

    # interrupt the scoring after its third chunk (a callback that raises, as Ctrl-C would), then rerun
    out = tmp_path / "resumed"
    calls = []

    def stop_after_three(done, total, label):
        calls.append((done, label))
        if label == Path(q).name and done == 3:
            raise KeyboardInterrupt

    s = kld_pipeline.KLDSettings(ctx=64, chunks=6, batch=128, threads=2, gpu_layers=0)
    with pytest.raises(KeyboardInterrupt):
        kld_pipeline.run_kld({Path(q).stem: Path(q)}, Path(ref), text.read_text(), out, s, progress=stop_after_three)
    states = list(out.glob("state-*.npz"))
    assert len(states) == 1 and int(np.load(states[0])["chunks_done"]) == 2  # two chunks per decode: 2 kept
    again = runner.invoke(cli, ["kld", q, *common, "-o", str(out)])
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.output)["models"][Path(q).stem]
    assert resumed["kld_mean"] == pytest.approx(figures["kld_mean"], rel=1e-12)
    assert resumed["n_tokens"] == figures["n_tokens"] and resumed["same_top_p"] == figures["same_top_p"]
    assert not list(out.glob("state-*.npz"))

    # the base file this wrote is llama-perplexity's format: given back with --base, the same figures
    base = json.loads(full.output)["base_file"]
    given = runner.invoke(cli, ["kld", q, "--base", base, "--batch", "128", "--threads", "2", "--gpu-layers", "0",
                                "--json", "-o", str(tmp_path / "given")])
    assert given.exit_code == 0, given.output
    assert json.loads(given.output)["models"][Path(q).stem]["kld_mean"] == pytest.approx(figures["kld_mean"])

    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    bad = runner.invoke(cli, ["kld", q, "--ref", ref, "--text", str(short), "--ctx", "64", "-o", str(tmp_path / "s")])
    assert bad.exit_code == 2 and "needs at least 128" in bad.output and len(bad.output.strip().splitlines()) == 1
