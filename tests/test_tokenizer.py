import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

from conftest import ROOT

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\nA second line, with commas.\n\n"
    "  Indented text keeps its spaces.",
    "Numbers like 2018 and 40478 split into digits.\nThe end of the book.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_sentencepiece(TEXTS, 96, 10_000)


def test_vocabulary_and_reserved_ids(tok):
    assert tok.vocab_size == 96
    assert (tok.unk_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
    # The fine-tuning specials come after the ordinary ids, as in the original release.
    assert tok.special_ids == {"_start_": 96, "_delimiter_": 97, "_classify_": 98}


def test_document_round_trip_keeps_newlines_and_spaces(tok):
    for text in TEXTS[:2]:
        ids = tok.encode_document(text)
        assert ids[-1] == tok.eos_id and tok.newline_id in ids.tolist()
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text


def test_windows_line_ends_read_as_newlines():
    """SentencePiece's trainer drops a line's last "\r": without reading "\r\n" as "\n",
    a tokenizer learned on CRLF books ended every line of them with <unk>."""
    crlf = [text.replace("\n", "\r\n") for text in TEXTS]
    tok = tokenizer_lib.train_sentencepiece(crlf, 96, 10_000)
    assert tok.digest == tokenizer_lib.train_sentencepiece(TEXTS, 96, 10_000).digest
    for windows, unix in zip(crlf[:2], TEXTS[:2], strict=True):
        ids = tok.encode_document(windows)
        assert tok.unk_id not in ids.tolist()
        assert ids.tolist() == tok.encode_document(unix).tolist()
        assert tok.decode(ids) == unix


def test_specials_never_come_from_text(tok):
    ids = tok.encode_document("_start_ _delimiter_ _classify_")
    assert max(ids) < tok.vocab_size
    assert tok.decode([tok.special_ids["_start_"]] + tok.encode("hi")) == "_start_hi"


def test_saved_and_reloaded(tok, tmp_path):
    path = str(tmp_path / "tokenizer.model")
    tok.save(path)
    again = tokenizer_lib.SentencePieceTokenizer.load(path)
    assert again.digest == tok.digest
    assert again.encode("The fox") == tok.encode("The fox")


@pytest.mark.parametrize(
    "vocab_size, fix",
    [
        (5000, "a small corpus needs a smaller --config.model.vocab_size"),
        (5, "raise --config.model.vocab_size: the corpus has more distinct characters"),
    ],
)
def test_a_vocabulary_the_corpus_cannot_give_is_a_user_error(vocab_size, fix):
    with pytest.raises(UserError, match=fix):
        tokenizer_lib.train_sentencepiece(["tiny corpus of words"], vocab_size, 10)


def test_books_without_line_breaks_still_train_a_tokenizer():
    """SentencePiece's trainer silently skips lines over 4,192 bytes: a book written as
    one line is cut into pieces at spaces, which together are the line."""
    books = [" ".join(t.replace("\n", " ") for t in TEXTS * 2) + f" book {i}" for i in range(4)]
    assert all(len(book.encode()) > 4192 for book in books)
    pieces = list(tokenizer_lib._training_lines(books[:1]))
    assert "".join(pieces) == books[0] and max(len(p) for p in pieces) <= 1024
    assert all(len(p) > 900 for p in pieces[:-1])  # cut near the limit, at a space
    tok = tokenizer_lib.train_sentencepiece(books, 96, 10_000)
    assert tok.decode(tok.encode(books[0])) == books[0]
    assert tok.vocab_size == 96


def test_sampled_lines_are_seeded_and_uniform():
    lines = [str(i) for i in range(1000)]
    first = tokenizer_lib.sample_lines(lines, 100)
    assert tokenizer_lib.sample_lines(iter(lines), 100) == first  # same seed, same lines
    assert len(set(first)) == 100 and set(first) <= set(lines)
    assert tokenizer_lib.sample_lines(lines, 100, seed=1) != first
    assert tokenizer_lib.sample_lines(lines[:50], 100) == lines[:50]  # all, in order
    # Every line is drawn with probability k / n = 0.1: 200 times in 2,000 samples
    # (standard deviation 13.4); the first and last hundred lines as often as the rest.
    counts = Counter(
        x for seed in range(2000) for x in tokenizer_lib.sample_lines(lines, 100, seed)
    )
    per_line = np.array([counts[x] for x in lines])
    assert per_line.min() > 200 - 6 * 13.4 and per_line.max() < 200 + 6 * 13.4
    assert abs(per_line[:100].mean() - 200) < 6 and abs(per_line[-100:].mean() - 200) < 6


def test_a_tokenizer_learned_from_a_sample_is_reproducible():
    """Across processes (SentencePiece's own sampling differed from one process to the
    next) and machines: the trainer's thread count, the core count, is not in the bytes."""
    script = (
        "import os, sys; os.cpu_count = lambda: int(sys.argv[1]); "
        "from gptjax import tokenizer as t; from test_tokenizer import TEXTS; "
        "texts = [f'{TEXTS[i % len(TEXTS)]} line {i} of many' for i in range(3000)]; "
        "print(t.train_sentencepiece(texts, 96, 500).digest)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    digests = [
        subprocess.run(
            [sys.executable, "-c", script, str(cores)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for cores in (1, 2, 16)
    ]
    assert len(set(digests)) == 1 and len(digests[0].strip()) == 64
