import pytest

from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

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


def test_vocabulary_too_large_for_corpus_is_a_user_error():
    with pytest.raises(UserError, match="vocab_size"):
        tokenizer_lib.train_sentencepiece(["tiny corpus"], 5000, 10)
