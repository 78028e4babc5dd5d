"""TFDS plumbing shared by the corpus builders: the book features, preparing and opening.

Datasets of whole books (``title`` and ``text``) are written as ``array_record`` files and
read back through random-access data sources as ``BookTexts``; TensorFlow is never imported.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from gptjax.errors import UserError

SPLITS = ("train", "validation")
FILE_FORMAT = "array_record"


# ----------------------------------------------------------------------------------------
# Reading prepared data.


class BookTexts(Sequence[str]):
    """Random-access view of one split: ``len()`` and ``[i]`` give book texts as ``str``."""

    def __init__(self, source: Sequence[Any], where: str = ""):
        self._source, self._where = source, where  # `where`: the dataset's directory

    def __len__(self) -> int:
        return len(self._source)

    def _record(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        n = len(self._source)
        if index < 0:
            index += n
        # Sequence iteration relies on IndexError, which the record reader doesn't raise.
        if not 0 <= index < n:
            raise IndexError(f"book index {index} out of range for {n} books")
        try:
            return self._source[index]
        except (RuntimeError, OSError, ValueError) as e:  # e.g. a truncated record file
            raise _damaged(self._where, e) from None

    def __getitem__(self, index: int | slice) -> str | list[str]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _as_str(self._record(index)["text"], self._where)

    def title(self, index: int) -> str:
        """Title of book ``index``: the relative file path, or the demo work's name."""
        return _as_str(self._record(index)["title"], self._where)

    def __repr__(self) -> str:
        return f"BookTexts({len(self)} books)"


def _as_str(value: Any, where: str = "") -> str:
    """Decodes a Text feature, which data sources return as UTF-8 bytes. A damaged record
    file (truncated, overwritten) decodes to None: an error, never the text "None"."""
    if value is None:
        raise _damaged(where, "a record cannot be read")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _damaged(where: str, why) -> UserError:
    return UserError(
        f"the prepared corpus {where or 'in the cache'} is damaged ({why}); delete that "
        "directory and run again to prepare it anew"
    )


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo that never looks for precomputed metadata in the TFDS bucket."""

    def initialize_from_bucket(self) -> None:
        # TFDS's version makes a temp dir (left behind) even with the bucket disabled, and
        # these datasets are never there anyway.
        pass


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()})


# ----------------------------------------------------------------------------------------
# Preparing and opening.


def prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Writes the dataset; on failure removes the (empty) directories TFDS left behind."""
    try:
        # Nothing is downloaded through TFDS, but it makes a download dir; keep it out of
        # data_dir.
        with tempfile.TemporaryDirectory(prefix="gptjax-tfds-") as download_dir:
            builder.download_and_prepare(download_dir=download_dir, file_format=FILE_FORMAT)
    except BaseException as e:
        # Another process (e.g. another host on a shared disk) may have won the race to
        # rename its copy into place; that copy has the same contents.
        if isinstance(e, Exception) and is_prepared(builder):
            return
        # TFDS already deleted its `incomplete.*` directory; drop the now empty parents it
        # made below data_dir so that nothing looks half-prepared. rmdir refuses non-empty
        # directories.
        root = os.path.abspath(builder.data_dir_root)
        path = os.path.dirname(os.path.abspath(builder.data_dir))
        while path.startswith(root + os.sep):
            try:
                os.rmdir(path)
            except OSError:
                break
            path = os.path.dirname(path)
        # array_record's writer reports a failed write (a full disk) as a RuntimeError.
        if isinstance(e, OSError) or (
            isinstance(e, RuntimeError) and "write() failed" in str(e)
        ):  # Book files raise UserError, so this is about data_dir.
            reason = " ".join(str(e).split())
            raise UserError(
                f"cannot write the prepared corpus under {root} ({reason}); free some space or "
                "set --config.data.cache_dir to a writable directory"
            ) from e
        raise


class _DropCustomConfigWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def without_custom_config_warning() -> Iterator[None]:
    """Silences TFDS's warning that a config is not predefined: ours never are."""
    logger = logging.getLogger("absl")  # TFDS logs through absl, which uses this logger.
    drop = _DropCustomConfigWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Not `builder.is_prepared()`, which logs a warning whenever the answer is no.
    return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def open_splits(builder: tfds.core.DatasetBuilder) -> dict[str, BookTexts]:
    # One split a call: `tfds.testing.mock_data`'s stand-in requires the split.
    return {
        split: BookTexts(builder.as_data_source(split=split), builder.data_dir) for split in SPLITS
    }
