"""The GPT-1 paper's fine-tuning tasks (Tables 2 to 4) as TensorFlow Datasets builders.

Each task names its TFDS datasets, the conversion of their records to examples
(`tfds_records`) and its splits; `tfds_loader` prepares each builder once under
``data_dir`` as ``array_record`` files and reads them back without TensorFlow. Importing
this module is cheap: TFDS and the builders' modules are imported on the first ``load``.

Story Cloze has no training split (ROCStories' training stories have no wrong endings):
as GPT-1 did, the task trains on the labelled 2016 validation set minus a held-out part
used for model selection (`tfds_loader.STORY_CLOZE_HELD_OUT_EVERY`), and reports on the
labelled 2016 test set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from gptjax.tasks.spec import Example, TaskSpec
from gptjax.tasks.tfds_loader import TfdsLoader
from gptjax.tasks.tfds_records import (
    glue_examples,
    nli_examples,
    race_question_example,
    story_cloze_examples,
)

STORY_CLOZE_MANUAL_FILES = ("cloze_test_val__spring2016.csv", "cloze_test_test__spring2016.csv")
STORY_CLOZE_FORM = "https://www.cs.rochester.edu/nlp/rocstories/"


# ----------------------------------------------------------------------------------------
# The tasks.


def _task(
    name: str,
    kind: str,
    datasets: tuple[str, ...],
    convert: Callable[[Mapping[str, Any]], list[Example]],
    *,
    eval_splits: tuple[str, ...] = ("validation",),
    test_splits: tuple[str, ...] = ("test",),
    splits: Mapping[str, tuple[str, str]] | None = None,
    manual_files: tuple[str, ...] = (),
    manual_hint: str = "",
    split_datasets: Mapping[str, tuple[str, ...]] | None = None,
    **spec: Any,
) -> TaskSpec:
    if splits is None:
        splits = {s: (s, "all") for s in ("train", *eval_splits, *test_splits)}
        # A split read from other datasets is their test split (MNLI's test_ax: glue/ax's).
        splits.update({s: ("test", "all") for s in split_datasets or {}})
    load = TfdsLoader(
        name, datasets, convert, splits, manual_files, manual_hint, dict(split_datasets or {})
    )
    return TaskSpec(
        name=name,
        kind=kind,
        load=load,
        eval_splits=eval_splits,
        test_splits=test_splits,
        **spec,
    )


def _glue(
    name: str, kind: str, fields: tuple[str, ...], submission: str, regression: bool = False, **spec
) -> TaskSpec:
    convert = functools.partial(glue_examples, fields=fields, regression=regression)
    return _task(
        name,
        kind,
        (f"glue/{name}",),
        convert,
        regression=regression,
        submission={"test": submission},
        **spec,
    )


_ACCURACY = ("accuracy",)
_ENTAILMENT_NEUTRAL_CONTRADICTION = ("entailment", "neutral", "contradiction")
_ENTAILMENT_NOT = ("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")
_LEVELS = ("middle", "high")  # RACE's school levels

_TASKS = (
    # Classification.
    _glue(
        "cola",
        "classification",
        ("sentence",),
        "CoLA.tsv",
        label_names=("unacceptable", "acceptable"),
        metrics=("mcc",),
        paper={"mcc": 45.4},
        description="CoLA: is the sentence grammatical English (GLUE)",
    ),
    _glue(
        "sst2",
        "classification",
        ("sentence",),
        "SST-2.tsv",
        label_names=("negative", "positive"),
        metrics=_ACCURACY,
        paper={"accuracy": 91.3},
        description="SST-2: sentiment of a movie review sentence (GLUE)",
    ),
    # Semantic similarity.
    _glue(
        "mrpc",
        "similarity",
        _PAIR,
        "MRPC.tsv",
        label_names=("not_equivalent", "equivalent"),
        metrics=("f1", "accuracy"),
        paper={"f1": 82.3},
        description="MRPC: are two news sentences paraphrases (GLUE)",
    ),
    _glue(
        "qqp",
        "similarity",
        ("question1", "question2"),
        "QQP.tsv",
        label_names=("not_duplicate", "duplicate"),
        metrics=("f1", "accuracy"),
        paper={"f1": 70.3},
        description="QQP: are two Quora questions duplicates (GLUE)",
    ),
    _glue(
        "stsb",
        "similarity",
        _PAIR,
        "STS-B.tsv",
        regression=True,
        metrics=("pearson", "spearman"),
        paper={"pearson": 82.0},
        description="STS-B: similarity of two sentences, a score from 0 to 5 (GLUE)",
    ),
    # Natural language inference.
    _task(
        "mnli",
        "entailment",
        ("glue/mnli",),
        functools.partial(glue_examples, fields=("premise", "hypothesis")),
        eval_splits=("validation_matched", "validation_mismatched"),
        # GLUE's diagnostic set (its test split only), predicted with the MNLI model.
        test_splits=("test_matched", "test_mismatched", "test_ax"),
        split_datasets={"test_ax": ("glue/ax",)},
        label_names=_ENTAILMENT_NEUTRAL_CONTRADICTION,
        metrics=_ACCURACY,
        # The paper's test accuracies: matched 82.1, mismatched 81.4.
        paper={
            "accuracy": 82.1,
            **{f"{s}_mismatched/accuracy": 81.4 for s in ("validation", "test")},
        },
        submission={
            "test_matched": "MNLI-m.tsv",
            "test_mismatched": "MNLI-mm.tsv",
            "test_ax": "AX.tsv",
        },
        description="MultiNLI: entailment, neutral or contradiction, ten genres (GLUE)",
    ),
    _glue(
        "qnli",
        "entailment",
        ("question", "sentence"),
        "QNLI.tsv",
        label_names=_ENTAILMENT_NOT,
        metrics=_ACCURACY,
        paper={"accuracy": 88.1},
        description="QNLI: does a Wikipedia sentence answer the question (GLUE)",
    ),
    _glue(
        "rte",
        "entailment",
        _PAIR,
        "RTE.tsv",
        label_names=_ENTAILMENT_NOT,
        metrics=_ACCURACY,
        paper={"accuracy": 56.0},
        description="RTE: does the first sentence entail the second (GLUE)",
    ),
    _task(
        "snli",
        "entailment",
        ("snli",),
        nli_examples,
        label_names=_ENTAILMENT_NEUTRAL_CONTRADICTION,
        metrics=_ACCURACY,
        paper={"accuracy": 89.9},
        description="SNLI: entailment, neutral or contradiction for image captions",
    ),
    _task(
        "scitail",
        "entailment",
        ("sci_tail",),  # TFDS's only config: the tsv files (premise, hypothesis, label).
        nli_examples,
        label_names=("entails", "neutral"),
        metrics=_ACCURACY,
        paper={"accuracy": 88.3},
        description="SciTail: does a science text entail the answer statement",
    ),
    # Question answering and commonsense reasoning.
    # One model trained on both levels and scored on each: the paper's RACE figure is
    # the question-weighted mean of its RACE-m and RACE-h ones over the test sets (1,436
    # and 3,498 questions: (62.9 x 1,436 + 57.4 x 3,498) / 4,934 = 59.0).
    _task(
        "race",
        "multiple_choice",
        ("race/middle", "race/high"),
        race_question_example,
        eval_splits=("validation", "validation_middle", "validation_high"),
        test_splits=("test", "test_middle", "test_high"),
        splits={
            **{s: (s, "all") for s in ("train", "validation", "test")},
            **{f"{s}_{level}": (s, "all") for s in ("validation", "test") for level in _LEVELS},
        },
        split_datasets={
            f"{s}_{level}": (f"race/{level}",) for s in ("validation", "test") for level in _LEVELS
        },
        # Both levels are their splits' examples in the order of `datasets`.
        parts={s: tuple(f"{s}_{level}" for level in _LEVELS) for s in ("validation", "test")},
        num_choices=4,
        metrics=_ACCURACY,
        paper={
            "accuracy": 59.0,
            **{f"{s}_middle/accuracy": 62.9 for s in ("validation", "test")},
            **{f"{s}_high/accuracy": 57.4 for s in ("validation", "test")},
        },
        description="RACE: reading comprehension, middle and high school English exams "
        "(RACE-m and RACE-h: its splits of one level)",
    ),
    _task(
        "story_cloze",
        "multiple_choice",
        ("story_cloze/2016",),
        story_cloze_examples,
        splits={
            "train": ("validation", "rest"),
            "validation": ("validation", "held_out"),
            "test": ("test", "all"),
        },
        manual_files=STORY_CLOZE_MANUAL_FILES,
        manual_hint=(
            f"request the Story Cloze Test (spring 2016) at {STORY_CLOZE_FORM}, save its "
            f"validation and test CSVs (ISO-8859-1/Latin-1, used as they come) as "
            f"{' and '.join(STORY_CLOZE_MANUAL_FILES)}"
        ),
        num_choices=2,
        metrics=_ACCURACY,
        paper={"accuracy": 86.5},
        description="Story Cloze 2016: the right ending of a four-sentence story",
    ),
)

TFDS_TASKS: dict[str, TaskSpec] = {task.name: task for task in _TASKS}
