"""Multiple-choice tasks (PIQA, HellaSwag, a generic --choices-column task): each example's own choices are
its labels, scored as lm-evaluation-harness's multiple_choice does — the log-likelihood of ' ' + choice
after the prompt (acc) and that divided by len(choice) in characters (acc_norm) — with the label-set
distribution, calibration and the comparison across levels over the choices.

Expectations come from outside the code under test: llama-cpp-python's high-level `Llama` with
logits_all=True on prompt + choice, NumPy/SciPy for the log-softmax sums and probabilities, the answer
tokens read by llama-cpp-python's tokenizer (demo) or transformers' (tiny models with real tokenizers),
and HellaSwag's preprocessing written out by hand for one row.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.special import log_softmax, softmax

from ggml_probe.analysis import scoring
from ggml_probe.cli import cli
from ggml_probe.errors import ProbeError
from ggml_probe.pipeline.evaluation import EvalConfig, task_spec
from ggml_probe.tasks import get_task, load_examples, make_task
from real_vocab_tiny import HFTokenizer, vocab_path

PIQA_ROWS = [
    {"goal": "To make a hard boiled egg,", "sol1": "boil it in water for ten minutes.",
     "sol2": "boil it in milk for ten seconds.", "label": 0},
    {"goal": "How do you dry wet shoes?", "sol1": "Put them in the freezer overnight.",
     "sol2": "Stuff them with newspaper and leave them near a warm place.", "label": 1},
    {"goal": "To keep bread fresh longer,", "sol1": "store it in a sealed bag.",
     "sol2": "leave it open on the counter.", "label": 0},
    {"goal": "How can I cool down a hot drink quickly?", "sol1": "Add ice cubes to it.",
     "sol2": "Put it in the oven.", "label": 0},
]

# Rowan/hellaswag's layout: ctx_a, ctx_b (lower-case start), ctx, endings (list), label (a string)
HELLASWAG_ROWS = [
    {"ind": 24, "activity_label": "Roof shingle removal",
     "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "label": "3"},
    {"ind": 106, "activity_label": "Home and Garden",
     "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.", "ctx_b": "",
     "ctx": "[header] How to grow tomatoes [title] Pick a sunny spot. ",
     "endings": ["[step] Tomatoes need six hours of sun a day.", "[title] Water them once a year.",
                 "Paint the pots blue.", "[substeps] Plant them in the freezer."], "label": "0"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def piqa_file(tmp_path):
    return _write_jsonl(tmp_path / "piqa_valid.jsonl", PIQA_ROWS)


@pytest.fixture
def hellaswag_file(tmp_path):
    return _write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_ROWS)


# ------------------------------------------------------------------ definitions and data


def test_shipped_definitions_and_their_examples(piqa_file, hellaswag_file):
    piqa = get_task("piqa")
    assert piqa.multiple_choice and piqa.labels == ("sol1", "sol2")
    data = load_examples(piqa, data_path=piqa_file)
    ex = data.examples[1]
    assert ex.prompt == "Question: How do you dry wet shoes?\nAnswer:"  # lm-evaluation-harness's piqa prompt
    assert ex.choices == (PIQA_ROWS[1]["sol1"], PIQA_ROWS[1]["sol2"]) and ex.gold == 1 and ex.label == "sol2"

    hs = get_task("hellaswag")
    assert hs.labels == ("endings[0]", "endings[1]", "endings[2]", "endings[3]")
    data = load_examples(hs, data_path=hellaswag_file)
    assert [ex.id for ex in data.examples] == ["24", "92", "106"] and [ex.gold for ex in data.examples] == [3, 3, 0]
    # lm-evaluation-harness: activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize(), then preprocess()
    assert data.examples[0].prompt == "Roof shingle removal: A man is sitting on a roof. He"
    assert data.examples[1].prompt == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. "
                                       "The lady")
    # WikiHow artifacts: ' [title]' → '. ', any '[...]' removed, double spaces halved, stripped first
    assert data.examples[2].prompt == "Home and Garden: How to grow tomatoes. Pick a sunny spot."
    assert data.examples[2].choices == (" Tomatoes need six hours of sun a day.", " Water them once a year.",
                                        "Paint the pots blue.", " Plant them in the freezer.")


def test_bad_choice_rows_and_definitions_are_one_line(tmp_path):
    rows = [dict(HELLASWAG_ROWS[0]), dict(HELLASWAG_ROWS[1], endings=["a", "b"]),
            dict(HELLASWAG_ROWS[0], ind=5, endings=["a", "", "c", "d"]), dict(HELLASWAG_ROWS[0], ind=6, label="7")]
    path = _write_jsonl(tmp_path / "hs.jsonl", rows)
    with pytest.raises(ProbeError, match=r"^task hellaswag: 3 malformed rows .*row 2: field 'endings' has 2 choices, "
                                         r"the task expects 4; row 3: empty or non-text choice 'endings\[1\]'; "
                                         r"row 4: unknown label value '7'"):
        load_examples("hellaswag", data_path=path)
    assert len(load_examples("hellaswag", data_path=path, on_bad_row="skip").examples) == 1
    for choices, message in (({"columns": ["a"]}, "at least two distinct"), ({"column": "e"}, "needs 'count'"),
                             ({"column": "e", "count": 3, "preprocess": "nope"}, "unknown preprocess"),
                             ({"columns": ["a", "b"], "column": "e"}, "either 'columns'")):
        with pytest.raises(ProbeError, match=message):
            make_task("{q}", None, "label", choices=choices)
    with pytest.raises(ProbeError, match="3 labels for 2 choices"):
        make_task("{q}", ["x", "y", "z"], "label", choices={"columns": ["a", "b"]})
    with pytest.raises(ProbeError, match="--choices-column is for a --template task"):
        task_spec(EvalConfig(task="boolq", choices_columns=("a",)))


def test_generic_choice_task_matches_the_definition(piqa_file, hellaswag_file):
    """--choices-column: one column per choice (PIQA's sol1,sol2), or a list column whose count comes from
    the data (HellaSwag's endings): the same examples as the shipped definitions give."""
    piqa = EvalConfig(data_path=str(piqa_file), template="Question: {goal}\nAnswer:", gold_column="label",
                      choices_columns=("sol1", "sol2"))
    got = load_examples(task_spec(piqa), data_path=piqa_file).examples
    want = load_examples("piqa", data_path=piqa_file).examples
    assert [(e.prompt, e.choices, e.gold) for e in got] == [(e.prompt, e.choices, e.gold) for e in want]
    assert piqa.identity()["choices_columns"] == ["sol1", "sol2"] and task_spec(piqa).name == "piqa_valid"
    listed = EvalConfig(data_path=str(hellaswag_file), template="{ctx}", gold_column="label",
                        choices_columns=("endings",), labels=("A", "B", "C", "D"))
    spec = task_spec(listed)
    assert spec.labels == ("A", "B", "C", "D") and spec.choices.count == 4
    assert [e.label for e in load_examples(spec, data_path=hellaswag_file).examples] == ["D", "D", "A"]
    inferred = task_spec(EvalConfig(data_path=str(hellaswag_file), template="{ctx}", gold_column="label",
                                    choices_columns=("endings",)))
    assert inferred.choices.count == 4
    with pytest.raises(ProbeError, match="no list of choices"):
        task_spec(EvalConfig(data_path=str(hellaswag_file), template="{ctx}", gold_column="label",
                             choices_columns=("ctx",)))


def test_acc_norm_and_paper_prediction_per_example():
    ll = np.array([[-10.0, -12.0], [-6.0, -5.0]])
    choices = [("ab", "abcdefgh"), ("abcdef", "a")]  # per character: -5 vs -1.5 → 1; -1 vs -5 → 0
    # lm-evaluation-harness: completion_len = [float(len(i)) for i in choices]; argmax(lls / completion_len)
    lm_eval = [int(np.argmax(row / np.array([float(len(c)) for c in ch]))) for row, ch in zip(ll, choices)]
    assert list(scoring.norm_prediction(ll, choices)) == lm_eval == [1, 0]
    answers = [((5, 6), (7,)), ((9, 1), (9, 2)), ((3,), (4,))]
    assert list(scoring.mc_paper_prediction(np.array([7, 9, 8]), answers)) == [1, -1, -1]


# ------------------------------------------------------------------ eval against llama-cpp-python


def _run_eval(model, out, *args, limit=4):
    res = CliRunner().invoke(cli, ["eval", str(model), "--limit", str(limit), "--threads", "2", "-o", str(out),
                                   "--json", "-q", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), pd.read_parquet(out / "predictions.parquet")


def _check_choices(model, preds, examples, labels, answers_of, n_ctx=2048):
    """Each choice's log-likelihood, the probabilities, acc and acc_norm from llama-cpp-python's logits.
    answers_of(prompt, choice) → the choice's answer tokens after the prompt, read independently."""
    import llama_cpp

    ref = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    correct, correct_norm = [], []
    try:
        for row, ex in zip(preds.itertuples(index=False), examples):
            context = ref.tokenize(ex.prompt.encode(), add_bos=True, special=True)
            n = len(context)
            assert row.n_tokens == n
            loglik = []
            for j, (w, choice) in enumerate(zip(labels, ex.choices)):
                ans = answers_of(ex.prompt, choice)
                assert list(preds.loc[row.position, f"answer_{w}"]) == ans
                ref.reset()
                ref.eval(list(context) + ans)
                rows = np.array(ref.scores[n - 1:n - 1 + len(ans)], dtype=np.float64)
                loglik.append(sum(log_softmax(rows[k])[t] for k, t in enumerate(ans)))
            loglik = np.array(loglik)
            got_ll = preds.loc[row.position, [f"loglik_{w}" for w in labels]].to_numpy(dtype=np.float64)
            got_p = preds.loc[row.position, [f"p_{w}" for w in labels]].to_numpy(dtype=np.float64)
            assert np.abs(got_ll - loglik).max() < 2e-3, (got_ll, loglik)
            assert np.abs(got_p - softmax(loglik)).max() < 1e-4
            assert row.label_scoring == "loglik"
            correct.append(int(np.argmax(loglik)) == ex.gold)
            correct_norm.append(int(np.argmax(loglik / np.array([float(len(c)) for c in ex.choices]))) == ex.gold)
    finally:
        ref.close()
    return np.array(correct), np.array(correct_norm)


@pytest.mark.slow
def test_piqa_on_the_demo_model(demo_path, piqa_file, tmp_path):
    """PIQA through the CLI on the demo model: every figure from llama-cpp-python's own logits; the terminal
    table shows acc_norm; the generic --choices-column task gives the same numbers."""
    import llama_cpp

    tok = llama_cpp.Llama(model_path=str(demo_path), vocab_only=True, verbose=False)

    def answers_of(prompt, choice):
        a = tok.tokenize(prompt.encode(), add_bos=True, special=True)
        b = tok.tokenize((prompt + " " + choice).encode(), add_bos=True, special=True)
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        assert k == len(a)  # after 'Answer:' nothing merges across the boundary
        return list(b[k:])

    out, preds = _run_eval(demo_path, tmp_path / "piqa", "--task", "piqa", "--data", str(piqa_file))
    examples = load_examples("piqa", data_path=piqa_file).examples
    correct, correct_norm = _check_choices(demo_path, preds, examples, ["sol1", "sol2"], answers_of)
    metrics = next(iter(out["runs"].values()))["metrics"]
    assert metrics["multiple_choice"] == 2 and metrics["label_scoring"] == {"token": 0, "loglik": 4}
    assert metrics["label_set"]["accuracy"]["value"] == pytest.approx(correct.mean())
    assert metrics["label_set"]["accuracy_norm"]["value"] == pytest.approx(correct_norm.mean())
    p = preds[["p_sol1", "p_sol2"]].to_numpy()
    gold = np.array([ex.gold for ex in examples])
    assert metrics["label_set"]["mean_confidence"]["value"] == pytest.approx(p.max(axis=1).mean())
    assert metrics["label_set"]["brier"]["value"] == pytest.approx(np.mean(np.sum((p - np.eye(2)[gold]) ** 2, axis=1)))
    # paper scoring of a choice task: the argmax token is the first token of the gold choice's answer
    first = np.array([answers_of(ex.prompt, ex.choices[ex.gold])[0] for ex in examples])
    assert list(preds["paper_correct"]) == list(preds["paper_token"].to_numpy() == first)

    res = CliRunner().invoke(cli, ["eval", str(demo_path), "--task", "piqa", "--data", str(piqa_file), "--limit", "4",
                                   "-o", str(tmp_path / "piqa"), "--resume"], catch_exceptions=False, terminal_width=250)
    assert res.exit_code == 0 and "acc_norm %" in res.output, res.output

    _, generic = _run_eval(demo_path, tmp_path / "generic", "--data", str(piqa_file), "--template",
                           "Question: {goal}\nAnswer:", "--choices-column", "sol1,sol2", "--gold-column", "label")
    assert np.array_equal(generic[["loglik_sol1", "loglik_sol2"]].to_numpy(), preds[["loglik_sol1", "loglik_sol2"]].to_numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
def test_hellaswag_on_tiny_models_with_real_tokenizers(name, real_vocab_model, hellaswag_file, tmp_path):
    """HellaSwag through the CLI on a tiny model with a SentencePiece (Llama 2) and a BPE (GPT-2) tokenizer:
    the answer tokens transformers reads for ' ' + ending, and every figure from llama-cpp-python's logits."""
    model = real_vocab_model(name)
    hf = HFTokenizer(vocab_path(name))

    def answers_of(prompt, choice):
        ans, offset = hf.after(prompt, " " + choice)
        assert offset == 0
        return ans

    out, preds = _run_eval(model, tmp_path / "hs", "--task", "hellaswag", "--data", str(hellaswag_file), limit=3)
    examples = load_examples("hellaswag", data_path=hellaswag_file).examples
    labels = list(get_task("hellaswag").labels)
    correct, correct_norm = _check_choices(model, preds, examples, labels, answers_of, n_ctx=256)
    metrics = next(iter(out["runs"].values()))["metrics"]
    assert metrics["label_set"]["accuracy"]["value"] == pytest.approx(correct.mean())
    assert metrics["label_set"]["accuracy_norm"]["value"] == pytest.approx(correct_norm.mean())
    assert list(preds["choice_endings[2]"]) == [ex.choices[2] for ex in examples]


@pytest.mark.slow
def test_neurons_attribute_the_chosen_choice(real_vocab_model, piqa_file, tmp_path):
    """`neurons` on a PIQA task: the attributed token of each prompt is the first answer token of the choice
    the model chose (transformers' reading of ' ' + that choice), so none is 'not a label'."""
    model = real_vocab_model("llama-spm")
    hf = HFTokenizer(vocab_path("llama-spm"))
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["neurons", str(model), "--task", "piqa", "--data", str(piqa_file), "--limit", "4",
                                   "--layers", "-1", "--salient-examples", "4", "--ablate-top", "0", "--threads", "2",
                                   "-o", str(out), "-q", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    salient = json.loads((out / "salient.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    examples = load_examples("piqa", data_path=piqa_file).examples
    expected = [hf.after(ex.prompt, " " + ex.choices[j])[0][0] for ex, j in zip(examples, preds["pred_index"])]
    assert salient["target"] == "label" and salient["targets"] == expected
    assert salient["salient_targets"]["not_label"] == 0


# ------------------------------------------------------------------ the whole study


@pytest.mark.slow
def test_study_with_a_choice_task_end_to_end(demo_ladder, piqa_file, tmp_path, monkeypatch):
    """`study` with PIQA from --data-dir: two levels, neurons, the comparison over the choice distribution
    (label KL, flips), acc_norm in the terminal table and in the report."""
    monkeypatch.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
    out = tmp_path / "study"
    res = CliRunner().invoke(cli, ["study", "demo", "--quants", "F16,Q4_0", "--task", "piqa", "--data-dir",
                                   str(piqa_file.parent), "--limit", "4", "--layers", "-1", "--salient-examples", "2",
                                   "--ablate-top", "0", "--no-weights", "--no-kld", "--threads", "2", "-o", str(out)],
                             catch_exceptions=False, terminal_width=250)
    assert res.exit_code == 0, res.output
    assert "acc_norm %" in res.output
    study = json.loads((out / "study.json").read_text())
    task = study["tasks"]["piqa"]
    assert task["data"]["source"] == str(piqa_file)
    runs = task["runs"]
    level = next(lvl for lvl in runs if lvl != study["study"]["reference"])
    c = task["comparison"]["levels"][level]
    ref_p = pd.read_parquet(out / "runs" / "piqa" / study["study"]["reference"] / "predictions.parquet")
    lvl_p = pd.read_parquet(out / "runs" / "piqa" / level / "predictions.parquet")
    p, q = ref_p[["p_sol1", "p_sol2"]].to_numpy(), lvl_p[["p_sol1", "p_sol2"]].to_numpy()
    assert c["kl_label_mean"] == pytest.approx(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)), abs=1e-9)
    assert c["flips"]["changed"] == int(np.sum(ref_p["pred_index"].to_numpy() != lvl_p["pred_index"].to_numpy()))
    assert task["neurons"][level]["salient_targets"]["not_label"] == 0
    report = (out / "report.md").read_text()
    assert "acc_norm (lm-evaluation-harness" in report
