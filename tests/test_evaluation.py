"""The output-level study: run directories, resumption, metrics and comparisons on the demo model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ggml_probe.pipeline.compare import compare_levels, compare_runs, reference_level
from ggml_probe.errors import ProbeError
from ggml_probe.pipeline.evaluation import EvalConfig, evaluate


@pytest.fixture(scope="module")
def boolq_run(demo_path, boolq_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "boolq"
    config = EvalConfig(task="boolq", data_path=str(boolq_path), limit=12, chunk_size=5, n_boot=200)
    return evaluate(demo_path, config, out), config


def test_run_directory_holds_what_produced_it(boolq_run, demo_path, boolq_path):
    summary, _ = boolq_run
    d = summary.run_dir
    for name in ("manifest.json", "predictions.parquet", "metrics.json", "reliability.png", "logits.npy", "hidden.npy"):
        assert (d / name).exists(), name
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["file_type"] == "Q4_1" and len(manifest["model"]["sha256"]) == 64
    assert manifest["task"]["task"] == "boolq" and manifest["task"]["examples"] == 12
    assert manifest["engine"]["n_layer"] == 30 and manifest["engine"]["loaded_tensor_types"]
    assert "llama_cpp_python" in manifest["tool"]
    assert set(manifest["definitions"]["scoring"]) == {"label_set", "paper"}
    assert np.load(d / "logits.npy").shape == (12, 49152)
    assert np.load(d / "hidden.npy").shape == (12, 576)


def test_metrics_agree_with_the_predictions_table(boolq_run, boolq_path):
    summary, _ = boolq_run
    df = pd.read_parquet(summary.run_dir / "predictions.parquet")
    rows = [json.loads(line) for line in boolq_path.open()][:12]
    assert list(df["id"]) == [str(r["idx"]) for r in rows]
    assert list(df["gold"]) == [str(r["label"]) for r in rows]
    m = summary.metrics["label_set"]
    assert m["accuracy"]["value"] == pytest.approx(df["correct"].mean())
    assert m["mean_confidence"]["value"] == pytest.approx(df["confidence"].mean())
    p = df[["p_True", "p_False"]].to_numpy()
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(df["confidence"], p.max(axis=1))
    gold = df["gold_index"].to_numpy()
    assert m["nll"]["value"] == pytest.approx(-np.mean(np.log(p[np.arange(12), gold])))
    # paper mode: the predicted token's piece decides correctness by substring match
    paper_ok = [g.lower() in piece.lower() for g, piece in zip(df["gold"], df["paper_piece"])]
    assert list(df["paper_correct"]) == paper_ok
    assert summary.metrics["paper"]["accuracy"]["value"] == pytest.approx(np.mean(paper_ok))
    # label-set logits come from the stored full logits (float16) through the label tokens
    logits = np.load(summary.run_dir / "logits.npy").astype(np.float64)
    lt = json.loads((summary.run_dir / "manifest.json").read_text())["label_tokens"]
    lab = np.stack([np.logaddexp.reduce(logits[:, lt[w]], axis=1) for w in ("True", "False")], axis=1)
    p_from_logits = np.exp(lab - np.logaddexp.reduce(lab, axis=1, keepdims=True))
    assert np.abs(p_from_logits - p).max() < 5e-3  # float16 storage of the logits


def test_an_interrupted_run_resumes_to_the_same_result(boolq_run, demo_path, tmp_path):
    reference, config = boolq_run
    out = tmp_path / "interrupted"
    calls = []

    def stop_after_first_chunk(done, total):
        calls.append(done)
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(demo_path, config, out, progress=stop_after_first_chunk)
    assert len(list((out / "chunks").glob("*.npz"))) == 1
    assert not (out / "predictions.parquet").exists()
    with pytest.raises(ProbeError, match="--resume"):
        evaluate(demo_path, config, out)
    resumed = evaluate(demo_path, config, out, resume=True)
    assert resumed.resumed_examples == 5
    a = pd.read_parquet(reference.run_dir / "predictions.parquet")
    b = pd.read_parquet(out / "predictions.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(np.load(reference.run_dir / "logits.npy"), np.load(out / "logits.npy"))


def test_a_finished_run_is_not_redone_without_force(boolq_run, demo_path):
    summary, config = boolq_run
    with pytest.raises(ProbeError, match="already holds a finished run"):
        evaluate(demo_path, config, summary.run_dir)
    other = EvalConfig(**{**config.__dict__, "limit": 11})
    with pytest.raises(ProbeError, match="different settings \\(limit\\)"):
        evaluate(demo_path, other, summary.run_dir, resume=True)


def test_comparison_of_a_run_with_itself_is_identity(boolq_run):
    summary, _ = boolq_run
    c = compare_runs(summary.run_dir, summary.run_dir, n_boot=50)
    assert c["agreement"] == 1.0 and c["flips"]["changed"] == 0
    assert c["kl_label_mean"] == pytest.approx(0.0, abs=1e-12)
    assert c["kl_full_mean"] == pytest.approx(0.0, abs=1e-12)
    assert c["top1_agreement"] == 1.0
    assert c["hidden_cosine_mean"] == pytest.approx(1.0)
    assert c["hidden_cka"] == pytest.approx(1.0)


def test_ladder_comparison_against_the_reference(demo_ladder, tmp_path):
    config = EvalConfig(task="yesno-mini", limit=10, n_boot=100)
    runs = {q: evaluate(demo_ladder[q], config, tmp_path / q, quant_label=q).run_dir for q in ("F16", "Q4_0")}
    assert reference_level(runs) == "F16"
    comp = compare_levels(runs)
    c = comp["levels"]["Q4_0"]
    assert comp["reference"] == "F16" and c["reference"] == "F16"
    assert 0 < c["kl_full_mean"] < 5  # quantization moved the distribution, but not arbitrarily
    assert 0.5 < c["hidden_cosine_mean"] < 1.0
    # an independent KL from the stored logits
    lr = np.load(runs["F16"] / "logits.npy").astype(np.float64)
    lq = np.load(runs["Q4_0"] / "logits.npy").astype(np.float64)
    def logsm(x):
        return x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    kl = (np.exp(logsm(lr)) * (logsm(lr) - logsm(lq))).sum(axis=1)
    assert c["kl_full_mean"] == pytest.approx(kl.mean(), rel=1e-6)
    preds = {q: pd.read_parquet(d / "predictions.parquet")["pred_index"].to_numpy() for q, d in runs.items()}
    assert c["agreement"] == pytest.approx(np.mean(preds["F16"] == preds["Q4_0"]))


def test_bad_rows_are_reported_with_row_numbers(demo_path, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "is water wet", "label": true}\n{"question": "is fire cold"}\n'
                    '{"question": "is ice cold", "label": "maybe"}\n')
    with pytest.raises(ProbeError) as err:
        evaluate(demo_path, EvalConfig(task="boolq", data_path=str(data)), tmp_path / "run")
    assert "2" in str(err.value) and "3" in str(err.value) and "--on-bad-row skip" in str(err.value)
    summary = evaluate(demo_path, EvalConfig(task="boolq", data_path=str(data), on_bad_row="skip", n_boot=10),
                       tmp_path / "run2")
    assert summary.n_examples == 1 and summary.bad_rows == 2


@pytest.mark.slow
def test_neurons_ride_along_and_resume_exactly(demo_ladder, tmp_path):
    from ggml_probe.pipeline.evaluation import NeuronSettings

    config = EvalConfig(task="yesno-mini", limit=9, chunk_size=3, n_boot=50,
                        neurons=NeuronSettings(layers="0,-1", definitions=("act", "down_in")))
    whole = evaluate(demo_ladder["Q8_0"], config, tmp_path / "whole")
    calls = []

    def stop(done, total):
        calls.append(done)
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(demo_ladder["Q8_0"], config, tmp_path / "cut", progress=stop)
    # a crash between a chunk and its neuron state: the chunk without state is recomputed
    states = sorted((tmp_path / "cut" / "neuron_state").glob("*.npz"))
    states[-1].unlink()
    resumed = evaluate(demo_ladder["Q8_0"], config, tmp_path / "cut", resume=True)
    assert resumed.resumed_examples == 3
    a = json.loads((whole.run_dir / "neurons.json").read_text())
    b = json.loads((tmp_path / "cut" / "neurons.json").read_text())
    for ea, eb in zip(a["layers"], b["layers"]):
        assert ea["tokens"] == eb["tokens"] > 0 and ea["dead_ids"] == eb["dead_ids"]
        assert ea["redundancy"]["pairs_above"] == eb["redundancy"]["pairs_above"]
        assert ea["max_abs_quantiles"] == pytest.approx(eb["max_abs_quantiles"])
    sa, sb = np.load(whole.run_dir / "neuron_stats.npz"), np.load(tmp_path / "cut" / "neuron_stats.npz")
    for k in sa.files:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-12, atol=1e-12)
    # the output-level results of a neuron run equal a plain run's: probes do not change the logits
    plain = evaluate(demo_ladder["Q8_0"], EvalConfig(task="yesno-mini", limit=9, n_boot=50), tmp_path / "plain")
    assert np.array_equal(np.load(plain.run_dir / "logits.npy"), np.load(whole.run_dir / "logits.npy"))
    assert np.array_equal(np.load(plain.run_dir / "hidden.npy"), np.load(whole.run_dir / "hidden.npy"))
