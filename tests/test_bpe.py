import collections
import itertools
import json

import numpy as np
import pytest

from gptjax import bpe
from gptjax import tokenizer as tokenizer_lib
from gptjax.bpe import BPETokenizer
from gptjax.errors import UserError

CORPUS = """\
The river ran past the old mill, and the miller's daughter watched the water turn the wheel.
Every morning she counted the sacks: forty-two of wheat, thirteen of barley, and one of rye.
"Nothing changes here," she said; but the town beyond the hill was changing every year.
Traders came (some honest, some not) with cloth, salt, iron nails and news from the coast.
She learned their prices, their songs and their tricks -- and, in time, their languages too.
Café owners, naïve clerks and a résumé-waving lawyer all wanted the mill's flour by Friday!
Is it 1885 or 1886? Nobody remembers; the ledger's first page was lost in the flood.
"""

# Punctuation, quotes, dashes, accents, CJK, emoji, controls, odd spaces, digits, capitals.
TEXTS = [
    "The river ran past the old mill.",
    'THE MILLER\'S DAUGHTER said: "nothing changes here"; the town -- beyond -- changed!!',
    "forty-two sacks, thirteen of barley (and one of rye) -- 1885 or 1886? 42.5% & $3",
    "Café owners, naïve clerks, a Résumé; ÉCOLE, Ångström, crème brûlée, straße, ΣΟΦΙΑ",
    "“Curly quotes” and ‘single ones’ — em dash – en dash … ellipsis, don´t",
    "CJK: 日本語の文 and 中文字 mixed in, emoji 😀👍🏽 and ☃ snowmen",
    "multiple   spaces\tand\ttabs\r\nand\nnewlines\n\n\nand trailing spaces   ",
    "controls\x00 and\u200b zero width\ufeff, nbsp\u00a0here, ideographic\u3000space",
    "<tags> [brackets] {braces} back\\slash slash/ pipe| tilde~ caret^ `tick` @at #hash",
    "unknownz letterz qqq xylophone jazz QUIZ",
    "",
    "   ",
]


def learn_bpe(text: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A plain BPE learner: the most frequent adjacent pair is merged, `num_merges` times.

    The vocabulary is laid out like GPT-1's: <unk> first, every character with and without
    </w>, each merge's result in order, then "\\n</w>". "z" and "q" are left out on purpose:
    words containing them exercise unknown pieces.
    """
    counts = collections.Counter(w for w in bpe.bert_words(text) if not set(w) & {"z", "q"})
    words = {w: list(w[:-1]) + [w[-1] + bpe.WORD_END] for w in counts}
    chars = sorted({c for w in words for c in w})
    pieces = ["<unk>"] + chars + [c + bpe.WORD_END for c in chars]
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, symbols in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        pieces.append(best[0] + best[1])
        for w, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i : i + 2]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[w] = merged
    pieces.append(bpe.NEWLINE_PIECE)
    return {p: i for i, p in enumerate(dict.fromkeys(pieces))}, merges


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    vocab, merges = learn_bpe(CORPUS, 200)
    assert len(merges) == 200  # fewer than would merge every word fully
    directory = tmp_path_factory.mktemp("bpe")
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tok(files):
    return BPETokenizer.load(str(files), pretokenizer="bert")


def test_ids_equal_transformers_openai_gpt(files, tok):
    transformers = pytest.importorskip("transformers")
    reference = transformers.OpenAIGPTTokenizer(
        str(files / "vocab.json"), str(files / "merges.txt")
    )
    words = " ".join(CORPUS.split()[::-1])  # every training word, merged fully
    for text in TEXTS + CORPUS.split("\n") + [words]:
        expected = reference.encode(text, add_special_tokens=False)
        assert tok.encode(text) == expected, text
    # The texts really exercise merges and unknown pieces, not only single characters.
    ids = tok.encode(" ".join(TEXTS))
    assert tok.unk_id in ids
    assert max(ids) > tok.vocab_size - 100


def test_merges_apply_in_rank_order(tmp_path):
    pieces = ["<unk>", "t", "h", "e", "e</w>", "th", "the</w>", "he</w>", "\n</w>"]
    vocab = {p: i for i, p in enumerate(pieces)}
    # "h e</w>" is learned after "t h", so "the" is "th" + "e</w>" -> "the</w>", not "t" + "he</w>".
    tok = BPETokenizer(vocab, [("t", "h"), ("th", "e</w>"), ("h", "e</w>")], "bert")
    assert tok.encode("The") == [vocab["the</w>"]]
    assert tok.encode("he") == [vocab["he</w>"]]
    assert tok.encode("thee") == [vocab["th"], vocab["e"], vocab["e</w>"]]
    # Unknown characters: one unknown id each, as transformers and the original do.
    assert tok.encode("tx日本") == [vocab["t"], 0, 0, 0]


def test_bert_words_normalise_like_transformers():
    assert bpe.bert_words("Héllo,  WORLD!!\tCafé\n") == ["hello", ",", "world", "!", "!", "cafe"]
    assert bpe.bert_words("a日本b") == ["a", "日", "本", "b"]
    assert bpe.bert_words("zero\u200bwidth\x00 non\u00a0breaking") == [
        "zerowidth",
        "non",
        "breaking",
    ]
    assert bpe.bert_words("$5 <i>") == ["$", "5", "<", "i", ">"]
    assert bpe.bert_words("ΟΔΟΣ") == ["οδοσ"]  # per-character lowercasing: no final sigma


def test_standardize_as_the_original():
    assert bpe.standardize("wait—what… don´t") == "wait - what... don't"
    assert bpe.standardize("so!!!  really?? (yes)") == "so !!! really ?? ( yes )"
    assert bpe.standardize("one  \n\n  two\tthree ") == "one \n two three"


def test_spacy_pretokenizer_is_the_original():
    pytest.importorskip("ftfy")
    pytest.importorskip("spacy")
    pieces = ["<unk>", "-</w>", "a</w>", "b</w>", "\n</w>"]
    tok = BPETokenizer({p: i for i, p in enumerate(pieces)}, [], "spacy")
    assert tok.encode("A—B\nA") == [2, 1, 3, 4, 2]


def test_auto_falls_back_to_bert_without_spacy(files, monkeypatch):
    monkeypatch.setattr(bpe, "_spacy_available", lambda: False)
    assert BPETokenizer.load(str(files)).pretokenizer == "bert"


def test_lines_documents_and_specials(tok):
    newline = tok.vocab["\n</w>"]
    assert tok.newline_id == tok.eos_id == newline
    assert tok.pad_id == tok.unk_id == tok.vocab["<unk>"] == 0
    assert tok.vocab_size == len(tok.vocab)
    assert tok.special_ids == {
        "_start_": tok.vocab_size,
        "_delimiter_": tok.vocab_size + 1,
        "_classify_": tok.vocab_size + 2,
    }
    a, b = tok.encode("the old mill"), tok.encode("the river")
    # As the original's standardize: a run of line breaks is one, none at either end.
    assert tok.encode_text("the old mill\n\n \nthe river") == a + [newline] + b
    assert tok.encode_text("\nthe old mill\n ") == a
    assert tok.encode_texts(["the river", "x\ny"]) == [b, tok.encode_text("x\ny")]
    document = tok.encode_document("the old mill\nthe river")
    assert document.dtype == np.int32
    assert document.tolist() == a + [newline] + b + [tok.eos_id]
    specials = [tok.special_ids[name] for name in tokenizer_lib.SPECIAL_TOKENS]
    assert max(tok.encode_text(" ".join(tokenizer_lib.SPECIAL_TOKENS))) < tok.vocab_size
    assert (
        tok.decode(specials[:1] + a + specials[1:]) == "_start_ the old mill _delimiter_ _classify_"
    )


def test_decode_inverts_lowercase_text(tok):
    text = "the miller watched the water turn the wheel\nevery morning she counted sacks"
    ids = tok.encode_text(text)
    assert len(ids) < len(text) / 2  # merged into real subwords
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("the river, ran!")) == "the river , ran !"


def test_save_load_round_trip_and_digest(tok, files, tmp_path, monkeypatch):
    tok.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    again = BPETokenizer.load(str(tmp_path), pretokenizer="bert")
    text = " ".join(TEXTS)
    assert again.encode_text(text) == tok.encode_text(text)
    assert again.digest == tok.digest == BPETokenizer.load(str(files), "bert").digest
    assert len(tok.digest) == 64
    fewer_merges = BPETokenizer(tok.vocab, tok.merges[:-1], "bert")
    assert fewer_merges.digest != tok.digest
    monkeypatch.setattr(bpe, "_SpacyWords", lambda: bpe.bert_words)
    assert BPETokenizer(tok.vocab, tok.merges, "spacy").digest != tok.digest  # other ids


def test_from_files_reads_the_original_release_names(files, tmp_path):
    vocab_path, merges_path = tmp_path / "encoder_bpe_40000.json", tmp_path / "vocab_40000.bpe"
    vocab_path.write_bytes((files / "vocab.json").read_bytes())
    merges_path.write_bytes((files / "merges.txt").read_bytes())
    tok = BPETokenizer.from_files(str(vocab_path), str(merges_path), "bert")
    assert tok.encode("the old mill") == BPETokenizer.load(str(files), "bert").encode(
        "the old mill"
    )


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="n</w>"):
        BPETokenizer({"<unk>": 0, "a": 1}, [], "bert")
    with pytest.raises(UserError, match="0..N-1"):
        BPETokenizer({"<unk>": 0, "\n</w>": 2}, [], "bert")
    (tmp_path / "vocab.json").write_text(json.dumps({"<unk>": 0, "\n</w>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(UserError, match="merge 1 is not two pieces"):
        BPETokenizer.load(str(tmp_path))


def test_load_dir_dispatches_on_the_files_present(files, tmp_path):
    assert isinstance(tokenizer_lib.load_dir(str(files)), BPETokenizer)
    assert tokenizer_lib.has_tokenizer(str(files))

    empty = tmp_path / "empty"
    empty.mkdir()
    assert not tokenizer_lib.has_tokenizer(str(empty))
    with pytest.raises(UserError, match=f"{empty}.*tokenizer.model.*vocab.json.*merges.txt"):
        tokenizer_lib.load_dir(str(empty))

    (empty / "vocab.json").write_text("{}")  # half a BPE tokenizer is none
    assert not tokenizer_lib.has_tokenizer(str(empty))

    both = tmp_path / "both"
    BPETokenizer.load(str(files)).save(str(both))
    sentencepiece = tokenizer_lib.train_sentencepiece([CORPUS] * 5, 80, 1000)
    sentencepiece.save(str(both / tokenizer_lib.TOKENIZER_FILE))
    loaded = tokenizer_lib.load_dir(str(both))  # SentencePiece wins when both are there
    assert isinstance(loaded, tokenizer_lib.SentencePieceTokenizer)
    assert loaded.digest == sentencepiece.digest
