"""Every command through click's CliRunner: what a user sees, and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ggml_probe.cli import cli


@pytest.fixture()
def runner(monkeypatch, tmp_path):
    monkeypatch.setenv("GGML_PROBE_MODELS", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return CliRunner()


def test_help_lists_every_command(runner):
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    for cmd in ("fetch", "convert", "quantize", "inspect", "models", "eval"):
        assert cmd in res.output


def test_inspect_demo_json(runner, demo_path):
    res = runner.invoke(cli, ["inspect", "demo", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["architecture"] == "llama" and info["n_layers"] == 30 and info["hidden_size"] == 576
    assert info["ffn_size"] == 1536 and info["vocab_size"] == 49152 and info["file_type"] == "Q4_1"
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert info["tokenizer"] == "gpt2 (smollm)" and info["context_length"] == 8192


def test_inspect_tensors_table(runner, demo_path):
    res = runner.invoke(cli, ["inspect", "demo", "--tensors"])
    assert res.exit_code == 0
    assert "blk.29.ffn_down.weight" in res.output and "bits per weight" in res.output


def test_quantize_then_models_lists_the_store(runner, demo_path, tmp_path):
    res = runner.invoke(cli, ["quantize", "demo", "--to", "Q8_0", "--json"])
    assert res.exit_code == 2 and "--allow-requantize" in res.output
    res = runner.invoke(cli, ["quantize", "demo", "--allow-requantize", "--to", "Q8_0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out[0]["quant"] == "Q8_0" and out[0]["requantized_from"] == "Q4_1"
    assert out[0]["tensor_types"] == {"Q8_0": 211, "F32": 61}
    res = runner.invoke(cli, ["quantize", "demo", "--allow-requantize", "--to", "Q8_0"])
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output
    res = runner.invoke(cli, ["models", "--json"])
    names = {m["name"]: m["source"] for m in json.loads(res.output)}
    assert names["demo"] == "demo" and names["SmolLM2-135M-Instruct-Q8_0.gguf"] == "store"
    res = runner.invoke(cli, ["inspect", "SmolLM2-135M-Instruct-Q8_0"])  # a store name resolves too
    assert res.exit_code == 0 and "Q8_0" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "demo", "--to", "Q4_Z"], "unknown quant type 'Q4_Z'"),
        (["inspect", "no-such-model.gguf"], "no such model"),
        (["eval", "demo", "--task", "boolk"], "boolq"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runner, demo_path, args, message):
    res = runner.invoke(cli, args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error:")]) == 1


def test_not_a_gguf_file(runner, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am text")
    res = runner.invoke(cli, ["inspect", str(bad)])
    assert res.exit_code == 2 and "not a GGUF file" in res.output


def test_eval_json_on_the_builtin_task(runner, demo_path, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(cli, ["eval", "demo", "--task", "yesno-mini", "--limit", "6", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    run = next(iter(data["runs"].values()))
    assert run["metrics"]["n"] == 6 and (out / "predictions.parquet").exists()
    res = runner.invoke(cli, ["eval", "demo", "--task", "yesno-mini", "--limit", "6", "-o", str(out), "--resume", "-q"])
    assert res.exit_code == 0 and "acc %" in res.output


def test_eval_generic_task_from_a_csv(runner, demo_path, tmp_path):
    data = tmp_path / "sent.csv"
    data.write_text("text,label\nI love this,positive\nI hate this,negative\nWhat a lovely day,positive\n")
    res = runner.invoke(cli, ["eval", "demo", "--data", str(data), "--template", "Review: {text}\nSentiment:",
                              "--labels", "positive,negative", "--gold-column", "label", "--task", "sentiment",
                              "-o", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    metrics = next(iter(json.loads(res.stdout)["runs"].values()))["metrics"]
    assert metrics["n"] == 3


def test_weights_and_dump_commands(runner, demo_ladder, tmp_path):
    import numpy as np

    res = runner.invoke(cli, ["weights", str(demo_ladder["Q4_0"]), "--ref", str(demo_ladder["F16"]),
                              "--layers", "0,-1", "--tensors", "ffn_down", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    names = {t["name"] for t in report["tensors"]}
    assert names == {"blk.0.ffn_down.weight", "blk.29.ffn_down.weight"}
    res = runner.invoke(cli, ["weights", str(demo_ladder["Q4_0"]), "--ref", str(demo_ladder["F16"]),
                              "--tensors", "ffn_dwn"])
    assert res.exit_code == 2 and "ffn_down" in res.output  # close matches are suggested
    out = tmp_path / "w.npy"
    res = runner.invoke(cli, ["dump", str(demo_ladder["F16"]), "--tensor", "blk.14.ffn_down.weight",
                              "--dequantize", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert np.load(out).shape == (576, 1536)
    res = runner.invoke(cli, ["dump", str(demo_ladder["F16"]), "--tensor", "blk.14.ffn_down.weight", "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.output


@pytest.mark.slow
def test_neurons_command_across_a_ladder(runner, demo_ladder, tmp_path, monkeypatch):
    monkeypatch.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
    res = runner.invoke(cli, ["neurons", "demo", "--quants", "F16,Q4_0", "--task", "yesno-mini", "--limit", "6",
                              "--layers", "0,-1", "--salient-examples", "3", "-o", str(tmp_path / "n"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    f16, q4 = out["neurons"]["F16"], out["neurons"]["Q4_0"]
    assert f16["layers"] == q4["layers"] == [0, 29] and set(f16["dead"]) == {"0", "29"}
    # exact attribution: the last layer only, on the --salient-examples prompts, one target token each
    for level in (f16, q4):
        assert set(level["salient_ids"]) == {"29"} and len(level["salient_ids"]["29"]) > 0
        assert level["salient_detail"]["n_prompts"] == 3 and len(level["salient_detail"]["targets"]) == 3
    # each level against the reference, F16 (the highest precision), layer by layer
    assert out["comparison"]["reference"] == "F16" and set(out["neuron_comparison"]) == {"Q4_0"}
    cmp = out["neuron_comparison"]["Q4_0"]
    assert set(cmp["dead_jaccard"]) == set(cmp["drift"]) == {"0", "29"} and set(cmp["salient_jaccard"]) == {"29"}
    assert (tmp_path / "n" / "F16" / "neurons.json").exists() and (tmp_path / "n" / "comparison.json").exists()


@pytest.mark.slow
def test_neurons_without_redundancy_keeps_the_rest(runner, demo_ladder, tmp_path, boolq_path):
    """--no-redundancy drops the n_ff² correlations only: the same dead neurons, no redundant pairs."""
    args = ["neurons", str(demo_ladder["Q8_0"]), "--task", "boolq", "--data", str(boolq_path), "--limit", "3",
            "--layers", "0,-1", "--salient-examples", "0", "--ablate-top", "0", "--json"]
    full = runner.invoke(cli, [*args, "-o", str(tmp_path / "full")])
    lean = runner.invoke(cli, [*args, "--no-redundancy", "-o", str(tmp_path / "lean")])
    assert full.exit_code == 0 and lean.exit_code == 0, full.output + lean.output
    full_n, lean_n = (json.loads(r.stdout)["neurons"] for r in (full, lean))
    (f,), (n,) = full_n.values(), lean_n.values()
    assert set(f["redundant_pairs"]) == {"0", "29"} and not n["redundant_pairs"]
    assert n["dead"] == f["dead"] and n["layers"] == f["layers"] == [0, 29]


def test_imatrix_collect_and_show(runner, demo_ladder, tmp_path, boolq_path):
    out = tmp_path / "b.imatrix.gguf"
    res = runner.invoke(cli, ["imatrix", "collect", str(demo_ladder["Q8_0"]), "--task", "boolq", "--data",
                              str(boolq_path), "--limit", "2", "-o", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["imatrix", "show", str(out), "--json"])
    data = json.loads(res.stdout)
    assert data["chunk_count"] == 2 and len(data["entries"]) == 210
    down = next(e for e in data["entries"] if e["name"] == "blk.29.ffn_down.weight")
    assert down["channels"] == 1536 and down["count"] > 10
    res = runner.invoke(cli, ["quantize", str(demo_ladder["F16"]), "--to", "IQ4_NL", "--imatrix", str(out),
                              "-o", str(tmp_path / "q"), "--json"])
    assert res.exit_code == 0, res.output
    assert "Q5_K" not in json.loads(res.stdout)[0]["tensor_types"]  # llama.cpp's no-imatrix lift is gone
    res = runner.invoke(cli, ["imatrix", "collect", str(demo_ladder["Q8_0"]), "--task", "boolq", "--data",
                              str(boolq_path), "--limit", "2", "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.output


def test_imatrix_show_counts_experts_apart(runner, tmp_path):
    """An expert stack (one row per expert, an unrouted expert counting 0) beside a dense matrix: the mean and
    max of x² are over the experts that counted tokens (the unrouted one's uniform 1s left out)."""
    from ggml_probe.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix

    rng = np.random.default_rng(0)
    dense_sums, dense_count = rng.uniform(1, 5, size=(1, 8)) * 6, np.array([6.0])
    expert_sums = rng.uniform(0.1, 2, size=(4, 8)) * np.array([[5.0], [3.0], [0.0], [7.0]])
    expert_counts = np.array([5.0, 3.0, 0.0, 7.0])
    im = Imatrix({"blk.0.ffn_up.weight": ImatrixEntry(dense_sums, dense_count),
                  "blk.0.ffn_down_exps.weight": ImatrixEntry(expert_sums, expert_counts)}, datasets=["d"], chunk_count=2)
    path = write_imatrix(tmp_path / "mixed.imatrix.gguf", im)
    res = runner.invoke(cli, ["imatrix", "show", str(path), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["entries"]}
    dense, experts = rows["blk.0.ffn_up.weight"], rows["blk.0.ffn_down_exps.weight"]
    ms = (dense_sums / dense_count).astype(np.float32)  # what llama-quantize hands the quantizer
    assert (dense["channels"], dense["matrices"], dense["count"]) == (8, 1, 6.0)
    assert dense["mean"] == pytest.approx(ms.mean(), rel=1e-6) and dense["max"] == pytest.approx(ms.max(), rel=1e-6)
    routed = (expert_sums[[0, 1, 3]] / expert_counts[[0, 1, 3], None]).astype(np.float32)
    assert (experts["channels"], experts["matrices"], experts["matrices_counted"]) == (8, 4, 3)
    assert experts["count"] == 15.0 and experts["counts"] == [5.0, 3.0, 0.0, 7.0]
    assert experts["mean"] == pytest.approx(routed.mean(), rel=1e-6)
    assert experts["max_over_mean"] == pytest.approx(routed.max() / routed.mean(), rel=1e-6)
    table = runner.invoke(cli, ["imatrix", "show", str(path)])
    assert table.exit_code == 0 and "3/4" in table.output
