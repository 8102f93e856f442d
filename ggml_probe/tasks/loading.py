"""Turning a task and its data into examples: prompts, gold label indices, and the rows that failed."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, NamedTuple
from urllib.parse import urlsplit

from ..errors import HubError, ProbeError
from ..fsutil import sha256_file
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
    """

    id: str
    index: int
    prompt: str
    gold: int
    label: str
    fields: Mapping[str, str]


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
    for logical in (*spec.template_fields, spec.gold_column):
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
    wanted = list(dict.fromkeys([*resolved.values(), *([id_col] if id_col else [])]))
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
        for logical in spec.template_fields:
            column = resolved[logical]
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


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value)


# -- the Hugging Face hub ----------------------------------------------------------------------

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether offline mode is asked for, read now: huggingface_hub reads HF_HUB_OFFLINE only at import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if var in os.environ:
            return os.environ[var].strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> str | None:
    """The hub cache folder from the environment as it is now (huggingface_hub froze it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _endpoint_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub, so that no network fails in seconds rather than after
    huggingface_hub's retries (about 25 s of backoff). Behind a proxy the direct connection
    proves nothing, so the check is skipped there."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlsplit(endpoint)
    if not url.hostname:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_hub_file(source: HubSource, task_name: str = "") -> Path:
    """Download (or find in the Hugging Face cache) one dataset file; failures raise HubError in one line.

    Offline (HF_HUB_OFFLINE=1), or when the hub does not answer, only the cache is consulted,
    so a file fetched once keeps working. HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME and HF_HUB_CACHE
    are read at call time, not frozen at import as huggingface_hub does.
    """
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    what = f"{'task ' + task_name + ': ' if task_name else ''}cannot get {source.describe()}"
    local_way = f"pass --data PATH with a local copy of the data (or use the built-in task {OFFLINE_TASK})"
    fix = f"fix [source] in the task definition or {local_way}"
    offline = hub_offline()
    endpoint = _hub_endpoint()
    unreachable = not offline and not _endpoint_reachable(endpoint)
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                source.repo,
                source.file,
                repo_type="dataset",
                revision=source.revision,
                cache_dir=_hub_cache_dir(),
                endpoint=endpoint,
                local_files_only=offline or unreachable,
            )
        )
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hugging Face hub ({endpoint}) cannot be reached"
        raise HubError(f"{what}: {why} and the file is not in the local Hugging Face cache; {local_way}") from exc
    except hf_errors.GatedRepoError as exc:
        raise HubError(
            f"{what}: the dataset is gated; accept its terms on huggingface.co and log in (hf auth login), or {local_way}"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise HubError(f"{what}: no such dataset repository on the hub (or it is private); {fix}") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise HubError(f"{what}: revision {source.revision!r} does not exist; {fix}") from exc
    except hf_errors.EntryNotFoundError as exc:
        raise HubError(f"{what}: the repository has no file {source.file!r}; {fix}") from exc
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"{what}: {first}; {local_way}") from exc
