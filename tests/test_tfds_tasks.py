"""The paper's TFDS tasks: their specs, record conversion, and preparing and reading them
without TensorFlow or network (TFDS's mock data, or real preparation from fake downloads)."""

import json
import math
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as data_sources_base
from tensorflow_datasets.text.glue import Glue

from gptjax.errors import UserError
from gptjax.tasks import tfds_loader, tfds_records, tfds_tasks
from gptjax.tasks.spec import KINDS, Example
from gptjax.tasks.tfds_tasks import TFDS_TASKS

# name: kind, metrics, paper, eval splits, test splits, GLUE submission file.
ACC, VAL, TEST = ("accuracy",), ("validation",), ("test",)
EXPECTED = {
    "cola": ("classification", ("mcc",), {"mcc": 45.4}, VAL, TEST, "CoLA"),
    "sst2": ("classification", ACC, {"accuracy": 91.3}, VAL, TEST, "SST-2"),
    "mrpc": ("similarity", ("f1", "accuracy"), {"f1": 82.3}, VAL, TEST, "MRPC"),
    "qqp": ("similarity", ("f1", "accuracy"), {"f1": 70.3}, VAL, TEST, "QQP"),
    "stsb": ("similarity", ("pearson", "spearman"), {"pearson": 82.0}, VAL, TEST, "STS-B"),
    "mnli": (
        "entailment",
        ACC,
        {"accuracy": 82.1, **{f"{s}_mismatched/accuracy": 81.4 for s in ("validation", "test")}},
        ("validation_matched", "validation_mismatched"),
        ("test_matched", "test_mismatched", "test_ax"),
        None,
    ),
    "qnli": ("entailment", ACC, {"accuracy": 88.1}, VAL, TEST, "QNLI"),
    "rte": ("entailment", ACC, {"accuracy": 56.0}, VAL, TEST, "RTE"),
    "snli": ("entailment", ACC, {"accuracy": 89.9}, VAL, TEST, None),
    "scitail": ("entailment", ACC, {"accuracy": 88.3}, VAL, TEST, None),
    "race": (
        "multiple_choice",
        ACC,
        {
            "accuracy": 59.0,
            **{f"{s}_middle/accuracy": 62.9 for s in ("validation", "test")},
            **{f"{s}_high/accuracy": 57.4 for s in ("validation", "test")},
        },
        ("validation", "validation_middle", "validation_high"),
        ("test", "test_middle", "test_high"),
        None,
    ),
    "story_cloze": ("multiple_choice", ACC, {"accuracy": 86.5}, VAL, TEST, None),
}

# The stock TFDS dataset behind each task (the builders' own label names are checked).
STOCK = {
    **{n: f"glue/{n}" for n in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")},
    "snli": "snli",
    "scitail": "sci_tail",
    "race": "race/high",
    "story_cloze": "story_cloze/2016",
}

STORY_CLOZE_HEADER = (
    "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
    "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
)


@pytest.fixture(autouse=True)
def tfds_temp_dirs(tmp_path, monkeypatch):
    """Keeps TFDS's temp dirs (one, empty, per builder not yet prepared) in tmp_path."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def stock_builder(dataset, data_dir):
    name, _, config = dataset.partition("/")
    if name == "glue":
        return Glue(config=config, data_dir=str(data_dir))
    return tfds.builder_cls(name)(config=config or None, data_dir=str(data_dir))


def check_example(spec, example):
    assert isinstance(example, Example)
    assert all(isinstance(t, str) and t for t in example.texts + example.choices)
    if spec.kind == "multiple_choice":
        assert len(example.texts) == 1 and len(example.choices) == spec.num_choices
        assert isinstance(example.label, int) and 0 <= example.label < spec.num_choices
        # RACE's questions are named by their article's file and place; Story Cloze keeps
        # no id in TFDS.
        assert isinstance(example.uid, str) if spec.name == "race" else example.uid is None
        return
    assert len(example.texts) == (1 if spec.kind == "classification" else 2)
    assert example.choices == ()
    if spec.regression:
        assert isinstance(example.label, float) and 0.0 <= example.label <= 5.0
    else:
        assert isinstance(example.label, int) and 0 <= example.label < len(spec.label_names)
    glue = spec.submission != {}
    assert isinstance(example.uid, int) if glue else example.uid is None


# ----------------------------------------------------------------------------------------
# The table.


def test_task_table():
    assert set(TFDS_TASKS) == set(EXPECTED)
    for name, (kind, metrics, paper, evals, tests, submission) in EXPECTED.items():
        spec = TFDS_TASKS[name]
        assert (spec.name, spec.kind, spec.metrics, spec.paper) == (name, kind, metrics, paper)
        assert (spec.train_split, spec.eval_splits, spec.test_splits) == ("train", evals, tests)
        assert spec.kind in KINDS and spec.description
        if submission:
            assert spec.submission == {"test": f"{submission}.tsv"}
    assert TFDS_TASKS["mnli"].submission == {
        "test_matched": "MNLI-m.tsv",
        "test_mismatched": "MNLI-mm.tsv",
        "test_ax": "AX.tsv",  # GLUE's diagnostic set, predicted with the MNLI model
    }
    assert TFDS_TASKS["mnli"].load.split_datasets == {"test_ax": ("glue/ax",)}
    assert TFDS_TASKS["mnli"].load.splits["test_ax"] == ("test", "all")
    assert TFDS_TASKS["stsb"].regression and TFDS_TASKS["stsb"].num_outputs == 1
    assert [TFDS_TASKS[n].num_choices for n in ("race", "story_cloze")] == [4, 2]


@pytest.mark.parametrize("name", sorted(TFDS_TASKS))
def test_label_names_are_the_builders(name, data_dir):
    spec = TFDS_TASKS[name]
    features = stock_builder(STOCK[name], data_dir).info.features
    if spec.kind == "multiple_choice":
        assert spec.label_names == ()
        assert {"options", "answers"} <= set(features) or {"endings", "label"} <= set(features)
    elif spec.regression:
        assert spec.label_names == ()
        assert not isinstance(features["label"], tfds.features.ClassLabel)
        assert features["label"].np_dtype == np.float32
    else:
        assert list(spec.label_names) == features["label"].names
        assert spec.num_outputs == len(spec.label_names)


def test_import_is_cheap():
    code = "import sys, gptjax.tasks.tfds_tasks; assert 'tensorflow_datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------
# Records to examples.


def test_glue_test_record_has_no_label_and_keeps_idx():
    record = {"sentence1": b"A caf\xc3\xa9.", "sentence2": b"B", "label": -1, "idx": np.int32(41)}
    assert tfds_records.glue_examples(record, ("sentence1", "sentence2")) == [
        Example(texts=("A café.", "B"), label=None, uid=41)
    ]
    record["label"] = np.float32(-1.0)  # STS-B's test split.
    [example] = tfds_records.glue_examples(record, ("sentence1", "sentence2"), regression=True)
    assert example.label is None and example.uid == 41
    record["label"] = np.float32(3.8)
    [example] = tfds_records.glue_examples(record, ("sentence1", "sentence2"), regression=True)
    assert type(example.label) is float and math.isclose(example.label, 3.8, rel_tol=1e-6)


PAIR = ("sentence1", "sentence2")
NLI = ("premise", "hypothesis")


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("cola", ("sentence",)),
        ("sst2", ("sentence",)),
        ("mrpc", PAIR),
        ("qqp", ("question1", "question2")),
        ("stsb", PAIR),
        ("mnli", NLI),
        ("qnli", ("question", "sentence")),
        ("rte", PAIR),
        ("snli", NLI),
        ("scitail", NLI),
    ],
)
def test_texts_are_the_fields_in_order(name, fields):
    record = {field: field.encode() for field in fields} | {"label": 1, "idx": 3}
    [example] = TFDS_TASKS[name].load.convert(record)
    assert example.texts == fields


def test_snli_pairs_without_gold_label_are_dropped():
    record = {"premise": b"P", "hypothesis": b"H", "label": -1}
    assert tfds_records.nli_examples(record) == []
    record["label"] = 2
    assert tfds_records.nli_examples(record) == [Example(texts=("P", "H"), label=2)]


def race_record(article="The article.", example_id="middle7.txt"):
    return {
        "article": article,
        "questions": ["Who came?", "The man _ ."],
        "answers": ["C", "A"],
        "options": [["Ann", "Bob", "Cid", "Dee"], ["ran", "sat", "ate", "hid"]],
        "example_id": example_id,
    }


def race_question(context, label, choices, uid):
    return Example(texts=(context,), label=label, choices=choices, uid=uid)


def test_race_record_is_one_example_per_question():
    assert tfds_records.race_examples(race_record()) == [
        race_question("The article. Who came?", 2, ("Ann", "Bob", "Cid", "Dee"), "middle7.txt/0"),
        race_question("The article. The man _ .", 0, ("ran", "sat", "ate", "hid"), "middle7.txt/1"),
    ]
    bad = race_record()
    bad["answers"][1] = "E"
    with pytest.raises(ValueError, match="answer 'E'"):
        tfds_records.race_examples(bad)


def test_story_cloze_answer_1_or_2_is_choice_0_or_1():
    record = {"context": b"a b c d", "endings": [b"x", b"y"], "label": np.int32(2)}
    assert tfds_records.story_cloze_examples(record) == [
        Example(texts=("a b c d",), label=1, choices=("x", "y"))
    ]
    record["label"] = -1
    assert tfds_records.story_cloze_examples(record)[0].label is None
    record["label"] = 0
    with pytest.raises(ValueError, match="expected 1 or 2"):
        tfds_records.story_cloze_examples(record)


# ----------------------------------------------------------------------------------------
# Every task on TFDS's mock data.


class ListSource(list):
    def __getitems__(self, keys):
        return [self[k] for k in keys]


def story_cloze_source(builder, split, **kwargs):
    """Mock records: the generic mock draws the int32 answer from 0..254, not 1 or 2."""
    del builder, kwargs
    return ListSource(
        {"context": f"{split} {i} a b c d", "endings": [b"x", b"y"], "label": np.int32(1 + i % 2)}
        for i in range(10)
    )


def write_story_cloze(data_dir, rows=None, names=tfds_tasks.STORY_CLOZE_MANUAL_FILES):
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    rows = rows or ["s1,A,B,C,D,x,y,1\n"]
    for name in names:
        (manual / name).write_bytes((STORY_CLOZE_HEADER + "".join(rows)).encode("latin-1"))
    return manual


@pytest.mark.parametrize("name", sorted(TFDS_TASKS))
def test_every_task_loads_mock_data(name, data_dir, monkeypatch):
    spec = TFDS_TASKS[name]
    # The mock's data source sets `__getitems__` on a MagicMock, where it isn't bound;
    # read through `__getitem__`, which the mock does support.
    monkeypatch.setattr(
        data_sources_base.BaseDataSource, "__getitems__", lambda self, ks: [self[k] for k in ks]
    )
    kwargs = {}
    if name == "story_cloze":
        write_story_cloze(data_dir)
        kwargs["as_data_source_fn"] = story_cloze_source
    n = 10
    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE, **kwargs):
        for split in (spec.train_split, *spec.eval_splits):
            examples = spec.load(split, str(data_dir))
            if name == "story_cloze":  # 1 in 5 of the validation set is held out.
                assert len(examples) == (8 if split == "train" else 2)
            elif name == "race":  # both levels, or one (validation_middle, _high)
                assert len(examples) == (2 * n if split in ("train", "validation") else n)
            else:
                assert len(examples) == n
            for example in examples:
                check_example(spec, example)
    assert not (data_dir / "story_cloze").exists()  # Nothing prepared: the mock does nothing.


def test_unknown_split_names_the_valid_ones(data_dir):
    with pytest.raises(UserError, match="valid splits: train, validation, test$"):
        TFDS_TASKS["story_cloze"].load("dev", str(data_dir))
    with pytest.raises(UserError, match="validation_matched, validation_mismatched, test_matched"):
        TFDS_TASKS["mnli"].load("validation", str(data_dir))


# ----------------------------------------------------------------------------------------
# Real preparation (array_record, no TensorFlow) from fake downloads.


def fake_glue_rte(root):
    rte = root / "RTE"
    rte.mkdir(parents=True)
    rows = (
        "index\tsentence1\tsentence2\tlabel\n0\tA café.\tB\tnot_entailment\n1\tC\tD\tentailment\n"
    )
    (rte / "train.tsv").write_text(rows, encoding="utf-8")
    (rte / "dev.tsv").write_text(rows, encoding="utf-8")
    (rte / "test.tsv").write_text("index\tsentence1\tsentence2\n0\tE\tF\n1\tG\tH\n")
    return root


def patch_download(result):
    def download_and_extract(self, url_or_urls):
        if isinstance(result, Exception):
            raise result
        return result

    return mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract", download_and_extract
    )


def test_glue_prepared_and_read_without_tensorflow(data_dir, tmp_path):
    rte = TFDS_TASKS["rte"]
    with patch_download(fake_glue_rte(tmp_path / "fake")):
        train = rte.load("train", str(data_dir))
    assert sorted(train, key=lambda ex: ex.uid) == [
        Example(texts=("A café.", "B"), label=1, uid=0),
        Example(texts=("C", "D"), label=0, uid=1),
    ]
    assert (data_dir / "glue" / "rte" / "2.0.0" / "dataset_info.json").is_file()
    # Prepared once: reading the other splits downloads nothing.
    with patch_download(AssertionError("downloaded again")):
        test = rte.load("test", str(data_dir))
        assert len(rte.load("validation", str(data_dir))) == 2
    assert sorted(test, key=lambda ex: ex.uid) == [
        Example(texts=("E", "F"), label=None, uid=0),
        Example(texts=("G", "H"), label=None, uid=1),
    ]
    assert "tensorflow" not in sys.modules


def test_download_failure_is_one_line_and_leaves_nothing_prepared(data_dir, tmp_path):
    offline = requests.exceptions.ConnectionError("Failed to resolve 'dl.fbaipublicfiles.com'")
    with patch_download(offline), pytest.raises(UserError) as error:
        TFDS_TASKS["rte"].load("train", str(data_dir))
    message = str(error.value)
    assert "\n" not in message and "task rte" in message and "glue/rte" in message
    assert "internet" in message and str(data_dir) in message
    assert not (data_dir / "glue" / "rte").exists()
    # Nothing half-prepared: with the download back, it prepares and reads.
    with patch_download(fake_glue_rte(tmp_path / "fake")):
        assert len(TFDS_TASKS["rte"].load("train", str(data_dir))) == 2


def test_incomplete_dataset_dir_is_refused(data_dir):
    (data_dir / "glue" / "rte" / "2.0.0").mkdir(parents=True)
    with pytest.raises(UserError, match="incomplete glue/rte dataset .*delete that directory"):
        TFDS_TASKS["rte"].load("train", str(data_dir))


def fake_race(root):
    for split in ("train", "dev", "test"):
        for level in ("middle", "high"):
            directory = root / "RACE" / split / level
            directory.mkdir(parents=True)
            record = race_record(article=f"{level} {split}.", example_id=f"{level}1.txt")
            record["id"] = record.pop("example_id")
            (directory / "1.txt").write_text(json.dumps(record))
    return root


def test_race_prepared_per_question_without_tensorflow(data_dir, tmp_path):
    # TFDS's own race builder can't write its nested options without TensorFlow.
    with patch_download(fake_race(tmp_path / "fake")):
        race = TFDS_TASKS["race"]
        middle = race.load("validation_middle", str(data_dir))
        splits = {s: race.load(s, str(data_dir)) for s in (*race.eval_splits, *race.test_splits)}
        train = race.load("train", str(data_dir))
    # Each question with its id in the RACE release: the article's file, its place there.
    assert sorted(middle, key=lambda ex: ex.label) == [
        race_question("middle dev. The man _ .", 0, ("ran", "sat", "ate", "hid"), "middle1.txt/1"),
        race_question("middle dev. Who came?", 2, ("Ann", "Bob", "Cid", "Dee"), "middle1.txt/0"),
    ]
    # Trained on both levels; each level scored on its own too (RACE-m, RACE-h).
    first_words = {s: [ex.texts[0].split(".")[0] for ex in exs] for s, exs in splits.items()}
    assert first_words == {
        "validation": ["middle dev"] * 2 + ["high dev"] * 2,
        "validation_middle": ["middle dev"] * 2,
        "validation_high": ["high dev"] * 2,
        "test": ["middle test"] * 2 + ["high test"] * 2,
        "test_middle": ["middle test"] * 2,
        "test_high": ["high test"] * 2,
    }
    assert [ex.texts[0].split(".")[0] for ex in train] == ["middle train"] * 2 + ["high train"] * 2
    assert (data_dir / "gptjax_race" / "high" / "1.1.0" / "dataset_info.json").is_file()
    assert "tensorflow" not in sys.modules


def test_bad_record_is_a_one_line_error_and_leaves_nothing_prepared(data_dir, tmp_path):
    fake = fake_race(tmp_path / "fake")
    record = json.loads((fake / "RACE" / "dev" / "middle" / "1.txt").read_text())
    record["answers"][0] = "E"
    (fake / "RACE" / "dev" / "middle" / "1.txt").write_text(json.dumps(record))
    with patch_download(fake), pytest.raises(UserError) as error:
        TFDS_TASKS["race"].load("train", str(data_dir))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not prepare task race (TFDS race/middle): ValueError")
    assert "answer 'E'" in message and message.endswith("to fetch the data again")
    # TFDS keeps only its record of the default config, gptjax_race/.config/metadata.json.
    assert not (data_dir / "gptjax_race" / "middle").exists()


def test_story_cloze_latin1_csvs_are_prepared(data_dir):
    rows = [
        f's{i},Caf\xe9 {i},"Two, with comma",C,D,end{i}a,end{i}b,{1 + i % 2}\n' for i in range(10)
    ]
    write_story_cloze(data_dir, rows)
    story_cloze = TFDS_TASKS["story_cloze"]
    train = story_cloze.load("train", str(data_dir))
    validation = story_cloze.load("validation", str(data_dir))
    test = story_cloze.load("test", str(data_dir))
    assert (len(train), len(validation), len(test)) == (8, 2, 10)
    assert sorted(ex.texts for ex in train + validation) == sorted(ex.texts for ex in test)
    by_story = {ex.choices[0][3]: ex for ex in test}
    for i in range(10):
        assert by_story[str(i)] == Example(
            texts=(f"Café {i} Two, with comma C D",),
            label=i % 2,
            choices=(f"end{i}a", f"end{i}b"),
        )


def test_story_cloze_without_manual_files_says_which_and_where(data_dir):
    write_story_cloze(data_dir, names=tfds_tasks.STORY_CLOZE_MANUAL_FILES[:1])
    with pytest.raises(UserError) as error:
        TFDS_TASKS["story_cloze"].load("train", str(data_dir))
    message = str(error.value)
    manual = data_dir / "downloads" / "manual"
    assert "\n" not in message
    assert message.startswith(
        "task story_cloze needs files downloaded by hand, missing: cloze_test_test__spring2016.csv;"
    )
    assert "cloze_test_val__spring2016.csv and cloze_test_test__spring2016.csv" in message
    assert message.endswith(f"put them in {manual}") and "Latin-1" in message
    assert not (data_dir / "story_cloze").exists()


def test_mnli_test_ax_is_glue_s_diagnostic_set(data_dir, monkeypatch):
    monkeypatch.setattr(
        data_sources_base.BaseDataSource, "__getitems__", lambda self, ks: [self[k] for k in ks]
    )
    built, make_builder = [], tfds_loader.make_builder
    monkeypatch.setattr(
        tfds_loader, "make_builder", lambda name, d: built.append(name) or make_builder(name, d)
    )
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        examples = TFDS_TASKS["mnli"].load("test_ax", str(data_dir))
    assert built == ["glue/ax"] and len(examples) == 3
    assert all(len(ex.texts) == 2 and isinstance(ex.uid, int) for ex in examples)
