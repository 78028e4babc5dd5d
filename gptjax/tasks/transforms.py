"""The paper's input transformations (Section 3.3, Figure 1 right): examples -> token arrays.

With `s` = `_start_`, `$` = `_delimiter_` and `e` = `_classify_` (ids after the
pretrained vocabulary), each example becomes S sequences of one padded length L:

    classification   S = 1            s text e
    entailment       S = 1            s premise $ hypothesis e
    similarity       S = 2            s A $ B e   and   s B $ A e
    multiple choice  S = num_choices  s context $ answer_k e   for each answer k

The linear head reads the final hidden state at `e`, whose position is stored per
sequence (`clf_pos`); positions after it are padding, which a causal model never lets
influence `e`. `lengths` says how many ids of each sequence are real (for the auxiliary
LM loss, which is masked to them).

Truncation keeps every sequence within n_ctx. A single text keeps its beginning. Two
parts share the n_ctx - 3 ids left after the specials longest-first: the shorter part
is kept whole if it fits in half, else both get half; the first part loses its
*beginning* (so a question at the end of a RACE context, next to the answer, survives)
and the second part its end. Multiple choice fits the context with each answer on its
own, so a longer answer leaves less of the context's beginning in its sequence.
Similarity's two orderings are built from the same two cut parts, so both see the same
text. (The original code instead cut every part to n_ctx // 2 - 2
ids whatever the other's length.)
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from gptjax.tasks.spec import Example, TaskSpec


@dataclasses.dataclass(frozen=True)
class Specials:
    start: int
    delimiter: int
    classify: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Specials":
        ids = tokenizer.special_ids
        return cls(ids["_start_"], ids["_delimiter_"], ids["_classify_"])


def fit_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Two parts cut to at most `budget` ids together (see the module doc)."""
    if len(a) + len(b) <= budget:
        return a, b
    half = budget // 2
    if len(a) <= half:
        keep_a, keep_b = len(a), budget - len(a)
    elif len(b) <= budget - half:
        keep_a, keep_b = budget - len(b), len(b)
    else:
        keep_a, keep_b = half, budget - half
    return a[len(a) - keep_a :], b[:keep_b]


def single(text: list[int], n_ctx: int, sp: Specials) -> list[int]:
    return [sp.start, *text[: n_ctx - 2], sp.classify]


def pair(a: list[int], b: list[int], n_ctx: int, sp: Specials) -> list[int]:
    a, b = fit_pair(a, b, n_ctx - 3)
    return [sp.start, *a, sp.delimiter, *b, sp.classify]


def sequences(kind: str, parts: list[list[int]], n_ctx: int, sp: Specials) -> list[list[int]]:
    """The token sequences of one example whose texts (and choices, for multiple choice,
    after the context) are already tokenized as `parts`."""
    if kind == "classification":
        return [single(parts[0], n_ctx, sp)]
    if kind == "entailment":
        return [pair(parts[0], parts[1], n_ctx, sp)]
    if kind == "similarity":  # both orderings of the same (once truncated) two texts
        a, b = fit_pair(parts[0], parts[1], n_ctx - 3)
        return [pair(a, b, n_ctx, sp), pair(b, a, n_ctx, sp)]
    if kind == "multiple_choice":
        return [pair(parts[0], answer, n_ctx, sp) for answer in parts[1:]]
    raise ValueError(f"unknown task kind {kind!r}")


def _parts(example: Example) -> tuple[str, ...]:
    return example.texts + example.choices


def id_dtype(vocab_rows: int) -> type:
    """The dtype token ids of a vocabulary of `vocab_rows` are stored in: 16 bits where
    they fit (GPT-1's 40,481), half the memory of the encoded splits and their batches."""
    return np.uint16 if vocab_rows <= np.iinfo(np.uint16).max else np.int32


def encode(
    task: TaskSpec,
    examples: Sequence[Example],
    tokenizer,
    n_ctx: int,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """All `examples` as arrays, one row per example:

    tokens [N, S, L] (ids; padding is the tokenizer's pad id), clf_pos [N, S],
    lengths [N, S], label [N] (int32 class or choice index, float32 for regression; 0
    where unlabelled), weight [N] (1.0: a real example; padding rows added later get 0),
    labelled [N] (whether the label is known) and index [N] (the example's position).
    L is `length` if given, else the longest sequence (at most n_ctx).
    """
    sp = Specials.from_tokenizer(tokenizer)
    texts = [t for ex in examples for t in _parts(ex)]
    ids = iter(tokenizer.encode_texts(texts))
    seqs = []
    for ex in examples:
        parts = [next(ids) for _ in _parts(ex)]
        seqs.append(sequences(task.kind, parts, n_ctx, sp))
    num_seqs = {len(s) for s in seqs}
    if len(num_seqs) > 1:
        raise ValueError(f"examples have different numbers of sequences: {sorted(num_seqs)}")
    longest = max((len(x) for s in seqs for x in s), default=1)
    length = min(n_ctx, longest) if length is None else length
    n, s = len(examples), num_seqs.pop() if num_seqs else 1
    total_vocab = tokenizer.vocab_size + 3
    dtype = id_dtype(total_vocab)
    tokens = np.full((n, s, length), tokenizer.pad_id, dtype)
    lengths = np.zeros((n, s), np.int32)
    for i, example_seqs in enumerate(seqs):
        for j, seq in enumerate(example_seqs):
            if len(seq) > length:
                raise ValueError(f"sequence of {len(seq)} ids exceeds the padded length {length}")
            tokens[i, j, : len(seq)] = seq
            lengths[i, j] = len(seq)
    labelled = np.array([ex.label is not None for ex in examples], bool)
    label_dtype = np.float32 if task.regression else np.int32
    labels = np.array([0 if ex.label is None else ex.label for ex in examples], label_dtype)
    return {
        "tokens": tokens,
        "clf_pos": lengths - 1,
        "lengths": lengths,
        "label": labels,
        "weight": np.ones((n,), np.float32),
        "labelled": labelled,
        "index": np.arange(n, dtype=np.int32),
    }


class Rows:
    """Random access to the rows of `encode`'s arrays (a grain data source)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["index"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return {k: v[i] for k, v in self.arrays.items()}
