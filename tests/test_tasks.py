"""Tasks: definitions, loading real data files, malformed rows, formats, and the hub when offline.

The real evaluation data lives outside the repository (../shared/data, see its README); tests that
need it skip when it is absent. Expected counts and hashes come from that README, and are checked
again here by reading the files with plain json, independently of the loader.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ggml_probe.errors import HubError, ProbeError
from ggml_probe.tasks import (
    HubSource,
    get_task,
    list_tasks,
    load_examples,
    load_task_file,
    make_task,
)

REPO = Path(__file__).resolve().parent.parent
BOOLQ_SHA256 = "65120ac350e23920a6e05a2228258dbade0d9a4d7b3509407d660201af91807e"
JIGSAW_SHA256 = "bb1b224bad244c1ea3bdb09e6f05961838813fc752b6783832510d1df7807e02"
BOOLQ_PROMPT = "Respond with True or False only.\n{question}\nAnswer:"
JIGSAW_PROMPT = (
    "Given a sentence, respond with only 'True' if the sentence is toxic or else 'False'.\n"
    "Sentence: '{comment}'\nAnswer:"
)


def _shared(*parts: str) -> Path:
    base = Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared"))
    return base.joinpath(*parts)


@pytest.fixture(scope="module")
def boolq_file() -> Path:
    path = _shared("data", "boolq_validation.jsonl")
    if not path.is_file():
        pytest.skip(f"{path} not present (shared evaluation data)")
    return path


@pytest.fixture(scope="module")
def jigsaw_file() -> Path:
    path = _shared("data", "jigsaw_toxic_test_balanced.jsonl")
    if not path.is_file():
        pytest.skip(f"{path} not present (shared evaluation data)")
    return path


def _json_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def boolq_rows(boolq_file) -> list[dict]:
    return _json_rows(boolq_file)


@pytest.fixture(scope="module")
def jigsaw_rows(jigsaw_file) -> list[dict]:
    return _json_rows(jigsaw_file)


# -- definitions -------------------------------------------------------------------------------


def test_shipped_tasks_parse_and_are_named_after_their_files():
    names = [spec.name for spec in list_tasks()]
    assert names == ["boolq", "boolq-passage", "hellaswag", "jigsaw", "piqa", "yesno-mini"]
    defs = sorted(p.stem for p in (REPO / "ggml_probe" / "tasks" / "defs").glob("*.toml"))
    assert names == defs
    for spec in list_tasks():
        assert spec.description and spec.citation
        if spec.multiple_choice:  # PIQA, HellaSwag: the examples carry their choices; data from --data/--data-dir
            continue
        assert spec.labels == ("True", "False")
        assert spec.source is not None


def test_paper_prompts_are_byte_exact():
    assert get_task("boolq").template == BOOLQ_PROMPT
    assert get_task("jigsaw").template == JIGSAW_PROMPT
    assert get_task("yesno-mini").template == BOOLQ_PROMPT
    assert get_task("boolq").prompt_origin == "paper"
    assert get_task("boolq-passage").prompt_origin == "ggml-probe"


def test_paper_prompts_match_the_study_protocol_text():
    doc = _shared("docs", "study-protocol.md")
    if not doc.is_file():
        pytest.skip(f"{doc} not present")
    text = doc.read_text(encoding="utf-8")
    # The protocol writes each prompt in backticks with a literal backslash-n for each newline.
    boolq = re.search(r"BoolQ, questions only \(no passage\): `([^`]*)`", text).group(1)
    jigsaw = re.search(r"Jigsaw toxicity: `([^`]*)`", text).group(1)
    assert get_task("boolq").template == boolq.replace("\\n", "\n")
    assert get_task("jigsaw").template == jigsaw.replace("\\n", "\n")


def test_unknown_task_names_list_the_known_ones_and_close_matches():
    with pytest.raises(ProbeError) as err:
        get_task("boolqq")
    message = str(err.value)
    assert "did you mean boolq" in message
    assert "known tasks: boolq, boolq-passage, hellaswag, jigsaw, piqa, yesno-mini" in message
    assert "\n" not in message
    with pytest.raises(ProbeError, match="did you mean jigsaw"):
        get_task("jigsw")
    with pytest.raises(ProbeError) as err:
        get_task("sentiment-analysis")
    assert "did you mean" not in str(err.value)
    assert get_task("BoolQ").name == "boolq"


def test_a_task_definition_file_outside_the_package(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text(
        'name = "mine"\ntemplate = "Claim: {claim}\\nVerdict:"\nlabels = ["yes", "no"]\n'
        '[gold]\ncolumn = "verdict"\nvalues = { true = "yes", false = "no" }\n',
        encoding="utf-8",
    )
    spec = get_task(str(toml))
    assert spec.template == "Claim: {claim}\nVerdict:"
    assert spec.source is None
    data_file = tmp_path / "d.jsonl"
    data_file.write_text('{"claim": "a", "verdict": true}\n{"claim": "b", "verdict": "No"}\n')
    data = load_examples(spec, data_file)
    assert [(e.prompt, e.label) for e in data.examples] == [("Claim: a\nVerdict:", "yes"), ("Claim: b\nVerdict:", "no")]
    with pytest.raises(ProbeError, match="no data source of its own; pass --data PATH"):
        load_examples(spec)


@pytest.mark.parametrize(
    "body, message",
    [
        ('name = "x"\ntemplate = "{q}"\nlabels = ["a", "b"]\nlabel = 1\n[gold]\ncolumn = "g"\n', "unknown key"),
        ('name = "x"\ntemplate = "{q}"\nlabels = ["a", "b"]\n[gold]\ncolumn = "g"\nvalues = { "1" = "c" }\n', "not one of the labels"),
        ('name = "x"\ntemplate = "no fields"\nlabels = ["a", "b"]\n[gold]\ncolumn = "g"\n', "has no {field}"),
        ('name = "x"\ntemplate = "{q.attr}"\nlabels = ["a", "b"]\n[gold]\ncolumn = "g"\n', "not a plain column name"),
        ('name = "x"\ntemplate = "{q}"\nlabels = ["A", "a"]\n[gold]\ncolumn = "g"\n', "must differ ignoring case"),
        ('name = "x"\ntemplate = "{q}"\nlabels = ["a", "b"]\n', "missing [gold]"),
        ('name = "x"\ntemplate = "{q}\nlabels = ["a", "b"]\n', "not valid TOML"),
        ('name = "x"\ntemplate = "{q}"\nlabels = ["a", "b"]\n[gold]\ncolumn = "g"\n[columns]\nz = ["y"]\n', "not a template field"),
    ],
)
def test_bad_task_definitions_are_refused_in_one_line(tmp_path, body, message):
    toml = tmp_path / "x.toml"
    toml.write_text(body, encoding="utf-8")
    with pytest.raises(ProbeError) as err:
        load_task_file(toml)
    assert message in str(err.value)
    assert str(toml) in str(err.value)


# -- the real data -----------------------------------------------------------------------------


def test_shared_files_are_the_documented_ones(boolq_rows, jigsaw_rows):
    # Independent of the loader: plain json over the files, numbers from shared/data/README.md.
    assert len(boolq_rows) == 3270
    assert Counter(r["label"] for r in boolq_rows) == {True: 2033, False: 1237}
    assert len(jigsaw_rows) == 1200
    assert Counter(r["label"] for r in jigsaw_rows) == {1: 584, 0: 616}


def test_boolq_counts_balance_and_prompts(boolq_file, boolq_rows):
    data = load_examples(get_task("boolq"), boolq_file)
    assert len(data.examples) == 3270 and data.rows_read == 3270 and data.bad_rows == []
    assert data.label_counts() == {"True": 2033, "False": 1237}
    assert data.data_sha256 == BOOLQ_SHA256
    assert data.source == str(boolq_file)
    assert data.columns == {"question": "question", "label": "label"} and data.id_column == "idx"
    first = data.examples[0]
    assert first.id == "0" and first.index == 1
    assert first.prompt == "Respond with True or False only.\ndoes ethanol take more energy make that produces\nAnswer:"
    assert (first.gold, first.label) == (1, "False")
    # Every example against the raw rows, built by concatenation rather than str.format.
    for ex, row in zip(data.examples, boolq_rows, strict=True):
        assert ex.id == str(row["idx"])
        assert ex.prompt == "Respond with True or False only.\n" + row["question"] + "\nAnswer:"
        assert data.labels[ex.gold] == ("True" if row["label"] else "False")


def test_boolq_passage_prompt(boolq_file, boolq_rows):
    data = load_examples("boolq-passage", boolq_file, limit=2)
    row = boolq_rows[1]
    assert data.examples[1].prompt == (
        row["passage"] + "\nQuestion: " + row["question"] + "?\nRespond with True or False only.\nAnswer:"
    )
    assert data.examples[1].fields == {"passage": row["passage"], "question": row["question"]}


def test_jigsaw_counts_balance_alias_and_prompt(jigsaw_file, jigsaw_rows):
    data = load_examples("jigsaw", jigsaw_file)
    assert len(data.examples) == 1200 and data.bad_rows == []
    assert data.label_counts() == {"True": 584, "False": 616}
    assert data.data_sha256 == JIGSAW_SHA256
    # The template field is `comment`; this file calls the column `text`.
    assert data.columns == {"comment": "text", "label": "label"}
    ex = data.examples[3]
    assert (ex.id, ex.index, ex.label) == ("00e3f344cc9fef4a", 4, "False")
    assert ex.prompt == (
        "Given a sentence, respond with only 'True' if the sentence is toxic or else 'False'.\n"
        "Sentence: 'Who is the man in the high castle?'\nAnswer:"
    )
    for ex, row in zip(data.examples, jigsaw_rows, strict=True):
        assert ex.fields["comment"] == row["text"]
        assert ex.label == ("True" if row["label"] == 1 else "False")


def test_limit_takes_the_first_valid_examples_in_file_order(boolq_file, boolq_rows):
    data = load_examples("boolq", boolq_file, limit=5)
    assert [e.id for e in data.examples] == [str(r["idx"]) for r in boolq_rows[:5]]
    assert [e.index for e in data.examples] == [1, 2, 3, 4, 5]
    assert load_examples("boolq", boolq_file, limit=10_000).examples[-1].id == "3269"
    with pytest.raises(ProbeError, match="positive whole number"):
        load_examples("boolq", boolq_file, limit=0)


def test_seeded_sample_is_deterministic_and_in_file_order(boolq_file):
    a = [e.index for e in load_examples("boolq", boolq_file, limit=50, seed=7).examples]
    b = [e.index for e in load_examples("boolq", boolq_file, limit=50, seed=7).examples]
    c = [e.index for e in load_examples("boolq", boolq_file, limit=50, seed=8).examples]
    assert a == b and a != c
    assert a == sorted(a) and len(set(a)) == 50
    assert a != list(range(1, 51))


# -- malformed rows ----------------------------------------------------------------------------

_JSONL_ROWS = [
    '{"idx": 1, "question": "is water wet", "label": true}',
    '{"idx": 2, "label": false}',  # line 2: missing question
    '{"idx": 3, "question": "is the sky green", "label": "maybe"}',  # line 3: unknown label
    '{"idx": 4, "question": "is this broken", "label": tru',  # line 4: broken JSON
    "",  # line 5: blank, not a row
    '{"idx": 6, "question": "   ", "label": false}',  # line 6: empty field
    '{"idx": 1, "question": "is this a repeat", "label": false}',  # line 7: duplicate id
    '{"idx": 8, "question": "is fire hot", "label": "TRUE"}',
]


def test_malformed_jsonl_fails_naming_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(_JSONL_ROWS) + "\n", encoding="utf-8")
    with pytest.raises(ProbeError) as err:
        load_examples("boolq", path)
    message = str(err.value)
    assert "5 malformed rows" in message
    assert "row 2: missing field 'question'" in message
    assert "row 3: unknown label value 'maybe'" in message
    assert "row 4: not valid JSON" in message
    assert "and 2 more" in message and "row 6" not in message
    assert "--on-bad-row skip" in message and "\n" not in message


def test_malformed_jsonl_skip_keeps_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(_JSONL_ROWS) + "\n", encoding="utf-8")
    data = load_examples("boolq", path, on_bad_row="skip")
    assert [(e.id, e.index, e.label) for e in data.examples] == [("1", 1, "True"), ("8", 8, "True")]
    assert [b.row for b in data.bad_rows] == [2, 3, 4, 6, 7]
    reasons = [b.reason for b in data.bad_rows]
    assert reasons[0] == "missing field 'question'"
    assert reasons[1].startswith("unknown label value 'maybe' in 'label'")
    assert reasons[2].startswith("not valid JSON")
    assert reasons[3] == "empty field 'question'"
    assert reasons[4] == "duplicate id '1' (first at row 1)"
    assert data.rows_read == 7
    # --limit counts valid examples only.
    assert [e.id for e in load_examples("boolq", path, on_bad_row="skip", limit=2).examples] == ["1", "8"]


def test_malformed_csv_rows_are_reported_by_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "id,text,label\n"  # line 1
        'a,"a comment\nthat spans\nthree lines",1\n'  # lines 2-4
        "b,,0\n"  # line 5: empty text
        "c,hello there,2\n"  # line 6: unknown label
        "d,too,many,fields\n"  # line 7: wrong field count
        "e,a fine comment,0\n",  # line 8
        encoding="utf-8",
    )
    with pytest.raises(ProbeError, match=r"3 malformed rows .*row 5: empty field 'text'.*row 6: unknown label value '2'.*row 7: has 4 fields, the header has 3"):
        load_examples("jigsaw", path)
    data = load_examples("jigsaw", path, on_bad_row="skip")
    assert [(e.id, e.index, e.label) for e in data.examples] == [("a", 2, "True"), ("e", 8, "False")]
    assert data.examples[0].prompt.endswith("Sentence: 'a comment\nthat spans\nthree lines'\nAnswer:")
    assert [b.row for b in data.bad_rows] == [5, 6, 7]


def test_a_missing_column_is_a_file_error_naming_what_was_looked_for(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,body,label\nx,hi,1\n", encoding="utf-8")
    with pytest.raises(ProbeError) as err:
        load_examples("jigsaw", path)
    assert "no column for 'comment' (looked for: comment, comment_text, text)" in str(err.value)
    assert "its columns: id, body, label" in str(err.value)


def test_bad_policy_missing_file_and_unsupported_format(tmp_path):
    with pytest.raises(ProbeError, match="on_bad_row must be one of fail, skip"):
        load_examples("yesno-mini", on_bad_row="ignore")
    with pytest.raises(ProbeError, match="does not exist"):
        load_examples("boolq", tmp_path / "nope.jsonl")
    odd = tmp_path / "data.xlsx"
    odd.write_bytes(b"x")
    with pytest.raises(ProbeError, match="unsupported data format .xlsx"):
        load_examples("boolq", odd)
    with pytest.raises(ProbeError, match="not a readable parquet file"):
        (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
        load_examples("boolq", tmp_path / "junk.parquet")


# -- other formats give the same examples ------------------------------------------------------


def _key(data):
    return [(e.id, e.prompt, e.gold) for e in data.examples]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_round_trip_through_other_formats(tmp_path, jigsaw_file, fmt):
    import pandas as pd

    reference = load_examples("jigsaw", jigsaw_file)
    frame = pd.read_json(jigsaw_file, lines=True, dtype={"id": str})
    path = tmp_path / f"jigsaw.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "csv":
        # Comments hold quotes, commas and newlines: CSV quoting must bring them back intact.
        frame.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    else:
        frame.to_json(path, orient="records", force_ascii=False)
    data = load_examples("jigsaw", path)
    assert _key(data) == _key(reference)
    assert data.label_counts() == {"True": 584, "False": 616}
    if fmt == "parquet":
        assert [e.index for e in data.examples][:3] == [1, 2, 3]


def test_hub_style_columns_work_through_aliases(tmp_path, boolq_rows):
    # The hub copy of BoolQ calls the gold column `answer` and has no id column.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "question": [r["question"] for r in boolq_rows],
        "answer": [r["label"] for r in boolq_rows],
        "passage": [r["passage"] for r in boolq_rows],
    })
    path = tmp_path / "validation.parquet"
    pq.write_table(table, path)
    data = load_examples("boolq", path)
    assert data.columns["label"] == "answer" and data.id_column is None
    assert data.label_counts() == {"True": 2033, "False": 1237}
    assert [e.id for e in data.examples[:3]] == ["1", "2", "3"]


# -- generic tasks -----------------------------------------------------------------------------


def test_make_task_for_a_local_file(tmp_path):
    spec = make_task(
        "Q: {q}\nA:", ["yes", "no"], "ans", id_column="key",
        gold_values={"y": "yes", "n": "NO"}, columns={"q": ["query", "q"]},
    )
    assert spec.name == "custom" and spec.prompt_origin == "user"
    path = tmp_path / "d.tsv"
    path.write_text("key\tquery\tans\nk1\tis it?\tYES\nk2\tis it not?\tn\nk3\twhat?\tperhaps\n", encoding="utf-8")
    data = load_examples(spec, path, on_bad_row="skip")
    assert [(e.id, e.prompt, e.label, e.gold) for e in data.examples] == [
        ("k1", "Q: is it?\nA:", "yes", 0),
        ("k2", "Q: is it not?\nA:", "no", 1),
    ]
    assert data.bad_rows[0].row == 4 and "unknown label value 'perhaps'" in data.bad_rows[0].reason
    with pytest.raises(ProbeError, match="not one of the labels"):
        make_task("{q}", ["yes", "no"], "ans", gold_values={"1": "maybe"})


# -- offline -----------------------------------------------------------------------------------


def test_builtin_task_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = load_examples("yesno-mini")
    assert len(data.examples) == 40 and data.bad_rows == []
    assert data.label_counts() == {"True": 20, "False": 20}
    assert data.source == "builtin:yesno_mini.jsonl"
    raw = _json_rows(REPO / "ggml_probe" / "tasks" / "data" / "yesno_mini.jsonl")
    assert len({r["question"] for r in raw}) == 40
    assert data.examples[0].prompt == "Respond with True or False only.\n" + raw[0]["question"] + "\nAnswer:"
    # True and false alternate, so an even --limit stays balanced.
    assert load_examples("yesno-mini", limit=10).label_counts() == {"True": 5, "False": 5}


def test_hub_source_offline_gives_one_clear_line(monkeypatch, tmp_path):
    # Set after huggingface_hub read its constants (the package imports them lazily, so import
    # the module itself): the loader must read the variables at call time.
    from huggingface_hub import constants

    if not any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        assert constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(HubError) as err:
        load_examples("boolq")
    message = str(err.value)
    assert "HF_HUB_OFFLINE=1" in message and "--data PATH" in message
    assert "hf://datasets/google/boolq/data/validation-00000-of-00001.parquet" in message
    assert "\n" not in message


_NETWORK_VARS = {
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT",
    "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy",
}
_PRINT_HUB_ERROR = """
from ggml_probe.tasks import load_examples
from ggml_probe.errors import HubError
try:
    load_examples({task!r})
except HubError as e:
    print('HubError:', e)
"""


def test_hub_source_offline_in_a_fresh_process(tmp_path):
    # Set before anything is imported, the way a user sets it in their shell.
    env = {k: v for k, v in os.environ.items() if k not in _NETWORK_VARS}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_HUB_ERROR.format(task="jigsaw")],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HubError: task jigsaw: cannot get hf://datasets/")
    assert "HF_HUB_OFFLINE=1" in out.stdout and "--data PATH" in out.stdout
    assert out.stdout.count("\n") == 1


def test_unreachable_hub_fails_fast_with_the_same_advice(tmp_path):
    # A fresh process, so no offline setting captured earlier in this one can leak in.
    env = {k: v for k, v in os.environ.items() if k not in _NETWORK_VARS}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")  # port 9: nothing listens
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_HUB_ERROR.format(task="boolq")],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "HubError: task boolq: cannot get hf://datasets/google/boolq/" in out.stdout
    assert "could not be reached at http://127.0.0.1:9" in out.stdout
    assert "--data PATH" in out.stdout and out.stdout.count("\n") == 1
    assert "Retrying" not in out.stderr  # failed at once, without huggingface_hub's backoff


def test_a_cached_hub_file_is_used_offline(monkeypatch, tmp_path, boolq_rows):
    # A file fetched once is read from the Hugging Face cache with no network. The cache is laid
    # out as huggingface_hub lays it out (repo folder, refs/main -> commit, snapshots/commit/file).
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = get_task("boolq")
    source = spec.source
    assert isinstance(source, HubSource)
    commit = "0" * 40
    repo_dir = tmp_path / "hub" / ("datasets--" + source.repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    target = repo_dir / "snapshots" / commit / source.file
    target.parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "question": [r["question"] for r in boolq_rows],
        "answer": [r["label"] for r in boolq_rows],
    }), target)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    data = load_examples(spec)
    assert data.source == "hf://datasets/google/boolq/data/validation-00000-of-00001.parquet"
    assert Path(data.local_path).resolve() == target.resolve()
    assert len(data.examples) == 3270
    assert data.label_counts() == {"True": 2033, "False": 1237}
    assert data.describe()["columns"] == {"question": "question", "label": "answer"}
