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

    config = EvalConfig(task="yesno-mini", limit=12, chunk_size=3, n_boot=50, state_every_s=0,
                        neurons=NeuronSettings(layers="0,-1", definitions=("act", "down_in")))
    whole = evaluate(demo_ladder["Q8_0"], config, tmp_path / "whole")
    # the last two states are kept, each written over the one before them (save_npz's reuse)
    assert [f.name for f in sorted((whole.run_dir / "neuron_state").iterdir()) if f.name != ".lock"] == [
        "00002.npz", "00003.npz"]
    calls = []

    def stop(done, total):
        calls.append(done)
        if done >= 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(demo_ladder["Q8_0"], config, tmp_path / "cut", progress=stop)
    # a crash between a chunk and its neuron state: the chunk without state is recomputed
    states = sorted((tmp_path / "cut" / "neuron_state").glob("*.npz"))
    assert [f.name for f in states] == ["00001.npz", "00002.npz"]  # the third written over the first's file
    states[-1].unlink()
    resumed = evaluate(demo_ladder["Q8_0"], config, tmp_path / "cut", resume=True)
    assert resumed.resumed_examples == 6
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
    plain = evaluate(demo_ladder["Q8_0"], EvalConfig(task="yesno-mini", limit=12, chunk_size=3, n_boot=50),
                     tmp_path / "plain")  # the same chunks: the same prompts packed per decode
    assert np.array_equal(np.load(plain.run_dir / "logits.npy"), np.load(whole.run_dir / "logits.npy"))
    assert np.array_equal(np.load(plain.run_dir / "hidden.npy"), np.load(whole.run_dir / "hidden.npy"))


PASSAGE_TEMPLATE = "Respond with True or False only.\nPassage: {passage}\nQuestion: {question}?\nAnswer:"


def _decoded_token_arrays(run_dir) -> list[np.ndarray]:
    """The token arrays the run says it decoded, read straight from its checkpoints."""
    by_position = {}
    for f in sorted((run_dir / "chunks").glob("*.npz")):
        with np.load(f) as z:
            for pos, arr in zip(z["positions"], np.split(z["tokens"], np.cumsum(z["n_tokens"])[:-1])):
                by_position[int(pos)] = arr
    return [by_position[i] for i in range(len(by_position))]


def test_truncation_keeps_the_template_and_top_tokens_point_into_the_decoded_tokens(demo_path, boolq_path, tmp_path):
    """n_ctx 64 on real BoolQ passages: the passage is cut, the instruction before it and the question
    after it stay, and every top-activating token shown is the token at its position in what was decoded."""
    import llama_cpp

    from ggml_probe.analysis.neurons import NeuronAccumulator
    from ggml_probe.pipeline.evaluation import NeuronSettings
    from ggml_probe.pipeline.neurons import _top_tokens

    n_ctx = 64
    config = EvalConfig(task="boolq-passage-short", data_path=str(boolq_path), template=PASSAGE_TEMPLATE,
                        labels=("True", "False"), gold_column="label", id_column="idx", limit=4, n_ctx=n_ctx,
                        n_boot=10, neurons=NeuronSettings(layers="0,-1", redundancy=False))
    summary = evaluate(demo_path, config, tmp_path / "run")
    run_dir = summary.run_dir
    rows = [json.loads(line) for line in boolq_path.open()][:4]
    df = pd.read_parquet(run_dir / "predictions.parquet")
    decoded = _decoded_token_arrays(run_dir)

    ref = llama_cpp.Llama(model_path=str(demo_path), n_ctx=n_ctx, logits_all=True, verbose=False)
    def tok(text, bos):
        return ref.tokenize(text.encode(), add_bos=bos, special=True)
    def piece(t):
        return ref.detokenize([int(t)]).decode("utf-8", errors="replace")

    head = "Respond with True or False only.\nPassage:"
    head_tokens = tok(head, True)  # BOS first when the model adds one (SmolLM2 does not)
    logits = np.load(run_dir / "logits.npy").astype(np.float32)
    for i, (row, toks) in enumerate(zip(rows, decoded)):
        tail = f"\nQuestion: {row['question']}?\nAnswer:"
        full = tok(PASSAGE_TEMPLATE.format(passage=row["passage"], question=row["question"]), True)
        assert len(full) > n_ctx and len(toks) <= n_ctx  # every one of these needed cutting
        assert list(toks[: len(head_tokens)]) == head_tokens
        text = ref.detokenize(list(toks)).decode()
        assert text.startswith(head) and text.endswith(tail)
        kept = text[len(head):-len(tail)].strip()
        assert kept and row["passage"].startswith(kept) and len(kept) < len(row["passage"])
        assert df["n_tokens"][i] == len(toks) and df["truncated_tokens"][i] == len(full) - len(toks)
        # these tokens are what was decoded: llama.cpp's own API gives the run's logits for them
        ref.reset()
        ref.eval(list(toks))
        assert np.abs(np.array(ref.scores[ref.n_tokens - 1]) - logits[i]).max() < 0.05  # float16 storage

    def expected(prompt, pos, window=5):
        toks = decoded[prompt]
        return piece(toks[pos]), "".join(piece(t) for t in toks[max(0, pos - window):pos])

    nj = json.loads((run_dir / "neurons.json").read_text())
    shown = 0
    for entry in nj["layers"]:
        for rows_j in entry["top_tokens"].values():
            for r in rows_j:
                assert (r["token"], r["context"]) == expected(r["prompt"], r["position"])
                shown += 1
    assert shown > 0
    # the study's lookup of chosen neurons (e.g. the salient ones) in layer 0
    acc = NeuronAccumulator.load(sorted((run_dir / "neuron_state").glob("*.npz"))[-1])
    top = acc.top[("act", 0)]
    neurons = list(range(0, acc.n_ff, 7))  # a spread of 220 of the 1,536
    looked_up = _top_tokens(run_dir, demo_path, "act", 0, neurons)
    in_tail = 0
    for j in neurons:
        want = [[*expected(p, pos), v] for v, p, pos in top.for_neuron(j)]
        assert looked_up[str(j)] == want
        in_tail += sum(pos >= len(decoded[p]) - 8 for _, p, pos in top.for_neuron(j))
    assert in_tail > 0  # positions after the cut are covered, where a re-tokenized prompt would be off


@pytest.mark.slow
def test_salient_neurons_attribute_the_decoded_tokens_at_a_small_ctx(demo_path, boolq_path, tmp_path):
    """At n_ctx 64 every passage prompt is fitted (template kept, passage cut): the salient-neuron pass
    attributes and ablates exactly the token arrays the run decoded, not the prompt texts (which the
    engine, given a text too long, would cut from the left, dropping the instruction)."""
    from ggml_probe.attribution import ablation_effect, attribute
    from ggml_probe.pipeline.evaluation import NeuronSettings
    from ggml_probe.pipeline.neurons import NeuronAnalysis
    from ggml_probe.pipeline.runs import run_level_files

    n_ctx, n = 64, 2
    config = EvalConfig(task="boolq-passage-short", data_path=str(boolq_path), template=PASSAGE_TEMPLATE,
                        labels=("True", "False"), gold_column="label", id_column="idx", limit=n, n_ctx=n_ctx,
                        threads=1, n_boot=10, neurons=NeuronSettings(layers="0,-1", redundancy=False, top_k=0))
    analysis = NeuronAnalysis(layers="0,-1", salient_examples=n, attribution="exact", attribution_target="answer",
                              ablate_top=1)
    runs = run_level_files({None: demo_path}, config, tmp_path / "run", neurons=analysis)
    run_dir = next(iter(runs.run_dirs.values()))
    decoded = _decoded_token_arrays(run_dir)
    df = pd.read_parquet(run_dir / "predictions.parquet")
    assert len(decoded) == n and (df["truncated_tokens"] > 0).all()  # every prompt was cut to fit
    sal = json.loads((run_dir / "salient.json").read_text())

    # the same attribution and ablation, computed here on the decoded arrays
    ref = attribute("exact", demo_path, decoded, [29], n_ctx=n_ctx, threads=1)
    summary = ref.layers[29].salient(analysis.saliency)
    layer = sal["layers"]["29"]
    assert sal["targets"] == [int(t) for t in ref.target_tokens]
    assert layer["union"] == [int(i) for i in summary.union]
    assert layer["ranking"] == [int(i) for i in summary.ranking[:20]]
    abl = ablation_effect(demo_path, decoded, 29, layer["ablation"]["neurons"], values=0.0, definition="act",
                          targets=sal["targets"], n_ctx=n_ctx, n_threads=1)
    assert layer["ablation"]["delta_logprob_mean"] == pytest.approx(float(abl.delta.mean()), abs=1e-9)

    # and the texts would have given other attributions: the check above can tell the two apart
    texts = [PASSAGE_TEMPLATE.format(**row) for row in
             (json.loads(line) for line in list(boolq_path.open())[:n])]
    left_cut = attribute("exact", demo_path, texts, [29], n_ctx=n_ctx, threads=1)
    assert not np.allclose(left_cut.layers[29].attributions, ref.layers[29].attributions)


@pytest.mark.slow
def test_probe_states_wait_state_every_s_and_a_resume_recomputes_the_chunks_after_the_last(demo_path, tmp_path):
    from ggml_probe.pipeline.evaluation import NeuronSettings

    config = EvalConfig(task="yesno-mini", limit=9, chunk_size=3, n_boot=20, state_every_s=3600,
                        neurons=NeuronSettings(layers="0", definitions=("act",)))
    whole = evaluate(demo_path, config, tmp_path / "whole")
    # no interval passed: one state, after the last chunk
    assert sorted(f.name for f in (whole.run_dir / "neuron_state").glob("*.npz")) == ["00002.npz"]

    def stop(done, total):
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(demo_path, config, tmp_path / "cut", progress=stop)
    assert len(list((tmp_path / "cut" / "chunks").glob("*.npz"))) == 2
    assert not list((tmp_path / "cut" / "neuron_state").glob("*.npz"))
    # two chunks finished but no state covers them: they are decoded again, and no token counts twice
    resumed = evaluate(demo_path, config, tmp_path / "cut", resume=True)
    assert resumed.resumed_examples == 0
    sa, sb = np.load(whole.run_dir / "neuron_stats.npz"), np.load(tmp_path / "cut" / "neuron_stats.npz")
    assert sa.files == sb.files
    for k in sa.files:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_neuron_resume_with_another_top_k_is_refused(demo_path, tmp_path):
    """The top-activating tokens kept per neuron are part of a neuron run: an interrupted run resumed with
    another top_k is refused in one line naming the setting, loses nothing, and resumes with the same one."""
    from ggml_probe.pipeline.evaluation import NeuronSettings

    def config(top_k):
        return EvalConfig(task="yesno-mini", limit=6, chunk_size=3, n_boot=20, state_every_s=0,
                          neurons=NeuronSettings(layers="0,-1", top_k=top_k))

    def stop(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        evaluate(demo_path, config(3), out, progress=stop)
    states = sorted((out / "neuron_state").glob("*.npz"))
    saved = [p.read_bytes() for p in states]
    with pytest.raises(ProbeError, match=r"neurons\.top_k 3, now 5\)") as refused:
        evaluate(demo_path, config(5), out, resume=True)
    assert "\n" not in str(refused.value) and "--force" in str(refused.value)
    assert [p.read_bytes() for p in sorted((out / "neuron_state").glob("*.npz"))] == saved
    assert evaluate(demo_path, config(3), out, resume=True).resumed_examples == 3


def test_resume_with_another_batch_layout_is_refused(demo_path, boolq_path, tmp_path):
    """A packed batch changes the logits (test_engine: batch-layout noise), so --batch is part of what a
    resumed run must match: refused with one line, never mixed. The same --batch resumes."""
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    out = tmp_path / "run"
    base = ["eval", "demo", "--task", "boolq", "--data", str(boolq_path), "--limit", "6", "-o", str(out)]
    runner = CliRunner()
    first = runner.invoke(cli, [*base, "--batch", "1"])
    assert first.exit_code == 0, first.output
    before = (out / "predictions.parquet").read_bytes()
    again = runner.invoke(cli, [*base, "--resume", "--batch", "4"])
    assert again.exit_code == 2, again.output
    errors = [line for line in again.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "batch" in errors[0] and "Traceback" not in again.output
    assert (out / "predictions.parquet").read_bytes() == before
    assert json.loads((out / "manifest.json").read_text())["config"]["batch_prompts"] == 1
    same = runner.invoke(cli, [*base, "--resume", "--batch", "1"])
    assert same.exit_code == 0, same.output
    redo = runner.invoke(cli, [*base, "--force", "--batch", "4"])
    assert redo.exit_code == 0, redo.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["batch_prompts"] == 4 and manifest["identity"]["batch_prompts"] == 4


def test_study_passes_batch_to_its_runs(demo_ladder, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    monkeypatch.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
    out = tmp_path / "study"
    res = CliRunner().invoke(cli, ["study", "demo", "--quants", "F16", "--task", "yesno-mini", "--limit", "6",
                                   "--no-weights", "--no-neurons", "--batch", "4", "-q", "-o", str(out),
                                   "--no-noise-floor", "--no-speed"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "runs" / "yesno-mini" / "F16" / "manifest.json").read_text())
    assert manifest["config"]["batch_prompts"] == 4 and manifest["identity"]["batch_prompts"] == 4


@pytest.fixture(scope="module")
def boolq_vocab_spm(boolq_path):
    p = boolq_path.parent / "vocab" / "ggml-vocab-llama-spm.gguf"  # Llama 2's tokenizer, no weights
    if not p.exists():
        pytest.skip(f"shared vocabulary files not found at {p.parent}")
    return p


class _VocabOnly:
    """A tokenizer from llama-cpp-python's high-level API on a vocabulary-only GGUF (no weights)."""

    def __init__(self, path):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def tokenize(self, text, add_special=True):
        return np.array(self.llm.tokenize(text.encode(), add_bos=add_special, special=True), dtype=np.int32)

    def detokenize(self, tokens):
        return self.llm.detokenize([int(t) for t in tokens]).decode("utf-8", errors="replace")


def test_fitting_keeps_bos_and_the_template_with_a_sentencepiece_vocabulary(boolq_path, boolq_vocab_spm):
    """Llama 2's tokenizer adds BOS and a leading space; the cut passage must still be the passage's own
    beginning, with BOS, the instruction and the question kept."""
    from ggml_probe.tasks import make_task

    tok = _VocabOnly(boolq_vocab_spm)
    spec = make_task(PASSAGE_TEMPLATE, ["True", "False"], "label")
    head, limit = "Respond with True or False only.\nPassage:", 64
    for row in [json.loads(line) for line in boolq_path.open()][:5]:
        fields = {"passage": row["passage"], "question": row["question"]}
        fitted = spec.fit(fields, tok, limit)
        full = tok.tokenize(PASSAGE_TEMPLATE.format(**fields))
        assert len(full) > limit and len(fitted.tokens) <= limit and fitted.dropped == len(full) - len(fitted.tokens)
        assert fitted.tokens[0] == tok.llm.token_bos()
        tail = f"\nQuestion: {row['question']}?\nAnswer:"
        assert fitted.text.startswith(head) and fitted.text.endswith(tail)
        assert np.array_equal(fitted.tokens, tok.tokenize(fitted.text))
        kept = fitted.text[len(head):-len(tail)].strip()
        assert kept and row["passage"].startswith(kept)
        assert len(tok.tokenize(spec.render({**fields, "passage": row["passage"][:len(kept) + 40]}))) > limit - 2


def test_a_context_too_small_for_the_template_is_one_line(demo_path, jigsaw_path, tmp_path):
    config = EvalConfig(task="jigsaw", data_path=str(jigsaw_path), limit=2, n_ctx=16, n_boot=10)
    with pytest.raises(ProbeError, match=r"the prompt template alone takes \d+ tokens, more than the 16"):
        evaluate(demo_path, config, tmp_path / "run")
