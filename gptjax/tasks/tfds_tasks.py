"""The GPT-1 paper's fine-tuning tasks (Tables 2 to 4) as TensorFlow Datasets builders.

Each task's builder is prepared once under ``data_dir`` as ``array_record`` files and read
back through random-access data sources; TensorFlow is never imported. Importing this
module is cheap: TFDS and the builders' modules are imported on the first ``load``.

TFDS quirks handled here:

* GLUE's builder lives in ``tensorflow_datasets.text.glue``, which ``import
  tensorflow_datasets`` does not import (without it ``tfds.builder("glue/cola")`` reports
  an unknown dataset); SNLI, SciTail, RACE and Story Cloze come from ``tfds.builder_cls``.
* TFDS's ``race`` stores each article's options as a nested sequence, which TFDS cannot
  serialise without TensorFlow. RACE is therefore prepared by a subclass of TFDS's builder
  (``gptjax_race``, same download and checksums) that writes one record per question, with
  the ``dev`` split named ``validation``.
* The Story Cloze CSVs are ISO-8859-1 (Latin-1), but TFDS's ``story_cloze`` builder reads
  them as UTF-8 and fails on the first accented letter. The manual files are re-encoded to
  UTF-8 into a temporary manual directory that the builder reads instead.
* Story Cloze has no training split (ROCStories' training stories have no wrong endings):
  as GPT-1 did, the task trains on the labelled 2016 validation set minus a held-out part
  used for model selection, and reports on the labelled 2016 test set.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gptjax.errors import UserError
from gptjax.tasks.spec import Example, TaskSpec

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

FILE_FORMAT = "array_record"
# Records read per `__getitems__` call: reading one at a time is about 10x slower.
_READ_BATCH = 4096

# Story Cloze: every 5th story of the 2016 validation set (374 of 1,871, the size of GPT-1's
# held-out set) is the task's "validation" split, the others (1,497) its "train" split.
STORY_CLOZE_HELD_OUT_EVERY = 5
STORY_CLOZE_MANUAL_FILES = ("cloze_test_val__spring2016.csv", "cloze_test_test__spring2016.csv")
STORY_CLOZE_FORM = "https://www.cs.rochester.edu/nlp/rocstories/"

RACE_ANSWERS = ("A", "B", "C", "D")


# ----------------------------------------------------------------------------------------
# Records to examples. Data sources return Text features as UTF-8 bytes and scalars as
# NumPy values; TFDS's mock data gives str and 0-d arrays, which these accept as well.


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def glue_examples(
    record: Mapping[str, Any], fields: tuple[str, ...], regression: bool = False
) -> list[Example]:
    """A GLUE record as an Example; test splits have label -1 (-1.0 for STS-B): None."""
    if regression:
        score = float(record["label"])
        label = None if score < 0 else score
    else:
        index = int(record["label"])
        label = None if index < 0 else index
    texts = tuple(_text(record[field]) for field in fields)
    return [Example(texts=texts, label=label, uid=int(record["idx"]))]


def nli_examples(record: Mapping[str, Any]) -> list[Example]:
    """An SNLI or SciTail record; none for SNLI's pairs without a gold label (label -1).

    All SNLI splits are labelled; -1 marks pairs whose annotators did not agree, which the
    standard splits (and SNLI's reported accuracies) leave out.
    """
    label = int(record["label"])
    if label < 0:
        return []
    return [Example(texts=(_text(record["premise"]), _text(record["hypothesis"])), label=label)]


def flatten_race(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A TFDS ``race`` record (one article, several questions) as one record per question.

    The result has ``article``, ``question``, ``options`` (4), ``answer`` (index of the
    answer letter A-D) and ``example_id``, as stored by the ``gptjax_race`` builder.
    """
    questions, answers, options = record["questions"], record["answers"], record["options"]
    example_id = _text(record["example_id"])
    if not len(questions) == len(answers) == len(options):
        raise ValueError(
            f"RACE {example_id}: {len(questions)} questions, {len(answers)} answers and "
            f"{len(options)} option lists"
        )
    flat = []
    for question, answer, choices in zip(questions, answers, options, strict=True):
        answer = _text(answer)
        if answer not in RACE_ANSWERS or len(choices) != len(RACE_ANSWERS):
            raise ValueError(
                f"RACE {example_id}: answer {answer!r} with {len(choices)} options, expected "
                f"one of {'/'.join(RACE_ANSWERS)} with {len(RACE_ANSWERS)}"
            )
        flat.append(
            {
                "article": _text(record["article"]),
                "question": _text(question),
                "options": [_text(choice) for choice in choices],
                "answer": RACE_ANSWERS.index(answer),
                "example_id": example_id,
            }
        )
    return flat


def race_question_example(record: Mapping[str, Any]) -> list[Example]:
    """A per-question RACE record: context "article question", the 4 options as choices."""
    context = f"{_text(record['article'])} {_text(record['question'])}"
    choices = tuple(_text(option) for option in record["options"])
    return [Example(texts=(context,), choices=choices, label=int(record["answer"]))]


def race_examples(record: Mapping[str, Any]) -> list[Example]:
    """A TFDS ``race`` record as one Example per question."""
    return [ex for flat in flatten_race(record) for ex in race_question_example(flat)]


def story_cloze_examples(record: Mapping[str, Any]) -> list[Example]:
    """A Story Cloze record; TFDS keeps the CSV's AnswerRightEnding (1 or 2, -1 if none)."""
    answer = int(record["label"])
    if answer not in (-1, 1, 2):
        raise ValueError(f"Story Cloze answer {answer}, expected 1 or 2 (or -1 for none)")
    endings = tuple(_text(ending) for ending in record["endings"])
    if len(endings) != 2:
        raise ValueError(f"Story Cloze story with {len(endings)} endings, expected 2")
    # TFDS already joined the four context sentences with spaces.
    label = None if answer == -1 else answer - 1
    return [Example(texts=(_text(record["context"]),), choices=endings, label=label)]


# ----------------------------------------------------------------------------------------
# Builders, imported on first use.


@functools.cache
def _race_builder_class() -> type:
    """TFDS's RACE builder, changed to write one record per question (see module doc)."""
    import tensorflow_datasets as tfds

    from gptjax.data.tfds_books import LocalDatasetInfo

    base = tfds.builder_cls("race")

    class RaceQuestions(base, skip_registration=True):
        """RACE (TFDS ``race`` 2.0.0) with one record per question; ``dev`` is ``validation``."""

        name = "gptjax_race"
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "One record per question of TFDS race 2.0.0."}
        # TFDS looks for checksums next to the builder's module: use those of `race`.
        url_infos = base.url_infos

        def _info(self) -> tfds.core.DatasetInfo:
            features = tfds.features.FeaturesDict(
                {
                    "article": tfds.features.Text(),
                    "question": tfds.features.Text(),
                    "options": tfds.features.Sequence(
                        tfds.features.Text(), length=len(RACE_ANSWERS)
                    ),
                    "answer": tfds.features.ClassLabel(names=RACE_ANSWERS),
                    "example_id": tfds.features.Text(),
                }
            )
            return LocalDatasetInfo(
                builder=self,
                description="RACE reading comprehension, one record per question.",
                features=features,
                homepage="https://www.cs.cmu.edu/~glai1/data/race/",
            )

        def _split_generators(self, dl_manager):
            splits = super()._split_generators(dl_manager)
            return {"validation" if name == "dev" else name: gen for name, gen in splits.items()}

        def _generate_examples(self, path) -> Iterator[tuple[str, dict[str, Any]]]:
            for key, record in super()._generate_examples(path):
                for i, question in enumerate(flatten_race(record)):
                    yield f"{key}/{i}", question

    return RaceQuestions


@functools.cache
def _builder_class(name: str) -> type:
    import tensorflow_datasets as tfds

    if name == "glue":
        # `import tensorflow_datasets` doesn't import (so register) GLUE; this does.
        from tensorflow_datasets.text import glue

        return glue.Glue
    if name == "race":
        return _race_builder_class()
    return tfds.builder_cls(name)


def make_builder(dataset: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of ``dataset`` ("glue/cola", "race/middle", "sci_tail") under data_dir."""
    name, _, config = dataset.partition("/")
    return _builder_class(name)(config=config or None, data_dir=data_dir)


# ----------------------------------------------------------------------------------------
# Preparing and reading.


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # TFDS writes dataset_info.json last, in a temporary directory it then renames.
    return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def _is_network_error(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        module = type(seen).__module__.split(".")[0]
        if module in ("requests", "urllib3") or isinstance(
            seen, ConnectionError | TimeoutError | socket.gaierror
        ):
            return True
        if type(seen).__name__ in ("DownloadError", "NonMatchingChecksumError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _remove_empty_parents(builder: tfds.core.DatasetBuilder) -> None:
    """Drops the empty directories a failed preparation left between data_dir and its own."""
    root = os.path.abspath(builder.data_dir_root)
    path = os.path.dirname(os.path.abspath(builder.data_dir))
    while path.startswith(root + os.sep):
        try:
            os.rmdir(path)  # Refuses non-empty directories.
        except OSError:
            break
        path = os.path.dirname(path)


def _transcode_manual_files(manual_dir: str, names: Sequence[str], target: str) -> None:
    """Copies the manual files to `target` as UTF-8: they are Latin-1 unless already UTF-8."""
    for name in names:
        with open(os.path.join(manual_dir, name), "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        with open(os.path.join(target, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)


@dataclasses.dataclass(frozen=True)
class TfdsLoader:
    """``TaskSpec.load`` of a TFDS task: prepares its builders once, converts their records.

    `datasets` are TFDS builder names whose records are concatenated in this order.
    `splits` maps each split of the task to (TFDS split, part): part "all", or for Story
    Cloze "rest"/"held_out" (see STORY_CLOZE_HELD_OUT_EVERY). `manual_files` must be put
    in ``<data_dir>/downloads/manual`` by hand; `manual_hint` says how.
    """

    task: str
    datasets: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], list[Example]]
    splits: Mapping[str, tuple[str, str]]
    manual_files: tuple[str, ...] = ()
    manual_hint: str = ""

    def __call__(self, split: str, data_dir: str) -> list[Example]:
        if split not in self.splits:
            raise UserError(
                f"task {self.task} has no split {split!r}; valid splits: {', '.join(self.splits)}"
            )
        if not data_dir:
            raise UserError(f"task {self.task}: no data_dir to prepare its TFDS dataset in")
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
        tfds_split, part = self.splits[split]
        examples: list[Example] = []
        for dataset in self.datasets:
            builder = make_builder(dataset, data_dir)
            self._prepare(builder, dataset, data_dir)
            source = builder.as_data_source(split=tfds_split)
            for i, record in enumerate(_read_all(source)):
                held_out = i % STORY_CLOZE_HELD_OUT_EVERY == STORY_CLOZE_HELD_OUT_EVERY - 1
                if part == "all" or held_out == (part == "held_out"):
                    examples.extend(self.convert(record))
        return examples

    def _prepare(self, builder: tfds.core.DatasetBuilder, dataset: str, data_dir: str) -> None:
        if _is_prepared(builder):
            return
        if os.path.exists(builder.data_dir):
            raise UserError(
                f"task {self.task}: {builder.data_dir} holds an incomplete {dataset} dataset "
                "(no dataset_info.json); delete that directory and run again"
            )
        import tensorflow_datasets as tfds

        download_dir = os.path.join(data_dir, "downloads")
        manual_dir = os.path.join(download_dir, "manual")
        missing = [
            name for name in self.manual_files if not os.path.isfile(os.path.join(manual_dir, name))
        ]
        if missing:
            raise UserError(
                f"task {self.task} needs files downloaded by hand, missing: {', '.join(missing)}"
                f"; {self.manual_hint}, and put them in {manual_dir}"
            )
        with tempfile.TemporaryDirectory(prefix="gptjax-manual-") as utf8_dir:
            config = None
            if self.manual_files:
                _transcode_manual_files(manual_dir, self.manual_files, utf8_dir)
                config = tfds.download.DownloadConfig(manual_dir=utf8_dir)
            try:
                builder.download_and_prepare(
                    download_dir=download_dir, download_config=config, file_format=FILE_FORMAT
                )
            except Exception as e:
                # Another process (e.g. a host on a shared disk) may have won the race to
                # rename its copy into place; TFDS removed its own incomplete directory.
                if _is_prepared(builder):
                    return
                _remove_empty_parents(builder)
                raise UserError(self._failure(dataset, e, data_dir, manual_dir)) from e

    def _failure(self, dataset: str, error: Exception, data_dir: str, manual_dir: str) -> str:
        prefix = f"could not prepare task {self.task} (TFDS {dataset})"
        if _is_network_error(error):
            return (
                f"{prefix}: download failed ({_short(error)}); connect to the internet, or "
                f"prepare it once on a machine with internet access and copy {data_dir} here"
            )
        if isinstance(error, OSError):
            return (
                f"{prefix}: {_short(error)}; free some disk space or use a writable data "
                f"directory instead of {data_dir}"
            )
        if self.manual_files:
            return (
                f"{prefix}: {_short(error)}; check that {', '.join(self.manual_files)} in "
                f"{manual_dir} are the CSV files as downloaded ({self.manual_hint})"
            )
        return (
            f"{prefix}: {_short(error)}; delete {os.path.join(data_dir, 'downloads')} to fetch "
            "the data again"
        )


def _read_all(source: Sequence[Any]) -> Iterator[Mapping[str, Any]]:
    """The records of a TFDS data source in order, read in batches."""
    n = len(source)
    for start in range(0, n, _READ_BATCH):
        yield from source.__getitems__(list(range(start, min(n, start + _READ_BATCH))))


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
    **spec: Any,
) -> TaskSpec:
    if splits is None:
        splits = {s: (s, "all") for s in ("train", *eval_splits, *test_splits)}
    load = TfdsLoader(name, datasets, convert, splits, manual_files, manual_hint)
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
        test_splits=("test_matched", "test_mismatched"),
        label_names=_ENTAILMENT_NEUTRAL_CONTRADICTION,
        metrics=_ACCURACY,
        # The paper's test accuracies: matched 82.1, mismatched 81.4.
        paper={"accuracy": 82.1, "validation_mismatched/accuracy": 81.4},
        submission={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
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
    _task(
        "race_middle",
        "multiple_choice",
        ("race/middle",),
        race_question_example,
        num_choices=4,
        metrics=_ACCURACY,
        paper={"accuracy": 62.9},
        description="RACE-m: reading comprehension, middle school English exams",
    ),
    _task(
        "race_high",
        "multiple_choice",
        ("race/high",),
        race_question_example,
        num_choices=4,
        metrics=_ACCURACY,
        paper={"accuracy": 57.4},
        description="RACE-h: reading comprehension, high school English exams",
    ),
    _task(
        "race",
        "multiple_choice",
        ("race/middle", "race/high"),
        race_question_example,
        num_choices=4,
        metrics=_ACCURACY,
        paper={"accuracy": 59.0},
        description="RACE: reading comprehension, middle and high school English exams",
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
