"""The pretraining data of a run: corpus -> tokenizer -> token streams -> packed windows."""

import dataclasses
import hashlib
import logging
import os

import jax
import ml_collections
import numpy as np

from gptjax import tokenizer as tokenizer_lib
from gptjax.data import corpus
from gptjax.data.pipeline import PackedWindows, cached_tokens
from gptjax.errors import UserError

SPLITS = ("train", "validation")


@dataclasses.dataclass
class LMData:
    tokenizer: tokenizer_lib.SentencePieceTokenizer
    tokens: dict[str, np.ndarray]  # split -> the whole token stream
    windows: dict[str, PackedWindows]  # split -> packed n_ctx + 1 windows
    num_books: dict[str, int]
    description: str


def cache_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """Where prepared datasets live: data.cache_dir, else $GPTJAX_CACHE, else ~/.cache."""
    return data_cfg.cache_dir or os.environ.get(
        "GPTJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gptjax")
    )


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def prepare(config: ml_collections.ConfigDict, workdir: str) -> LMData:
    """Loads (preparing once) the corpus, trains or reloads the workdir's tokenizer, and
    tokenizes and packs each split, caching the token streams in the workdir."""
    books = corpus.load_books(config.data, os.path.join(cache_dir(config.data), "tfds"))
    if jax.process_index() == 0:
        logging.info("corpus: %s", corpus.describe(config.data))
    tokenizer, trained = tokenizer_lib.load_or_train(
        workdir,
        config.model.vocab_size,
        (books["train"][i] for i in range(len(books["train"]))),
        config.data.tokenizer_sample_lines,
    )
    if trained:
        logging.info("trained a %d-piece SentencePiece BPE tokenizer", tokenizer.vocab_size)
    fingerprint = corpus.fingerprint(config.data) + ":" + _file_digest(tokenizer.path)
    tokens, windows = {}, {}
    for split in SPLITS:
        path = os.path.join(workdir, "data", f"{split}.npy")
        tokens[split] = cached_tokens(path, books[split], tokenizer, fingerprint)
        if tokens[split].size < config.model.n_ctx + 1:
            raise UserError(
                f"the {split} split has {tokens[split].size} tokens, fewer than one window "
                f"of model.n_ctx + 1 = {config.model.n_ctx + 1}; add text or lower "
                "--config.model.n_ctx"
            )
        windows[split] = PackedWindows(tokens[split], config.model.n_ctx, tokenizer.pad_id)
    return LMData(
        tokenizer=tokenizer,
        tokens=tokens,
        windows=windows,
        num_books={split: len(books[split]) for split in SPLITS},
        description=corpus.describe(config.data),
    )
