"""Reading a task file into rows: JSON lines, or CSV/TSV with a header row (see
`files` for the formats). Every problem is a one-line error naming the file, the line
and the setting to fix."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import sys
from typing import Any

from gptjax.errors import UserError

EXTENSIONS = (".jsonl", ".csv", ".tsv")

# Messages name the settings as command-line overrides of the task config.
_OPTION = "--config.task."
# The roles of the files: split, the words for it in messages, its setting.
ROLES = {
    "train": ("training", "train_path"),
    "validation": ("evaluation", "eval_path"),
    "test": ("test", "test_path"),
}


def opt(name: str) -> str:
    """A task setting as a command-line override, for messages."""
    return _OPTION + name


def codec_for(encoding: str) -> str:
    """The codec that reads `encoding` (utf-8 also with a byte order mark)."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(
            f"unknown text encoding {encoding!r}; set {opt('encoding')} to a Python codec name "
            "such as utf-8 or latin-1"
        ) from None
    # utf-8-sig reads files with and without a byte order mark (Excel writes one).
    return "utf-8-sig" if name == "utf-8" else name


class Table:
    """The rows of one file: (line number, {field: value}) and, for CSV/TSV, the header."""

    def __init__(self, split: str, path: str, rows: list, columns: list[str] | None):
        self.split, self.path, self.rows, self.columns = split, path, rows, columns
        self.role = ROLES[split][0]


def read_table(split: str, path: str, codec: str, encoding: str) -> Table:
    role, option = ROLES[split]
    extension = os.path.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        raise UserError(
            f"the {role} file {path} has an unsupported extension {extension or '(none)'!r}; "
            f"use one of {', '.join(EXTENSIONS)} (JSON lines, comma- or tab-separated)"
        )
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"the {role} file {path} does not exist; check {opt(option)}") from None
    except IsADirectoryError:
        raise UserError(
            f"the {role} file {path} is a directory; set {opt(option)} to a file"
        ) from None
    except OSError as e:
        raise UserError(
            f"cannot read the {role} file {path} ({e.strerror}); check {opt(option)}"
        ) from None
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"line {line} of {path} is not valid {encoding} (byte 0x{data[e.start]:02x}); set "
            f"{opt('encoding')} to the file's encoding, e.g. latin-1 or cp1252"
        ) from None
    if extension == ".jsonl":
        rows, columns = _jsonl_rows(path, text), None
    else:
        rows, columns = _csv_rows(path, text, "excel-tab" if extension == ".tsv" else "excel")
    if not rows:
        raise UserError(f"the {role} file {path} has no examples; check {opt(option)}")
    return Table(split, path, rows, columns)


def _jsonl_rows(path: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # Not splitlines(): JSON strings may hold U+2028 and other line breaks of Unicode's.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"line {number} of {path} is not valid JSON ({e.msg}, column {e.colno}); write "
                "one JSON object per line"
            ) from None
        except (ValueError, RecursionError) as e:  # an integer of 4,300+ digits; deep nesting
            raise UserError(
                f"line {number} of {path} cannot be read as JSON ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'too deeply nested'}); write one flat "
                "JSON object per line"
            ) from None
        if not isinstance(value, dict):
            raise UserError(
                f"line {number} of {path} is a JSON {type(value).__name__}, not an object; write "
                'one object per line, e.g. {"sentence": "...", "label": 1}'
            )
        rows.append((number, value))
    return rows


def _csv_rows(path: str, text: str, dialect: str) -> tuple[list, list[str]]:
    # strict: a field that starts with a quote must be a whole quoted field (as
    # spreadsheets and pandas write them); otherwise (an unquoted `"Yes" he said`, or an
    # unbalanced quote that would swallow the next rows) it is an error, never rows
    # silently merged or quotes silently dropped.
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect, strict=True)
    kind = "tab" if dialect == "excel-tab" else "comma"
    end = 0  # the last line read (a quoted field may span several)
    # csv's default limit on a field, 131,072 characters, is not the file's: a long
    # document is a valid field. The limit is the module's, so it is put back after.
    field_limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # (a C long)
    try:
        header = [name.strip() for name in next(reader, [])]
        # (Columns without a name, a spreadsheet's empty trailing ones, can repeat.)
        repeated = sorted({name for name in header if name and header.count(name) > 1})
        if repeated:
            raise UserError(
                f"the header of {path} names the column(s) {', '.join(map(repr, repeated))} "
                "more than once; give every column its own name"
            )
        rows, end = [], reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num  # A quoted field may span several lines.
            if not any(value.strip() for value in values):  # A blank line.
                continue
            if len(values) != len(header):
                raise UserError(
                    f"line {start} of {path} has {len(values)} {kind}-separated fields but the "
                    f"header has {len(header)}; quote fields that contain the separator"
                )
            rows.append((start, dict(zip(header, values, strict=True))))
    except csv.Error as e:
        raise UserError(
            f"line {end + 1} of {path} is malformed ({e}); a field that starts with "
            '" must be quoted whole, its quotes doubled ("""Yes"" he said"), as spreadsheets '
            "and pandas write them; or write the file as .jsonl"
        ) from None
    finally:
        csv.field_size_limit(field_limit)
    return rows, header
