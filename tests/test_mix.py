"""quantize's per-tensor options, measured group sensitivity and `ggml-probe mix` on tiny real GGUF files.

The tiny llama (tests/validate_tiny_gguf.py) has rows of 64 and 128 values: 32-block types fit, the
256-block k-quants do not, so llama.cpp's fallback is exercised too. Types are read back with gguf-py;
KLDs come from llama.cpp through pipeline/kld (checked against llama-perplexity in test_kld.py); the
static error is checked against a NumPy Q8_0 quantizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import validate_tiny_gguf as tiny
from ggml_probe.analysis.mix import allocate, spearman
from ggml_probe.cli import cli
from ggml_probe.models.quantize import GGML_TYPES
from ggml_probe.pipeline.kld import KLDSettings
from ggml_probe.pipeline.mix import STOCK_TYPES
from ggml_probe.pipeline.sensitivity import measure_sensitivity
from ggml_probe.weights.type_error import type_errors

SETTINGS = KLDSettings(ctx=64, chunks=4, batch=256)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny llama with its (tied) embeddings scaled by 0.1: as written, its logits are so large that every
    position puts all mass on one token and no weight change moves the KLD off 0."""
    path = tiny.write_tiny_llama(tmp_path_factory.mktemp("mix") / "tiny.gguf", tiny.self_made_vocab(), seed=3)
    reader = gguf.GGUFReader(path)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embd.tensor_type == gguf.GGMLQuantizationType.F16
    values = np.memmap(path, dtype=np.float16, mode="r+", offset=reader.data_offset + embd.data_offset,
                       shape=(int(embd.n_elements),))
    values[:] = (values.astype(np.float32) * 0.1).astype(np.float16)
    values.flush()
    del values, reader
    return path


@pytest.fixture(scope="module")
def text_file(boolq_path, tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in boolq_path.read_text().splitlines()[:6]]
    path = tmp_path_factory.mktemp("mixtext") / "passages.txt"
    path.write_text("\n\n".join(r["passage"] for r in rows))
    return path


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_overrides_hold_exactly_the_requested_types(tiny_model, tmp_path):
    out = tmp_path / "mixed.gguf"
    res = _run("quantize", tiny_model, "--to", "Q8_0", "--allow-requantize", "--pure", "--outfile", out,
               "--tensor-type", r"blk\.0\.attn_q=Q4_0", "--tensor-type", "ffn_down=Q5_1",
               "--tensor-type", r"blk\.1\.ffn_up=F16", "--token-embedding-type", "Q4_1", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)[0]
    written = _types(out)
    for name, t in written.items():
        if name.endswith("norm.weight"):
            assert t == "F32"
        elif name == "blk.0.attn_q.weight":
            assert t == "Q4_0"
        elif name.endswith("ffn_down.weight"):
            assert t == "Q5_1"
        elif name == "blk.1.ffn_up.weight":
            assert t == "F16"
        elif name == "token_embd.weight":
            assert t == "Q4_1"
        else:
            assert t == "Q8_0", name
    assert report["fallbacks"] == {}
    assert report["tensor_types"] == dict(__import__("collections").Counter(written.values()))


def test_type_too_wide_for_the_rows_falls_back_and_is_reported(tiny_model, tmp_path):
    out = tmp_path / "fallback.gguf"
    res = _run("quantize", tiny_model, "--to", "Q8_0", "--allow-requantize", "--outfile", out,
               "--tensor-type", "attn_q=Q4_K", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)[0]
    # 64 columns are not a multiple of Q4_K's 256: llama.cpp's table says Q5_0
    assert report["fallbacks"]["blk.0.attn_q.weight"] == {"asked": "Q4_K", "used": "Q5_0"}
    assert _types(out)["blk.0.attn_q.weight"] == "Q5_0"
    text = _run("quantize", tiny_model, "--to", "Q8_0", "--allow-requantize", "--outfile", tmp_path / "f2.gguf",
                "--tensor-type", "attn_q=Q4_K")
    assert "Q4_K→Q5_0" in text.output


def test_bad_override_input_gets_one_line(tiny_model, tmp_path):
    res = _run("quantize", tiny_model, "--to", "Q8_0", "--allow-requantize", "-o", tmp_path,
               "--tensor-type", "ffn_dwn=Q6_K")
    assert res.exit_code == 2
    assert "ffn_dwn" in res.output and "matches no tensor" in res.output and len(res.output.strip().splitlines()) == 1
    res = _run("quantize", tiny_model, "--to", "Q8_0", "--allow-requantize", "-o", tmp_path,
               "--tensor-type", "ffn_down=Q9_K")
    assert res.exit_code == 2 and "unknown tensor type 'Q9_K'" in res.output
    assert not list(tmp_path.glob("*.gguf"))


def test_dry_run_writes_nothing_and_sizes_equal_a_real_run(tiny_model, tmp_path):
    args = ["quantize", tiny_model, "--to", "Q4_K_M", "--to", "Q8_0", "--allow-requantize", "-o", tmp_path,
            "--tensor-type", "ffn_up=Q4_0", "--json"]
    dry = json.loads(_run(*args, "--dry-run").output)
    assert not list(tmp_path.iterdir())
    real = json.loads(_run(*args).output)
    for d, r in zip(dry, real):
        assert d["dry_run"] and not r["dry_run"]
        assert d["tensor_types"] == r["tensor_types"]
        assert d["fallbacks"] == r["fallbacks"]
        # tensor data is exact; the header differs by the few bytes of our metadata, padded to 32
        assert abs(d["size_bytes"] - r["size_bytes"]) <= 256, (d["size_bytes"], r["size_bytes"])
        assert Path(r["path"]).stat().st_size == r["size_bytes"]


def test_static_type_error_equals_a_numpy_q8_0(tiny_model):
    name = "blk.0.attn_q.weight"
    m = np.random.default_rng(0).uniform(0.5, 2.0, tiny.N_EMBD).astype(np.float32)
    got = type_errors(tiny_model, [name], {"Q8_0": GGML_TYPES["Q8_0"], "Q4_K": GGML_TYPES["Q4_K"]}, {name: m})[name]
    assert "Q4_K" not in got  # 64 columns: not a whole Q4_K block
    w = gguf.dequantize(next(t for t in gguf.GGUFReader(tiny_model).tensors if t.name == name).data,
                        next(t for t in gguf.GGUFReader(tiny_model).tensors if t.name == name).tensor_type)
    w = w.reshape(-1, tiny.N_EMBD).astype(np.float32)
    blocks = w.reshape(w.shape[0], -1, 32)
    d = (np.abs(blocks).max(axis=2, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    q = np.round(blocks / np.where(d == 0, 1, (np.abs(blocks).max(axis=2, keepdims=True) / 127)))
    back = (q * d).reshape(w.shape)
    expected = float((np.square(back - w, dtype=np.float64) @ m.astype(np.float64)).sum())
    assert got["Q8_0"] == pytest.approx(expected, rel=1e-3)


def test_allocation_respects_the_budget_and_beats_uniform_types():
    rng = np.random.default_rng(1)
    types = {"a": 4.5, "b": 5.5, "c": 8.5}
    size = {f"u{i}": {t: int(bits * 1000 * (i + 1)) for t, bits in types.items()} for i in range(12)}
    sens = rng.uniform(0.01, 1.0, 12)
    cost = {f"u{i}": {t: sens[i] * 4.0 ** (-bits) for t, bits in types.items()} for i in range(12)}
    uniform_b = sum(size[u]["b"] for u in size)
    alloc = allocate(size, cost, uniform_b)
    assert alloc.size_bytes <= uniform_b
    assert alloc.size_bytes == sum(size[u][t] for u, t in alloc.types.items())
    assert alloc.predicted_cost <= sum(cost[u]["b"] for u in cost) + 1e-15
    with pytest.raises(ValueError, match="smallest choice"):
        allocate(size, cost, sum(size[u]["a"] for u in size) - 1)


def test_spearman_equals_scipy():
    from scipy.stats import spearmanr  # the independent reference

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=20), rng.normal(size=20)
    b[3] = b[5]  # a tie
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


@pytest.mark.slow
def test_group_sensitivity_equals_the_kld_of_a_file_quantized_that_way(tiny_model, text_file, tmp_path):
    sens = measure_sensitivity(tiny_model, tiny_model, text_file.read_text(), "Q4_0", tmp_path / "work",
                               per_layer_kinds=1, settings=SETTINGS)
    kinds = {g.group: g for g in sens.groups}
    assert {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd"} <= set(kinds)
    group = kinds["ffn_down"]
    assert set(group.low_types.values()) == {"Q4_0"} and len(group.tensors) == tiny.N_LAYER
    assert all(g.kld_mean > 0 and g.static > 0 for g in sens.groups)
    assert sens.spearman_all is not None and -1 <= sens.spearman_all <= 1

    # The same file built by hand with the quantize command, and its KLD by the kld command.
    probe = tmp_path / "probe.gguf"
    res = _run("quantize", tiny_model, "--to", "Q8_0", "--allow-requantize", "--outfile", probe,
               "--tensor-type", group.pattern + "=Q4_0", "--tensor-type", ".=F16")
    assert res.exit_code == 0, res.output
    assert {n: t for n, t in _types(probe).items() if re.search(group.pattern, n)} == group.low_types
    res = _run("kld", probe, "--ref", tiny_model, "--text", text_file, "--ctx", SETTINGS.ctx, "--chunks",
               SETTINGS.chunks, "--batch", SETTINGS.batch, "-o", tmp_path / "kld", "--json", "-q")
    assert res.exit_code == 0, res.output
    figures = json.loads(res.output)["models"]["probe"]
    assert figures["kld_mean"] == pytest.approx(group.kld_mean, rel=1e-9)
    assert figures["same_top_p"] == pytest.approx(group.same_top_p, rel=1e-9)

    # A second run measures nothing again: every probe comes from the cache.
    again = measure_sensitivity(tiny_model, tiny_model, text_file.read_text(), "Q4_0", tmp_path / "work",
                                per_layer_kinds=1, settings=SETTINGS)
    assert all(g.cached for g in again.groups)


@pytest.mark.slow
def test_mix_cli_writes_a_file_under_the_budget(tiny_model, text_file, tmp_path):
    out = tmp_path / "tiny-mix.gguf"
    common = ["--ref", tiny_model, "--type", "Q4_0", "--text", text_file, "--ctx", SETTINGS.ctx, "--chunks",
              SETTINGS.chunks, "--work-dir", tmp_path / "work"]
    res = _run("mix", tiny_model, *common, "--budget-of", "Q5_0", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert set(report) >= {"mix", "stock"}
    for side in ("mix", "stock"):
        assert {"size_bytes", "kld_mean", "same_top_p"} <= set(report[side])
    assert report["mix"]["size_bytes"] <= report["budget_bytes"] == report["stock"]["size_bytes"]
    assert out.stat().st_size == report["mix"]["size_bytes"]
    written = _types(out)
    assert dict(__import__("collections").Counter(written.values())) == report["mix"]["tensor_types"]
    assert report["mix"]["kld_mean"] >= 0

    # The same again for a person: every probe and score comes from the work folder's cache.
    res = _run("mix", tiny_model, *common, "--budget-of", "Q5_0", "-o", out, "--force")
    assert res.exit_code == 0, res.output
    assert f"mix: {out}" in res.output and "stock Q5_0:" in res.output
    assert f"KLD {report['mix']['kld_mean']:.5f}" in res.output

    # A budget in bits per weight: compared with the largest stock type that fits it.
    res = _run("mix", tiny_model, *common, "--bpw", "6", "-o", tmp_path / "bpw.gguf", "--json")
    assert res.exit_code == 0, res.output
    by_bpw = json.loads(res.output)
    assert by_bpw["budget"] == "6 bpw"
    assert by_bpw["mix"]["bits_per_weight"] <= 6.0 and by_bpw["stock"]["size_bytes"] <= by_bpw["budget_bytes"]
    stock_args = [a for q in STOCK_TYPES for a in ("--to", q)]
    planned = json.loads(_run("quantize", tiny_model, *stock_args, "--allow-requantize", "-o", tmp_path,
                              "--dry-run", "--json").output)
    fitting = [p for p in planned if p["size_bytes"] <= by_bpw["budget_bytes"]]
    assert by_bpw["stock"]["quant"] == max(fitting, key=lambda p: p["size_bytes"])["quant"]

    # A budget below the smallest possible file: one line with that size, nothing written.
    small = tmp_path / "too-small.gguf"
    res = _run("mix", tiny_model, *common, "--bpw", "1", "-o", small)
    assert res.exit_code == 2
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and re.search(r"smallest possible file: \d+ bytes", line)
    assert not small.exists()


def test_output_tensor_type_on_a_model_with_its_own_output(tmp_path):
    model = tiny.write_tiny_model(tmp_path / "tiny-qwen2.gguf", tiny.self_made_vocab(), "qwen2", seed=4)
    out = tmp_path / "out.gguf"
    res = _run("quantize", model, "--to", "Q8_0", "--allow-requantize", "--outfile", out,
               "--output-tensor-type", "Q4_0", "--token-embedding-type", "Q5_1")
    assert res.exit_code == 0, res.output
    written = _types(out)
    assert written["output.weight"] == "Q4_0" and written["token_embd.weight"] == "Q5_1"
    assert written["blk.0.attn_q.weight"] == "Q8_0"
