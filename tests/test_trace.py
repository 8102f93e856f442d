"""The divergence trace (`ggml-probe trace`): statistics, the llama.cpp pipeline against transformers, the CLI.

The pipeline is checked on a tiny random F32 Llama and a perturbed copy of it (weights + noise, as a quantizer
would move them), both converted to GGUF: transformers runs the same chunks with hooks, reads the same four
tensors per block, and computes the KL with blocks ≤ k perturbed by overwriting the residual stream after
block k in the reference model, in NumPy/torch, independently of llama.cpp.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggml_probe.analysis.trace import EMBEDDING_POINT, FULL_POINT, TensorErrorSums, TraceAccumulator, log_probs
from ggml_probe.cli import cli

TEXT = ("The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
        "Numbers like 12345 and 67890 are split into digits, and the words keep coming until the text is long "
        "enough for several chunks of tokens in a row, which is what the trace needs to stream. ") * 4


# ------------------------------------------------------------------ pure statistics


def test_error_sums_streamed_equal_direct_numpy():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((50, 16)) * np.linspace(0.1, 30, 50)[:, None]
    q = r + 0.05 * rng.standard_normal((50, 16))
    acc = TensorErrorSums()
    for part in np.array_split(np.arange(50), 4):  # chunk by chunk
        acc.update(r[part].astype(np.float32), q[part].astype(np.float32))
    r32, q32 = r.astype(np.float32).astype(np.float64), q.astype(np.float32).astype(np.float64)
    rel = np.linalg.norm(q32 - r32, axis=1) / np.linalg.norm(r32, axis=1)
    cos = (q32 * r32).sum(1) / (np.linalg.norm(q32, axis=1) * np.linalg.norm(r32, axis=1))
    out = acc.result()
    assert out["n"] == 50
    assert out["rel_err"] == pytest.approx(rel.mean(), rel=1e-12)
    assert out["cos"] == pytest.approx(cos.mean(), rel=1e-12)
    assert out["rel_err_total"] == pytest.approx(np.linalg.norm(q32 - r32) / np.linalg.norm(r32), rel=1e-12)


def test_identical_tensors_give_exact_zero_and_one():
    r = np.random.default_rng(1).standard_normal((7, 33)).astype(np.float32)
    acc = TensorErrorSums()
    acc.update(r, r.copy())
    out = acc.result()
    assert out["rel_err"] == 0.0 and out["rel_err_total"] == 0.0 and out["cos"] == 1.0


def test_kl_steps_add_up_and_name_the_parts(monkeypatch):
    from ggml_probe.analysis import trace as trace_stats

    monkeypatch.setattr(trace_stats, "_BLOCK_ELEMENTS", 80)  # two rows per block: the blocked sum is exercised
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((6, 40))
    acc = TraceAccumulator(["l_out"], [0, 2, 4], [0, 2, 4], n_layer=5)
    kls = {}
    for scale, point in zip((0.01, 0.1, 0.3, 0.2, 0.5), acc.kl_points):
        logits = ref + scale * rng.standard_normal(ref.shape)
        acc.update_kl(point, log_probs(ref), logits)
        lp, lq = ref - np.log(np.exp(ref).sum(1, keepdims=True)), logits - np.log(np.exp(logits).sum(1, keepdims=True))
        kls[point] = float((np.exp(lp) * (lp - lq)).sum(1).mean())
    for k in (0, 2, 4):
        acc.update_tensor("l_out", k, ref, ref)
    out = acc.result()
    steps = out["kl_steps"]
    assert [s["part"] for s in steps] == ["token embedding", "block 0", "blocks 1–2", "blocks 3–4", "output (norm, head)"]
    assert [s["kl_upto"] for s in steps] == pytest.approx([kls[p] for p in acc.kl_points], rel=1e-10)
    assert sum(s["step"] for s in steps) == pytest.approx(kls[FULL_POINT], rel=1e-12)
    assert out["kl"]["full"] == pytest.approx(kls[FULL_POINT]) and out["kl"]["embd"] == pytest.approx(kls[EMBEDDING_POINT])
    assert out["layers"][1]["kl_step"] == pytest.approx(kls[2] - kls[0])
    assert steps[2]["step"] < 0 or steps[3]["step"] < 0  # a part may undo error: the steps are not clipped


# ------------------------------------------------------------------ llama.cpp on tiny F32 models


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import neurons_tiny
    import torch
    import transformers

    from ggml_probe.models.convert import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("trace-tiny")
    neurons_tiny.build_hf(root / "ref")
    model = transformers.LlamaForCausalLM.from_pretrained(root / "ref", dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # every weight moved by noise, as quantization moves it (here ~10% of a matrix's scale)
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "quant")
    transformers.AutoTokenizer.from_pretrained(root / "ref").save_pretrained(root / "quant")
    text = root / "text.txt"
    text.write_text(TEXT)
    return {"ref_hf": root / "ref", "quant_hf": root / "quant", "text": text,
            "ref": convert_hf_to_gguf(root / "ref", root / "ref-f32.gguf", outtype="f32"),
            "quant": convert_hf_to_gguf(root / "quant", root / "quant-f32.gguf", outtype="f32")}


def _transformers_trace(ref_hf: Path, quant_hf: Path, chunks: list[np.ndarray]):
    """Per (sublayer, layer) the reference's and the perturbed model's rows, and per KL point the per-token KL,
    all from transformers with hooks (float32), chunk by chunk."""
    import torch
    import transformers

    def load(folder):
        return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    def run(model, ids, patch=None):
        seen, hooks = {}, []
        inner = model.model
        hooks.append(inner.embed_tokens.register_forward_hook(
            lambda _m, _i, out: patch[1] if patch and patch[0] == "embd" else seen.__setitem__("embd", out[0].clone())))
        for i, layer in enumerate(inner.layers):
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, inp, i=i: seen.__setitem__(("kqv_out", i), inp[0][0].clone())))
            hooks.append(layer.self_attn.o_proj.register_forward_hook(
                lambda _m, _i, out, i=i: seen.__setitem__(("attn_out", i), out[0].clone())))
            hooks.append(layer.mlp.register_forward_hook(
                lambda _m, _i, out, i=i: seen.__setitem__(("ffn_out", i), out[0].clone())))

            def layer_hook(_m, _i, out, i=i):
                if patch and patch[0] == i:
                    return (patch[1], *out[1:]) if isinstance(out, tuple) else patch[1]
                seen[("l_out", i)] = first(out)[0].clone()
            hooks.append(layer.register_forward_hook(layer_hook))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
        for h in hooks:
            h.remove()
        return {k: v.double().numpy() for k, v in seen.items()}, logits

    def kl(ref_logits, logits):
        lp = ref_logits - np.logaddexp.reduce(ref_logits, axis=1, keepdims=True)
        lq = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        return (np.exp(lp) * (lp - lq)).sum(1)

    ref_model, quant_model = load(ref_hf), load(quant_hf)
    rows: dict = {}
    kls: dict = {}
    n_layer = len(ref_model.model.layers)
    for chunk in chunks:
        ids = [int(t) for t in chunk]
        r, ref_logits = run(ref_model, ids)
        q, q_logits = run(quant_model, ids)
        for key in r:
            if key != "embd":
                rows.setdefault(key, []).append((r[key], q[key]))
        kls.setdefault(FULL_POINT, []).append(kl(ref_logits, q_logits))
        for point in [EMBEDDING_POINT, *range(n_layer)]:
            name = point if point == EMBEDDING_POINT else ("l_out", point)
            replacement = torch.tensor(q[name], dtype=torch.float32)[None]
            _, patched = run(ref_model, ids, patch=(point, replacement))
            kls.setdefault(point, []).append(kl(ref_logits, patched))
    return rows, {p: np.concatenate(v) for p, v in kls.items()}


def _chunks(gguf: Path, text: str, ctx: int, n: int) -> list[np.ndarray]:
    from ggml_probe.engine.model import Vocab

    with Vocab(gguf) as vocab:
        toks = vocab.tokenize(text, add_special=True)
        add_bos = bool(vocab._lib.llama_vocab_get_add_bos(vocab._vocab))
        bos = int(vocab._lib.llama_vocab_bos(vocab._vocab))
    chunks = [np.array(toks[i * ctx:(i + 1) * ctx]) for i in range(n)]
    if add_bos:
        for c in chunks:
            c[0] = bos
    return chunks


def test_tiny_trace_matches_transformers(tiny_pair):
    """Relative error, cosine and every KL point against transformers, over two chunks. With an F32 KV cache:
    llama.cpp's default F16 cache rounds K and V, which moved the embedding-only KL by 0.6% here."""
    import neurons_tiny

    from ggml_probe.pipeline.trace import TraceSettings, run_trace

    ctx = 32
    result = run_trace(tiny_pair["quant"], tiny_pair["ref"], TEXT, TraceSettings(ctx=ctx, tokens=2 * ctx, threads=1, kv_type=0))
    assert result["chunks"] == 2 and result["tokens"] == 2 * ctx
    rows, kls = _transformers_trace(tiny_pair["ref_hf"], tiny_pair["quant_hf"], _chunks(tiny_pair["ref"], TEXT, ctx, 2))
    assert len(result["layers"]) == neurons_tiny.N_LAYER
    worst = 0.0
    for row in result["layers"]:
        k = row["layer"]
        for sub in ("kqv_out", "attn_out", "ffn_out", "l_out"):
            r = np.concatenate([a for a, _ in rows[(sub, k)]])
            q = np.concatenate([b for _, b in rows[(sub, k)]])
            rel = np.linalg.norm(q - r, axis=1) / np.linalg.norm(r, axis=1)
            cos = (q * r).sum(1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(r, axis=1))
            got = row[sub]
            assert got["n"] == 2 * ctx
            assert got["rel_err"] == pytest.approx(rel.mean(), rel=2e-4), (sub, k)
            assert got["rel_err_total"] == pytest.approx(np.linalg.norm(q - r) / np.linalg.norm(r), rel=2e-4), (sub, k)
            assert 1 - got["cos"] == pytest.approx(1 - cos.mean(), rel=5e-4), (sub, k)
            worst = max(worst, abs(got["rel_err"] / rel.mean() - 1))
        assert row["kl_upto"] == pytest.approx(kls[k].mean(), rel=2e-4), k
    assert result["kl"]["full"] == pytest.approx(kls[FULL_POINT].mean(), rel=2e-4)
    assert result["kl"]["embd"] == pytest.approx(kls[EMBEDDING_POINT].mean(), rel=2e-4)
    assert result["kl"]["full"] > 1e-3  # the perturbation is visible: the comparison is not of zeros
    assert sum(s["step"] for s in result["kl_steps"]) == pytest.approx(result["kl"]["full"], rel=1e-9)
    print(f"tiny f32: worst relative difference of rel_err, llama.cpp vs transformers: {worst:.2e}")


def test_tiny_trace_against_itself_is_exactly_zero(tiny_pair):
    from ggml_probe.pipeline.trace import TraceSettings, run_trace

    result = run_trace(tiny_pair["ref"], tiny_pair["ref"], TEXT, TraceSettings(ctx=32, tokens=64, threads=1))
    for row in result["layers"]:
        for sub in ("kqv_out", "attn_out", "ffn_out", "l_out"):
            assert row[sub]["rel_err"] == 0.0 and row[sub]["rel_err_total"] == 0.0 and row[sub]["cos"] == 1.0
        assert row["kl_upto"] == 0.0 and row["kl_step"] == 0.0
    assert result["kl"]["full"] == 0.0 and result["kl"]["embd"] == 0.0


def test_memory_is_flat_in_the_number_of_tokens(tiny_pair):
    """Chunk by chunk: the peak of Python-side allocations is the same for one chunk and for four."""
    from ggml_probe.pipeline.trace import TraceSettings, run_trace

    peaks = {}
    for n_chunk in (1, 4):
        tracemalloc.start()
        run_trace(tiny_pair["quant"], tiny_pair["ref"], TEXT * 2, TraceSettings(ctx=32, tokens=32 * n_chunk, threads=1))
        peaks[n_chunk] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[4] < 1.25 * peaks[1], peaks


def test_cli_trace_json_and_table(tiny_pair):
    from ggml_probe.pipeline.trace import TraceSettings, run_trace

    runner = CliRunner()
    args = ["trace", str(tiny_pair["quant"]), "--ref", str(tiny_pair["ref"]), "--text", str(tiny_pair["text"]),
            "--ctx", "32", "--tokens", "64", "--layers", "0,-1", "--threads", "1"]
    res = runner.invoke(cli, args + ["--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    direct = run_trace(tiny_pair["quant"], tiny_pair["ref"], TEXT, TraceSettings(ctx=32, tokens=64, layers="0,-1", threads=1))
    assert [r["layer"] for r in data["layers"]] == [0, 2]
    assert data["kl"]["full"] == pytest.approx(direct["kl"]["full"], rel=1e-12)
    assert data["layers"][1]["l_out"]["rel_err"] == pytest.approx(direct["layers"][1]["l_out"]["rel_err"], rel=1e-12)
    assert [s["part"] for s in data["kl_steps"]] == ["token embedding", "block 0", "blocks 1–2", "output (norm, head)"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "l_out" in res.output and "KL" in res.output and "blocks 1–2" in res.output


def test_bad_input_is_one_line(tiny_pair, tmp_path):
    import real_vocab_tiny

    runner = CliRunner()
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    res = runner.invoke(cli, ["trace", str(tiny_pair["quant"]), "--ref", str(tiny_pair["ref"]), "--text", str(short),
                              "--ctx", "32"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "needs at least 32" in res.output

    vocab_file = real_vocab_tiny.vocab_path("qwen2")
    if not vocab_file.exists():
        pytest.skip(f"shared vocab file not found: {vocab_file}")
    other = real_vocab_tiny.write_tiny_model(tmp_path / "other-vocab.gguf", vocab_file)
    res = runner.invoke(cli, ["trace", str(other), "--ref", str(tiny_pair["ref"]), "--text", str(tiny_pair["text"]),
                              "--ctx", "32"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "same vocabulary" in res.output

    res = runner.invoke(cli, ["trace", str(tiny_pair["quant"]), "--ref", str(tiny_pair["ref"]),
                              "--text", str(tiny_pair["text"]), "--ctx", "32", "--layers", "7"])
    assert res.exit_code == 2 and "out of range" in res.output

    res = runner.invoke(cli, ["trace", str(tiny_pair["quant"]), "--ref", str(tiny_pair["ref"])])
    assert res.exit_code == 2 and "--text" in res.output


# ------------------------------------------------------------------ the demo model


@pytest.mark.slow
def test_demo_trace_against_itself_is_exactly_zero(demo_path):
    """A real model (SmolLM2-135M) against itself: rel err 0, cos 1, KL 0 at every chosen block."""
    from ggml_probe.pipeline.trace import TraceSettings, run_trace

    result = run_trace(demo_path, demo_path, TEXT, TraceSettings(ctx=16, tokens=16, layers="0,14,-1", threads=2))
    assert [r["layer"] for r in result["layers"]] == [0, 14, 29]
    for row in result["layers"]:
        for sub in ("kqv_out", "attn_out", "ffn_out", "l_out"):
            assert row[sub]["rel_err"] == 0.0 and row[sub]["cos"] == 1.0
        assert row["kl_upto"] == 0.0
    assert result["kl"]["full"] == 0.0


# ------------------------------------------------------------------ study and report


def test_study_trace_section_is_saved_and_reused(tiny_pair, tmp_path):
    from ggml_probe.fsutil import sha256_file
    from ggml_probe.pipeline.study import StudyConfig, _trace_section
    from ggml_probe.pipeline.trace import TraceSettings, run_trace

    files = {"F32": tiny_pair["ref"], "NOISY": tiny_pair["quant"]}
    levels = {lvl: {"sha256": sha256_file(p)} for lvl, p in files.items()}
    config = StudyConfig(trace_ctx=32, trace_tokens=64, threads=1)

    class Steps:
        def __init__(self):
            self.steps = []

        def step(self, label):
            self.steps.append(label)

        def run(self, label):
            return None

    first, second = Steps(), Steps()
    section = _trace_section(files, "F32", config, tmp_path, {"t": TEXT}, levels, False, first)
    assert list(section["levels"]) == ["NOISY"] and (tmp_path / "trace" / "NOISY.json").exists()
    direct = run_trace(files["NOISY"], files["F32"], TEXT, TraceSettings(ctx=32, tokens=64, threads=1))
    assert section["levels"]["NOISY"]["kl"]["full"] == pytest.approx(direct["kl"]["full"], rel=1e-12)
    again = _trace_section(files, "F32", config, tmp_path, {"t": TEXT}, levels, False, second)
    assert any("trace NOISY" in s for s in first.steps) and not any("trace" in s for s in second.steps)
    assert again["levels"]["NOISY"] == section["levels"]["NOISY"]

    short = _trace_section(files, "F32", StudyConfig(trace_ctx=4096, trace_tokens=4096), tmp_path, {"t": "short"},
                           levels, False, None)
    assert not short["levels"] and "needs at least 4096" in short["note"]


def test_report_shows_where_the_error_enters(tiny_pair, tmp_path):
    from ggml_probe.pipeline.trace import TraceSettings, run_trace
    from ggml_probe.report.render import render_report

    trace = run_trace(tiny_pair["quant"], tiny_pair["ref"], TEXT, TraceSettings(ctx=32, tokens=32, threads=1))
    study = {"study": {"model": "tiny", "quants": ["F32", "NOISY"], "reference": "F32"},
             "trace": {"text_source": "test text", "levels": {"NOISY": json.loads(json.dumps(trace))}}}
    paths = render_report(study, tmp_path)
    md = paths["md"].read_text()
    assert "Where the error enters" in md
    top = trace["summary"]["largest_kl_step"]
    assert f"the error enters most at {top['part']}" in md
    assert f"{trace['kl']['full']:.5f}" in md
    rows = [(r["layer"], r["l_out"]["rel_err"]) for r in trace["layers"]]
    layer, rise = max(((b[0], b[1] - a[1]) for a, b in zip(rows, rows[1:])), key=lambda x: x[1])
    assert trace["summary"]["l_out_largest_rise"]["layer"] == layer and f"it grows most at block {layer} " in md
    assert (tmp_path / "plots" / "trace-NOISY.png").stat().st_size > 1000
    # the study's terminal line: the KL and the part with the largest KL step, found here from the steps
    from ggml_probe.report.terminal import trace_line
    line = trace_line("NOISY", trace, "F32")
    largest = max(trace["kl_steps"], key=lambda s: s["step"])
    assert line.startswith("where the error enters · NOISY vs F32") and f"KL {trace['kl']['full']:.4f}" in line
    assert f"enters most at {largest['part']} ({largest['step']:+.4f}" in line
    html = paths["html"].read_text()
    assert "Where the error enters" in html and "data:image/png;base64" in html


def test_cli_task_text_and_no_kl(tiny_pair, boolq_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["trace", str(tiny_pair["quant"]), "--ref", str(tiny_pair["ref"]), "--task", "boolq",
                              "--data", str(boolq_path), "--limit", "3", "--ctx", "32", "--tokens", "32", "--no-kl",
                              "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["tokens"] == 32 and data["chunks"] == 1
    assert all("kl_upto" not in r for r in data["layers"]) and data["kl"]["embd"] is None
    assert data["kl"]["full"] > 0 and data["layers"][0]["l_out"]["rel_err"] > 0
    assert "largest_kl_step" not in data["summary"]
    res = runner.invoke(cli, ["trace", str(tiny_pair["quant"]), "--ref", str(tiny_pair["ref"]), "--task", "boolq",
                              "--text", str(tiny_pair["text"])])
    assert res.exit_code == 2 and "not both" in res.output
