"""The zero-shot tasks' examples (`--mode=zeroshot`, `gptjax.zeroshot`).

Tasks come from the fine-tuning task registry (TFDS, validation splits, prepared under
the data cache) or from your JSON-lines files, one object per line (`FILE_FIELDS`):

    sst2  {"sentence": "a gripping film", "label": 1}       1 positive, 0 negative (GLUE's)
    cola  {"sentence": "The book was read.", "label": 1}    1 acceptable, 0 unacceptable
    race  {"context": "ARTICLE QUESTION", "choices": ["A", "B", ...], "label": 0}
    dprd  {"sentence": "The trophy doesn't fit in the suitcase because _ is too big.",
           "candidates": ["the trophy", "the suitcase"], "label": 0}

DPRD (Rahman & Ng's Definite Pronoun Resolution Dataset) is not in TFDS: it needs its
file. Its sentence marks the pronoun with one `_` (MARKER); labels index the candidates.
Every problem with a file is a one-line error naming the line and the fix.
"""

import json
import os
import random
from collections.abc import Sequence

import ml_collections

from gptjax.data.corpus import cache_dir
from gptjax.errors import UserError
from gptjax.tasks import registry
from gptjax.tasks.spec import Example

TASKS = ("sst2", "cola", "race", "dprd")
# What stands for the pronoun in a DPRD sentence.
MARKER = "_"
# Each task's fields in a user file: its text field(s), then the label.
FILE_FIELDS = {
    "sst2": ("sentence", "label"),
    "cola": ("sentence", "label"),
    "race": ("context", "choices", "label"),
    "dprd": ("sentence", "candidates", "label"),
}
_OPTION = "--config.zeroshot."


def task_names(zs: ml_collections.ConfigDict) -> list[str]:
    """The tasks of `zeroshot.tasks`, checked against the settings."""
    names = list(dict.fromkeys(n.strip() for n in zs.tasks.split(",") if n.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(
            f"unknown zero-shot task(s) {unknown or zs.tasks!r}; set {_OPTION}tasks to a "
            f"comma-separated list of {', '.join(TASKS)}"
        )
    for name in TASKS:
        for setting in [f"{name}_path", *(["cola_train_path"] if name == "cola" else [])]:
            if zs[setting] and name not in names:
                raise UserError(
                    f"{_OPTION}{setting} is set but {name} is not in zeroshot.tasks; add it: "
                    f"{_OPTION}tasks={','.join([*names, name])}"
                )
    if "dprd" in names and not zs.dprd_path:
        raise UserError(
            f"DPRD is not in TFDS: set {_OPTION}dprd_path to its JSON-lines file (fields "
            f"sentence with the pronoun as {MARKER}, candidates, label)"
        )
    if zs.max_examples < 0 or zs.batch_size <= 0:
        raise UserError(
            f"zeroshot.max_examples must be >= 0 and zeroshot.batch_size positive (got "
            f"{zs.max_examples}, {zs.batch_size})"
        )
    return names


def read_file(name: str, path: str, option: str) -> list[Example]:
    """The examples of a user's JSON-lines file for task `name` (fields: FILE_FIELDS)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check {_OPTION}{option}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 JSON lines") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            examples.append(_file_example(name, path, number, line))
    if not examples:
        raise UserError(f"{path} has no examples; check {_OPTION}{option}")
    return examples


def _file_example(name: str, path: str, number: int, line: str) -> Example:
    where = f"line {number} of {path}"
    fields = FILE_FIELDS[name]
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}); write one object per line") from None
    if not isinstance(row, dict):
        raise UserError(f"{where} is a JSON {type(row).__name__}; write one object per line")
    missing = [f for f in fields if f not in row]
    if missing:
        raise UserError(
            f"{where} lacks field(s) {', '.join(missing)}; {name} rows need {', '.join(fields)}"
        )
    text, label = row[fields[0]], row["label"]
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: {fields[0]!r} must be a non-empty string")
    choices: tuple[str, ...] = ()
    if len(fields) == 3:
        choices = row[fields[1]]
        if not (isinstance(choices, list) and len(choices) >= 2):
            raise UserError(f"{where}: {fields[1]!r} must be a list of at least 2 strings")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise UserError(f"{where}: {fields[1]!r} must hold non-empty strings")
        choices = tuple(c.strip() for c in choices)
    count = len(choices) or 2
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < count:
        raise UserError(f"{where}: label {label!r} must be an integer from 0 to {count - 1}")
    if name == "dprd" and text.count(MARKER) != 1:
        raise UserError(
            f"{where}: mark the pronoun with exactly one {MARKER!r} (found {text.count(MARKER)})"
        )
    if name == "dprd" and not text.split(MARKER)[1].strip():
        raise UserError(f"{where}: nothing follows the pronoun {MARKER!r} to score")
    return Example(texts=(text.strip(),), label=label, choices=choices, uid=number)


def sample(examples: Sequence[Example], limit: int) -> list[Example]:
    """At most `limit` labelled examples (0: all): a fixed random sample, in order."""
    examples = [ex for ex in examples if ex.label is not None]
    if not limit or len(examples) <= limit:
        return examples
    return [examples[i] for i in sorted(random.Random(0).sample(range(len(examples)), limit))]


def load_examples(config, name: str) -> tuple[list[Example], list[Example]]:
    """Task `name`'s evaluated examples and (CoLA) the training ones its threshold is fit on."""
    zs = config.zeroshot
    data_dir = os.path.join(cache_dir(config.data), "tfds")  # as fine-tuning prepares them
    task = None
    if zs[f"{name}_path"]:
        examples = read_file(name, zs[f"{name}_path"], f"{name}_path")
    else:
        task = registry.get_task(ml_collections.ConfigDict({"name": name}))
        examples = task.load(task.eval_splits[0], data_dir)
    fit: Sequence[Example] = ()
    if name == "cola":
        if zs.cola_train_path:
            fit = read_file(name, zs.cola_train_path, "cola_train_path")
        elif zs.cola_path:
            raise UserError(
                f"CoLA's threshold is chosen on labelled training sentences, never the evaluated "
                f"ones: set {_OPTION}cola_train_path (same format as cola_path)"
            )
        else:
            task = task or registry.get_task(ml_collections.ConfigDict({"name": name}))
            fit = task.load(task.train_split, data_dir)
    return sample(examples, zs.max_examples), sample(fit, zs.max_examples)
