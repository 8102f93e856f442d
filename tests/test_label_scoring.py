"""Label-set scoring on every tokenizer: each label's answer tokens after the prompt, labels of several
tokens by log-likelihood (and lm-evaluation-harness's acc_norm), today's numbers kept where every
answer is one token, and the generic task's integer gold labels.

Expectations come from outside the code under test: transformers' own reading of each real tokenizer
(llama.cpp's vocab-only test files, ../shared/data/vocab/), llama-cpp-python's high-level `Llama` with
logits_all=True on prompt + answer, NumPy/SciPy for the probabilities, and the rule ggml-probe used
before (first tokens of 'W' and ' W' tokenized alone) written out again here.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.special import log_softmax, logsumexp, softmax

from ggml_probe.analysis import scoring
from ggml_probe.analysis.calibration import calibration_summary
from ggml_probe.cli import cli
from ggml_probe.errors import ProbeError
from ggml_probe.pipeline.evaluation import EvalConfig, task_spec
from ggml_probe.tasks import load_examples, parse_label_map, positional_gold_values
from real_vocab_tiny import NAMES, HFTokenizer, vocab_path

# ------------------------------------------------------------------ pure scoring


def test_continuation_loglik_is_the_sum_of_token_log_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    tokens = [7, 3, 49]
    expected = sum(float(log_softmax(logits[j].astype(np.float64))[t]) for j, t in enumerate(tokens))
    assert scoring.continuation_loglik(logits, tokens) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        scoring.continuation_loglik(logits, tokens[:2])


def test_acc_norm_divides_by_characters_as_lm_eval_does():
    labels = ("No", "Not at all")  # 2 and 10 characters
    ll = np.array([[-3.0, -5.0],   # raw argmax 0; per character -1.5 vs -0.5 → 1
                   [-1.0, -20.0]])  # 0 either way
    assert list(np.argmax(ll, axis=1)) == [0, 0]
    # lm-evaluation-harness: completion_len = [float(len(i)) for i in choices]; argmax(lls / completion_len)
    lm_eval = [int(np.argmax(row / np.array([float(len(c)) for c in labels]))) for row in ll]
    assert list(scoring.norm_prediction(ll, labels)) == lm_eval == [1, 0]


# ------------------------------------------------------------------ the generic task's gold labels


def test_label_map_parsing_and_positional_mapping():
    assert parse_label_map("0=No, 1=Yes") == {"0": "No", "1": "Yes"}
    assert parse_label_map("true=Yes indeed,false=Not at all") == {"true": "Yes indeed", "false": "Not at all"}
    for bad in ("0:No", "0=", "=No", "0=No,0=Yes"):
        with pytest.raises(ProbeError, match="--label-map"):
            parse_label_map(bad)
    assert positional_gold_values(["negative", "positive"]) == {"0": "negative", "1": "positive"}
    assert positional_gold_values(["1", "2", "3"]) == {}  # star ratings match the data's values as they are


@pytest.fixture
def sst2_file(tmp_path):
    """An SST-2-like file: integer gold labels (0 negative, 1 positive), as GLUE ships them."""
    rows = [{"idx": 10, "sentence": "a gorgeous, witty film", "label": 1},
            {"idx": 11, "sentence": "dull and far too long", "label": 0},
            {"idx": 12, "sentence": "the cast is wonderful", "label": 1},
            {"idx": 13, "sentence": "I wanted my money back", "label": 0}]
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_integer_gold_labels_map_by_position_or_by_label_map(sst2_file):
    gold = [1, 0, 1, 0]
    by_position = EvalConfig(data_path=str(sst2_file), template="Review: {sentence}\nSentiment:",
                             labels=("negative", "positive"), gold_column="label")
    data = load_examples(task_spec(by_position), data_path=sst2_file)
    assert [ex.gold for ex in data.examples] == gold
    assert [ex.label for ex in data.examples] == ["positive", "negative", "positive", "negative"]
    # the generic task is named after its data file, not after the CLI's default task (boolq)
    assert by_position.task == "sst2" and data.spec.name == "sst2"

    explicit = EvalConfig(data_path=str(sst2_file), template="Review: {sentence}\nGood?", gold_column="label",
                          label_map=tuple(parse_label_map("0=No,1=Yes").items()))
    data = load_examples(task_spec(explicit), data_path=sst2_file)
    assert data.labels == ("No", "Yes") and [ex.label for ex in data.examples] == ["Yes", "No", "Yes", "No"]
    assert explicit.identity()["label_map"] == [["0", "No"], ["1", "Yes"]]

    # a map onto words that are not the labels, and a value the map does not know: errors that name the task
    wrong = EvalConfig(data_path=str(sst2_file), template="{sentence}\nA:", labels=("No", "Yes"), gold_column="label",
                       label_map=(("0", "No"), ("1", "Maybe")))
    with pytest.raises(ProbeError, match=r"task 'sst2'.*'Maybe'.*not one of the labels"):
        task_spec(wrong)
    partial = EvalConfig(data_path=str(sst2_file), template="{sentence}\nA:", gold_column="label",
                         label_map=(("1", "Yes"), ("2", "No")), task="reviews")
    with pytest.raises(ProbeError, match=r"^task reviews: 2 malformed rows .*unknown label value 0") as err:
        load_examples(task_spec(partial), data_path=sst2_file)
    assert "boolq" not in str(err.value)
    with pytest.raises(ProbeError, match="--label-map is for a --template task"):
        task_spec(EvalConfig(task="boolq", label_map=(("0", "False"),)))


# ------------------------------------------------------------------ tiny models with real tokenizers

BOOLQ_TEMPLATE = "Respond with True or False only.\n{question}\nAnswer:"
MULTI = {"true": "Yes indeed", "false": "Not at all"}  # several tokens in every tokenizer
N = 3


def _params(names):
    return [pytest.param(n, marks=[pytest.mark.slow]) for n in names]


def _eval(model, out, *args):
    res = CliRunner().invoke(cli, ["eval", str(model), "--limit", str(N), "--threads", "2", "-o", str(out), "--json",
                                   "-q", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), pd.read_parquet(out / "predictions.parquet")


def _expected(ref, hf, prompt: str, labels, context_tokens: np.ndarray):
    """The label-set probabilities and log-likelihoods from llama-cpp-python's logits, by NumPy, with the
    answers read by transformers' tokenizer: (p, loglik, answers, mode)."""
    answers, offsets = zip(*(hf.after(prompt, " " + w) for w in labels))
    assert all(o == 0 for o in offsets)  # after 'Answer:' no tokenizer merges across the boundary
    n = len(context_tokens)
    loglik = []
    scores = {}
    for ans in answers:
        ref.reset()
        ref.eval(list(context_tokens) + ans)
        rows = np.array(ref.scores[n - 1:n - 1 + len(ans)], dtype=np.float64)
        scores[tuple(ans)] = rows
        loglik.append(sum(log_softmax(rows[j])[t] for j, t in enumerate(ans)))
    loglik = np.array(loglik)
    if all(len(a) == 1 for a in answers):  # every answer one token: each label's forms ' W' and 'W' merged
        last = next(iter(scores.values()))[0]
        answer_ids = {a[0] for a in answers}
        lab = []
        for w, ans in zip(labels, answers):
            ids = {ans[0]}
            glued, off = hf.after(prompt, w)
            if len(glued) == 1 and off == 0 and (glued[0] not in answer_ids or glued[0] == ans[0]):
                ids.add(glued[0])
            lab.append(logsumexp(last[sorted(ids)]))
        return softmax(np.array(lab)), loglik, [list(a) for a in answers], "token"
    return softmax(loglik), loglik, [list(a) for a in answers], "loglik"


def _check_run(model, hf, preds, labels, examples):
    import llama_cpp

    ref = llama_cpp.Llama(model_path=str(model), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        for row, ex in zip(preds.itertuples(index=False), examples):
            context = np.array(ref.tokenize(ex.prompt.encode(), add_bos=True, special=True))
            assert row.n_tokens == len(context)
            p, ll, answers, mode = _expected(ref, hf, ex.prompt, labels, context)
            got_answers = [list(preds.loc[row.position, f"answer_{w}"]) for w in labels]
            assert got_answers == answers, (ex.prompt[-20:], got_answers, answers)
            assert row.label_scoring == mode
            got_p = preds.loc[row.position, [f"p_{w}" for w in labels]].to_numpy(dtype=np.float64)
            got_ll = preds.loc[row.position, [f"loglik_{w}" for w in labels]].to_numpy(dtype=np.float64)
            assert np.abs(got_p - p).max() < 1e-4, (got_p, p)
            assert np.abs(got_ll - ll).max() < 2e-3, (got_ll, ll)
            assert row.pred_norm_index == int(np.argmax(got_ll / np.array([len(w) for w in labels])))
    finally:
        ref.close()


@pytest.mark.parametrize("name", _params(NAMES))
def test_eval_on_every_real_tokenizer(name, real_vocab_model, boolq_path, tmp_path):
    """BoolQ through the CLI on a tiny model carrying each real tokenizer: no 'same token' refusal (the
    SentencePiece case), the answer tokens transformers reads, and probabilities equal to NumPy's from
    llama-cpp-python's logits — single-token answers by the merged next-token logits, several-token
    answers ('Yes indeed', via --label-map on the same data) by their log-likelihood."""
    model = real_vocab_model(name)
    hf = HFTokenizer(vocab_path(name))

    out, preds = _eval(model, tmp_path / "boolq", "--task", "boolq", "--data", str(boolq_path))
    examples = load_examples("boolq", data_path=boolq_path, limit=N).examples
    assert (preds["label_scoring"] == "token").all()
    _check_run(model, hf, preds, ["True", "False"], examples)
    manifest = json.loads((tmp_path / "boolq" / "manifest.json").read_text())
    assert {w: [a["tokens"] for a in v] for w, v in manifest["answers"].items()} == {
        w: [hf.after(examples[0].prompt, " " + w)[0]] for w in ("True", "False")}

    out, preds = _eval(model, tmp_path / "multi", "--data", str(boolq_path), "--template", BOOLQ_TEMPLATE,
                       "--label-map", ",".join(f"{k}={v}" for k, v in MULTI.items()), "--gold-column", "label")
    run = next(iter(out["runs"].values()))
    assert run["metrics"]["label_scoring"] == {"token": 0, "loglik": N}
    spec = task_spec(EvalConfig(data_path=str(boolq_path), template=BOOLQ_TEMPLATE, gold_column="label",
                                label_map=tuple(MULTI.items())))
    examples = load_examples(spec, data_path=boolq_path, limit=N).examples
    assert all(len(a) > 1 for w in MULTI.values() for a in preds[f"answer_{w}"])
    _check_run(model, hf, preds, list(MULTI.values()), examples)
    norm = run["metrics"]["label_set"]["accuracy_norm"]
    assert norm["value"] == pytest.approx(preds["correct_norm"].mean())


@pytest.mark.slow
def test_continuation_logits_equal_llama_cpp_and_stay_out_of_the_probes(real_vocab_model, boolq_path, tmp_path):
    """Engine.continuation_logits (the prompt decoded once, each answer after it on the KV cache) against
    llama-cpp-python decoding prompt + answer whole; and an eval pass with several-token labels and
    --imatrix-out counts the prompts' tokens only — the answers' decodes are not shown to the probes."""
    import llama_cpp

    from ggml_probe.engine.model import Engine

    model = real_vocab_model("gpt-2")
    prompt = "Respond with True or False only.\nis the sky blue\nAnswer:"
    with Engine(model, n_ctx=256, n_threads=2) as engine:
        head = engine.tokenize(prompt)
        answers = [engine.tokenize(" Yes indeed", add_special=False), engine.tokenize(" No", add_special=False),
                   engine.tokenize(" Not at all", add_special=False)]
        got = engine.continuation_logits(head, answers)
        again = engine.continuation_logits(head, answers[::-1])[::-1]  # the cache is left as it was found
    ref = llama_cpp.Llama(model_path=str(model), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    for ans, rows, rows2 in zip(answers, got, again):
        ref.reset()
        ref.eval(list(head) + list(ans))
        expected = np.array(ref.scores[len(head) - 1:len(head) - 1 + len(ans)])
        assert rows.shape == expected.shape == (len(ans), ref.n_vocab())
        assert np.abs(rows - expected).max() < 1e-3
        assert np.array_equal(rows, rows2)
    ref.close()

    im = tmp_path / "run.imatrix.gguf"
    _, preds = _eval(model, tmp_path / "multi", "--data", str(boolq_path), "--template", BOOLQ_TEMPLATE,
                     "--label-map", ",".join(f"{k}={v}" for k, v in MULTI.items()), "--gold-column", "label",
                     "--imatrix-out", str(im))
    assert (preds["label_scoring"] == "loglik").all()
    manifest = json.loads((tmp_path / "multi" / "manifest.json").read_text())
    assert manifest["imatrix"]["tokens"] == int(preds["n_tokens"].sum())


@pytest.mark.slow
def test_integer_gold_labels_through_the_cli(real_vocab_model, sst2_file, tmp_path):
    """SST-2's 0/1 gold labels from the command line: by position of --labels, or by --label-map; the run is
    named after its data, and a bad row names that task."""
    model = real_vocab_model("gpt-2")
    out, preds = _eval(model, tmp_path / "pos", "--data", str(sst2_file), "--template", "Review: {sentence}\nSentiment:",
                       "--labels", "negative,positive", "--gold-column", "label", "--id-column", "idx")
    assert list(preds["gold"]) == ["positive", "negative", "positive"] and list(preds["id"]) == ["10", "11", "12"]
    assert json.loads((tmp_path / "pos" / "manifest.json").read_text())["task"]["task"] == "sst2"
    out, preds = _eval(model, tmp_path / "map", "--data", str(sst2_file), "--template", "Review: {sentence}\nGood?",
                       "--label-map", "0=No,1=Yes", "--gold-column", "label")
    assert list(preds["gold"]) == ["Yes", "No", "Yes"] and {"p_No", "p_Yes"} <= set(preds.columns)
    res = CliRunner().invoke(cli, ["eval", str(model), "--data", str(sst2_file), "--template", "{sentence}\nA:",
                                   "--label-map", "1=Yes,2=No", "--gold-column", "label", "-o", str(tmp_path / "bad"),
                                   "-q"])
    assert res.exit_code != 0
    assert "task sst2: 2 malformed rows" in res.output and "boolq" not in res.output


# ------------------------------------------------------------------ today's numbers, where every answer is one token


@pytest.mark.slow
@pytest.mark.parametrize("task", ["boolq", "jigsaw"])
def test_single_token_labels_keep_todays_numbers_on_the_demo(task, request, demo_path, tmp_path):
    """Where every label's answer is one token, the probabilities and metrics are bit for bit what the rule
    ggml-probe had before computes from the same logits: per label the first tokens of 'W' and ' W'
    tokenized alone, log-sum-exp of their logits, softmax over the labels."""
    from ggml_probe.engine.model import Engine
    from ggml_probe.pipeline.evaluation import evaluate
    from ggml_probe.pipeline.tokens import decoded_tokens

    data_path = request.getfixturevalue(f"{task}_path")
    # one prompt per decode, as the independent pass below: the probabilities are compared exactly
    config = EvalConfig(task=task, data_path=str(data_path), limit=10, n_boot=200, threads=2, batch_prompts=1)
    summary = evaluate(demo_path, config, tmp_path / task)
    preds = pd.read_parquet(tmp_path / task / "predictions.parquet")
    assert (preds["label_scoring"] == "token").all()
    labels = ["True", "False"]
    with Engine(demo_path, n_ctx=config.n_ctx, n_threads=2) as engine:
        before_ids = [sorted({int(engine.tokenize(form, add_special=False)[0]) for form in (w, " " + w)})
                      for w in labels]
        logits = np.stack([r.logits for r in engine.run(decoded_tokens(tmp_path / task))]).astype(np.float32)
    x = logits.astype(np.float64)
    before_logits = np.stack([logsumexp(x[:, ids], axis=1) for ids in before_ids], axis=1)
    p = np.exp(log_softmax(before_logits, axis=1))
    assert np.array_equal(preds[[f"p_{w}" for w in labels]].to_numpy(), p)
    manifest = json.loads((tmp_path / task / "manifest.json").read_text())
    assert manifest["label_tokens"] == dict(zip(labels, before_ids))  # the same tokens: ' True' and 'True'
    before = calibration_summary(p, preds["gold_index"].to_numpy(), n_boot=200)
    for key in ("accuracy", "mean_confidence", "ace_paper", "ece", "brier", "nll"):
        assert summary.metrics["label_set"][key] == before[key], key


@pytest.mark.slow
def test_neurons_attribute_the_answer_token_on_a_sentencepiece_model(real_vocab_model, boolq_path, tmp_path):
    """`neurons` on the Llama 2 tokenizer: the salient neurons explain the chosen label's answer token
    after the prompt ('▁True' / '▁False', as transformers tokenizes it), none of them '▁' alone."""
    model = real_vocab_model("llama-spm")
    hf = HFTokenizer(vocab_path("llama-spm"))
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["neurons", str(model), "--task", "boolq", "--data", str(boolq_path), "--limit", str(N),
                                   "--layers", "-1", "--salient-examples", str(N), "--ablate-top", "0", "--threads", "2",
                                   "-o", str(out), "-q", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    salient = json.loads((out / "salient.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    examples = load_examples("boolq", data_path=boolq_path, limit=N).examples
    expected = [hf.after(ex.prompt, " " + w)[0][0] for ex, w in zip(examples, preds["pred"])]
    assert salient["target"] == "label" and salient["targets"] == expected
    assert salient["salient_targets"]["not_label"] == 0
