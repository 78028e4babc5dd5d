import json
import os
import shutil

import numpy as np
import pytest

from gptjax.data import lm_data
from gptjax.errors import UserError

from conftest import tiny_books_config, tree_bytes, write_books


def test_prepare_caches_and_reuses(books, tmp_path):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = lm_data.prepare(config, workdir, resuming=False)
    assert sorted(os.listdir(os.path.join(workdir, "data"))) == [
        "train.npy",
        "train.npy.json",
        "validation.npy",
        "validation.npy.json",
    ]
    again = lm_data.prepare(config, workdir, resuming=True)
    assert again.tokenizer.digest == first.tokenizer.digest
    for split in ("train", "validation"):
        np.testing.assert_array_equal(again.tokens[split], first.tokens[split])
        # The stream is the books, each tokenized and ended by </s>, in order.
        eos = first.tokenizer.eos_id
        assert int(np.sum(first.tokens[split] == eos)) == first.num_books[split]
        assert first.tokens[split][-1] == eos


def test_changed_corpus_is_rebuilt_before_training_and_refused_when_resuming(books, tmp_path):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = lm_data.prepare(config, workdir, resuming=False)
    assert lm_data.prepare(config, workdir, resuming=False).tokenizer.digest == (
        first.tokenizer.digest
    )  # the same corpus: the tokenizer is kept
    write_books(books, num_books=8)  # three more books
    cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_dir())
    with pytest.raises(UserError, match="not the one this run's checkpoints"):
        lm_data.prepare(config, workdir, resuming=True)
    # Refused before the changed corpus was prepared: no copy of it in the cache.
    assert sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_dir()) == cached
    rebuilt = lm_data.prepare(config, workdir, resuming=False)
    assert sum(rebuilt.num_books.values()) == 8
    # Nothing trained yet: the tokenizer is learned again, from the new corpus.
    assert rebuilt.tokenizer.digest != first.tokenizer.digest


def test_tokenizer_of_another_size(books, tmp_path):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    lm_data.prepare(config, workdir, resuming=False)
    config.model.vocab_size = 80
    with pytest.raises(UserError, match="model.vocab_size"):
        lm_data.prepare(config, workdir, resuming=True)
    # Nothing trained yet: a new tokenizer of the new size replaces it.
    assert lm_data.prepare(config, workdir, resuming=False).tokenizer.vocab_size == 80


def test_missing_tokenizer_when_resuming(books, tmp_path):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with pytest.raises(UserError, match="no tokenizer in .*trained with one"):
        lm_data.prepare(config, workdir, resuming=True)


def test_damaged_token_caches_are_made_again(books, tmp_path):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = lm_data.prepare(config, workdir, resuming=False)
    # In memory: the prepared streams are maps of the files about to be damaged.
    expected = {split: np.array(first.tokens[split]) for split in ("train", "validation")}
    del first
    train_npy = os.path.join(workdir, "data", "train.npy")
    with open(train_npy, "r+b") as f:  # cut short, as a full disk might leave it
        f.truncate(os.path.getsize(train_npy) // 2)
    with open(os.path.join(workdir, "data", "validation.npy.json"), "w") as f:
        f.write('{"fingerprint": ')
    again = lm_data.prepare(config, workdir, resuming=True)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(again.tokens[split], expected[split])


@pytest.mark.parametrize("content", [b"not a model", b""])  # b"": a model of no pieces
def test_a_damaged_tokenizer_is_a_user_error(books, tmp_path, content):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.model").write_bytes(content)
    with pytest.raises(UserError, match="tokenizer.model is not a SentencePiece model"):
        lm_data.prepare(config, str(workdir), resuming=True)


def test_a_changed_tokenizer_sample_is_learned_again_before_training(books, tmp_path, monkeypatch):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    trained = []
    learn = lm_data.tokenizer_lib.train_sentencepiece
    monkeypatch.setattr(
        lm_data.tokenizer_lib,
        "train_sentencepiece",
        lambda texts, vocab, lines: trained.append(lines) or learn(texts, vocab, lines),
    )
    lm_data.prepare(config, workdir, resuming=False)
    lm_data.prepare(config, workdir, resuming=False)  # the same settings: kept
    config.data.tokenizer_sample_lines += 1
    lm_data.prepare(config, workdir, resuming=True)  # resuming: the run's own, whatever
    lm_data.prepare(config, workdir, resuming=False)  # nothing trained: learned again
    assert trained == [config.data.tokenizer_sample_lines - 1, config.data.tokenizer_sample_lines]


def test_a_cache_that_cannot_be_written_is_a_user_error_leaving_nothing(books, tmp_path):
    """`data` a file here; a full disk takes the same path (an OSError mid-write)."""
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "data").write_text("in the way")
    with pytest.raises(UserError, match="cannot write .*data/train.npy"):
        lm_data.prepare(config, str(workdir), resuming=False)
    assert sorted(os.listdir(workdir)) == ["data"]  # no tokenizer without its streams


def test_a_full_disk_leaves_no_temporary_file(books, tmp_path, monkeypatch):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()

    def no_space(file, array):
        file.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        lm_data.prepare(config, str(workdir), resuming=False)
    assert os.listdir(workdir / "data") == []


def test_odd_cache_metadata_and_a_tokenizer_directory(books, tmp_path):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()
    first = lm_data.prepare(config, str(workdir), resuming=False)
    expected = np.array(first.tokens["validation"])
    (workdir / "data" / "validation.npy.json").write_text("null")  # JSON, not an object
    again = lm_data.prepare(config, str(workdir), resuming=True)
    np.testing.assert_array_equal(again.tokens["validation"], expected)
    os.remove(workdir / "tokenizer.model")
    (workdir / "tokenizer.model").mkdir()
    with pytest.raises(UserError, match="cannot read .*tokenizer.model"):
        lm_data.prepare(config, str(workdir), resuming=True)


def test_a_changed_corpus_is_refused_on_resume_even_without_the_cached_streams(
    books, tmp_path, caplog
):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()
    lm_data.prepare(config, str(workdir), resuming=False)
    record = (workdir / lm_data.STREAMS_FILE).read_text()
    shutil.rmtree(workdir / "data")  # a cache: it may go
    lm_data.prepare(config, str(workdir), resuming=True)  # the same corpus: made again
    assert (workdir / lm_data.STREAMS_FILE).read_text() == record
    shutil.rmtree(workdir / "data")
    write_books(books, num_books=8)
    with pytest.raises(UserError, match="not the one this run's checkpoints"):
        lm_data.prepare(config, str(workdir), resuming=True)
    # A run from before the record existed (or whose record was deleted) resumes as it
    # did, is told that the corpus could not be checked, and gets a record.
    os.remove(workdir / lm_data.STREAMS_FILE)
    caplog.clear()
    lm_data.prepare(config, str(workdir), resuming=True)
    assert (workdir / lm_data.STREAMS_FILE).exists()
    assert "cannot be checked against the one the checkpoints were trained on" in caplog.text


def test_an_evaluation_reads_the_cached_streams_without_the_books(books, tmp_path):
    """--mode=eval of a run needs its held-out stream, cached in the workdir, not the
    books it was made from (moved, touched or gone since)."""
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = lm_data.prepare(config, workdir, resuming=False)
    shutil.move(books, tmp_path / "elsewhere")
    with pytest.raises(UserError, match="does not exist"):
        lm_data.prepare(config, workdir, resuming=True)
    evaluated = lm_data.prepare(config, workdir, resuming=True, evaluating=True)
    assert evaluated.tokenizer.digest == first.tokenizer.digest
    assert evaluated.num_books == first.num_books
    for split in ("train", "validation"):
        np.testing.assert_array_equal(evaluated.tokens[split], first.tokens[split])
    # Streams that are gone are made again, from the books, which must then be there.
    shutil.rmtree(os.path.join(workdir, "data"))
    with pytest.raises(UserError, match="does not exist"):
        lm_data.prepare(config, workdir, resuming=True, evaluating=True)


def test_an_evaluation_of_other_books_tokenizes_them_and_keeps_the_runs_streams(books, tmp_path):
    """--mode=eval with another data.books scores those books' held-out split (with the
    run's tokenizer), not the cached streams, and leaves the run's streams and their
    record as they were; the unigram baseline's training tokens are the run's own (what
    the model learned from), so the other books' training split is not tokenized."""
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()
    first = lm_data.prepare(config, str(workdir), resuming=False)
    before = tree_bytes(workdir)
    other = tiny_books_config(write_books(tmp_path / "other", num_books=6), tmp_path / "cache")
    with pytest.raises(UserError, match="not the one this run's checkpoints were trained on"):
        lm_data.prepare(other, str(workdir), resuming=True)
    evaluated = lm_data.prepare(other, str(workdir), resuming=True, evaluating=True)
    assert evaluated.tokenizer.digest == first.tokenizer.digest
    other_books = lm_data.corpus.load_books(other.data, str(tmp_path / "cache" / "tfds"))
    assert evaluated.num_books == {
        "train": first.num_books["train"],
        "validation": len(other_books["validation"]),
    }
    np.testing.assert_array_equal(evaluated.tokens["train"], first.tokens["train"])
    fresh = lm_data.prepare(other, str(tmp_path / "scratch"), resuming=False)
    assert fresh.tokenizer.digest != first.tokenizer.digest  # (so the two differ below)
    expected = lm_data.tokenize_books(other_books["validation"], first.tokenizer, "validation")
    np.testing.assert_array_equal(evaluated.tokens["validation"], expected)
    assert tree_bytes(workdir) == before
    # The run's own books again: its cached streams.
    again = lm_data.prepare(config, str(workdir), resuming=True, evaluating=True)
    np.testing.assert_array_equal(again.tokens["validation"], first.tokens["validation"])
    # Books that are gone can only be evaluated from the streams when they are the run's.
    missing = tiny_books_config(tmp_path / "gone", tmp_path / "cache")
    with pytest.raises(UserError, match="does not exist"):
        lm_data.prepare(missing, str(workdir), resuming=True, evaluating=True)
    # Without the run's training stream, the baseline is fit on the other books' own.
    os.remove(workdir / "data" / "train.npy")
    evaluated = lm_data.prepare(other, str(workdir), resuming=True, evaluating=True)
    own = lm_data.tokenize_books(other_books["train"], first.tokenizer, "train")
    np.testing.assert_array_equal(evaluated.tokens["train"], own)
    assert sum(evaluated.num_books.values()) == 6


def test_a_resume_with_both_streams_cached_does_not_read_the_books(books, tmp_path, monkeypatch):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = lm_data.prepare(config, workdir, resuming=False)

    def unexpected(*args):
        raise AssertionError("the books were prepared again")

    monkeypatch.setattr(lm_data.corpus, "load_books", unexpected)
    again = lm_data.prepare(config, workdir, resuming=True)
    assert again.num_books == first.num_books
    np.testing.assert_array_equal(again.tokens["train"], first.tokens["train"])
    os.remove(os.path.join(workdir, "data", "validation.npy"))  # one gone: the books are read
    with pytest.raises(AssertionError, match="prepared again"):
        lm_data.prepare(config, workdir, resuming=True)


def test_a_replaced_tokenizer_is_named_on_resume_and_evaluation(books, tmp_path):
    config = tiny_books_config(books, tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()
    lm_data.prepare(config, str(workdir), resuming=False)
    other = tiny_books_config(write_books(tmp_path / "other", num_books=6), tmp_path / "cache")
    lm_data.prepare(other, str(tmp_path / "other_run"), resuming=False)
    shutil.copy(tmp_path / "other_run" / "tokenizer.model", workdir / "tokenizer.model")
    for evaluating in (False, True):
        with pytest.raises(UserError, match="tokenizer.model is not the tokenizer this run"):
            lm_data.prepare(config, str(workdir), resuming=True, evaluating=evaluating)


def test_a_converted_workdirs_gpt1_bpe_tokenizes_the_books(books, tmp_path):
    """A workdir converted from the released GPT-1 holds its BPE (vocab.json and
    merges.txt), not a tokenizer.model: evaluating it on books tokenizes them with it."""
    from gptjax import bpe

    chars = [chr(c) for c in range(33, 127)]
    pieces = ["<unk>", "\n</w>", *chars, *(c + "</w>" for c in chars)]
    workdir = tmp_path / "converted"
    workdir.mkdir()
    (workdir / bpe.VOCAB_FILE).write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (workdir / bpe.MERGES_FILE).write_text("#version: 0.2\n")
    config = tiny_books_config(books, tmp_path / "cache")
    config.model.vocab_size = len(pieces)
    data = lm_data.prepare(config, str(workdir), resuming=True)
    assert isinstance(data.tokenizer, bpe.BPETokenizer)
    assert not (workdir / "tokenizer.model").exists()
    text = data.tokenizer.decode(data.tokens["validation"][:20].tolist())
    assert text.split() and text.split()[0].isalpha()
