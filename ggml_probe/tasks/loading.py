"""Turning a task and its data into examples: prompts, gold label indices, and the rows that failed."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from .. import hub
from ..errors import HubError, ProbeError
from ..fsutil import sha256_file
from .preprocess import PREPROCESSORS
from .readers import Table, open_table
from .spec import BuiltinSource, HubSource, TaskSpec, get_task

OFFLINE_TASK = "yesno-mini"  # shipped with the package: works with no network at all
BAD_ROW_POLICIES = ("fail", "skip")
_SHOWN_BAD_ROWS = 3


@dataclass(frozen=True)
class Example:
    """One prompt to score.

    id: the id column's value as text, or the row number when the task or file has no id column.
    index: where the row is in the data file (see readers: line number for jsonl/csv, else position).
    gold: index into the task's label words; label: that word.
    fields: the template fields' values, by template field name, exactly as put into the prompt.
    choices: a multiple-choice example's answers, in label order (empty for a label-word task): each is
    scored as that example's label word would be (tasks.answers).
    """

    id: str
    index: int
    prompt: str
    gold: int
    label: str
    fields: Mapping[str, str]
    choices: tuple[str, ...] = ()

    def answer_words(self, labels: Sequence[str]) -> Sequence[str]:
        """What is scored after the prompt, in label order: the example's own choices, else the label words."""
        return self.choices or labels


class BadRow(NamedTuple):
    row: int
    reason: str


@dataclass
class TaskData:
    """The examples of a task, and what they were made from."""

    spec: TaskSpec
    examples: list[Example]
    labels: tuple[str, ...]
    bad_rows: list[BadRow]
    source: str  # the data file's path, or hf://datasets/REPO[@REV]/FILE, or builtin:FILE
    data_sha256: str
    rows_read: int  # data rows in the file, bad ones included
    columns: dict[str, str]  # logical name -> the column it was read from
    id_column: str | None  # the column ids came from; None: ids are row numbers
    limit: int | None = None
    seed: int | None = None
    local_path: str = field(default="", repr=False)  # where the file was read (the hub cache for hub data)

    def label_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.labels, 0)
        for ex in self.examples:
            counts[ex.label] += 1
        return counts

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for run manifests and reports."""
        return {
            "task": self.spec.name,
            "prompt_origin": self.spec.prompt_origin,
            "template": self.spec.template,
            "labels": list(self.labels),
            "source": self.source,
            "data_sha256": self.data_sha256,
            "rows_read": self.rows_read,
            "examples": len(self.examples),
            "label_counts": self.label_counts(),
            "bad_rows": len(self.bad_rows),
            "columns": dict(self.columns),
            "id_column": self.id_column,
            "limit": self.limit,
            "seed": self.seed,
        }


def load_examples(
    spec: TaskSpec | str,
    data_path: str | os.PathLike | None = None,
    limit: int | None = None,
    on_bad_row: str = "fail",
    seed: int | None = None,
) -> TaskData:
    """Read a task's data and build its examples.

    spec: a TaskSpec or a task name. data_path: a local .jsonl/.json/.csv/.tsv/.parquet file;
    without it the task's own source is used (a hub dataset file through the Hugging Face cache,
    or a file shipped in the package).

    Malformed rows (unparseable line, missing or empty field, gold value that maps to no label,
    repeated id) are collected with their row numbers. on_bad_row="fail" (default) raises
    ProbeError naming the first few if the file has any, anywhere in it, even beyond `limit`;
    "skip" leaves them out and lists them in `bad_rows`.

    limit: keep the first N valid examples in file order. With seed as well, keep a random
    sample of N (random.Random(seed)), still in file order; seed without limit changes nothing.
    """
    if isinstance(spec, str):
        spec = get_task(spec)
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ProbeError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, not {on_bad_row!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ProbeError(f"--limit must be a positive whole number, not {limit!r}")

    if data_path is not None:
        path = Path(data_path).expanduser()
        if not path.is_file():
            raise ProbeError(f"data file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
        return _load_file(spec, path, str(path), limit, on_bad_row, seed)
    if isinstance(spec.source, HubSource):
        path = fetch_hub_file(spec.source, spec.name)
        return _load_file(spec, path, spec.source.describe(), limit, on_bad_row, seed)
    if isinstance(spec.source, BuiltinSource):
        ref = resources.files(__package__).joinpath("data", spec.source.file)
        with resources.as_file(ref) as path:
            if not path.is_file():
                raise ProbeError(f"task {spec.name}: built-in data file {spec.source.file} is missing from the package")
            return _load_file(spec, path, spec.source.describe(), limit, on_bad_row, seed)
    raise ProbeError(f"task {spec.name} has no data source of its own; pass --data PATH")


def _resolve_columns(spec: TaskSpec, table: Table, where: str) -> tuple[dict[str, str], str | None]:
    """Pick, for each logical name, the first candidate column the file has."""
    resolved: dict[str, str] = {}
    choice_columns = spec.choices.columns if spec.choices else ()
    for logical in dict.fromkeys((*spec.template_fields, spec.gold_column, *choice_columns)):
        found = next((c for c in spec.candidates(logical) if c in table.columns), None)
        if found is None:
            looked = ", ".join(spec.candidates(logical))
            has = ", ".join(table.columns[:20]) + (", …" if len(table.columns) > 20 else "")
            raise ProbeError(
                f"task {spec.name}: {where} has no column for '{logical}' (looked for: {looked}); "
                f"its columns: {has or 'none'}"
            )
        resolved[logical] = found
    id_col = None
    if spec.id_column:
        # A missing id column is allowed: the same task then runs on copies without ids.
        id_col = next((c for c in spec.candidates(spec.id_column) if c in table.columns), None)
    return resolved, id_col


def _as_text(value: Any) -> str | None:
    """A field value as prompt text; None for values that cannot stand in a prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    return str(value)


def _load_file(
    spec: TaskSpec, path: Path, source: str, limit: int | None, on_bad_row: str, seed: int | None
) -> TaskData:
    table = open_table(path)
    resolved, id_col = _resolve_columns(spec, table, source)
    pre = PREPROCESSORS[spec.choices.preprocess] if spec.choices and spec.choices.preprocess else None
    reads = [c for c in (pre.reads if pre else ()) if c in table.columns]
    wanted = list(dict.fromkeys([*resolved.values(), *([id_col] if id_col else []), *reads]))
    records = table.records(wanted)

    examples: list[Example] = []
    bad: list[BadRow] = []
    first_seen: dict[str, int] = {}
    for row_no, rec in records:
        if isinstance(rec, str):
            bad.append(BadRow(row_no, rec))
            continue
        reason = None
        fields: dict[str, str] = {}
        derived = pre.derive(rec) if pre else {}
        for logical in spec.template_fields:
            column = resolved[logical]
            if logical in derived:
                fields[logical] = derived[logical]
                continue
            if column not in rec:
                reason = f"missing field '{column}'"
                break
            text = _as_text(rec[column])
            if text is None and rec[column] is not None:
                reason = f"field '{column}' is not text ({type(rec[column]).__name__})"
                break
            if text is None or not text.strip():
                reason = f"empty field '{column}'"
                break
            fields[logical] = text
        choices: tuple[str, ...] = ()
        if reason is None and spec.choices:
            choices, reason = _read_choices(spec, resolved, rec)
        gold = None
        if reason is None:
            gold_col = resolved[spec.gold_column]
            if gold_col not in rec:
                reason = f"missing field '{gold_col}'"
            elif _blank(rec[gold_col]):
                reason = f"empty field '{gold_col}'"
            else:
                gold = spec.gold_index(rec[gold_col])
                if gold is None:
                    shown = repr(rec[gold_col])
                    shown = shown if len(shown) <= 40 else shown[:39] + "…"
                    known = ", ".join(sorted(spec.gold_values))
                    reason = f"unknown label value {shown} in '{gold_col}' (known: {known})"
        ex_id = str(row_no)
        if reason is None and id_col is not None:
            if id_col not in rec:
                reason = f"missing field '{id_col}'"
            else:
                text = _as_text(rec[id_col])
                if text is None or not text.strip():
                    reason = f"empty field '{id_col}'"
                else:
                    ex_id = text
        if reason is None and ex_id in first_seen:
            reason = f"duplicate id {ex_id!r} (first at row {first_seen[ex_id]})"
        if reason is not None:
            bad.append(BadRow(row_no, reason))
            continue
        first_seen[ex_id] = row_no
        examples.append(
            Example(
                id=ex_id,
                index=row_no,
                prompt=spec.render(fields),
                gold=gold,
                label=spec.labels[gold],
                fields=fields,
                choices=choices,
            )
        )

    if bad and on_bad_row == "fail":
        shown = "; ".join(f"row {b.row}: {b.reason}" for b in bad[:_SHOWN_BAD_ROWS])
        more = f"; and {len(bad) - _SHOWN_BAD_ROWS} more" if len(bad) > _SHOWN_BAD_ROWS else ""
        raise ProbeError(
            f"task {spec.name}: {len(bad)} malformed row{'s' if len(bad) != 1 else ''} in {source} "
            f"({shown}{more}); fix them or pass --on-bad-row skip to leave them out"
        )
    if not examples:
        raise ProbeError(f"task {spec.name}: {source} has no usable rows ({len(bad)} malformed)")

    if limit is not None and limit < len(examples):
        if seed is None:
            examples = examples[:limit]
        else:
            keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
            examples = [examples[i] for i in keep]

    return TaskData(
        spec=spec,
        examples=examples,
        labels=spec.labels,
        bad_rows=bad,
        source=source,
        data_sha256=sha256_file(path),
        rows_read=len(records),
        columns=resolved,
        id_column=id_col,
        limit=limit,
        seed=seed,
        local_path=str(path),
    )


def choice_count(data_path: str | os.PathLike, column: str, task: str = "") -> int:
    """How many choices the first row of a data file lists in `column` (a generic multiple-choice task's count)."""
    path = Path(data_path).expanduser()
    table = open_table(path)
    if column not in table.columns:
        raise ProbeError(f"task {task}: {path} has no column '{column}' for the choices; its columns: "
                         f"{', '.join(table.columns[:20])}")
    for _row, rec in table.records([column]):
        if isinstance(rec, str):
            continue
        values = rec.get(column)
        values = values.tolist() if hasattr(values, "tolist") and not isinstance(values, str) else values
        if isinstance(values, (list, tuple)) and len(values) >= 2:
            return len(values)
        raise ProbeError(f"task {task}: column '{column}' of {path} holds no list of choices; name one column per "
                         "choice instead (--choices-column sol1,sol2)")
    raise ProbeError(f"task {task}: {path} has no rows")


def _read_choices(spec: TaskSpec, resolved: Mapping[str, str],
                  rec: Mapping[str, Any]) -> tuple[tuple[str, ...], str | None]:
    """A multiple-choice row's choices (cleaned by the task's preprocess), or why the row cannot be used."""
    ch = spec.choices
    columns = [resolved[c] for c in ch.columns]
    for column in columns:
        if column not in rec:
            return (), f"missing field '{column}'"
    if ch.in_list:
        values = rec[columns[0]]
        if hasattr(values, "tolist") and not isinstance(values, str):  # parquet list cells arrive as NumPy arrays
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            return (), f"field '{columns[0]}' is not a list of choices ({type(values).__name__})"
        if len(values) != ch.count:
            return (), f"field '{columns[0]}' has {len(values)} choices, the task expects {ch.count}"
    else:
        values = [rec[c] for c in columns]
    out = []
    for k, value in enumerate(values):
        text = _as_text(value)
        if text is not None and ch.preprocess:
            text = PREPROCESSORS[ch.preprocess].text(text)
        if text is None or not text.strip():
            where = f"{columns[0]}[{k}]" if ch.in_list else columns[k]
            return (), f"empty or non-text choice '{where}'"
        out.append(text)
    return tuple(out), None


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value)


# -- the Hugging Face hub ----------------------------------------------------------------------

# Offline mode as set now (huggingface_hub reads HF_HUB_OFFLINE only at import); kept under this name
# for the package's public API.
hub_offline = hub.offline


def fetch_hub_file(source: HubSource, task_name: str = "") -> Path:
    """Download (or find in the Hugging Face cache) one dataset file; failures raise HubError in one line.

    Offline (HF_HUB_OFFLINE=1), or when the hub does not answer, only the cache is consulted,
    so a file fetched once keeps working. HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME and HF_HUB_CACHE
    are read at call time, not frozen at import as huggingface_hub does (ggml_probe.hub).
    """
    import huggingface_hub  # slow to import (ggml_probe.hub): only when a task's data comes from the hub

    what = f"{'task ' + task_name + ': ' if task_name else ''}cannot get {source.describe()}"
    local_way = f"pass --data PATH with a local copy of the data (or use the built-in task {OFFLINE_TASK})"
    endpoint = hub.endpoint()
    # Unreachable: fail in seconds from the cache instead of after huggingface_hub's retries.
    cache_only = hub.offline() or not hub.endpoint_reachable(endpoint)
    cache = hub.cache_dir()
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                source.repo,
                source.file,
                repo_type="dataset",
                revision=source.revision,
                cache_dir=cache,
                endpoint=endpoint,
                local_files_only=cache_only,
            )
        )
    except Exception as exc:
        mapped = hub.hub_error(exc, source.repo, filename=source.file, revision=source.revision, cache_dir=cache,
                               repo_type="dataset")
        if mapped is None:
            raise
        advice = f"fix [source] in the task definition or {local_way}" if hub.classify(exc) in hub.NOT_FOUND else local_way
        raise HubError(f"{what}: {mapped}; {advice}") from exc
