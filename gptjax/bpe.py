"""The original GPT-1 BPE tokenizer (OpenAI's 2018 release, transformers' `openai-gpt`).

Text is split into lowercased words, each word is cut into characters with `</w>` glued to
the last one, and the released merges are applied in rank order (the earliest-learned pair
first, every occurrence at once) until none applies. The ids are the 40,478 pieces of
`vocab.json` (`encoder_bpe_40000.json` in the release); the fine-tuning specials come after
them, exactly as for `SentencePieceTokenizer`, whose interface this class shares.

How text becomes words, the `pretokenizer`:
- "spacy", the original (`text_utils.py`): `ftfy.fix_text`, `standardize` (dashes, the
  ellipsis and the acute accent replaced; runs of punctuation and all whitespace spaced out),
  spaCy's English tokenizer, then lowercasing. Needs both `ftfy` and `spacy`.
- "bert", the documented fallback: what transformers' `OpenAIGPTTokenizer` does (its
  BERT normaliser and pre-tokenizer, id for id): control characters dropped, whitespace
  split, CJK ideographs and every punctuation character made words of their own, accents
  stripped (NFD, nonspacing marks removed), lowercased character by character. It does not
  `standardize`: an em dash stays an em dash, as in transformers. Character classes come
  from Python's Unicode database; transformers' Rust tables are older (about Unicode 8), so
  a few hundred marks and punctuation characters Unicode added since (none of them in
  English text) can split differently there.
- "auto" (the default) is "spacy" when both libraries import, else "bert".

Choices where the original has no answer, the same for every vocabulary:
- unknown pieces (characters the vocabulary lacks) get `unk_id`: the id of "<unk>" (0 in
  transformers' files), else 0, which is what the original `encoder.get(t, 0)` returned.
  Each unknown character is its own unknown id, as in both.
- `newline_id` is the id of "\\n</w>", the vocabulary's line break; `encode_text` encodes
  line by line with it between lines, a run of line breaks as one and none at either end,
  as the spaCy path does. A vocabulary without that
  piece is refused (a UserError): it is not GPT-1's, and its line breaks would vanish.
- `eos_id` is `newline_id`: GPT-1 has no end-of-document token, and a document ending in a
  line break is the closest the vocabulary can say.
- `pad_id` is `unk_id`: padding is masked out of every loss, so any ordinary id would do.
"""

import hashlib
import importlib.util
import itertools
import json
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from gptjax.atomic import replacing
from gptjax.errors import UserError
from gptjax.tokenizer import SPECIAL_TOKENS

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
MERGES_HEADER = "#version: 0.2"
WORD_END = "</w>"
NEWLINE_PIECE = "\n" + WORD_END
UNK_PIECE = "<unk>"
# Words seen by one tokenizer are remembered up to this many (a few hundred MB at most),
# then forgotten all at once: a corpus of millions of distinct words cannot exhaust memory.
MAX_CACHED_WORDS = 1_000_000


def standardize(text: str) -> str:
    """The original `text_standardize`: patches for spaCy on BookCorpus, and whitespace.

    Dashes become "-", "…" becomes "...", "´" becomes "'"; each run of one repeated
    punctuation character (---, !!, ...) is spaced out as a word; every line break becomes
    " \\n " and all other whitespace one space.
    """
    text = text.translate(_STANDARD_CHARS)
    text = _PUNCTUATION_RUN.sub(r" \g<0> ", text)
    text = _LINE_BREAK.sub(" \n ", text)
    return _SPACES.sub(" ", text).strip()


_STANDARD_CHARS = str.maketrans({"—": "-", "–": "-", "―": "-", "…": "...", "´": "'"})
_PUNCTUATION_RUN = re.compile(r"""([-~!";?+,)(\\/*\[\]}{|_])\1*""")
_LINE_BREAK = re.compile(r"\s*\n\s*")
_SPACES = re.compile(r"[^\S\n]+")


def _is_cjk(code: int) -> bool:
    """CJK ideographs, the ranges transformers' BERT normaliser (Rust) isolates."""
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_punctuation(char: str) -> bool:
    # ASCII symbols such as $ + < = > ^ ` | ~ count too, though Unicode calls them symbols.
    return char in string.punctuation or unicodedata.category(char).startswith("P")


class _BertChars(dict):
    """A `str.translate` table doing transformers' BERT normalisation one character at a time.

    Every step of it depends on the character alone, so each character's replacement is
    worked out once, when first seen: dropped (controls), a space (whitespace), or its
    accent-stripped lowercase form with punctuation and CJK ideographs padded by spaces,
    so that `str.split` then yields the pre-tokenizer's words.
    """

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if char in "\t\n\r":
            out = " "
        elif code in (0, 0xFFFD) or unicodedata.category(char) in _CONTROL:
            out = ""
        elif char.isspace():
            out = " "
        else:
            stripped = (
                c for c in unicodedata.normalize("NFD", char) if unicodedata.category(c) != "Mn"
            )
            # Lowercased per character, as the Rust normaliser does (so no final sigma).
            lowered = "".join(c.lower() for c in stripped)
            if _is_cjk(code):
                out = f" {lowered} "
            else:
                out = "".join(f" {c} " if _is_punctuation(c) else c for c in lowered)
        self[code] = out
        return out


# Unassigned code points (Cn) are kept, as transformers keeps them.
_CONTROL = ("Cc", "Cf", "Co", "Cs")
_BERT_CHARS = _BertChars()


def bert_words(text: str) -> list[str]:
    """The words transformers' `OpenAIGPTTokenizer` cuts `text` into, before BPE."""
    return text.translate(_BERT_CHARS).split()


def _spacy_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("ftfy", "spacy"))


class _SpacyWords:
    """The original release's words: ftfy, `standardize`, spaCy's English tokenizer, lowercased."""

    def __init__(self):
        import ftfy
        import spacy

        self._fix_text = ftfy.fix_text
        self._nlp = spacy.blank("en").tokenizer  # rules only, as the original's spacy.load('en')

    def __call__(self, text: str) -> list[str]:
        doc = self._nlp(standardize(self._fix_text(text)))
        # A line break token may carry a space ("\n "): the original made it "\n</w>" too.
        return ["\n" if t.is_space and "\n" in t.text else t.text.lower() for t in doc]


class BPETokenizer:
    """GPT-1's lowercased, `</w>`-suffixed BPE plus the reserved fine-tuning specials."""

    def __init__(
        self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], pretokenizer: str = "auto"
    ):
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise UserError("the BPE vocabulary's ids are not 0..N-1, each used once")
        if NEWLINE_PIECE not in vocab:
            # GPT-1's vocabulary has it; without it line breaks would silently vanish.
            raise UserError('the BPE vocabulary has no "\\n</w>" piece for line breaks')
        if pretokenizer == "auto":
            pretokenizer = "spacy" if _spacy_available() else "bert"
        if pretokenizer not in ("spacy", "bert"):
            raise UserError(f"unknown BPE pretokenizer {pretokenizer!r}: spacy, bert or auto")
        self.pretokenizer = pretokenizer
        self._words = _SpacyWords() if pretokenizer == "spacy" else bert_words
        self.vocab = dict(vocab)
        self.merges = [tuple(pair) for pair in merges]
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._pieces = sorted(self.vocab, key=self.vocab.get)
        self._cache: dict[str, list[int]] = {}

        self.vocab_size = len(self.vocab)
        self.unk_id = self.vocab.get(UNK_PIECE, 0)
        self.pad_id = self.unk_id
        self.newline_id = self.vocab[NEWLINE_PIECE]
        self.eos_id = self.newline_id
        self.special_ids = {name: self.vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    @classmethod
    def from_files(
        cls, vocab_path: str, merges_path: str, pretokenizer: str = "auto"
    ) -> "BPETokenizer":
        """Reads transformers' `vocab.json` + `merges.txt`, or the original release's
        `encoder_bpe_40000.json` + `vocab_40000.bpe` (the same formats)."""
        texts = []
        for path in (vocab_path, merges_path):
            try:
                with open(path, encoding="utf-8") as f:
                    texts.append(f.read())
            except UnicodeDecodeError:
                raise UserError(f"{path} is not UTF-8 text: not a BPE tokenizer file") from None
        return cls.from_texts(*texts, pretokenizer, names=(vocab_path, merges_path))

    @classmethod
    def from_texts(
        cls,
        vocab_text: str,
        merges_text: str,
        pretokenizer: str = "auto",
        names: tuple[str, str] = (VOCAB_FILE, MERGES_FILE),
    ) -> "BPETokenizer":
        """The tokenizer of a `vocab.json` and a `merges.txt`'s contents; `names` are
        what its errors call them."""
        try:
            vocab = json.loads(vocab_text)
        except json.JSONDecodeError as e:
            raise UserError(f"{names[0]} is not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
            raise UserError(f"{names[0]} is not a JSON object of piece -> integer id")
        lines = merges_text.split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            pair = line.split()
            if len(pair) != 2:
                raise UserError(f"{names[1]}: merge {number} is not two pieces: {line!r}")
            merges.append(tuple(pair))
        return cls(vocab, merges, pretokenizer)

    @classmethod
    def load(cls, directory: str, pretokenizer: str = "auto") -> "BPETokenizer":
        return cls.from_files(
            os.path.join(directory, VOCAB_FILE), os.path.join(directory, MERGES_FILE), pretokenizer
        )

    def save(self, directory: str):
        """Writes `vocab.json` and `merges.txt`, each under a temporary name then renamed."""
        os.makedirs(directory, exist_ok=True)
        vocab_text, merges_text = self._files()
        for name, text in ((VOCAB_FILE, vocab_text), (MERGES_FILE, merges_text)):
            path = os.path.join(directory, name)
            with replacing(path, encoding="utf-8") as f:
                f.write(text)

    def _files(self) -> tuple[str, str]:
        vocab_text = json.dumps(
            {piece: self.vocab[piece] for piece in self._pieces}, ensure_ascii=False
        )
        merges_text = "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in self.merges]) + "\n"
        return vocab_text, merges_text

    @property
    def digest(self) -> str:
        """Identifies the ids this tokenizer produces: the vocabulary, the merges and the
        pretokenizer (installing spaCy changes the ids, so it must change the digest)."""
        vocab_text, merges_text = self._files()
        content = "\0".join([vocab_text, merges_text, self.pretokenizer])
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    def _bpe(self, word: str) -> list[str]:
        """The word's pieces: repeatedly merge every occurrence of its best-ranked pair."""
        symbols = list(word[:-1]) + [word[-1] + WORD_END]
        while len(symbols) > 1:
            pair = min(itertools.pairwise(symbols), key=lambda p: self._ranks.get(p, _NEVER))
            if pair not in self._ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= MAX_CACHED_WORDS:
                self._cache.clear()
            ids = [self.vocab.get(piece, self.unk_id) for piece in self._bpe(word)]
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._words(text):
            ids.extend(self._word_ids(word))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """`encode` of each text (`num_threads` is accepted for the shared interface)."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Pieces joined, each `</w>` a space; lines and specials as `encode_text` wrote them.

        Lowercasing, accents and spacing around punctuation are not recoverable, so this
        inverts `encode_text` only for lowercase words separated by single spaces.
        """
        names = {v: f"{k} " for k, v in self.special_ids.items()}
        names[self.newline_id] = "\n"
        text = "".join(
            names.get(i) or self._pieces[i].replace(WORD_END, " ") for i in map(int, ids)
        )
        return _SPACE_BEFORE_NEWLINE.sub("\n", text).rstrip(" ")

    def encode_text(self, text: str) -> list[int]:
        """Any text as ids, line by line, with the "\\n</w>" id between lines. As the
        original's `standardize` does to a whole text, a run of line breaks (blank lines,
        spaces around them) is one, and there is none at the start or the end."""
        ids: list[int] = []
        for i, line in enumerate(_LINE_BREAK.sub("\n", text).strip().split("\n")):
            if i:
                ids.append(self.newline_id)
            ids.extend(self.encode(line))
        return ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode_text(text) for text in texts]

    def encode_document(self, text: str) -> np.ndarray:
        """A whole book as ids, line by line, ending with `eos_id` (a line break)."""
        return np.asarray(self.encode_text(text) + [self.eos_id], dtype=np.int32)


_SPACE_BEFORE_NEWLINE = re.compile(r" +\n")
_NEVER = float("inf")
