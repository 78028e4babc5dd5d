"""The ``books`` corpus: a directory (searched recursively) or glob of ``.txt`` books.

One book per file, as BookCorpus is distributed. Finds the files, assigns each book to a
split by a hash of its relative path (so adding books never moves existing ones between
splits), checks the encoding and decodes the books for the TFDS builder.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow_datasets as tfds

from gptjax.data.tfds_books import SPLITS, LocalDatasetInfo, features
from gptjax.errors import UserError

if TYPE_CHECKING:
    from ml_collections import ConfigDict

_BOOKS_HINT = "point --config.data.books at a directory or glob of .txt books"


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


class BookDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
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
        return LocalDatasetInfo(
            builder=self,
            description="Books read from text files, one book per file.",
            features=features(),
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
    if os.path.isdir(pattern):  # before globs: a directory's name may hold "[" or "*"
        root = os.path.abspath(pattern)
        paths = _txt_files_under(root)
        if not paths:
            raise UserError(
                f"empty corpus: no .txt files under data.books {books!r}; {_BOOKS_HINT}"
            )
    elif os.path.isfile(pattern):
        root, paths = os.path.dirname(os.path.abspath(pattern)), [pattern]
    elif _has_magic(pattern):
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
    else:
        raise UserError(f"data.books {books!r} does not exist; {_BOOKS_HINT}")

    files, seen, real_root = [], set(), os.path.realpath(root)

    def through_a_link(path):  # (the root itself may be reached through one: not counted)
        inside = os.path.relpath(os.path.abspath(path), root)
        return os.path.realpath(path) != os.path.normpath(os.path.join(real_root, inside))

    # A file reached by several paths is one book, under its real path if it has one
    # under the root (so adding a link never moves a book), else its first.
    order = sorted(paths, key=lambda p: (through_a_link(p), os.path.relpath(p, root)))
    for path in order:
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
        except OSError as e:
            raise UserError(f"cannot read book file {path}: {e.strerror}; fix or remove it") from e
        if (st.st_dev, st.st_ino) in seen:  # a link to a book already listed: once only
            continue
        seen.add((st.st_dev, st.st_ino))
        relpath = os.path.relpath(path, root).replace(os.sep, "/")
        try:
            relpath.encode("utf-8")  # the book's title, hashed for its split and cached
        except UnicodeEncodeError:
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UserError(
                f"the book file name {shown} is not UTF-8; rename it (e.g. with convmv)"
            ) from None
        files.append(_BookFile(relpath, path, st.st_size, st.st_mtime_ns))
    files.sort(key=lambda f: f.relpath)
    return root, files


def _txt_files_under(root: str) -> list[str]:
    """The .txt files under `root`: the tree itself first, then what its links to
    directories reach, each directory entered once (a link back up the tree would
    otherwise repeat it without end). Hidden files and directories (a name starting with
    `.`: `.ipynb_checkpoints/`, macOS's `._name.txt`) are left out, as a glob leaves them,
    so a directory and `DIR/**/*.txt` name the same books."""

    def visible(names):
        return [n for n in names if not n.startswith(".")]

    def key(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def unreadable(error: OSError):  # os.walk would skip it without a word
        logging.warning(
            "cannot read directory %s (%s): the books in it are left out",
            error.filename,
            error.strerror,
        )

    paths, visited, links = [], set(), []
    for directory, subdirs, names in os.walk(root, onerror=unreadable):  # links: not followed
        visited.add(key(directory))
        subdirs[:] = visible(subdirs)
        paths += [os.path.join(directory, n) for n in visible(names) if n.endswith(".txt")]
        links += [
            os.path.join(directory, d)
            for d in subdirs
            if os.path.islink(os.path.join(directory, d))
        ]
    for link in sorted(links):
        for directory, subdirs, names in os.walk(link, onerror=unreadable, followlinks=True):
            if not os.path.isdir(directory) or key(directory) in visited:
                subdirs[:] = []
                continue
            visited.add(key(directory))
            subdirs[:] = sorted(visible(subdirs))
            paths += [os.path.join(directory, n) for n in visible(names) if n.endswith(".txt")]
    return [p for p in paths if os.path.isfile(p)]


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


def check_decodable(books: Sequence[_BookFile], encoding: str) -> None:
    """Decodes every book once so that bad files fail before anything is written."""
    for book in books:
        _read_book(book, encoding)


def _check_encoding(encoding: Any) -> str:
    try:
        codec = codecs.lookup(encoding)
        if not getattr(codec, "_is_text_encoding", True):  # base64, rot13: not bytes <-> str
            raise LookupError(encoding)
        return codec.name
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


def make_config(data_cfg: ConfigDict) -> _BookDirConfig:
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
