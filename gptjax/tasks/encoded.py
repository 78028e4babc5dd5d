"""Encoded task splits kept on disk, so that a task is tokenized once for all its runs.

Every fine-tuning run on a task (seeds, ablations, a resumed run, `--mode=eval`) encodes
the same examples with the same tokenizer: on 2 CPU cores 100k sentence pairs took 3.5 s
with GPT-1's BPE (BERT pre-tokenizer; the original ftfy + spaCy one was not measured)
and 5 s with SentencePiece; read back, 0.4 s (mostly hashing them). `encode` keeps
`transforms.encode`'s arrays in `<cache>/encoded/<task>/<split>-<key>.npz`, where the key
hashes everything the arrays depend on: the examples (texts, choices, labels, in order),
the tokenizer's digest and special ids, n_ctx, the task's kind and label type, and the
source code of `gptjax.tasks.transforms` and of the tokenizer's module, and the versions
of the libraries tokenizing uses (a change to the input transformations or to tokenizing
is a new key). So a file is never reused for
other inputs; old ones are just left behind (delete the directory freely).

The file is written to a temporary name and renamed, so a killed run leaves no torn file;
a file that cannot be read is encoded again and replaced, and a cache that cannot be
written costs a warning, not the run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import unicodedata
import zipfile
from collections.abc import Sequence

import numpy as np

from gptjax.atomic import replacing
from gptjax.tasks import transforms
from gptjax.tasks.spec import Example, TaskSpec


def path(cache: str, task: TaskSpec, split: str, key: str) -> str:
    return os.path.join(cache, "encoded", task.name, f"{split}-{key[:20]}.npz")


def key(task: TaskSpec, examples: Sequence[Example], tokenizer, n_ctx: int) -> str:
    """The hash of everything `transforms.encode`'s arrays depend on."""
    h = hashlib.sha256()
    inputs = {
        "task": [task.name, task.kind, task.regression],
        "n_ctx": n_ctx,
        "tokenizer": [tokenizer.digest, tokenizer.vocab_size, tokenizer.pad_id],
        "specials": tokenizer.special_ids,
        # The code that makes the ids: a fix there must not meet arrays made before it.
        "code": [_source_digest(transforms), _source_digest(type(tokenizer))],
        # ... and the libraries under it (SentencePiece; GPT-1's BPE normalises text with
        # ftfy and splits words with spaCy's rules).
        "libraries": _library_versions(),
    }
    h.update(json.dumps(inputs, default=repr).encode())
    for ex in examples:
        h.update(json.dumps([ex.texts, ex.choices, ex.label], default=repr).encode())
    return h.hexdigest()


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"unicode": unicodedata.unidata_version}
    for name in ("sentencepiece", "ftfy", "spacy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _source_digest(obj) -> str:
    return hashlib.sha256(inspect.getsource(inspect.getmodule(obj)).encode()).hexdigest()


def encode(
    task: TaskSpec,
    split: str,
    examples: Sequence[Example],
    tokenizer,
    n_ctx: int,
    cache: str,
) -> dict[str, np.ndarray]:
    """`transforms.encode(task, examples, tokenizer, n_ctx)`, from `cache` when it holds
    this split's arrays and saved there when not."""
    file = path(cache, task, split, key(task, examples, tokenizer, n_ctx))
    try:
        with np.load(file) as saved:
            return {name: saved[name] for name in saved.files}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        logging.warning("cannot read %s (%s); encoding %s again", file, e, split)
    arrays = transforms.encode(task, examples, tokenizer, n_ctx)
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with replacing(file, "wb") as f:  # hosts may share the cache
            np.savez(f, **arrays)
    except OSError as e:
        logging.warning("cannot cache the encoded %s split in %s: %s", split, file, e)
    return arrays
