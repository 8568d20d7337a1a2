"""Data files -> records: JSONL, a JSON list, or a table (Parquet, Arrow, CSV, TSV), each record
with the line (a table's row) it comes from, so that every later problem is named `FILE:LINE`.

A file is read whole into memory (CSV as a stream) and must be UTF-8 (a byte-order mark is
dropped). Entries that are no record (invalid JSON, a non-object, a lone surrogate) are returned
as problems beside the records, not raised, so that they are reported (or skipped, with
`data.skip_invalid`) together with the records' own problems. Compressed files are refused by
name rather than read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

from lorakit.errors import UserError


MAX_REPORTED = 10  # line numbers kept in DataStats.skipped_lines and listed in an error
_SKIP_HINT = "fix it, or skip invalid records with data.skip_invalid: true (lorakit eval --skip-invalid)"
# What a JSON value nested past Python's recursion limit is told (json raises RecursionError for it).
TOO_DEEP = "nested too deeply to read (lists or objects about 1000 levels inside each other, past Python's recursion limit)"


def read_records(path: Union[str, Path], *, skip_invalid: bool = False) -> list[tuple[int, dict]]:
    """(line number, record) for every JSON object of a JSONL file or a JSON list (for a table
    file, `TABLE_SUFFIXES`: (row number, record) for every row).

    Raises:
        UserError: missing/unreadable/empty file, invalid JSON or a non-object record
            (`FILE:LINE: invalid JSON: <reason>`), unless `skip_invalid` skips such lines.
    """
    records, problems = read_with_problems(Path(path), skip_invalid=skip_invalid)
    if problems and not skip_invalid:
        raise_problems(str(path), problems)
    return records


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file, less a byte-order mark (Windows editors write one).

    Raises:
        UserError: bytes that are not UTF-8, named by their line (`FILE:LINE: not UTF-8 text`).
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def undecodable_byte(text: str) -> Optional[str]:
    """Where a command-line argument or terminal line holds bytes that were not UTF-8, else None.

    Python keeps such bytes as lone surrogates (U+DC80-U+DCFF, its `surrogateescape`), which no
    tokenizer can encode."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    code = ord(found.group())
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
    return f"{what} at character {found.start() + 1} is not UTF-8 text"


def read_with_problems(path: Path, *, skip_invalid: bool) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(records, (line, problem) of the entries that are no readable record). The problems are
    returned, not raised, so that they are reported with the records' own (`tokenize_records`).

    Raises:
        UserError: a file that is missing, not UTF-8, empty or not readable as a whole (a JSON
            list's syntax error, a CSV's unclosed quote).
    """
    if path.is_dir():
        raise UserError(f"data file {str(path)!r} is a folder; set data.train / data.eval to a file in it (.jsonl, .json, .parquet, .csv)")
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} not found; set data.train / data.eval to a .jsonl, .json, .parquet or .csv file")
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        raise UserError(f"data file {str(path)!r} is compressed, which lorakit does not read; decompress it (e.g. gunzip) and give the file")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _read_table(path)
    text = read_utf8(path)
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path}: the file is empty; write one JSON object per line (JSONL) or a JSON list")
    if stripped[0] == "[":
        records = _read_json_list(path, text, skip_invalid=skip_invalid)
        escaped = _SURROGATE_ESCAPE.search(text) is not None
        found = [lone_surrogate(r) if escaped else None for _, r in records]
        problems = [(line, problem) for (line, _), problem in zip(records, found) if problem is not None]
        records = [record for record, problem in zip(records, found) if problem is None]
    else:
        records, problems = _read_jsonl(path, text)
    if not records and not problems:
        raise UserError(f"{path}: no records in the file; write one JSON object per line (JSONL) or a JSON list")
    return records, problems


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


# Tables read as records, a row each: Parquet and Arrow (Hugging Face datasets' files; needs
# pyarrow: lorakit's `parquet` extra), numbered by row from 1; CSV and TSV (a header row, then
# a record a row; string cells only, so no chat messages), numbered by the line a row starts on,
# as JSONL records are. A missing value (a null cell, an empty CSV cell) is a key the record lacks:
# a column other rows fill, such as Alpaca's empty `input`.
TABLE_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv")


def _read_table(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(records, (line, problem) of the rows that are no record) of a table file."""
    if path.suffix.lower() in (".csv", ".tsv"):
        records, problems = _read_csv(path)
    else:
        records, problems = _read_arrow(path), []
    if not records and not problems:
        raise UserError(f"{path}: no rows in the table")
    return records, problems


def _read_csv(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    import csv

    csv.field_size_limit(2**31 - 1)  # whole documents in a cell: far beyond the module's 128 KiB default
    records, problems = [], []
    # Read as a stream, not decoded whole first: a StringIO of the text holds 4 bytes a character
    # besides it, 5-6x the file. A file read in text mode decodes a chunk ahead of the rows, so its
    # bad byte is named by the file's bytes (read_utf8), not by the row the reader is at.
    with open(path, newline="", encoding="utf-8-sig") as f:
        # strict: a quote never closed, or a cell going on after its closing quote, is an error, not
        # the rest of the file read as one cell (or the quotes dropped)
        reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
        line = 1
        try:
            header = next(reader, None)
            twice = next((name for i, name in enumerate(header or []) if name in header[:i]), None)
            if twice is not None:  # a row would keep one of its two cells, silently
                raise UserError(f"{path}:1: the header names the column {twice!r} twice; give each column its own name")
            while True:
                line = reader.line_num + 1  # where the next row starts (blank lines give empty rows)
                row = next(reader, None)
                if row is None:
                    break
                if not row:
                    continue
                if header is not None and len(row) > len(header):
                    problems.append((line, f"{len(row)} cells, more than the header's {len(header)}; quote cells that "
                                           "hold the delimiter"))  # fmt: skip
                    continue
                record = _Row((k, v) for k, v in zip(header, row) if v != "")
                record.empty = [k for k, v in zip(header, row) if v == ""]
                records.append((line, record))
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise UserError(f"{path}:{line}: a quoted cell of the row starting here is never closed (the file ends inside "
                                'it); close its quote, and write a quote inside a quoted cell twice ("")') from None  # fmt: skip
            if "expected after" in str(exc):
                raise UserError(f"{path}:{reader.line_num}: a cell goes on after its closing quote ({exc}); quote the whole "
                                'cell and write the quotes inside it twice ("")') from None  # fmt: skip
            raise UserError(f"{path}:{reader.line_num}: not readable as {path.suffix[1:].upper()} ({exc}); save it as UTF-8 "
                            "with quoted cells") from None  # fmt: skip
        except UnicodeDecodeError:
            read_utf8(path)  # raises, naming the bad byte's line
            raise
    return records, problems


class _Row(dict):
    """A CSV/TSV row as a record, which also knows its empty cells (`empty`): they are keys it
    lacks, and a record found invalid names them, since the reason is then often an empty cell."""

    empty: list[str] = []


def _read_arrow(path: Path) -> list[tuple[int, dict]]:
    suffix = path.suffix.lower()
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading {suffix} files needs pyarrow; pip install pyarrow (lorakit's `parquet` extra)") from None
    try:
        if suffix == ".parquet":
            table = pyarrow.parquet.read_table(path)
        else:  # datasets writes the Arrow stream format; the file format is the other one
            try:
                table = pyarrow.ipc.open_stream(path).read_all()
            except pyarrow.ArrowInvalid:
                table = pyarrow.ipc.open_file(path).read_all()
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable {suffix[1:]} file ({str(exc).splitlines()[0]})") from None
    return [(i, _without_nulls(row)) for i, row in enumerate(table.to_pylist(), 1)]


def _without_nulls(value: Any) -> Any:
    """A table row with the keys whose value is null left out, in nested objects too: Arrow gives a
    column of objects the keys of all its rows, null where a row has none (a tool call's arguments,
    a message's tool_calls), so it cannot tell a key the record lacks from a null one."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _read_jsonl(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    records, problems = [], []
    loads = json.loads
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except json.JSONDecodeError as exc:
            problems.append((lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        except RecursionError:
            problems.append((lineno, f"the record is {TOO_DEEP}"))
            continue
        if not isinstance(obj, dict):
            problems.append((lineno, f"expected a JSON object per line, got {kind_of(obj)}"))
            continue
        surrogate = lone_surrogate(obj) if _SURROGATE_ESCAPE.search(line) else None
        if surrogate is not None:
            problems.append((lineno, surrogate))
            continue
        records.append((lineno, obj))
    if problems and text.lstrip().startswith("{"):  # (a JSONL file of several objects is no one JSON value)
        _refuse_one_object(path, text)
    return records, problems


def _refuse_one_object(path: Path, text: str) -> None:
    """Raises UserError where a file whose lines are no JSON objects is one object written over
    several lines (pretty-printed), which its lines' errors would not tell."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return
    if isinstance(obj, dict):
        raise UserError(
            f"{path}: holds one JSON object written over several lines; a data file holds one object per line "
            "(JSONL) or a JSON list of objects: write each record on one line, or put them in [ ]"
        )


# A JSON escape of a UTF-16 surrogate: a lone one (\ud800 without its pair) decodes to no character,
# which the tokenizer cannot encode; only lines with such an escape are searched for one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(obj: Any, path: str = "") -> Optional[str]:
    """The problem of a record that holds a lone surrogate, in a string at `path` or a key, else None."""
    if isinstance(obj, str):
        found = _SURROGATE.search(obj)
        return None if found is None else f"'{path}' holds {_surrogate_escape(found)}"
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _SURROGATE.search(key)
            if found is not None:
                return f"a key{f' of {path!r}' if path else ''} holds {_surrogate_escape(found)}"
            problem = lone_surrogate(value, f"{path}.{key}" if path else key)
            if problem is not None:
                return problem
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            problem = lone_surrogate(value, f"{path}[{i}]")
            if problem is not None:
                return problem
    return None


def _surrogate_escape(found: re.Match) -> str:
    return f"\\u{ord(found.group()):04x}, half of a UTF-16 surrogate pair and no character (an escape cut in two)"


def _read_json_list(path: Path, text: str, *, skip_invalid: bool = False) -> list[tuple[int, dict]]:
    """Parse a JSON list element by element to know each record's line. A syntax error cannot
    be skipped here (the rest of the list cannot be re-synchronised), so it always raises.
    Where elements share a line (`json.dump` writes the list on one), the records are numbered by
    their place in the list instead, so that each has a number of its own."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    records: list[tuple[int, dict]] = []
    i = skip(skip(0) + 1)
    line, counted = 1, 0
    try:
        if i < len(text) and text[i] == "]":
            return records
        while True:
            line += text.count("\n", counted, i)
            counted = i
            try:
                obj, end = dec.raw_decode(text, i)
            except RecursionError:
                raise UserError(f"{path}:{line}: the list element is {TOO_DEEP}; fix that element") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{line}: expected a list of JSON objects, got {kind_of(obj)}; fix that element")
            records.append((line, obj))
            i = skip(end)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
            elif i < len(text) and text[i] == "]":
                break
            else:
                raise json.JSONDecodeError("expected ',' or ']' after a list element", text, i)
    except json.JSONDecodeError as exc:
        unskippable = " (data.skip_invalid cannot skip it: the rest of a list cannot be read past a syntax error)" if skip_invalid else ""
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}){unskippable}; fix the list") from None
    if len({line for line, _ in records}) < len(records):
        return [(n, record) for n, (_, record) in enumerate(records, 1)]
    return records


def kind_of(obj: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(obj), f"a number ({obj!r})" if isinstance(obj, (int, float)) else type(obj).__name__)


def raise_problems(source: str, problems: list[tuple[int, str]]) -> None:
    if len(problems) == 1:
        line, msg = problems[0]
        raise UserError(f"{source}:{line}: {msg}; {_SKIP_HINT}")
    listed = "\n  ".join(f"{source}:{line}: {msg}" for line, msg in problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    hint = _SKIP_HINT.replace("fix it", "fix them")
    raise UserError(f"{source}: {len(problems)} invalid records ({hint}):\n  {listed}{more}")
