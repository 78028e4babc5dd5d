"""A task from the user's own files: a training file, an evaluation file, optionally a test file.

Formats, by extension: ``.jsonl`` (one JSON object per line; blank lines are skipped),
``.csv`` and ``.tsv`` (a header row naming the columns; read with Python's csv module,
dialects ``excel`` and ``excel-tab``, so fields may be quoted with ``"``). A UTF-8 byte
order mark is ignored.

Which fields hold what is configured, not guessed: ``text_fields`` names the text(s) in the
order the task's input transformation reads them, ``label_field`` the label and, for
multiple choice, ``choices_field`` a list of candidate answers (a JSON list; in CSV/TSV a
JSON-encoded list in one cell, e.g. ``["yes", "no"]``).

Labels of classification, entailment and similarity-as-classes may be strings, integers or
(JSON) booleans; the classes are the distinct labels of the training file, sorted
(numerically when they are all integers), and label i of the model is the i-th of those.
Regression labels are numbers; a multiple-choice label is the 0-based index of the right
answer among the row's choices. Every file is read and checked when the task is made, so a
bad row in the evaluation file is reported before any training rather than at the first
evaluation. Examples keep their row's 0-based index in its file as ``uid``.
"""

from __future__ import annotations

import decimal
import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from gptjax.errors import UserError
from gptjax.tasks.file_tables import EXTENSIONS, ROLES, Table, codec_for, opt, read_table
from gptjax.tasks.spec import KINDS, Example, TaskSpec

__all__ = ["EXTENSIONS", "load_file_task"]

_INTEGER = re.compile(r"[+-]?\d+")
# The second class F1 is computed for without task.positive_label: 1 of 0/1, true of
# false/true (in any case: CSV files write True/False).
POSITIVE = ("1", "true")


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_file_task(
    kind: str,
    train_path: str,
    eval_path: str,
    text_fields: str | Sequence[str],
    label_field: str,
    choices_field: str = "",
    regression: bool = False,
    encoding: str = "utf-8",
    test_path: str = "",
    positive_label: str = "",
) -> TaskSpec:
    """Reads and checks the files and returns the task ``custom`` made of them.

    ``load(split, data_dir)`` gives the examples of the training file for ``train``, the
    evaluation file for ``validation`` and the test file (``test_path``, whose labels may
    be missing) for ``test``; ``data_dir`` is not used. Anything wrong with the settings
    or the files raises UserError naming the file, the line and the fix.

    Metrics: accuracy; for similarity with two classes also F1 of the positive class:
    ``positive_label`` when given (it becomes label 1), else ``1`` of ``0``/``1`` or
    ``true`` of ``false``/``true`` (with other labels F1 needs ``positive_label``: sorted
    names say nothing about which class is the positive one); Pearson and Spearman
    correlation for regression.
    """
    fields = text_field_names(text_fields)
    _check_settings(kind, fields, label_field, choices_field, regression, train_path, eval_path)
    codec = codec_for(encoding)
    paths = {"train": train_path, "validation": eval_path}
    if test_path:
        paths["test"] = test_path
    tables = {split: read_table(split, path, codec, encoding) for split, path in paths.items()}

    reader = _ExampleReader(kind, fields, label_field, choices_field, regression)
    label_names: tuple[str, ...] = ()
    if kind != "multiple_choice" and not regression:
        label_names = reader.set_classes(tables["train"], positive_label)
    elif positive_label:
        raise UserError(f"{opt('positive_label')} applies to classes, not to {kind} tasks")
    examples = {split: tuple(reader.examples(table)) for split, table in tables.items()}

    if regression:
        metrics: tuple[str, ...] = ("pearson", "spearman")
    elif (
        kind == "similarity"
        and len(label_names) == 2
        and (positive_label or label_names[1].lower() in POSITIVE)
    ):
        metrics = ("accuracy", "f1")
    elif kind == "similarity" and len(label_names) == 2:
        metrics = ("accuracy",)
        logging.info(
            "F1 needs the positive class: set %s to %s or %s",
            opt("positive_label"),
            *map(repr, label_names),
        )
    else:
        metrics = ("accuracy",)

    def load(split: str, data_dir: str) -> Sequence[Example]:
        del data_dir  # The examples were read from the user's files above.
        if split not in examples:
            hint = f"; set {opt('test_path')} for a test split" if split == "test" else ""
            raise UserError(
                f"the custom task has no {split!r} split ({_listing(list(examples))}){hint}"
            )
        return examples[split]

    described = ", ".join(f"{ROLES[s][0]} {p}" for s, p in paths.items())
    return TaskSpec(
        name="custom",
        kind=kind,
        load=load,
        metrics=metrics,
        test_splits=("test",) if test_path else (),
        label_names=label_names,
        regression=regression,
        num_choices=reader.num_choices or 0,
        description=f"your {kind} task from files ({described})",
    )


# ----------------------------------------------------------------------------------------
# Settings.


def text_field_names(text_fields: str | Sequence[str]) -> tuple[str, ...]:
    """`task.text_fields` as names: "premise, hypothesis" and ("premise", "hypothesis")
    are ("premise", "hypothesis")."""
    if isinstance(text_fields, str):
        text_fields = text_fields.split(",")
    return tuple(f.strip() for f in text_fields if f.strip())


def _check_settings(kind, fields, label_field, choices_field, regression, train_path, eval_path):
    if kind not in KINDS:
        raise UserError(
            f"unknown task kind {kind!r}; set {opt('kind')} to one of {', '.join(KINDS)}"
        )
    if kind == "multiple_choice":
        fits, wanted, example = bool(fields), "1 or more", "context"
    else:
        count = 1 if kind == "classification" else 2
        fits, wanted = len(fields) == count, str(count)
        example = "sentence" if count == 1 else "sentence1,sentence2"
    if not fits:
        raise UserError(
            f"a {kind} task reads {wanted} text field(s) but text_fields names {len(fields)} "
            f"({_listing(fields) or 'none'}); set {opt('text_fields')}={example} (comma-separated)"
        )
    if not label_field:
        raise UserError(f"no label field given; set {opt('label_field')} to the label's column")
    if kind == "multiple_choice" and not choices_field:
        raise UserError(
            f"a multiple_choice task needs the field holding each row's list of answers; set "
            f"{opt('choices_field')}"
        )
    if kind != "multiple_choice" and choices_field:
        raise UserError(
            f"choices_field is only for multiple_choice tasks, not {kind}; unset "
            f"{opt('choices_field')} or set {opt('kind')}=multiple_choice"
        )
    if regression and kind != "similarity":
        raise UserError(
            f"regression (a score per example) is only for similarity tasks, not {kind}; set "
            f"{opt('regression')}=False or {opt('kind')}=similarity"
        )
    named = [*fields, label_field] + ([choices_field] if choices_field else [])
    repeated = sorted({f for f in named if named.count(f) > 1})
    if repeated:
        raise UserError(
            f"field(s) {_listing(repeated)} named more than once among text_fields, label_field "
            f"and choices_field; each must be a different column"
        )
    for path, option in ((train_path, "train_path"), (eval_path, "eval_path")):
        if not path:
            raise UserError(
                f"a custom task needs a training and an evaluation file; set {opt(option)}"
            )


# ----------------------------------------------------------------------------------------
# Rows into examples.


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class _ExampleReader:
    """Turns rows into Examples for one task's settings, checking every field."""

    def __init__(self, kind, fields, label_field, choices_field, regression):
        self.kind, self.fields, self.label_field = kind, fields, label_field
        self.choices_field, self.regression = choices_field, regression
        self.classes: dict[str, int] = {}
        self.train_path = ""
        # The number of choices of the first multiple-choice row, and where it was.
        self.num_choices: int | None = None
        self.first_choices_at = ""

    # -- Classes --------------------------------------------------------------------------

    def set_classes(self, table: Table, positive: str = "") -> tuple[str, ...]:
        """The sorted distinct labels of the training file, which become the classes;
        with two, a `positive` one (the class F1 scores) is made the second."""
        self._check_columns(table)
        self.train_path = table.path
        keys: dict[str, None] = {}
        for line, row in table.rows:
            value = self._label_value(table, line, row)
            keys.setdefault(self._class_key(table, line, value), None)
        if all(_INTEGER.fullmatch(k) for k in keys):
            names = sorted(keys, key=decimal.Decimal)  # (int() refuses 4,300+ digits)
        else:
            names = sorted(keys)
            numbers = [k for k in names if _as_float(k) is not None]
            if len(numbers) == len(names):
                raise UserError(
                    f"the labels of {table.path} look like scores (e.g. {numbers[0]!r}), not "
                    f"classes; for a similarity score set {opt('regression')}=True, else use "
                    "integer or string class labels"
                )
        if len(names) < 2:
            raise UserError(
                f"the training file {table.path} has only {len(names)} distinct label "
                f"({_listing(names)}); a classifier needs examples of at least 2 classes"
            )
        if positive:
            positive = positive.strip()
            positive = str(int(positive)) if _INTEGER.fullmatch(positive) else positive
            if len(names) != 2 or positive not in names:
                raise UserError(
                    f"{opt('positive_label')}={positive!r} must be one of the 2 classes of "
                    f"{table.path}, which has {len(names)}: {_listing(names)}"
                )
            names = [n for n in names if n != positive] + [positive]
        self.classes = {name: i for i, name in enumerate(names)}
        return tuple(names)

    def _class_key(self, table: Table, line: int, value: Any) -> str:
        if isinstance(value, bool):  # E.g. BoolQ's true/false, spelled as JSON does.
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)  # (JSON's reader refuses an integer of 4,300+ digits)
        if isinstance(value, str):
            key = value.strip()
            # "01" and 1 are the same class (and a full-width "１": int() reads any
            # digits); int() refuses an integer of 4,300 digits or more, kept as written.
            if _INTEGER.fullmatch(key):
                try:
                    return str(int(key))
                except ValueError:
                    return key
            return key
        raise UserError(
            f"label {value!r} on line {line} of {table.path} is a JSON {type(value).__name__}; "
            "class labels must be strings, integers or booleans"
        )

    # -- Examples -------------------------------------------------------------------------

    def examples(self, table: Table):
        self._check_columns(table)
        for index, (line, row) in enumerate(table.rows):
            texts = self._texts(table, line, row)
            choices: tuple[str, ...] = ()
            if self.kind == "multiple_choice":
                choices = self._choices(table, line, row)
                label = self._choice_label(table, line, row, len(choices))
            elif self.regression:
                label = self._score(table, line, row)
            else:
                label = self._class(table, line, row)
            yield Example(texts=texts, label=label, choices=choices, uid=index)

    def _check_columns(self, table: Table) -> None:
        if table.columns is None:  # JSON lines: checked row by row.
            return
        required = [*self.fields] + ([self.choices_field] if self.choices_field else [])
        if table.split != "test":  # Test files may come without labels (GLUE's do).
            required.append(self.label_field)
        for name in required:
            if name not in table.columns:
                raise UserError(
                    f"the {table.role} file {table.path} has no column {name!r} (columns: "
                    f"{_listing(table.columns)}); fix the header or {self._setting_of(name)}"
                )

    def _setting_of(self, name: str) -> str:
        if name == self.label_field:
            return f"set {opt('label_field')}"
        if name == self.choices_field:
            return f"set {opt('choices_field')}"
        return f"set {opt('text_fields')}"

    def _field(self, table: Table, line: int, row: dict, name: str) -> Any:
        if name not in row:
            raise UserError(
                f"line {line} of {table.path} has no field {name!r} (its fields: "
                f"{_listing(list(row))}); add it or {self._setting_of(name)}"
            )
        return row[name]

    def _texts(self, table: Table, line: int, row: dict) -> tuple[str, ...]:
        texts = []
        for name in self.fields:
            value = self._field(table, line, row, name)
            if value is not None and not isinstance(value, str):
                raise UserError(
                    f"field {name!r} on line {line} of {table.path} is a JSON "
                    f"{type(value).__name__}, not a string; texts must be strings"
                )
            texts.append((value or "").strip())
        if self.kind == "multiple_choice":
            # Context parts may be empty (HellaSwag's second part often is), not all of them.
            texts = [" ".join(t for t in texts if t)]
            empty = list(self.fields) if not texts[0] else []
        else:
            empty = [name for name, text in zip(self.fields, texts, strict=True) if not text]
        if empty:
            raise UserError(
                f"line {line} of {table.path} has no text in {' or '.join(map(repr, empty))}; "
                "every example needs its text(s): fill them in or drop the row"
            )
        return tuple(texts)

    def _label_value(self, table: Table, line: int, row: dict) -> Any:
        """The raw label, or None on a test split without one."""
        if table.split == "test" and self.label_field not in row:
            return None
        value = self._field(table, line, row, self.label_field)
        if _is_missing(value):
            if table.split == "test":
                return None
            raise UserError(
                f"line {line} of {table.path} has no label ({self.label_field!r} is empty); every "
                f"{table.role} example needs one"
            )
        return value

    def _class(self, table: Table, line: int, row: dict) -> int | None:
        value = self._label_value(table, line, row)
        if value is None:
            return None
        key = self._class_key(table, line, value)
        if key not in self.classes:
            raise UserError(
                f"label {key!r} on line {line} of {table.path} does not occur in the training "
                f"file {self.train_path} (labels: {_listing(list(self.classes))}); correct the "
                "label or add training examples of it"
            )
        return self.classes[key]

    def _score(self, table: Table, line: int, row: dict) -> float | None:
        value = self._label_value(table, line, row)
        if value is None:
            return None
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        score = _as_float(value) if is_number or isinstance(value, str) else None
        if score is None or not math.isfinite(score):
            raise UserError(
                f"label {value!r} on line {line} of {table.path} is not a finite number; a "
                f"regression task needs numeric scores (or set {opt('regression')}=False for "
                "class labels)"
            )
        return score

    def _choices(self, table: Table, line: int, row: dict) -> tuple[str, ...]:
        value = self._field(table, line, row, self.choices_field)
        if isinstance(value, str):  # CSV/TSV, or a JSON string holding the list.
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):  # not JSON; a huge integer; deep nesting
                value = None
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(
                f"field {self.choices_field!r} on line {line} of {table.path} is not a JSON list "
                'of strings; write the answers as e.g. ["yes", "no", "maybe"]'
            )
        choices = tuple(v.strip() for v in value)
        if len(choices) < 2 or not all(choices):
            raise UserError(
                f"line {line} of {table.path} has {len(choices)} choice(s), some of them empty; "
                "a multiple-choice row needs at least 2 non-empty answers"
            )
        where = f"line {line} of {table.path}"
        if self.num_choices is None:
            self.num_choices, self.first_choices_at = len(choices), where
        elif len(choices) != self.num_choices:
            raise UserError(
                f"{where} has {len(choices)} choices but {self.first_choices_at} has "
                f"{self.num_choices}; rows with different numbers of choices are not supported: "
                "give every row (in all files) the same number"
            )
        return choices

    def _choice_label(self, table: Table, line: int, row: dict, count: int) -> int | None:
        value = self._label_value(table, line, row)
        if value is None:
            return None
        index = None
        if isinstance(value, int) and not isinstance(value, bool):
            index = value
        elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            index = int(value)
        if index is None:
            raise UserError(
                f"label {value!r} on line {line} of {table.path} is not an integer; a "
                "multiple-choice label is the index of the right answer (0 for the first)"
            )
        if not 0 <= index < count:
            raise UserError(
                f"label {index} on line {line} of {table.path} is out of range for its {count} "
                f"choices; labels count from 0, so use 0 to {count - 1}"
            )
        return index


def _as_float(value: int | float | str) -> float | None:
    """The number, or None: not a number, or an integer too large for a float."""
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None
