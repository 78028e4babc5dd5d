"""Tokenizers: a SentencePiece BPE learned from the training corpus, or GPT-1's own BPE.

The ids follow the original GPT-1 layout: `vocab_size` ordinary ids (here <unk>=0,
<pad>=1, the end-of-document marker </s>=2 and "\\n", then the learned pieces), and the
fine-tuning specials `_start_`, `_delimiter_`, `_classify_` reserved *after* them, at
ids vocab_size .. vocab_size+2. Pretraining never sees the specials; fine-tuning
appends their embedding rows (Section 3.3 of the paper). The released GPT-1 vocabulary
(`gptjax.bpe.BPETokenizer`) has the same interface; `load_dir` picks whichever a directory holds.
"""

import hashlib
import io
import itertools
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from gptjax.atomic import replacing
from gptjax.errors import UserError

SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")
TOKENIZER_FILE = "tokenizer.model"


class SentencePieceTokenizer:
    """A trained SentencePiece BPE model plus the reserved fine-tuning specials."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.unk_id = self._sp.unk_id()
        self.pad_id = self._sp.pad_id()
        self.eos_id = self._sp.eos_id()
        self.newline_id = self._sp.piece_to_id("\n")
        self.special_ids = {name: self.vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    @classmethod
    def load(cls, path: str) -> "SentencePieceTokenizer":
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except OSError as e:  # e.g. a directory in its place
            raise UserError(
                f"cannot read {path} ({e.strerror}); restore the tokenizer file or use a new "
                "--workdir"
            ) from None
        try:
            tokenizer = cls(proto)
        except RuntimeError as e:  # SentencePiece's parse error
            raise UserError(
                f"{path} is not a SentencePiece model ({_one_line(e)}); restore it from a "
                "copy, or use a new --workdir"
            ) from None
        if tokenizer.vocab_size == 0:  # an empty file parses as a model of no pieces
            raise UserError(
                f"{path} is not a SentencePiece model (it holds no pieces: {len(proto)} "
                "bytes); restore it from a copy, or use a new --workdir"
            )
        return tokenizer

    def save(self, path: str):
        """Written under a temporary name and renamed: never half-written (a failed
        write, a full disk, is a UserError that leaves no temporary file)."""
        try:
            with replacing(path, "wb") as f:
                f.write(self.model_proto)
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror or e}); free some space") from None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

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

    def encode_text(self, text: str) -> list[int]:
        """Any text as ids, line by line, with the "\\n" id between lines."""
        return self.encode_texts([text])[0]

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_text` of many texts at once (SentencePiece encodes them in parallel)."""
        lines = [_lines(text) for text in texts]
        flat = self.encode_batch([line for parts in lines for line in parts])
        out, i = [], 0
        for parts in lines:
            ids: list[int] = []
            for j in range(len(parts)):
                if j:
                    ids.append(self.newline_id)
                ids.extend(flat[i + j])
            i += len(parts)
            out.append(ids)
        return out

    def encode_document(self, text: str) -> np.ndarray:
        """A whole book as ids: line by line (keeping newlines; "\\r\\n" reads as "\\n")
        and ending with </s>."""
        return np.asarray(self.encode_text(text) + [self.eos_id], dtype=np.int32)


def has_tokenizer(directory: str) -> bool:
    """Whether `load_dir(directory)` finds a tokenizer there."""
    from gptjax import bpe  # here, not at the top: gptjax.bpe imports this module

    bpe_files = (os.path.join(directory, name) for name in (bpe.VOCAB_FILE, bpe.MERGES_FILE))
    return os.path.exists(os.path.join(directory, TOKENIZER_FILE)) or all(
        map(os.path.exists, bpe_files)
    )


def save_dir(tokenizer, directory: str):
    """Saves either kind of tokenizer into `directory`, where `load_dir` finds it."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.save(os.path.join(directory, TOKENIZER_FILE))
    else:
        tokenizer.save(directory)


def load_dir(directory: str):
    """The tokenizer saved in `directory`: a SentencePiece `tokenizer.model`, else GPT-1's BPE
    (`vocab.json` + `merges.txt`, as transformers saves it)."""
    from gptjax import bpe

    sentencepiece_path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.exists(sentencepiece_path):
        return SentencePieceTokenizer.load(sentencepiece_path)
    if has_tokenizer(directory):
        return bpe.BPETokenizer.load(directory)
    raise UserError(
        f"no tokenizer in {directory}: it needs {TOKENIZER_FILE} (SentencePiece) or "
        f"{bpe.VOCAB_FILE} and {bpe.MERGES_FILE} (GPT-1 BPE)"
    )


# SentencePiece's trainer skips, without a word, every sentence over its
# max_sentence_length (4,192 bytes): a book written as one line, or a paragraph a line,
# would never reach it. Longer lines are cut, at spaces, into pieces of at most this many
# characters (4 UTF-8 bytes each at the most).
_MAX_LINE_CHARS = 1024


def _lines(text: str) -> list[str]:
    """The lines of `text`, ended by "\\n" or Windows' "\\r\\n" (SentencePiece's trainer
    drops a line's last "\\r", so it would never get an id: each line of a CRLF book
    would end in <unk>)."""
    return text.split("\n") if "\r" not in text else text.replace("\r\n", "\n").split("\n")


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in _lines(text):
            if not line.strip():
                continue
            if len(line) <= _MAX_LINE_CHARS or len(line.encode()) <= 4 * _MAX_LINE_CHARS:
                yield line
                continue
            while line:
                cut = len(line)
                if cut > _MAX_LINE_CHARS:
                    cut = line.rfind(" ", 1, _MAX_LINE_CHARS + 1)
                    cut = cut if cut > 0 else _MAX_LINE_CHARS
                if line[:cut].strip():
                    yield line[:cut]
                line = line[cut:]


def sample_lines(lines: Iterable[str], k: int, seed: int = 0) -> list[str]:
    """`k` of `lines` drawn uniformly without replacement in one pass, the same ones for
    the same seed (reservoir sampling, Li's algorithm L: random draws only where a line
    enters the sample). All of them, in order, when there are at most `k`."""
    lines = iter(lines)
    sample = list(itertools.islice(lines, k))
    if len(sample) < k or k == 0:
        return sample
    rng = random.Random(seed)
    w = math.exp(math.log(1.0 - rng.random()) / k)
    while True:
        skip = math.floor(math.log(1.0 - rng.random()) / math.log1p(-w)) if w < 1 else 0
        line = next(itertools.islice(lines, skip, None), None)
        if line is None:
            return sample
        sample[rng.randrange(k)] = line
        w *= math.exp(math.log(1.0 - rng.random()) / k)


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, max_lines: int
) -> SentencePieceTokenizer:
    """Learns a BPE vocabulary of exactly `vocab_size` pieces from `max_lines` non-empty
    lines sampled uniformly from all of `texts`, in memory. The sample is drawn here,
    seeded, so the same corpus always gives the same tokenizer (SentencePiece's own
    sampling is not reproducible from run to run)."""
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample_lines(_training_lines(texts), max(max_lines, 101))),
            model_writer=model,
            input_sentence_size=max(max_lines, 101),  # SentencePiece requires > 100
            shuffle_input_sentence=True,
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
        message = _one_line(e)
        if "smaller than required_chars" in message:
            fix = "raise --config.model.vocab_size: the corpus has more distinct characters"
        elif "too high" in message:
            fix = "a small corpus needs a smaller --config.model.vocab_size"
        else:
            fix = "check that the corpus holds text, or change --config.model.vocab_size"
        raise UserError(
            f"could not train a {vocab_size}-piece tokenizer on this corpus ({message}); {fix}"
        ) from None
    return SentencePieceTokenizer(_machine_independent(model.getvalue()))


def _machine_independent(model_proto: bytes) -> bytes:
    """The trained model with its recorded trainer thread count (this machine's cores)
    set to 1: the same corpus then gives the same bytes, and so the same digest (the
    key of every cache of its token ids), on any machine. Encoding does not read it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    proto.trainer_spec.num_threads = 1
    return proto.SerializeToString()


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
