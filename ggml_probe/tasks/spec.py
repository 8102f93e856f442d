"""Task definitions: what a task is (prompt template, label words, gold mapping, columns, data source).

A task is data, not code. Each file in `defs/` is one task, written in TOML::

    name = "boolq"                       # must equal the file name without .toml
    description = "..."
    template = "Respond with True or False only.\\n{question}\\nAnswer:"   # str.format fields
    prompt_origin = "paper"              # paper | ggml-probe | user: whose prompt this is
    labels = ["True", "False"]           # label words; gold indices point into this list
    id_column = "idx"                    # optional; without it (or if absent) ids are row numbers
    citation = "..."
    notes = "..."

    [gold]
    column = "label"
    values = { "1" = "True", "0" = "False" }   # optional extra spellings -> label word

    [columns]                             # logical name -> columns to look for, first match wins
    comment = ["comment", "comment_text", "text"]

    [choices]                             # a multiple-choice task: each example carries its own answers
    columns = ["sol1", "sol2"]            # one column per choice (PIQA) ...
    # column = "endings"                  # ... or one column holding the list of choices (HellaSwag),
    # count = 4                           #     with how many each example has
    preprocess = "hellaswag"              # optional: a named text cleanup (tasks.preprocess.PREPROCESSORS)

    [source]                              # where the data comes from when no --data is given
    hub = "google/boolq"                  # a Hugging Face dataset repo ...
    file = "data/validation-00000-of-00001.parquet"
    revision = "main"                     # optional: pin a commit for reproducible runs
    # builtin = "yesno_mini.jsonl"        # ... or a file shipped in ggml_probe/tasks/data/

Gold values are compared after normalisation: booleans become "true"/"false", integral numbers
their decimal digits, strings are stripped and lower-cased. Every label word matches itself
case-insensitively, so bool gold values need no mapping when the labels are True/False.
Template fields are plain names; write a literal brace as `{{` or `}}`.

A multiple-choice task's labels name the choice positions (default: the choice columns, or
`endings[0]`, `endings[1]`, … for a list column); its gold value is the 0-based index of the right
choice (or a label name), and each choice is scored as that example's answer (tasks.answers).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: same parser under its PyPI name
    import tomli as tomllib  # type: ignore[no-redef]

from ..errors import ProbeError
from .preprocess import PREPROCESSORS, clean_text

PROMPT_ORIGINS = ("paper", "ggml-probe", "user")
_TOP_KEYS = {
    "name", "description", "template", "prompt_origin", "labels", "id_column",
    "citation", "notes", "license", "gold", "columns", "source", "choices",
}
_CHOICE_KEYS = {"columns", "column", "count", "preprocess"}
_GOLD_KEYS = {"column", "values"}
_SOURCE_KEYS = {"hub", "file", "revision", "split", "builtin"}


@dataclass(frozen=True)
class HubSource:
    """One data file of a Hugging Face dataset repository."""

    repo: str
    file: str
    revision: str | None = None
    split: str | None = None

    def describe(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"hf://datasets/{self.repo}{at}/{self.file}"


@dataclass(frozen=True)
class BuiltinSource:
    """A data file shipped inside the package (ggml_probe/tasks/data/)."""

    file: str

    def describe(self) -> str:
        return f"builtin:{self.file}"


class Tokenizer(Protocol):
    """What fitting a prompt to a context needs of a tokenizer (an Engine or a Vocab)."""

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class FittedPrompt:
    """An example's prompt as decoded: its tokens, and how many tokens of the full prompt it lacks."""

    tokens: np.ndarray  # int32, what the model is given (BOS included when the model adds one)
    dropped: int  # tokens of the full prompt left out (cut from the ends of its longest fields)
    text: str  # the rendered prompt these tokens come from


@dataclass(frozen=True)
class Choices:
    """Where a multiple-choice task's examples keep their choices.

    columns: one logical column per choice (resolved through [columns] like template fields), or with
    `in_list` one column holding the list of `count` choices. preprocess: a tasks.preprocess name."""

    columns: tuple[str, ...]
    in_list: bool
    count: int
    preprocess: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A validated task definition. Build one with `get_task` or `make_task`, not directly."""

    name: str
    template: str
    labels: tuple[str, ...]
    gold_column: str
    # normalised gold value -> index into labels
    gold_values: Mapping[str, int]
    # logical name (template field, gold column, id column) -> candidate columns, first match wins
    columns: Mapping[str, tuple[str, ...]]
    id_column: str | None = None
    source: HubSource | BuiltinSource | None = None
    description: str = ""
    prompt_origin: str = "user"
    citation: str = ""
    notes: str = ""
    license: str = ""
    definition: str | None = None  # the TOML file it came from, if any
    template_fields: tuple[str, ...] = field(default=())
    choices: Choices | None = None  # a multiple-choice task: the examples carry their own answers

    @property
    def multiple_choice(self) -> bool:
        return self.choices is not None

    def candidates(self, logical: str) -> tuple[str, ...]:
        """The data columns that may hold `logical`, in the order they are tried."""
        return self.columns.get(logical, (logical,))

    def gold_index(self, value: Any) -> int | None:
        """Index into `labels` for a raw gold value from the data, or None if it maps to no label."""
        key = normalize_gold_value(value)
        return None if key is None else self.gold_values.get(key)

    def render(self, fields: Mapping[str, str]) -> str:
        """The prompt for one example: the template with its fields filled in, nothing added (but the
        task's named text cleanup, when it has one: HellaSwag's, as lm-evaluation-harness applies it)."""
        text = self.template.format_map({name: fields[name] for name in self.template_fields})
        return clean_text(self.choices.preprocess, text) if self.choices and self.choices.preprocess else text

    def fit(self, fields: Mapping[str, str], tokenizer: Tokenizer, limit: int) -> FittedPrompt:
        """The prompt's tokens, at most `limit` of them: the template stays whole (BOS, the text before,
        between and after the fields, so the prompt still ends where the answer goes) and the longest
        field is cut token-wise from its end, then the next longest if that is not enough."""
        text = self.render(fields)
        full = tokenizer.tokenize(text)
        if len(full) <= limit:
            return FittedPrompt(full, 0, text)
        values = dict(fields)
        field_tokens = {name: tokenizer.tokenize(values[name], add_special=False) for name in self.template_fields}
        for name in sorted(self.template_fields, key=lambda f: -len(field_tokens[f])):
            toks = field_tokens[name]

            def attempt(k: int) -> tuple[str, np.ndarray]:
                trial = {**values, name: _token_prefix(tokenizer, values[name], toks, k)}
                rendered = self.render(trial)
                return rendered, tokenizer.tokenize(rendered)

            best = attempt(0)
            if len(best[1]) > limit:  # even without this field it is too long: drop it, cut the next
                values[name] = ""
                continue
            lo, hi = 0, len(toks) + 1  # the longest prefix that fits: attempt(lo) fits, hi is past the field
            while hi - lo > 1:
                mid = (lo + hi) // 2
                trial = attempt(mid)
                if len(trial[1]) <= limit:
                    lo, best = mid, trial
                else:
                    hi = mid
            return FittedPrompt(best[1], len(full) - len(best[1]), best[0])
        empty = tokenizer.tokenize(self.render(dict.fromkeys(self.template_fields, "")))
        raise ProbeError(f"task {self.name}: the prompt template alone takes {len(empty)} tokens, more than the "
                         f"{limit} the context holds; raise --ctx")


def _token_prefix(tokenizer: Tokenizer, text: str, tokens: np.ndarray, k: int) -> str:
    """The text of a field's first k tokens, as a prefix of the field's own text where possible (a
    detokenizer may add or drop a leading space, or end inside a multi-byte character)."""
    if k <= 0:
        return ""
    piece = tokenizer.detokenize(tokens[:k]).rstrip("\ufffd")
    for candidate in (piece, piece.lstrip()):
        if text.startswith(candidate):
            return candidate
    return piece


def normalize_gold_value(value: Any) -> str | None:
    """The comparison key for a gold value; None for missing values (None, NaN, blank text)."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip().lower() or None
    return repr(value).lower()


def parse_template(template: str, where: str) -> tuple[str, ...]:
    """The template's field names, in order of first use; rejects anything but plain names."""
    names: list[str] = []
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ProbeError(f"{where}: bad prompt template ({exc}); write literal braces as {{{{ and }}}}") from exc
    for _literal, name, format_spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or format_spec or conversion:
            raise ProbeError(
                f"{where}: template field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + format_spec if format_spec else ''}}} is not a plain column name"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ProbeError(f"{where}: the prompt template has no {{field}}, so every prompt would be the same")
    return tuple(names)


def _need_str(raw: Mapping[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise ProbeError(f"{where}: missing required key '{key}'")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ProbeError(f"{where}: '{key}' must be a non-empty string")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ProbeError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def spec_from_mapping(raw: Mapping[str, Any], where: str, definition: str | None = None) -> TaskSpec:
    """Validate a task definition (the parsed TOML, or what make_task builds) into a TaskSpec."""
    _check_keys(raw, _TOP_KEYS, where)
    name = _need_str(raw, "name", where)
    template = _need_str(raw, "template", where)
    fields = parse_template(template, where)

    choices = _parse_choices(raw.get("choices"), where)
    labels = raw.get("labels")
    if labels is None and choices is not None:
        labels = list(choices.columns) if not choices.in_list else [f"{choices.columns[0]}[{i}]" for i in range(choices.count)]
    if choices is not None and isinstance(labels, (list, tuple)) and len(labels) != choices.count:
        raise ProbeError(f"{where}: {len(labels)} labels for {choices.count} choices; name each choice once")
    if (
        not isinstance(labels, (list, tuple))
        or len(labels) < 2
        or not all(isinstance(w, str) and w.strip() for w in labels)
    ):
        raise ProbeError(f"{where}: 'labels' must list at least two non-empty label words")
    folded = [w.strip().lower() for w in labels]
    if len(set(folded)) != len(folded):
        raise ProbeError(f"{where}: label words must differ ignoring case: {labels}")
    labels = tuple(labels)

    gold = raw.get("gold")
    if not isinstance(gold, Mapping):
        raise ProbeError(f"{where}: missing [gold] table with the gold 'column'")
    _check_keys(gold, _GOLD_KEYS, f"{where} [gold]")
    gold_column = _need_str(gold, "column", f"{where} [gold]")
    gold_values = {w: i for i, w in enumerate(folded)}
    if choices is not None:  # the gold value of a multiple-choice example is the right choice's 0-based index
        gold_values.update({str(i): i for i in range(choices.count)})
    extra = gold.get("values") or {}
    if not isinstance(extra, Mapping):
        raise ProbeError(f"{where} [gold]: 'values' must be a table of value = \"label word\"")
    for value, word in extra.items():
        key = normalize_gold_value(value)
        if not isinstance(word, str) or word.strip().lower() not in gold_values:
            raise ProbeError(
                f"{where} [gold]: value {value!r} maps to {word!r}, which is not one of the labels {list(labels)}"
            )
        index = folded.index(word.strip().lower())
        if key is None:
            raise ProbeError(f"{where} [gold]: empty gold value key")
        if gold_values.get(key, index) != index:
            other = labels[gold_values[key]]
            raise ProbeError(f"{where} [gold]: value {value!r} maps to {word!r} but is also the label word {other!r}")
        gold_values[key] = index

    id_column = _need_str(raw, "id_column", where, required=False)

    columns_raw = raw.get("columns") or {}
    if not isinstance(columns_raw, Mapping):
        raise ProbeError(f"{where}: [columns] must map names to lists of column names")
    columns: dict[str, tuple[str, ...]] = {}
    for logical, cands in columns_raw.items():
        if isinstance(cands, str):
            cands = [cands]
        if not isinstance(cands, (list, tuple)) or not cands or not all(isinstance(c, str) and c for c in cands):
            raise ProbeError(f"{where} [columns]: '{logical}' must be a column name or a non-empty list of them")
        columns[logical] = tuple(cands)
    used = set(fields) | {gold_column} | ({id_column} if id_column else set()) | set(choices.columns if choices else ())
    stray = sorted(set(columns) - used)
    if stray:
        raise ProbeError(f"{where} [columns]: {', '.join(stray)} is not a template field, the gold column or the id column")
    for logical in used:
        columns.setdefault(logical, (logical,))

    source = _parse_source(raw.get("source"), where)

    origin = raw.get("prompt_origin", "user")
    if origin not in PROMPT_ORIGINS:
        raise ProbeError(f"{where}: prompt_origin must be one of {', '.join(PROMPT_ORIGINS)}, not {origin!r}")
    texts = {}
    for key in ("description", "citation", "notes", "license"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise ProbeError(f"{where}: '{key}' must be a string")
        texts[key] = value.strip()

    return TaskSpec(
        name=name,
        template=template,
        labels=labels,
        gold_column=gold_column,
        gold_values=gold_values,
        columns=columns,
        id_column=id_column,
        source=source,
        prompt_origin=origin,
        definition=definition,
        template_fields=fields,
        choices=choices,
        **texts,
    )


def _parse_choices(table: Any, where: str) -> Choices | None:
    """[choices]: `columns` (one per choice) or `column` + `count` (a list column), and `preprocess`."""
    if table is None:
        return None
    where = f"{where} [choices]"
    if not isinstance(table, Mapping):
        raise ProbeError(f"{where}: must be a table with 'columns' or 'column' and 'count'")
    _check_keys(table, _CHOICE_KEYS, where)
    preprocess = _need_str(table, "preprocess", where, required=False)
    if preprocess is not None and preprocess not in PREPROCESSORS:
        raise ProbeError(f"{where}: unknown preprocess {preprocess!r} (known: {', '.join(sorted(PREPROCESSORS))})")
    if ("columns" in table) == ("column" in table):
        raise ProbeError(f"{where}: give either 'columns' (one column per choice) or 'column' (a list of choices) "
                         "with 'count'")
    if "columns" in table:
        cols = table["columns"]
        if (not isinstance(cols, (list, tuple)) or len(cols) < 2 or len(set(cols)) != len(cols)
                or not all(isinstance(c, str) and c.strip() for c in cols)):
            raise ProbeError(f"{where}: 'columns' must list at least two distinct column names")
        if "count" in table and table["count"] != len(cols):
            raise ProbeError(f"{where}: 'count' is {table['count']} but 'columns' lists {len(cols)}")
        return Choices(tuple(cols), False, len(cols), preprocess)
    column = _need_str(table, "column", where)
    count = table.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ProbeError(f"{where}: a list column needs 'count', how many choices each example has (at least 2)")
    return Choices((column,), True, count, preprocess)


def _parse_source(source: Any, where: str) -> HubSource | BuiltinSource | None:
    if source is None:
        return None
    if not isinstance(source, Mapping):
        raise ProbeError(f"{where}: [source] must be a table")
    _check_keys(source, _SOURCE_KEYS, f"{where} [source]")
    if "builtin" in source:
        if set(source) - {"builtin", "split"}:
            raise ProbeError(f"{where} [source]: 'builtin' cannot be combined with hub keys")
        return BuiltinSource(_need_str(source, "builtin", f"{where} [source]"))
    return HubSource(
        repo=_need_str(source, "hub", f"{where} [source]"),
        file=_need_str(source, "file", f"{where} [source]"),
        revision=_need_str(source, "revision", f"{where} [source]", required=False),
        split=_need_str(source, "split", f"{where} [source]", required=False),
    )


def load_task_file(path: str | Path) -> TaskSpec:
    """Read one task definition from a TOML file (a user's own task, outside the package)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProbeError(f"cannot read task definition {path}: {exc.strerror or exc}") from exc
    return _spec_from_toml(text, str(path))


def _spec_from_toml(text: str, where: str) -> TaskSpec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProbeError(f"{where}: not valid TOML ({exc})") from exc
    return spec_from_mapping(raw, where, definition=where)


@functools.lru_cache(maxsize=1)
def _shipped_specs() -> dict[str, TaskSpec]:
    specs: dict[str, TaskSpec] = {}
    for entry in sorted(resources.files(__package__).joinpath("defs").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        where = f"ggml_probe/tasks/defs/{entry.name}"
        spec = _spec_from_toml(entry.read_text(encoding="utf-8"), where)
        if spec.name != entry.name[: -len(".toml")]:
            raise ProbeError(f"{where}: name {spec.name!r} must match the file name")
        specs[spec.name] = spec
    return specs


def list_tasks() -> list[TaskSpec]:
    """Every task defined in ggml_probe/tasks/defs/, sorted by name."""
    return [spec for _, spec in sorted(_shipped_specs().items())]


def get_task(name: str) -> TaskSpec:
    """A shipped task by name, or a task definition read from a .toml file path.

    An unknown name raises ProbeError listing the known tasks, closest matches first.
    """
    specs = _shipped_specs()
    if name in specs:
        return specs[name]
    if name.endswith(".toml") or Path(name).expanduser().is_file():
        return load_task_file(name)
    lowered = {n.lower(): n for n in specs}
    if name.lower() in lowered:
        return specs[lowered[name.lower()]]
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(lowered[c] for c in close)}? " if close else ""
    raise ProbeError(f"unknown task {name!r}; {hint}known tasks: {', '.join(sorted(specs))} (or give a task .toml file)")


def parse_label_map(text: str) -> dict[str, str]:
    """'0=No,1=Yes' → {'0': 'No', '1': 'Yes'}: gold values (as the data holds them) → label words."""
    out: dict[str, str] = {}
    for item in text.split(","):
        value, sep, word = item.partition("=")
        value, word = value.strip(), word.strip()
        if not sep or not value or not word:
            raise ProbeError(f"--label-map: {item.strip()!r} is not VALUE=WORD (e.g. --label-map 0=No,1=Yes)")
        if value in out and out[value] != word:
            raise ProbeError(f"--label-map: {value!r} maps to both {out[value]!r} and {word!r}")
        out[value] = word
    return out


def positional_gold_values(labels: Sequence[str]) -> dict[str, str]:
    """Integer gold labels by position in the label list (0 → the first word, 1 → the second, ...), the
    layout of most classification data sets (SST-2, GLUE: `label` 0/1). None when a label word is itself
    an integer (star ratings '1'..'5'): such words match the data's values as they are."""
    if any(_is_integer(w) for w in labels):
        return {}
    return {str(i): w for i, w in enumerate(labels)}


def _is_integer(word: str) -> bool:
    try:
        int(word.strip())
    except ValueError:
        return False
    return True


def generic_task_name(task: str | None, data_path: str | os.PathLike | None) -> str:
    """The name of a task built from --template: the --task given, unless that names a shipped task (the
    CLI's default boolq), then the data file's name (sst2.csv → sst2), so its errors and run directories
    never speak of a task it is not."""
    if task and task not in _shipped_specs() and not task.endswith(".toml"):
        return task
    return Path(data_path).stem if data_path else "custom"


def make_task(
    template: str,
    labels: list[str] | tuple[str, ...] | None,
    gold_column: str,
    id_column: str | None = None,
    *,
    name: str = "custom",
    gold_values: Mapping[str, str] | None = None,
    columns: Mapping[str, list[str] | str] | None = None,
    description: str = "",
    choices: Mapping[str, Any] | None = None,
) -> TaskSpec:
    """A task built from arguments, for a local data file (load it with `load_examples(spec, data_path)`).

    template: str.format template whose fields name columns, e.g. "Q: {question}\\nA:".
    labels: the label words; gold values match them case-insensitively.
    gold_values: extra gold spellings, e.g. {"1": "True", "0": "False"}.
    columns: aliases, e.g. {"question": ["question", "query"]}.
    choices: a multiple-choice task, as the [choices] table of a definition ({"columns": ["sol1", "sol2"]} or
    {"column": "endings", "count": 4}); labels may then be None (named after the columns).
    """
    raw: dict[str, Any] = {
        "name": name,
        "template": template,
        **({"labels": list(labels)} if labels else {}),
        "gold": {"column": gold_column, **({"values": dict(gold_values)} if gold_values else {})},
        "prompt_origin": "user",
        "description": description,
    }
    if id_column is not None:
        raw["id_column"] = id_column
    if columns:
        raw["columns"] = dict(columns)
    if choices:
        raw["choices"] = dict(choices)
    return spec_from_mapping(raw, f"task {name!r}")
