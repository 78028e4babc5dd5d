"""Preparing the tasks' TFDS datasets once (``array_record`` files under ``data_dir``) and
reading them back through random-access data sources; TensorFlow is never imported, and
TFDS and the builders' modules only on the first load.

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
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gptjax.errors import UserError
from gptjax.tasks.spec import Example
from gptjax.tasks.tfds_records import RACE_ANSWERS, flatten_race

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

FILE_FORMAT = "array_record"
# Records read per `__getitems__` call: reading one at a time is about 10x slower.
_READ_BATCH = 4096

# Story Cloze: every 5th story of the 2016 validation set, in the order TFDS stores its
# records (shuffled by a hash of each record, not the CSV's order, but the same on every
# machine), is the task's "validation" split (374 of 1,871, the size of GPT-1's held-out
# set), the others (1,497) its "train" split.
STORY_CLOZE_HELD_OUT_EVERY = 5


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
        VERSION = tfds.core.Version("1.1.0")
        RELEASE_NOTES = {
            "1.0.0": "One record per question of TFDS race 2.0.0.",
            "1.1.0": "Each question's place in its article (question_index), for its id.",
        }
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
                    "question_index": tfds.features.Scalar(np.int32),
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

    `datasets` are TFDS builder names whose records are concatenated in this order;
    `split_datasets` names others for some splits (MNLI's `test_ax`: GLUE's diagnostic
    set, `glue/ax`). `splits` maps each split of the task to (TFDS split, part): part
    "all", or for Story Cloze "rest"/"held_out" (see STORY_CLOZE_HELD_OUT_EVERY).
    `manual_files` must be put in ``<data_dir>/downloads/manual`` by hand; `manual_hint`
    says how.
    """

    task: str
    datasets: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], list[Example]]
    splits: Mapping[str, tuple[str, str]]
    manual_files: tuple[str, ...] = ()
    manual_hint: str = ""
    split_datasets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

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
        for dataset in self.split_datasets.get(split, self.datasets):
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
            logging.info(
                "preparing TFDS %s in %s, once: %s",
                dataset,
                data_dir,
                "from the files downloaded by hand"
                if self.manual_files
                else "downloading its files (TFDS retries for a few minutes when offline)",
            )
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
