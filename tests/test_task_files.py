"""Tasks from users' own JSONL/CSV/TSV files: every kind, label mapping, every error."""

import csv
import json

import pytest

from gptjax.errors import UserError
from gptjax.tasks.files import load_file_task
from gptjax.tasks.spec import Example

FORMATS = ("jsonl", "csv", "tsv")


def write(path, rows, columns=None):
    """Writes dicts in the format of path's extension; lists become JSON in CSV/TSV cells."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path
    columns = columns or list(rows[0])
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        for row in rows:
            cells = [row.get(c, "") for c in columns]
            writer.writerow([json.dumps(c) if isinstance(c, list) else c for c in cells])
    return path


def line_of(fmt, row):
    """The line number of 0-based `row` of a file written by `write` (CSV/TSV: a header)."""
    return row + (1 if fmt == "jsonl" else 2)


def error(match, *args, **kwargs) -> str:
    """The one-line UserError of load_file_task(*args, **kwargs), checked against `match`."""
    with pytest.raises(UserError, match=match) as info:
        load_file_task(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------
# Each kind from each format.


@pytest.mark.parametrize("fmt", FORMATS)
def test_classification(tmp_path, fmt):
    train = write(
        tmp_path / f"train.{fmt}",
        [
            {"sentence": "a fine film", "label": "pos"},
            {"sentence": "dull, and too long", "label": "neg"},
            {"sentence": "loved it", "label": "pos"},
        ],
    )
    dev = write(tmp_path / f"dev.{fmt}", [{"sentence": " so-so ", "label": "neg"}])
    task = load_file_task("classification", str(train), str(dev), "sentence", "label")
    assert (task.name, task.kind, task.metrics) == ("custom", "classification", ("accuracy",))
    assert task.label_names == ("neg", "pos") and task.num_outputs == 2
    assert task.test_splits == () and task.eval_splits == ("validation",)
    examples = task.load("train", "/unused")
    assert examples[0] == Example(texts=("a fine film",), label=1, uid=0)
    assert [e.label for e in examples] == [1, 0, 1]
    assert [e.uid for e in examples] == [0, 1, 2]
    assert task.load("validation", "/unused") == (Example(texts=("so-so",), label=0, uid=0),)


@pytest.mark.parametrize("fmt", FORMATS)
def test_entailment(tmp_path, fmt):
    rows = [
        {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "gold": "contradiction"},
        {"premise": "A dog runs.", "hypothesis": "An animal moves.", "gold": "entailment"},
        {"premise": "A girl sings.", "hypothesis": "She is happy.", "gold": "neutral"},
    ]
    train = write(tmp_path / f"train.{fmt}", rows)
    dev = write(tmp_path / f"dev.{fmt}", rows[1:])
    task = load_file_task("entailment", str(train), str(dev), "premise,hypothesis", "gold")
    assert task.label_names == ("contradiction", "entailment", "neutral")
    assert task.metrics == ("accuracy",)
    first = task.load("validation", "")[0]
    assert first.texts == ("A dog runs.", "An animal moves.") and first.label == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_similarity_as_classes(tmp_path, fmt):
    rows = [
        {"s1": "He left.", "s2": "He went away.", "paraphrase": 1},
        {"s1": "It rains.", "s2": "The sun shines.", "paraphrase": 0},
    ]
    train = write(tmp_path / f"train.{fmt}", rows)
    dev = write(tmp_path / f"dev.{fmt}", rows)
    task = load_file_task("similarity", str(train), str(dev), ("s1", "s2"), "paraphrase")
    assert task.label_names == ("0", "1")
    assert task.metrics == ("accuracy", "f1")  # Two classes: F1 of class 1 too, as MRPC.
    assert [e.label for e in task.load("train", "")] == [1, 0]
    assert task.load("train", "")[0].texts == ("He left.", "He went away.")


def test_similarity_with_more_classes_has_no_f1(tmp_path):
    rows = [{"a": "x", "b": "y", "label": c} for c in ("low", "mid", "high")]
    train = write(tmp_path / "train.jsonl", rows)
    task = load_file_task("similarity", str(train), str(train), "a,b", "label")
    assert task.metrics == ("accuracy",)


def test_f1_scores_the_positive_class_never_a_sorted_name(tmp_path):
    """duplicate sorts before not_duplicate: F1 only once positive_label names the class
    it scores, which then becomes label 1 (the class `metrics.compute`'s F1 scores)."""
    from gptjax.tasks import metrics

    rows = [{"a": f"q{i}", "b": "p", "label": "not_duplicate"} for i in range(18)]
    rows += [{"a": f"d{i}", "b": "p", "label": "duplicate"} for i in range(2)]
    train = write(tmp_path / "train.jsonl", rows)
    task = load_file_task("similarity", str(train), str(train), "a,b", "label")
    assert task.metrics == ("accuracy",)
    task = load_file_task(
        "similarity", str(train), str(train), "a,b", "label", positive_label="duplicate"
    )
    assert task.label_names == ("not_duplicate", "duplicate") and "f1" in task.metrics
    labels = [e.label for e in task.load("validation", "")]
    assert labels == [0] * 18 + [1] * 2
    never_duplicate = metrics.compute(task.metrics, [0] * 20, labels)
    assert never_duplicate == {"accuracy": 90.0, "f1": 0.0}
    flipped = load_file_task(
        "similarity", str(train), str(train), "a,b", "label", positive_label="not_duplicate"
    )
    assert flipped.label_names == ("duplicate", "not_duplicate")
    three = write(tmp_path / "three.jsonl", rows + [{"a": "x", "b": "y", "label": "maybe"}])
    for path, positive, words in (
        (train, "same", "must be one of the 2 classes"),  # not a class
        (three, "duplicate", "must be one of the 2 classes"),  # three classes
    ):
        error(words, "similarity", str(path), str(path), "a,b", "label", positive_label=positive)
    regression = dict(regression=True, positive_label="duplicate")
    error("applies to classes", "similarity", str(train), str(train), "a,b", "label", **regression)


@pytest.mark.parametrize("fmt", FORMATS)
def test_similarity_regression(tmp_path, fmt):
    rows = [
        {"a": "A plane takes off.", "b": "An air plane is taking off.", "score": 5.0},
        {"a": "A man plays a flute.", "b": "A man eats.", "score": 0.8},
        {"a": "Kids play.", "b": "Children are playing.", "score": 4},
    ]
    train = write(tmp_path / f"train.{fmt}", rows)
    dev = write(tmp_path / f"dev.{fmt}", rows[:2])
    task = load_file_task("similarity", str(train), str(dev), "a,b", "score", regression=True)
    assert task.regression and task.label_names == () and task.num_outputs == 1
    assert task.metrics == ("pearson", "spearman")
    labels = [e.label for e in task.load("train", "")]
    assert labels == [5.0, 0.8, 4.0] and all(isinstance(x, float) for x in labels)


@pytest.mark.parametrize("fmt", FORMATS)
def test_multiple_choice(tmp_path, fmt):
    rows = [
        {
            "ctx_a": "She opened the umbrella",
            "ctx_b": "because",
            "endings": ["it rained.", "it was sunny.", "she was hungry."],
            "label": 0,
        },
        {
            "ctx_a": "He missed the bus,",
            "ctx_b": "",  # Only some parts of the context may be empty (as in HellaSwag).
            "endings": ["so he walked.", "so he flew.", "so he sang."],
            "label": "0",
        },
    ]
    train = write(tmp_path / f"train.{fmt}", rows)
    dev = write(tmp_path / f"dev.{fmt}", [dict(rows[0], label=2)])
    task = load_file_task(
        "multiple_choice", str(train), str(dev), "ctx_a,ctx_b", "label", choices_field="endings"
    )
    assert task.metrics == ("accuracy",) and task.label_names == ()
    assert task.num_choices == 3 and task.num_outputs == 1
    first, second = task.load("train", "")
    assert first.texts == ("She opened the umbrella because",)
    assert first.choices == ("it rained.", "it was sunny.", "she was hungry.")
    assert (first.label, second.label) == (0, 0)
    assert second.texts == ("He missed the bus,",)
    assert task.load("validation", "")[0].label == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_test_file_labels_are_optional(tmp_path, fmt):
    train = write(tmp_path / f"train.{fmt}", [{"text": "a", "y": "u"}, {"text": "b", "y": "v"}])
    test = write(tmp_path / f"test.{fmt}", [{"text": "c"}, {"text": "d"}])
    task = load_file_task(
        "classification", str(train), str(train), "text", "y", test_path=str(test)
    )
    assert task.test_splits == ("test",)
    assert task.load("test", "") == (
        Example(texts=("c",), label=None, uid=0),
        Example(texts=("d",), label=None, uid=1),
    )
    # Labelled test rows, and rows with an empty label, are fine too.
    test = write(tmp_path / f"test2.{fmt}", [{"text": "c", "y": "v"}, {"text": "d", "y": ""}])
    task = load_file_task(
        "classification", str(train), str(train), "text", "y", test_path=str(test)
    )
    assert [e.label for e in task.load("test", "")] == [1, None]


def test_no_test_split_without_a_test_file(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"t": "a", "y": 0}, {"t": "b", "y": 1}])
    task = load_file_task("classification", str(train), str(train), "t", "y")
    with pytest.raises(UserError, match="no 'test' split.*--config.task.test_path"):
        task.load("test", "")


# ----------------------------------------------------------------------------------------
# Label mapping.


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"t": "x", "y": y} for y in (10, 2, -1, 2)]
    train = write(tmp_path / "train.jsonl", rows)
    # The same classes written as strings ("02" is 2) in the evaluation CSV.
    dev = write(tmp_path / "dev.csv", [{"t": "x", "y": "02"}, {"t": "x", "y": " 10"}])
    task = load_file_task("classification", str(train), str(dev), "t", "y")
    assert task.label_names == ("-1", "2", "10")  # Not "-1", "10", "2" as strings sort.
    assert [e.label for e in task.load("train", "")] == [2, 1, 0, 1]
    assert [e.label for e in task.load("validation", "")] == [1, 2]


def test_string_labels_sort_as_strings(tmp_path):
    rows = [{"t": "x", "y": y} for y in ("neutral", "1", "entailment")]
    train = write(tmp_path / "train.jsonl", rows)
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert task.label_names == ("1", "entailment", "neutral")
    assert [e.label for e in task.load("train", "")] == [2, 0, 1]


def test_boolean_labels(tmp_path):
    rows = [{"t": "x", "y": True}, {"t": "z", "y": False}]
    train = write(tmp_path / "train.jsonl", rows)
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert task.label_names == ("false", "true")
    assert [e.label for e in task.load("train", "")] == [1, 0]


def test_unseen_evaluation_label(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"t": "a", "y": "pos"}, {"t": "b", "y": "neg"}])
    dev = write(tmp_path / "dev.tsv", [{"t": "a", "y": "pos"}, {"t": "c", "y": "mixed"}])
    message = error("'mixed' on line 3 of .*dev.tsv", "classification", train, dev, "t", "y")
    assert "does not occur in the training file" in message and "'neg', 'pos'" in message


def test_fewer_than_two_classes(tmp_path):
    train = write(tmp_path / "train.csv", [{"t": "a", "y": "pos"}, {"t": "b", "y": "pos"}])
    error(
        "only 1 distinct label .'pos'.*at least 2 classes", "classification", train, train, "t", "y"
    )


def test_scores_without_regression(tmp_path):
    train = write(tmp_path / "train.csv", [{"a": "x", "b": "y", "s": s} for s in ("0.5", "4.2")])
    error("look like scores.*regression=True", "similarity", train, train, "a,b", "s")


def test_encoding_option(tmp_path):
    train = tmp_path / "train.csv"
    train.write_bytes(b"t,y\ncaf\xe9,a\nna\xefve,b\n")
    task = load_file_task("classification", str(train), str(train), "t", "y", encoding="latin-1")
    assert [e.texts[0] for e in task.load("train", "")] == ["café", "naïve"]
    # A UTF-8 byte order mark (as Excel writes) is not part of the first column's name.
    train.write_bytes(b"\xef\xbb\xbft,y\ncaf\xc3\xa9,a\nb,b\n")
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert task.load("train", "")[0].texts == ("café",)


def test_quoted_csv_fields_may_span_lines(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('t,y\n"one, two\nthree",a\nfour,\n', encoding="utf-8")
    # The row with the empty label starts on line 4, after the 2-line quoted field.
    error("line 4 of .*train.csv has no label", "classification", train, train, "t", "y")


# ----------------------------------------------------------------------------------------
# Errors in the files.


def test_missing_file(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"t": "a", "y": 0}, {"t": "b", "y": 1}])
    missing = tmp_path / "nope.jsonl"
    message = error(
        "evaluation file .*nope.jsonl does not exist", "classification", train, missing, "t", "y"
    )
    assert "--config.task.eval_path" in message
    (tmp_path / "dir.csv").mkdir()
    error("dir.csv is a directory", "classification", train, tmp_path / "dir.csv", "t", "y")


@pytest.mark.parametrize("content", ["", "\n\n", "t,y\n"])
def test_empty_file(tmp_path, content):
    name = "train.jsonl" if content.strip() == "" else "train.csv"
    train = tmp_path / name
    train.write_text(content)
    error(f"training file .*{name} has no examples", "classification", train, train, "t", "y")


def test_empty_csv_without_header(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("")
    error("has no examples", "classification", train, train, "t", "y")


def test_missing_column(tmp_path):
    train = write(
        tmp_path / "train.csv", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}]
    )
    message = error(
        "no column 'text' .columns: 'sentence', 'label'.",
        "classification",
        train,
        train,
        "text",
        "label",
    )
    assert "--config.task.text_fields" in message
    message = error("no column 'gold'", "classification", train, train, "sentence", "gold")
    assert "--config.task.label_field" in message


def test_missing_json_field(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"t": "a", "y": 0}, {"t": "b"}])
    error(
        "line 2 of .*train.jsonl has no field 'y' .its fields: 't'.",
        "classification",
        train,
        train,
        "t",
        "y",
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_text(tmp_path, fmt):
    rows = [{"p": "a", "h": "b", "y": 0}, {"p": "a", "h": " ", "y": 1}]
    train = write(tmp_path / f"train.{fmt}", rows)
    error(
        f"line {line_of(fmt, 1)} of .*train.{fmt} has no text in 'h'",
        "entailment",
        train,
        train,
        "p,h",
        "y",
    )


def test_null_text(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"t": "a", "y": 1}, {"t": None, "y": 0}])
    error("line 2 of .*train.jsonl has no text in 't'", "classification", train, train, "t", "y")
    train = write(tmp_path / "train.jsonl", [{"t": "a", "y": 1}, {"t": 3, "y": 0}])
    error("'t' on line 2 .*is a JSON int, not a string", "classification", train, train, "t", "y")


def test_missing_label(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"t": "a", "y": 0}, {"t": "b", "y": None}])
    error("line 2 of .*has no label .'y' is empty.", "classification", train, train, "t", "y")


def mc(tmp_path, fmt, rows, dev_rows=None, name="train"):
    train = write(tmp_path / f"{name}.{fmt}", rows)
    dev = write(tmp_path / f"dev.{fmt}", dev_rows) if dev_rows else train
    return load_file_task("multiple_choice", str(train), str(dev), "q", "y", choices_field="c")


@pytest.mark.parametrize("fmt", FORMATS)
def test_different_numbers_of_choices(tmp_path, fmt):
    rows = [{"q": "q1", "c": ["a", "b", "c"], "y": 0}, {"q": "q2", "c": ["a", "b", "c"], "y": 1}]
    with pytest.raises(
        UserError,
        match=rf"line {line_of(fmt, 0)} of .*dev\.\w+ has 2 choices but line {line_of(fmt, 0)} of",
    ) as info:
        mc(tmp_path, fmt, rows, dev_rows=[{"q": "q3", "c": ["a", "b"], "y": 0}])
    assert "has 3; rows with different numbers of choices are not supported" in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_multiple_choice_label_errors(tmp_path, fmt):
    with pytest.raises(
        UserError, match=rf"label 'b' on line {line_of(fmt, 0)} .* is not an integer"
    ):
        mc(tmp_path, fmt, [{"q": "q", "c": ["x", "y"], "y": "b"}])
    with pytest.raises(
        UserError, match=rf"label 2 on line {line_of(fmt, 0)} .*out of range for its 2 choices"
    ):
        mc(tmp_path, fmt, [{"q": "q", "c": ["x", "y"], "y": 2}])
    with pytest.raises(UserError, match=rf"label -1 on line {line_of(fmt, 0)} .*use 0 to 1"):
        mc(tmp_path, fmt, [{"q": "q", "c": ["x", "y"], "y": -1}])


def test_bad_choices(tmp_path):
    with pytest.raises(UserError, match="'c' on line 2 .* is not a JSON list of strings"):
        mc(tmp_path, "csv", [{"q": "q", "c": "x|y", "y": 0}])
    with pytest.raises(UserError, match="has 1 choice.*at least 2 non-empty answers"):
        mc(tmp_path, "jsonl", [{"q": "q", "c": ["x"], "y": 0}])
    with pytest.raises(UserError, match="no field 'c'"):
        mc(tmp_path, "jsonl", [{"q": "q", "y": 0}])


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_numeric_regression_label(tmp_path, fmt):
    rows = [{"a": "x", "b": "y", "s": 1.5}, {"a": "x", "b": "y", "s": "high"}]
    train = write(tmp_path / f"train.{fmt}", rows)
    error(
        f"label 'high' on line {line_of(fmt, 1)} of .*train.{fmt} is not a finite number",
        "similarity",
        train,
        train,
        "a,b",
        "s",
        regression=True,
    )


def test_undecodable_bytes(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"t": "a", "y": 0}\n{"t": "caf\xe9", "y": 1}\n')
    message = error(
        r"line 2 of .*train.jsonl is not valid utf-8 \(byte 0xe9\)",
        "classification",
        train,
        train,
        "t",
        "y",
    )
    assert "--config.task.encoding" in message
    error(
        "unknown text encoding 'klingon'",
        "classification",
        train,
        train,
        "t",
        "y",
        encoding="klingon",
    )


def test_bad_json_line(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"t": "a", "y": 0}\n\n{"t": "b" "y": 1}\n')
    error(
        r"line 3 of .*train.jsonl is not valid JSON \(Expecting ',' delimiter",
        "classification",
        train,
        train,
        "t",
        "y",
    )
    train.write_text('["a", 0]\n')
    error("line 1 of .*is a JSON list, not an object", "classification", train, train, "t", "y")


def test_unknown_extension(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a\t0\n")
    error(
        r"unsupported extension '.txt'; use one of .jsonl, .csv, .tsv",
        "classification",
        train,
        train,
        "t",
        "y",
    )


def test_row_with_wrong_number_of_fields(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("t\ty\na\t0\nb\tx\t1\n")
    error(
        "line 3 of .*has 3 tab-separated fields but the header has 2",
        "classification",
        train,
        train,
        "t",
        "y",
    )


# ----------------------------------------------------------------------------------------
# Errors in the settings.


def test_bad_settings(tmp_path):
    train = write(
        tmp_path / "train.jsonl", [{"t": "a", "u": "b", "y": 0}, {"t": "b", "u": "c", "y": 1}]
    )
    args = (str(train), str(train))
    error("unknown task kind 'ranking'", "ranking", *args, "t", "y")
    error("entailment task reads 2 text field.* names 1", "entailment", *args, "t", "y")
    error("classification task reads 1 text field.* names 2", "classification", *args, "t,u", "y")
    error("needs the field holding each row's list", "multiple_choice", *args, "t", "y")
    error(
        "choices_field is only for multiple_choice",
        "classification",
        *args,
        "t",
        "y",
        choices_field="u",
    )
    error("regression .* only for similarity", "entailment", *args, "t,u", "y", regression=True)
    error("'y' named more than once", "entailment", *args, "t,y", "y")
    error("no label field given", "classification", *args, "t", "")
    error("set --config.task.eval_path", "classification", str(train), "", "t", "y")


@pytest.mark.parametrize(
    "content",
    [
        't\ty\n"Yes" is his answer\t1\nno\t0\n',  # quotes opening an unquoted field
        't\ty\n"Stop\t1\nnow" she said\t0\nok\t1\n',  # a quote that would swallow a row
    ],
)
def test_quotes_are_never_dropped_or_rows_merged_silently(tmp_path, content):
    train = tmp_path / "train.tsv"
    train.write_text(content, encoding="utf-8")
    error(
        "line 2 of .*train.tsv is malformed.*quoted whole", "classification", train, train, "t", "y"
    )
    # Written as spreadsheets and pandas write it, the same text reads back exactly.
    write(train, [{"t": '"Yes" is his answer', "y": 1}, {"t": "no", "y": 0}])
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert task.load("train", "")[0].texts == ('"Yes" is his answer',)


def test_csv_true_false_labels_score_f1_of_true(tmp_path):
    rows = [{"a": "x", "b": "y", "label": label} for label in ("True", "False")]
    train = write(tmp_path / "train.csv", rows)
    task = load_file_task("similarity", str(train), str(train), "a,b", "label")
    assert task.label_names == ("False", "True") and task.metrics == ("accuracy", "f1")


def test_positive_label_is_refused_for_a_benchmark_task():
    import ml_collections

    from gptjax.tasks import registry

    config = ml_collections.ConfigDict({"name": "mrpc", "positive_label": "1"})
    with pytest.raises(UserError, match="task.positive_label is for your own files"):
        registry.get_task(config)


# ----------------------------------------------------------------------------------------
# Unusual but valid files, and pathological ones.


def test_a_csv_field_longer_than_csvs_default_limit(tmp_path):
    """csv refuses fields over 131,072 characters by default; a long document is fine."""
    long_text = "word " * 40_000
    train = write(tmp_path / "train.csv", [{"t": long_text, "y": 0}, {"t": "b", "y": 1}])
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert task.load("train", "")[0].texts == (long_text.strip(),)
    assert csv.field_size_limit() == 131_072  # the module's limit put back


@pytest.mark.parametrize("header", ["t,y,y", "t,t,y"])
def test_a_repeated_column_name_is_refused(tmp_path, header):
    train = tmp_path / "train.csv"
    train.write_text(f"{header}\na,0,1\nb,1,0\n")
    message = error("names the column", "classification", train, train, "t", "y")
    assert repr(header.split(",")[1]) in message


def test_a_spreadsheets_unnamed_trailing_columns_are_read(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("t,y,,\ngood,1,,\nbad,0,,\n")
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert [e.label for e in task.load("train", "")] == [1, 0]


def test_a_whitespace_only_csv_line_is_a_blank_line(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("t,y\na,0\n   \nb,1\n")
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert [e.texts for e in task.load("train", "")] == [("a",), ("b",)]


def test_pathological_labels_and_lines_are_one_line_errors(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"t": "a", "u": "b", "y": ' + "9" * 400 + "}\n")
    regression = ("similarity", train, train, "t,u", "y")
    error("is not a finite number", *regression, regression=True)
    train.write_text('{"t": "a", "y": ' + "9" * 5000 + '}\n{"t": "b", "y": 1}\n')
    error("line 1 of .* cannot be read as JSON", "classification", train, train, "t", "y")
    train.write_text('{"t": ' + "[" * 100_000 + "]" * 100_000 + ', "y": 1}\n')
    error("line 1 of .* cannot be read as JSON", "classification", train, train, "t", "y")
    # A class label of 5,000 digits in a CSV is a class like any other.
    train = tmp_path / "train.csv"
    train.write_text(f"t,y\na,{'9' * 5000}\nb,1\nc,01\n")
    task = load_file_task("classification", str(train), str(train), "t", "y")
    assert task.label_names == ("1", "9" * 5000)
    assert [e.label for e in task.load("train", "")] == [1, 0, 0]
