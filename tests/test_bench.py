"""`ggml-probe bench`: the decodes it times, the tokens llama.cpp counts, the statistics and memory it
reports, checked against independent computations (llama-cpp-python's high-level Llama, NumPy, the
GGUF's own hyperparameters). Nothing here asserts a speed: timings depend on the machine and its load.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ggml_probe.cli import cli
from ggml_probe.engine.model import Engine
from ggml_probe.errors import ProbeError
from ggml_probe.pipeline.speed import BenchSettings, SpeedTest, bench_files, generation_pass, random_tokens

TEXT = ("The library opens at nine in the morning and closes at six. On Sundays it stays closed, "
        "but the reading room upstairs is open to members until noon.")


def _hl_logits(model_path, tokens, n_ctx, n_batch=None):
    """Every position's logits from llama-cpp-python's high-level Llama (logits_all): the whole sequence in
    one decode, or with n_batch=1 one token per decode."""
    from llama_cpp import Llama

    n_batch = n_batch or n_ctx
    llm = Llama(str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=True, verbose=False,
                n_threads=2, n_gpu_layers=0, flash_attn=False)
    try:
        llm.reset()
        llm.eval([int(t) for t in tokens])
        return np.array(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def _kept_cache_logits(model_path, tokens, head):
    """Ours: `head` tokens in one decode, then one token at a time with the cache kept (tg's decode)."""
    with Engine(model_path, n_ctx=128, n_batch=128, n_threads=2, gpu_layers=0, hidden_states=False) as e:
        rows = [e.decode_at(tokens[:head], 0, outputs="all")]
        for i in range(head, len(tokens)):
            rows.append(e.decode_at(tokens[i:i + 1]))  # positions=None: right after the cache's last one
        out = np.concatenate(rows).astype(np.float64)
        # a cleared cache starts over: the same prompt at position 0 gives the same last logits again
        e.clear_cache()
        assert np.array_equal(e.decode_at(tokens[:head], np.arange(head), outputs="all"), out[:head])
    return out


@pytest.mark.slow
def test_generation_with_the_kept_cache_equals_llama_cpp_pythons_decodes(demo_path):
    """tg's decode, token by token with the cache kept, is bit-identical to llama-cpp-python's Llama
    decoding the same tokens one per decode (logits_all), and agrees with it decoding the whole sequence
    at once up to llama.cpp's own batch-layout noise (on this Q4_1 file up to ~0.8 logit: Llama's two
    layouts differ by exactly as much)."""
    with Engine(demo_path, n_ctx=32, n_threads=2, gpu_layers=0, hidden_states=False) as e:
        tokens = e.tokenize(TEXT)[:20]
    ours = _kept_cache_logits(demo_path, tokens, 1)
    step = _hl_logits(demo_path, tokens, 128, n_batch=1)
    assert ours.shape == step.shape == (len(tokens), 49152)
    assert np.array_equal(ours, step)
    whole = _hl_logits(demo_path, tokens, 128)
    assert np.abs(ours - whole).max() < 1.0
    assert (ours.argmax(1) == whole.argmax(1)).mean() >= 0.95


@pytest.mark.slow
def test_generation_with_the_kept_cache_equals_logits_all_over_the_whole_sequence(demo_ladder):
    """On the F16 file: every step's next-token logits (after an 8-token prompt, then one token at a time
    with the cache kept) equal those of the whole sequence decoded at once by Llama(logits_all=True),
    within batch-layout noise (measured: 0.04)."""
    f16 = demo_ladder["F16"]
    with Engine(f16, n_ctx=32, n_threads=2, gpu_layers=0, hidden_states=False) as e:
        tokens = e.tokenize(TEXT)
    ours = _kept_cache_logits(f16, tokens, 8)
    whole = _hl_logits(f16, tokens, 128)
    assert np.abs(ours - whole).max() < 0.2
    assert np.array_equal(ours.argmax(1), whole.argmax(1))


def test_decode_at_keeps_the_cache_and_refuses_what_does_not_fit(demo_path):
    with Engine(demo_path, n_ctx=64, n_batch=16, n_threads=2, gpu_layers=0, hidden_states=False) as e:
        tokens = e.tokenize(TEXT)[:24]
        # a prompt in two pieces (16 + 8) at explicit positions equals it in one decode at the same layout
        e.decode_at(tokens[:16], 0, outputs="none", read=False)
        two = e.decode_at(tokens[16:], np.arange(16, 24))
        e.clear_cache()
        e.decode_at(tokens[:16], 0, outputs="none", read=False)
        again = e.decode_at(tokens[16:], 16)
        assert np.array_equal(two, again)
        with pytest.raises(ProbeError, match="n_batch"):
            e.decode_at(tokens[:17], 0)
        with pytest.raises(ProbeError, match="outside the context"):
            e.decode_at(tokens[:2], e.n_ctx - 1)
        with pytest.raises(ProbeError, match="llama_decode failed"):  # llama.cpp: a sequence has no gaps
            e.decode_at(tokens[:2], 40)


def test_generation_pass_feeds_one_token_per_decode_after_the_cache(demo_path):
    """The tg loop itself: after it, the cache holds exactly its tokens and llama.cpp counted them as
    single-token decodes; the next decode continues at the following position."""
    with Engine(demo_path, n_ctx=64, n_batch=64, n_threads=2, gpu_layers=0, hidden_states=False) as e:
        tokens = e.tokenize(TEXT)[:12]
        e.clear_cache()
        e.reset_eval_counts()
        generation_pass(e, tokens)
        assert e.eval_counts()[1] == 12
        assert int(e._lib.llama_memory_seq_pos_max(e._mem, 0)) == 11
        step = e.decode_at(e.tokenize(TEXT)[12:13])
        ref = _hl_logits(demo_path, e.tokenize(TEXT)[:13], 64, n_batch=1)[-1]  # Llama, one token per decode
        assert np.array_equal(step[0], ref)


def test_random_tokens_are_llama_benchs():
    rng = np.random.default_rng(3)
    t = random_tokens(rng, 1000, 50, bos=7)
    assert t[0] == 7 and t.dtype == np.int32 and t.min() >= 0 and t.max() < 50 and len(np.unique(t[1:])) == 50
    free = random_tokens(np.random.default_rng(3), 1000, 50, bos=None)  # no BOS: the first token is random too
    assert np.array_equal(free[1:], t[1:]) and free[0] != 7


def test_statistics_are_llama_benchs_from_the_recorded_samples():
    """Rates are tokens / seconds per repetition; the figures, their mean and sample sd (llama-bench's
    stdev formula, written out here, equals NumPy's ddof=1)."""
    t = SpeedTest("pp512", 512, 0, samples_ns=[812_000_000, 790_500_000, 845_250_000, 801_000_000])
    ts = 1e9 * 512 / np.array(t.samples_ns, dtype=np.float64)
    n = len(ts)
    bench_sd = np.sqrt((ts ** 2).sum() / (n - 1) - ts.mean() ** 2 * n / (n - 1))
    assert t.mean == pytest.approx(ts.mean(), rel=1e-12)
    assert t.sd == pytest.approx(np.std(ts, ddof=1), rel=1e-12) == pytest.approx(bench_sd, rel=1e-9)
    assert SpeedTest("tg1", 0, 1, samples_ns=[10]).sd == 0.0  # one repetition: llama-bench's 0


@pytest.mark.slow
def test_bench_counts_the_tokens_asked_and_reports_numpys_statistics(demo_path):
    # ubatch 16: the 33-token prompt decodes as 16 + 16 + 1 (the last one a single-token decode)
    s = BenchSettings(n_prompt=33, n_gen=5, reps=3, threads=2, gpu_layers=0, ubatch=16)
    res = bench_files({"demo": demo_path}, s)
    lv = res.levels["demo"]
    pp, tg = lv.tests["pp33"], lv.tests["tg5"]
    # llama.cpp's own eval counters, per repetition (the warm-up runs are not counted)
    assert pp.tokens_counted == [33, 33, 33] and tg.tokens_counted == [5, 5, 5]
    assert len(pp.samples_ns) == len(tg.samples_ns) == 3
    d = res.to_dict()["levels"]["demo"]
    for name, n_tok in (("pp33", 33), ("tg5", 5)):
        rates = 1e9 * n_tok / np.array(d["tests"][name]["samples_ns"], dtype=np.float64)
        assert d["tests"][name]["tokens_per_second"] == pytest.approx(rates.mean(), rel=1e-12)
        assert d["tests"][name]["tokens_per_second_sd"] == pytest.approx(rates.std(ddof=1), rel=1e-12)
    assert d["pp_tokens_per_s"] == d["tests"]["pp33"]["tokens_per_second"]
    assert d["tg_tokens_per_s"] == d["tests"]["tg5"]["tokens_per_second"]
    assert res.speed()["demo"]["tg_tokens_per_s"] == d["tg_tokens_per_s"]
    assert lv.engine["n_batch"] == 16 and lv.engine["threads"] == 2
    # one token each: llama.cpp files a one-token prompt under generated tokens; it is still one token
    one = bench_files({"demo": demo_path}, BenchSettings(n_prompt=1, n_gen=1, reps=1, threads=2, gpu_layers=0,
                                                         warmup=False)).levels["demo"]
    assert one.tests["pp1"].tokens_counted == [1] and one.tests["tg1"].tokens_counted == [1]


@pytest.mark.slow
def test_memory_and_sizes_against_the_gguf(demo_path):
    """The KV cache llama.cpp reports equals the size from the file's own hyperparameters (F16 K and V,
    every layer, the context's cells); model bytes and bits per weight agree with the file."""
    import gguf

    r = gguf.GGUFReader(str(demo_path))

    def kv(key):
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    n_layer, n_embd = kv("llama.block_count"), kv("llama.embedding_length")
    n_head, n_head_kv = kv("llama.attention.head_count"), kv("llama.attention.head_count_kv")
    s = BenchSettings(n_prompt=16, n_gen=2, reps=1, threads=2, gpu_layers=0, warmup=False)
    lv = bench_files({"demo": demo_path}, s).levels["demo"]
    # each test its own context of p + n cells (llama-bench's), padded by llama.cpp to 256; memory: the largest
    assert set(lv.engine["n_ctx"]) == {"pp16", "tg2"}
    n_ctx = max(lv.engine["n_ctx"].values())
    kv_bytes = n_ctx * n_layer * 2 * (n_embd // n_head) * n_head_kv * 2  # K and V, f16
    m = lv.memory
    assert abs(m["kv_bytes"] - kv_bytes) <= 0.005 * 2 ** 20 + 1  # the log prints MiB with two decimals
    assert m["compute_bytes"] > 0 and m["llama_bytes"] == lv.model_bytes + m["kv_bytes"] + m["compute_bytes"] + m["output_bytes"]
    assert lv.file_bytes == demo_path.stat().st_size and lv.model_bytes < lv.file_bytes
    tensor_bytes = sum(int(t.n_bytes) for t in r.tensors)
    n_params = sum(int(t.n_elements) for t in r.tensors)
    assert lv.model_bytes == tensor_bytes and lv.n_params == n_params
    assert lv.bits_per_weight == pytest.approx(8 * tensor_bytes / n_params, rel=1e-6)
    assert m["peak_rss_bytes"] >= m["rss_bytes"] > lv.model_bytes * 0.5


@pytest.fixture()
def runner(monkeypatch, tmp_path):
    monkeypatch.setenv("GGML_PROBE_MODELS", str(tmp_path / "store"))
    return CliRunner()


@pytest.mark.slow
def test_bench_cli_json_keys(runner, demo_path):
    res = runner.invoke(cli, ["bench", "demo", "-p", "16", "-n", "3", "-r", "2", "-t", "2", "--gpu-layers", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"settings", "system", "levels"}
    assert out["settings"]["n_prompt"] == 16 and out["settings"]["reps"] == 2 and out["settings"]["threads"] == 2
    (name, lv), = out["levels"].items()
    assert name == demo_path.stem
    assert {"path", "file_bytes", "bits_per_weight", "model_bytes", "n_params", "pp_tokens_per_s", "pp_tokens_per_s_sd",
            "tg_tokens_per_s", "tg_tokens_per_s_sd", "tests", "memory", "engine"} <= set(lv)
    assert set(lv["tests"]) == {"pp16", "tg3"}
    assert {"samples_ns", "rates", "tokens_per_second", "tokens_per_second_sd", "tokens_counted"} <= set(lv["tests"]["pp16"])
    assert {"kv_bytes", "compute_bytes", "llama_bytes", "rss_bytes", "peak_rss_bytes", "vram_used_bytes"} <= set(lv["memory"])
    assert lv["tests"]["tg3"]["tokens_counted"] == [3, 3]


@pytest.mark.parametrize("args, message", [
    (["bench", "demo", "--quants", "F16,Q4_9"], "unknown quant type 'Q4_9'"),
    (["bench", "demo", "-p", "0", "-n", "0"], "-p or -n"),
    (["bench", "demo", "-r", "0"], "repetitions"),
])
def test_bench_bad_input_is_one_line_and_exit_2(runner, demo_path, args, message):
    res = runner.invoke(cli, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert [line for line in res.output.splitlines() if line.strip()] == [res.output.strip()]


def test_comma_lists_give_a_test_each_in_llama_benchs_order():
    """-p 128,512 -n 32,128 as llama-bench takes them: every pp size, then every tg size; 0 skipped, a size
    given twice run once; a single size stays the one test it was."""
    s = BenchSettings(n_prompt=(16, 8, 16, 0), n_gen=(0, 2, 3))
    assert [(t.name, t.n_prompt, t.n_gen) for t in s.tests()] == [("pp16", 16, 0), ("pp8", 8, 0), ("tg2", 0, 2),
                                                                 ("tg3", 0, 3)]
    assert [t.name for t in BenchSettings(n_prompt=512, n_gen=0).tests()] == ["pp512"]
    with pytest.raises(ProbeError, match="-p or -n"):
        BenchSettings(n_prompt=(0, 0), n_gen=0)
    with pytest.raises(ProbeError, match="below 0"):
        BenchSettings(n_prompt=(16, -1), n_gen=2)


@pytest.mark.slow
def test_bench_cli_comma_lists_run_every_test_with_llama_cpps_counts(runner, demo_path):
    res = runner.invoke(cli, ["bench", "demo", "-p", "8,16", "-n", "2,3", "-r", "2", "-t", "2", "--gpu-layers", "0",
                              "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["settings"]["n_prompt"] == [8, 16] and out["settings"]["n_gen"] == [2, 3]
    (lv,) = out["levels"].values()
    assert list(lv["tests"]) == ["pp8", "pp16", "tg2", "tg3"]
    for name, t in lv["tests"].items():  # llama.cpp's own eval counters: each test decoded what it names
        assert t["tokens_counted"] == [int(name[2:])] * 2
        rates = 1e9 * int(name[2:]) / np.array(t["samples_ns"], dtype=np.float64)
        assert t["tokens_per_second"] == pytest.approx(rates.mean(), rel=1e-12)
    # the headline pp/tg figures (pick's) are the first size of each
    assert lv["pp_tokens_per_s"] == lv["tests"]["pp8"]["tokens_per_second"]
    assert lv["tg_tokens_per_s"] == lv["tests"]["tg2"]["tokens_per_second"]
    table = runner.invoke(cli, ["bench", "demo", "-p", "8,16", "-n", "0", "-r", "1", "-t", "2", "--gpu-layers", "0",
                                "-q"])
    assert table.exit_code == 0, table.output
    assert "pp8 tok/s" in table.output and "pp16 tok/s" in table.output and "tg" not in table.output.split("definitions")[0]


@pytest.mark.parametrize("args, message", [
    (["bench", "demo", "-p", "128,x"], "-p takes token counts like 512 or 128,512, not '128,x'"),
    (["bench", "demo", "-n", "32,,128"], "-n takes token counts"),
    (["bench", "demo", "-p", "0,0", "-n", "0"], "-p or -n"),
    (["bench", "demo", "-p", "16,-1"], "below 0"),
])
def test_bench_bad_lists_are_one_line_and_exit_2(runner, demo_path, args, message):
    res = runner.invoke(cli, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert [line for line in res.output.splitlines() if line.strip()] == [res.output.strip()]
