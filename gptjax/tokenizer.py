"""Tokenizers: a SentencePiece BPE learned from the training corpus.

The ids follow the original GPT-1 layout: `vocab_size` ordinary ids (here <unk>=0,
<pad>=1, the end-of-document marker </s>=2 and "\\n", then the learned pieces), and the
fine-tuning specials `_start_`, `_delimiter_`, `_classify_` reserved *after* them, at
ids vocab_size .. vocab_size+2. Pretraining never sees the specials; fine-tuning
appends their embedding rows (Section 3.3 of the paper).
"""

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from gptjax.errors import UserError

SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")
TOKENIZER_FILE = "tokenizer.model"


class SentencePieceTokenizer:
    """A trained SentencePiece BPE model plus the reserved fine-tuning specials."""

    def __init__(self, model_path: str):
        self.path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()
        self.unk_id = self._sp.unk_id()
        self.pad_id = self._sp.pad_id()
        self.eos_id = self._sp.eos_id()
        self.newline_id = self._sp.piece_to_id("\n")
        self.special_ids = {name: self.vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of `encode_document` (lines are encoded separately, so are decoded so)."""
        names = {v: k for k, v in self.special_ids.items()}
        names[self.newline_id] = "\n"
        names[self.eos_id] = ""
        pieces, run = [], []
        for i in map(int, ids):
            if i in names:
                pieces += [self._sp.decode(run), names[i]]
                run = []
            else:
                run.append(i)
        return "".join(pieces + [self._sp.decode(run)])

    def encode_document(self, text: str) -> np.ndarray:
        """A whole book as ids: line by line (keeping newlines) and ending with </s>."""
        lines = text.split("\n")
        out: list[int] = []
        for i, ids in enumerate(self.encode_batch(lines)):
            if i:
                out.append(self.newline_id)
            out.extend(ids)
        out.append(self.eos_id)
        return np.asarray(out, dtype=np.int32)


def _training_lines(texts: Iterable[str], max_lines: int) -> Iterator[str]:
    count = 0
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line
                count += 1
                if count >= max_lines:
                    return


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, model_path: str, max_lines: int
) -> SentencePieceTokenizer:
    """Learns a BPE vocabulary of exactly `vocab_size` pieces from the first `max_lines`
    non-empty lines of `texts` (deterministic: no sampling) and writes `model_path`."""
    prefix = model_path.removesuffix(".model")
    tmp_prefix = prefix + ".tmp"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_lines),
            model_prefix=tmp_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=False,
            unk_id=0,
            pad_id=1,
            eos_id=2,
            bos_id=-1,
            # Keep line breaks: the original vocabulary has "\n</w>" too.
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(
            f"could not train a {vocab_size}-piece tokenizer on this corpus ({e}); "
            "a small corpus needs a smaller --config.model.vocab_size"
        ) from None
    # Written under a temporary name and renamed, so an interrupted run leaves no
    # half-written tokenizer that a resumed run would pick up.
    os.replace(tmp_prefix + ".model", model_path)
    os.remove(tmp_prefix + ".vocab")
    return SentencePieceTokenizer(model_path)


def load_or_train(
    workdir: str, vocab_size: int, texts: Iterable[str], max_lines: int
) -> tuple[SentencePieceTokenizer, bool]:
    """The workdir's tokenizer, trained from `texts` on the first run. Returns it and
    whether it was trained now. A saved tokenizer of another size is an error."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.exists(path):
        tokenizer = SentencePieceTokenizer(path)
        if tokenizer.vocab_size != vocab_size:
            raise UserError(
                f"the tokenizer in {path} has {tokenizer.vocab_size} ids but "
                f"model.vocab_size is {vocab_size}; use --config.model.vocab_size="
                f"{tokenizer.vocab_size} or a new --workdir"
            )
        return tokenizer, False
    return train_sentencepiece(texts, vocab_size, path, max_lines), True
