"""The pretraining data of a run: corpus -> tokenizer -> token streams -> packed windows."""

import contextlib
import dataclasses
import logging
import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from gptjax import tokenizer as tokenizer_lib
from gptjax.data import corpus
from gptjax.data.pipeline import (
    PackedWindows,
    StaleCache,
    load_cached_tokens,
    read_json,
    read_meta,
    save_tokens,
    tokenize_books,
    write_json,
)
from gptjax.errors import UserError

SPLITS = ("train", "validation")
STREAMS_DIR = "data"  # in the workdir: the token streams, one .npy a split
STREAMS_FILE = "data.json"  # in the workdir: the corpus and tokenizer the streams are of


@dataclasses.dataclass
class LMData:
    tokenizer: tokenizer_lib.SentencePieceTokenizer  # or a converted run's GPT-1 BPE
    tokens: dict[str, np.ndarray]  # split -> the whole token stream
    windows: dict[str, PackedWindows]  # split -> packed n_ctx + 1 windows
    num_books: dict[str, int]
    description: str

    @classmethod
    def of(cls, tokenizer, tokens: dict, n_ctx: int, num_books: dict, description: str):
        """The data of these streams, packed into n_ctx + 1 windows."""
        windows = {split: PackedWindows(tokens[split], n_ctx, tokenizer.pad_id) for split in SPLITS}
        return cls(tokenizer, tokens, windows, num_books, str(description))


def prepare(
    config: ml_collections.ConfigDict, workdir: str, resuming: bool, evaluating: bool = False
) -> LMData:
    """Loads (preparing once) the corpus, trains or reloads the workdir's tokenizer, and
    tokenizes and packs each split.

    The tokenizer and token streams are cached in the workdir, but only written once
    every check has passed, so a run that fails here leaves the workdir as it was. The
    books are read only when a split must be tokenized or a tokenizer learned: a resume
    with both streams cached does not prepare the corpus again. When `resuming` from a
    checkpoint, a changed corpus or tokenizer is an error: the saved data position would
    point into different windows (said before the changed corpus is prepared, a copy as
    large as the books). `evaluating` a run reads its cached streams when they are of
    the configured corpus, or the books are gone and the config names the same ones;
    another corpus's held-out split is tokenized for the evaluation and not cached, so
    the run's own streams stay as they were, and its "train" stream is the run's own
    (the unigram baseline is fit on what the model learned from; the other books'
    training split only when the run's stream is gone).
    """
    tfds.display_progress_bar(False)
    tokenizer_path = os.path.join(workdir, tokenizer_lib.TOKENIZER_FILE)
    paths = {split: os.path.join(workdir, STREAMS_DIR, f"{split}.npy") for split in SPLITS}
    record_path = os.path.join(workdir, STREAMS_FILE)
    # The streams' record, kept beside the tokenizer: it outlives a deleted data/ folder.
    record = read_json(record_path)
    if evaluating and (cached := _cached(config, workdir, paths, record)):
        return cached
    description = corpus.describe(config.data)
    logging.info("corpus: %s", description)
    corpus.check_held_out_share(config.data)
    corpus_fingerprint = corpus.fingerprint(config.data)
    tokenizer, new_tokenizer = None, False
    if resuming and not tokenizer_lib.has_tokenizer(workdir):
        raise UserError(
            f"no tokenizer in {workdir} ({tokenizer_lib.TOKENIZER_FILE}, or GPT-1's vocab.json "
            "and merges.txt), but its checkpoints were trained with one; restore it (a "
            "converted model: copy its source's tokenizer files in) or use a new --workdir"
        )
    if tokenizer_lib.has_tokenizer(workdir):  # SentencePiece's, or a converted GPT-1 BPE
        tokenizer = tokenizer_lib.load_dir(workdir)
        if tokenizer.vocab_size != config.model.vocab_size:
            if resuming:
                raise UserError(
                    f"the tokenizer in {workdir} has {tokenizer.vocab_size} ids but "
                    f"model.vocab_size is {config.model.vocab_size}; use "
                    f"--config.model.vocab_size={tokenizer.vocab_size} or a new --workdir"
                )
            tokenizer = None  # nothing trained with it yet: learn a new one
        elif not resuming and not _made_with(
            read_meta(paths["train"]), f"{corpus_fingerprint}:{tokenizer.digest}", config.data
        ):
            # The streams saved with it were made from another corpus or tokenizer setting
            # (or are gone), and nothing was trained with it yet: learn one from this corpus.
            tokenizer = None
    other_corpus = UserError(
        f"the corpus ({description}) is not the one this run's checkpoints were trained "
        "on, so the saved data position would be wrong (a corpus moved or copied anew "
        "counts as another: its files' paths and times are part of its identity); restore "
        "the original books or use a new --workdir"
    )
    recorded_corpus, recorded_tokenizer = _recorded(record)
    # An evaluation of another corpus than the streams' (with the run's own tokenizer):
    # tokenized, not cached.
    scratch = bool(evaluating and tokenizer and recorded_corpus) and (
        recorded_tokenizer == tokenizer.digest and recorded_corpus != corpus_fingerprint
    )
    own_train = None  # with `scratch`: the run's training stream, what the model learned
    if scratch:
        with contextlib.suppress(StaleCache):
            own_train = load_cached_tokens(paths["train"], record["fingerprint"])
        logging.info(
            "%s is not the corpus whose streams %s caches (%s): tokenizing %s for this "
            "evaluation, without caching it",
            description,
            workdir,
            record.get("corpus"),
            "its held-out split (the unigram baseline is fit on the run's own training "
            "stream, as the model was)"
            if own_train is not None
            else "it",
        )
    elif resuming:  # (with the tokenizer it was trained with) before the corpus is prepared
        if recorded_tokenizer not in (None, tokenizer.digest):
            files = (
                tokenizer_path
                if os.path.exists(tokenizer_path)
                else f"the GPT-1 BPE in {workdir} (vocab.json and merges.txt)"
            )
            raise UserError(
                f"{files} is not the tokenizer this run's checkpoints were trained with (its "
                f"digest differs from the one recorded in {record_path}); restore the "
                "original or use a new --workdir"
            )
        if recorded_corpus not in (None, corpus_fingerprint):
            raise other_corpus
        if not record and not evaluating:  # deleted, or a run from before the record
            logging.warning(
                "%s is missing, so the corpus (%s) cannot be checked against the one the "
                "checkpoints were trained on: with another, the saved data position points "
                "into other windows; resuming, and recording this corpus",
                record_path,
                description,
            )
    books = None

    def the_books():  # prepared and opened when first needed
        nonlocal books
        if books is None:
            books = corpus.load_books(
                config.data, os.path.join(corpus.cache_dir(config.data), "tfds")
            )
        return books

    if tokenizer is None:
        logging.info(
            "learning a %d-piece SentencePiece BPE tokenizer from up to %d lines of the "
            "training books",
            config.model.vocab_size,
            config.data.tokenizer_sample_lines,
        )
        train_books = the_books()["train"]
        tokenizer = tokenizer_lib.train_sentencepiece(
            (train_books[i] for i in range(len(train_books))),
            config.model.vocab_size,
            config.data.tokenizer_sample_lines,
        )
        new_tokenizer = True
        logging.info("trained a %d-piece SentencePiece BPE tokenizer", tokenizer.vocab_size)

    fingerprint = f"{corpus_fingerprint}:{tokenizer.digest}"
    tokens, fresh = {}, set()
    for split in SPLITS:
        if split == "train" and own_train is not None:
            tokens[split] = own_train  # the other books' training split is not needed
            continue
        try:
            cached = (
                None if new_tokenizer or scratch else load_cached_tokens(paths[split], fingerprint)
            )
        except StaleCache:
            if resuming:
                raise other_corpus from None
            cached = None
        if cached is None:
            cached = tokenize_books(the_books()[split], tokenizer, split)
            fresh.add(split)
        tokens[split] = cached
        if tokens[split].size < config.model.n_ctx + 1:
            raise UserError(
                f"the {split} split has {tokens[split].size} tokens, fewer than one window "
                f"of model.n_ctx + 1 = {config.model.n_ctx + 1}; add text or lower "
                "--config.model.n_ctx"
            )
    if books is None and record.get("fingerprint") == fingerprint and record.get("num_books"):
        num_books = record["num_books"]  # both streams cached: the books were not needed
    else:
        num_books = {split: len(the_books()[split]) for split in SPLITS}
    if own_train is not None:
        num_books["train"] = (record.get("num_books") or num_books)["train"]
    if scratch:
        return LMData.of(tokenizer, tokens, config.model.n_ctx, num_books, description)
    sample_lines = config.data.tokenizer_sample_lines
    for split in (s for s in SPLITS if s in fresh):
        tokens[split] = save_tokens(
            paths[split], tokens[split], fingerprint, tokenizer_sample_lines=sample_lines
        )
    if fresh or record.get("num_books") != num_books or record.get("books") != _books(config):
        record = {
            "fingerprint": fingerprint,
            "corpus": description,
            "books": _books(config),
            "num_books": num_books,
        }
        write_json(record_path, record)
    if new_tokenizer:  # last: a tokenizer in a workdir is one its streams were made with
        tokenizer.save(tokenizer_path)
    return LMData.of(tokenizer, tokens, config.model.n_ctx, num_books, description)


def _books(config) -> str:
    """What the config names as its corpus, as recorded in data.json."""
    return config.data.books if config.data.corpus == "books" else config.data.corpus


def _recorded(record: dict) -> tuple[str | None, str | None]:
    """The corpus fingerprint and tokenizer digest a record's streams were made from
    (None, None when there is no record)."""
    corpus_part, _, tokenizer_part = record.get("fingerprint", "").rpartition(":")
    return (corpus_part, tokenizer_part) if corpus_part else (None, None)


def _cached(config, workdir: str, paths: dict, record: dict) -> LMData | None:
    """The run's data from its workdir alone (tokenizer, both streams and their record,
    all of one fingerprint), for an evaluation of the corpus they were made from; None
    if any is missing or stale, or the config names another corpus. When the books
    cannot be found, the config must name the recorded ones."""
    if not (tokenizer_lib.has_tokenizer(workdir) and record.get("num_books")):
        return None
    try:
        corpus_fingerprint = corpus.fingerprint(config.data)
    except UserError:  # the books are gone: the streams are all there is of them
        corpus_fingerprint = None
        if record.get("books", _books(config)) != _books(config):
            raise
    tokenizer = tokenizer_lib.load_dir(workdir)
    recorded_corpus, recorded_tokenizer = _recorded(record)
    if recorded_tokenizer != tokenizer.digest or corpus_fingerprint not in (None, recorded_corpus):
        return None
    tokens = {}
    for split in SPLITS:
        try:
            tokens[split] = load_cached_tokens(paths[split], record.get("fingerprint", ""))
        except StaleCache:
            return None
        if tokens[split] is None or tokens[split].size < config.model.n_ctx + 1:
            return None
    logging.info("corpus: %s (its token streams, cached in the workdir)", record.get("corpus"))
    return LMData.of(tokenizer, tokens, config.model.n_ctx, record["num_books"], record["corpus"])


def _made_with(meta: dict | None, fingerprint: str, data_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the saved stream of `meta` (see save_tokens) was made from this corpus and
    tokenizer, with this `data.tokenizer_sample_lines` (streams saved before it was
    recorded count as made with it)."""
    if meta is None or meta.get("fingerprint") != fingerprint:
        return False
    return meta.get("tokenizer_sample_lines", data_cfg.tokenizer_sample_lines) == (
        data_cfg.tokenizer_sample_lines
    )
