"""Reading task data files into (row number, record) pairs, keeping malformed rows as reasons.

Row numbers are what a person needs to find the row: for .jsonl and .csv/.tsv the 1-based line
on which the row starts (a CSV header is line 1, so the first data row of a plain CSV is line 2;
a quoted field with newlines makes a row span several lines); for .json arrays and .parquet the
1-based position of the record.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from ..errors import ProbeError

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")

# A record is a dict of column -> value, or a string saying why the row could not be read.
Record = tuple[int, "dict[str, Any] | str"]


class Table:
    """The columns a data file has, and its records."""

    def __init__(self, columns: Sequence[str], records: Sequence[Record] | None = None, loader=None):
        self.columns = list(columns)
        self._records = records
        self._loader = loader  # parquet: read only the columns the task uses

    def records(self, wanted: Sequence[str]) -> Sequence[Record]:
        if self._records is not None:
            return self._records
        return self._loader(list(wanted))


def open_table(path: Path) -> Table:
    """Parse a data file by its suffix; file-level problems raise ProbeError, row-level ones become records."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ProbeError(f"{path}: unsupported data format {suffix or '(no suffix)'}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json_array(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    return _read_parquet(path)


def _union_columns(records: Sequence[Record]) -> list[str]:
    seen: dict[str, None] = {}
    for _, rec in records:
        if isinstance(rec, dict):
            seen.update(dict.fromkeys(rec))
    return list(seen)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _read_jsonl(path: Path) -> Table:
    records: list[Record] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                records.append((line_no, "not UTF-8 text"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                records.append((line_no, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                records.append((line_no, f"not a JSON object (a {type(obj).__name__})"))
                continue
            records.append((line_no, obj))
    return Table(_union_columns(records), records)


def _read_json_array(path: Path) -> Table:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ProbeError(f"{path}: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        hint = " (one object per line? name it .jsonl)" if "Extra data" in exc.msg else ""
        raise ProbeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}){hint}") from exc
    if not isinstance(data, list):
        raise ProbeError(f"{path}: a .json data file must hold a list of objects, not a {type(data).__name__}")
    records: list[Record] = [
        (i, obj if isinstance(obj, dict) else f"not a JSON object (a {type(obj).__name__})")
        for i, obj in enumerate(data, 1)
    ]
    return Table(_union_columns(records), records)


def _read_csv(path: Path, delimiter: str) -> Table:
    records: list[Record] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise ProbeError(f"{path}: empty file (a CSV needs a header row naming its columns)")
            header = [h.strip() for h in header]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise ProbeError(f"{path}: the header repeats column(s) {', '.join(dupes)}")
            last_line = reader.line_num
            for row in reader:
                start, last_line = last_line + 1, reader.line_num
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    records.append((start, f"has {len(row)} fields, the header has {len(header)}"))
                    continue
                records.append((start, dict(zip(header, row))))
    except UnicodeDecodeError as exc:
        raise ProbeError(f"{path}: not UTF-8 text") from exc
    except csv.Error as exc:
        raise ProbeError(f"{path}: unreadable CSV near line {reader.line_num}: {exc}") from exc
    return Table(header, records)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        columns = pq.ParquetFile(path).schema_arrow.names
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for anything unreadable
        raise ProbeError(f"{path}: not a readable parquet file ({_short(str(exc))})") from exc

    def load(wanted: list[str]) -> list[Record]:
        table = pq.read_table(path, columns=[c for c in wanted if c in columns])
        return list(enumerate(table.to_pylist(), 1))

    return Table(columns, loader=load)

