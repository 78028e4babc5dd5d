"""From book texts to batches: tokenize, pack into contiguous windows, shuffle and batch.

Packing (Section 4.1: "contiguous sequences of 512 tokens"): every split is one stream of
token ids, the books concatenated, each ended by </s>. Window i holds the n_ctx + 1 ids
stream[i * n_ctx : i * n_ctx + n_ctx + 1]; the model reads the first n_ctx and predicts
the last n_ctx. Consecutive windows overlap by one id, so across all windows every
stream position but the last is an input exactly once and every one but the first a
target exactly once: no token lost or duplicated. The last window is padded, and its
padded targets have weight 0.
"""

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from gptjax.atomic import replacing
from gptjax.errors import UserError
from gptjax.metrics import Progress
from gptjax.tokenizer import SentencePieceTokenizer


def tokenize_books(
    books: Sequence[str], tokenizer: SentencePieceTokenizer, name: str = ""
) -> np.ndarray:
    """One stream of ids for a sequence of books, with periodic progress lines."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    parts = []
    progress = Progress(f"tokenizing {name}", len(books), unit="books")
    for i in range(len(books)):
        parts.append(tokenizer.encode_document(books[i]).astype(dtype))
        if progress.due():
            progress.log(i + 1)
    tokens = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    if name:  # a run's split (the benchmark times this without a line)
        took = time.time() - progress.started
        logging.info(
            "tokenized %s: %d books, %d tokens in %.1fs", name, len(books), tokens.size, took
        )
    return tokens


def load_cached_tokens(path: str, fingerprint: str) -> np.ndarray | None:
    """The token stream saved at `path` (memory-mapped) if it was made from the corpus and
    tokenizer `fingerprint` names; None if absent or damaged (a cache: it is made again);
    raises StaleCache if made from others."""
    meta_path = path + ".json"
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        return None
    meta = read_meta(path)
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:  # truncated or overwritten
        logging.warning("the cached tokens %s are unreadable (%s): tokenizing again", path, e)
        return None
    if meta is None:
        logging.warning(
            "the cached tokens %s have no readable %s.json: tokenizing again", path, path
        )
        return None
    if meta.get("fingerprint") != fingerprint:
        raise StaleCache(path)
    if tokens.ndim != 1 or tokens.size != meta.get("num_tokens"):
        logging.warning("the cached tokens %s are incomplete: tokenizing again", path)
        return None
    return tokens


def read_json(path: str) -> dict:
    """The JSON object at `path`; {} if it is missing, damaged or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_meta(path: str) -> dict | None:
    """The JSON saved beside the token stream at `path` (see save_tokens); None if it is
    missing or damaged."""
    return read_json(path + ".json") or None


def write_json(path: str, value: dict):
    """`value` as JSON at `path`, written whole or not at all (see _write_whole)."""
    _write_whole([(path, lambda f: f.write(json.dumps(value).encode()))], path)


def save_tokens(path: str, tokens: np.ndarray, fingerprint: str, **extra) -> np.ndarray:
    """Saves a token stream with its fingerprint and `extra` facts and returns it
    memory-mapped."""
    meta = {"fingerprint": fingerprint, "num_tokens": int(tokens.size), **extra}
    _write_whole(
        [
            (path, lambda f: np.save(f, tokens)),
            (path + ".json", lambda f: f.write(json.dumps(meta).encode())),
        ],
        path,
    )
    return np.load(path, mmap_mode="r")


def _write_whole(files, what: str):
    """Each (path, write) of `files` written under a temporary name, then renamed. A
    failed write (a full disk, `data` a file) is a UserError naming `what` that leaves
    no temporary file behind."""
    try:
        os.makedirs(os.path.dirname(files[0][0]), exist_ok=True)
        for target, write in files:
            with replacing(target, "wb") as f:
                write(f)
    except OSError as e:
        raise UserError(
            f"cannot write {what} ({e.strerror or e}); free some space, or move what is in "
            "the way in the workdir"
        ) from None


class StaleCache(Exception):
    """A cached token stream made from another corpus or tokenizer."""


class PackedWindows:
    """Random-access windows of n_ctx + 1 ids over a token stream (see module doc)."""

    def __init__(self, tokens: np.ndarray, n_ctx: int, pad_id: int):
        if tokens.size < 2:
            raise ValueError("a token stream needs at least two tokens to predict one")
        self.tokens, self.n_ctx, self.pad_id = tokens, n_ctx, pad_id

    def __len__(self) -> int:
        return -(-(self.tokens.size - 1) // self.n_ctx)  # ceil((n - 1) / n_ctx)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.gather(np.array([i])).items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Windows `indices`, stacked: tokens [N, n_ctx + 1] (int32, padded past the end
        of the stream) and weights [N, n_ctx] (1 for a real target, 0 for padding), in
        one vectorised read of the stream."""
        indices = np.asarray(indices, np.int64)
        if indices.size and not (indices.min() >= 0 and indices.max() < len(self)):
            raise IndexError(f"window indices outside 0..{len(self) - 1}")
        positions = indices[:, None] * self.n_ctx + np.arange(self.n_ctx + 1)
        inside = positions < self.tokens.size
        read = np.asarray(self.tokens[np.minimum(positions, self.tokens.size - 1)])
        tokens = np.where(inside, read, self.pad_id).astype(np.int32)
        return {"tokens": tokens, "weights": inside[:, 1:].astype(np.float32)}


def train_iterator(
    windows: PackedWindows,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's share of each global batch.

    All processes shuffle the same way (each epoch a fresh permutation: grain reshuffles
    on repeat) and cut the stream into chunks of `global_batch_size / process_count`
    windows; global batch b is chunks b * process_count ... + process_count - 1, and
    process i reads only chunk b * process_count + i. So a global batch holds the same
    windows in the same order whatever the number of processes, and each process reads
    only its own. The iterator's `get_state()` is its position.
    """
    local_batch = global_batch_size // process_count
    # Sources with a `gather` (PackedWindows) are read a batch at a time: grain shuffles
    # and batches their indices, then one vectorised read per batch (2.3x faster than a
    # window at a time; the same batches and iterator state).
    gather = getattr(windows, "gather", None)
    source = grain.MapDataset.range(len(windows)) if gather else grain.MapDataset.source(windows)
    dataset = (
        source.shuffle(seed=seed)
        .repeat(None)
        .batch(local_batch, drop_remainder=True)[process_index::process_count]
    )
    if gather:
        dataset = dataset.map(gather)
    # Windows are slices of a memory-mapped array: one reader thread keeps up, and more
    # would only compete with XLA for the cores.
    read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)
    return iter(dataset.to_iter_dataset(read_options))


def eval_batches(
    windows: PackedWindows,
    global_batch_size: int,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every window once, in order; the last batch is padded with zero-weight windows so
    that every batch has the same shape (one compilation). Its `len` is the number of
    batches (an evaluation's progress line says how many are left)."""
    local_batch = global_batch_size // process_count
    shard = grain.MapDataset.source(windows)[process_index::process_count]
    # Counted from the largest shard so every process runs the same number of steps.
    num_batches = math.ceil(math.ceil(len(windows) / process_count) / local_batch)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    padding = {k: np.zeros_like(v) for k, v in windows[0].items()}  # weight 0

    def batches():
        for b in range(num_batches):
            indices = range(b * local_batch, (b + 1) * local_batch)
            rows = [shard[i] if i < len(shard) else padding for i in indices]
            yield {k: np.stack([r[k] for r in rows]) for k in padding}

    return Counted(batches(), num_batches)


class Counted:
    """An iterator that knows how many items it yields."""

    def __init__(self, items: Iterator, count: int):
        self.items, self.count = items, count

    def __iter__(self):
        return self.items

    def __next__(self):
        return next(self.items)

    def __len__(self) -> int:
        return self.count


UNIGRAM_PART = 1 << 26  # tokens counted at a time


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int):
    """Perplexity on `eval_tokens` of the add-one-smoothed unigram model of `train_tokens`:
    the baseline a language model must beat by using context."""
    counts = np.zeros(vocab_size, np.float64)
    # In parts: bincount copies its input to int64 (8 GB for BookCorpus's billion tokens).
    for start in range(0, train_tokens.size, UNIGRAM_PART):
        part = np.asarray(train_tokens[start : start + UNIGRAM_PART])
        counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
    log_probs = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    # Targets are every eval token but the first (see PackedWindows).
    return float(np.exp(-log_probs[np.asarray(eval_tokens[1:])].mean()))
