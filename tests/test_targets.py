"""Which token the salient neurons explain: the label the model chose (default), the full-vocabulary
argmax (the paper's), or the gold label — each checked against an independent tokenizer
(transformers' own reading of the same GGUF files), not against the code's own convention."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from click.testing import CliRunner
from rich.console import Console

from conftest import shared_data_dir
from ggml_probe.cli import cli
from ggml_probe.engine.llama_lib import llama
from ggml_probe.engine.model import _VocabMethods
from ggml_probe.pipeline.study import StudyConfig
from ggml_probe.report.terminal import print_neuron_summary
from ggml_probe.tasks import get_task, load_examples

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")  # transformers reads GGUF tokenizers through it

VOCABS = shared_data_dir() / "vocab"
BOOLQ_PROMPT = "Respond with True or False only.\nis the sky blue\nAnswer:"
JIGSAW_PROMPT = "Given a sentence, respond with only 'True' if the sentence is toxic or else 'False'.\nSentence: 'hi'\nAnswer:"
# (prompt, continuation): the task's separator; a prompt ending in a space (BPE merges it into ' True')
CASES = [(BOOLQ_PROMPT, " True"), (BOOLQ_PROMPT, " False"), (JIGSAW_PROMPT, " False"),
         (BOOLQ_PROMPT + " ", "True"), (BOOLQ_PROMPT + "\n", "False")]


def hf_tokenizer(folder, name):
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


def hf_continuation(tok, prompt: str, continuation: str) -> list[int]:
    """transformers: the tokens of prompt + continuation after the longest common prefix with the prompt's."""
    a, b = tok(prompt)["input_ids"], tok(prompt + continuation)["input_ids"]
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return list(b[k:])


class VocabFile(_VocabMethods):
    """llama.cpp's tokenizer of a vocabulary-only GGUF (llama.cpp's own test vocabularies have no tensors)."""

    def __init__(self, path):
        self._lib = llama()
        params = self._lib.llama_model_default_params()
        params.vocab_only = True
        self._model = self._lib.llama_model_load_from_file(str(path).encode(), params)
        assert self._model, path
        self._vocab = self._lib.llama_model_get_vocab(self._model)

    def close(self):
        self._lib.llama_model_free(self._model)


def _check_vocab(name):
    path = VOCABS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found")
    tok = hf_tokenizer(VOCABS, path.name)
    vocab = VocabFile(path)
    try:
        for prompt, continuation in CASES:
            expected = hf_continuation(tok, prompt, continuation)
            assert expected, (name, prompt, continuation)
            got = vocab.continuation_tokens(prompt, continuation)
            assert got == expected, (name, continuation, got, expected, tok.convert_ids_to_tokens(expected))
            assert all(isinstance(t, int) for t in got)
    finally:
        vocab.close()


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gpt-2"])
def test_continuation_tokens_equal_transformers(name):
    """SentencePiece (' True' alone is '▁' + 'True', after 'Answer:' it is '▁True') and GPT-2 BPE."""
    _check_vocab(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_continuation_tokens_equal_transformers_large_bpe(name):
    _check_vocab(name)


def test_study_target_defaults():
    assert StudyConfig().attribution_target is None  # resolved by run_study: label outside paper mode
    paper = StudyConfig(paper=True)
    paper.apply_paper()
    assert paper.attribution_target == "answer"  # the paper's argmax token
    explicit = StudyConfig(paper=True, attribution_target="gold")
    explicit.apply_paper()
    assert explicit.attribution_target == "gold"


# ------------------------------------------------------------------ through the CLI, on the demo

N = 3


@pytest.fixture(scope="module")
def demo_tok(demo_path):
    return hf_tokenizer(demo_path.parent, demo_path.name)


@pytest.fixture(scope="module")
def demo_prompts(boolq_path):
    data = load_examples(get_task("boolq"), data_path=boolq_path, limit=N)
    return data.examples


def _neurons(tmp_path, boolq_path, *extra, as_json=True):
    out = tmp_path / "run"
    args = ["neurons", "demo", "--task", "boolq", "--data", str(boolq_path), "--limit", str(N), "--layers", "-1",
            "--salient-examples", str(N), "--ablate-top", "0", "--threads", "2", "-o", str(out), "--quiet",
            *(["--json"] if as_json else []), *extra]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sal = json.loads((out / "salient.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    level = next(iter(json.loads(res.stdout)["neurons"].values())) if as_json else None
    return res, sal, preds, level


def _label_tokens(tok, prompts) -> set[int]:
    """Every token that stands for a label: the first token of ' True'/' False' after each prompt, and
    the first tokens of the label words' surface forms alone."""
    out = {hf_continuation(tok, p, " " + w)[0] for p in prompts for w in ("True", "False")}
    out |= {tok(form, add_special_tokens=False)["input_ids"][0] for w in ("True", "False") for form in (w, " " + w)}
    return out


def _expected_summary(tok, kind, targets, label_tokens):
    return {"kind": kind, "tokens": dict(Counter(tok.decode([t]) for t in targets)),
            "not_label": sum(t not in label_tokens for t in targets), "n": len(targets)}


@pytest.mark.slow
def test_default_target_is_the_chosen_label(tmp_path, boolq_path, demo_tok, demo_prompts):
    """By default the salient neurons explain the label the model chose under label-set scoring, as the
    token it would emit for that label after the prompt — not the argmax (`<|im_end|>` on the demo)."""
    _, sal, preds, level = _neurons(tmp_path, boolq_path)
    prompts = [ex.prompt for ex in demo_prompts]
    expected = [hf_continuation(demo_tok, p, " " + w)[0] for p, w in zip(prompts, preds["pred"][:N])]
    assert sal["target"] == "label" and sal["targets"] == expected
    assert demo_tok.convert_tokens_to_ids("<|im_end|>") not in sal["targets"]
    summary = _expected_summary(demo_tok, "label", expected, _label_tokens(demo_tok, prompts))
    assert summary["not_label"] == 0
    assert level["salient_targets"] == summary and sal["salient_targets"] == summary
    console = Console(record=True, width=200)
    print_neuron_summary(console, {"Q4_1": level}, None)
    text = console.export_text()
    pieces = ", ".join(f"{piece!r}×{count}" for piece, count in level["salient_targets"]["tokens"].items())
    assert f"attributed tokens (label): {pieces}; not a label: 0 of {N}" in text


@pytest.mark.slow
def test_answer_target_is_the_argmax(tmp_path, boolq_path, demo_tok, demo_prompts):
    """--attribution-target answer keeps the paper's full-vocabulary argmax, and says how many are not a label."""
    _, sal, preds, level = _neurons(tmp_path, boolq_path, "--attribution-target", "answer")
    argmax = [int(t) for t in preds["paper_token"][:N]]  # the eval pass's own argmax, recorded per example
    assert sal["target"] == "answer" and sal["targets"] == argmax
    prompts = [ex.prompt for ex in demo_prompts]
    summary = _expected_summary(demo_tok, "answer", argmax, _label_tokens(demo_tok, prompts))
    assert level["salient_targets"] == summary and sal["salient_targets"] == summary


@pytest.mark.slow
def test_gold_target_is_the_token_emitted_for_the_gold_label(tmp_path, boolq_path, demo_tok, demo_prompts):
    """Gold True and gold False are both attributed as the token after 'Answer:' (' True', ' False')."""
    _, sal, _, level = _neurons(tmp_path, boolq_path, "--attribution-target", "gold")
    golds = {ex.label for ex in demo_prompts}
    assert golds == {"True", "False"}  # both labels are exercised
    expected = [hf_continuation(demo_tok, ex.prompt, " " + ex.label)[0] for ex in demo_prompts]
    assert sal["target"] == "gold" and sal["targets"] == expected
    assert level["salient_targets"]["kind"] == "gold" and level["salient_targets"]["not_label"] == 0
    assert "ablation" not in sal["layers"]["29"]  # --ablate-top 0
