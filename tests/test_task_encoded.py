"""The on-disk cache of encoded task splits: reused only for the same inputs, and never
the cause of a failed run."""

import logging

import numpy as np
import pytest

from gptjax.tasks import encoded, transforms
from gptjax.tasks.spec import Example, TaskSpec


class Tokenizer:
    """Word 'wN' -> id 10 + N; its digest names its vocabulary."""

    pad_id = 1

    def __init__(self, vocab_size=100):
        self.vocab_size = vocab_size
        self.special_ids = {"_start_": vocab_size, "_delimiter_": vocab_size + 1}
        self.special_ids["_classify_"] = vocab_size + 2
        self.calls = 0

    @property
    def digest(self):  # a property, as on gptjax's tokenizers
        return f"words-{self.vocab_size}"

    def encode_texts(self, texts):
        self.calls += 1
        return [[10 + int(w[1:]) for w in t.split()] for t in texts]


TASK = TaskSpec(name="t", kind="entailment", load=None, metrics=("accuracy",))
EXAMPLES = [Example(("w1 w2", "w3"), 0), Example(("w4", "w5 w6 w7"), 2)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_a_second_run_reads_the_arrays_instead_of_encoding(tmp_path):
    tok = Tokenizer()
    first = encoded.encode(TASK, "train", EXAMPLES, tok, 16, str(tmp_path))
    assert tok.calls == 1
    again = encoded.encode(TASK, "train", EXAMPLES, tok, 16, str(tmp_path))
    assert tok.calls == 1  # read from the file, not encoded
    assert_same(again, first)
    assert_same(first, transforms.encode(TASK, EXAMPLES, Tokenizer(), 16))
    assert len(list(tmp_path.glob("encoded/t/train-*.npz"))) == 1


@pytest.mark.parametrize(
    "change",
    ["label", "text", "order", "tokenizer", "n_ctx", "split", "kind", "library"],
)
def test_any_changed_input_encodes_again(tmp_path, change, monkeypatch):
    tok = Tokenizer()
    encoded.encode(TASK, "train", EXAMPLES, tok, 16, str(tmp_path))
    examples, task, split, n_ctx = list(EXAMPLES), TASK, "train", 16
    if change == "label":
        examples[0] = Example(("w1 w2", "w3"), 1)
    elif change == "text":
        examples[0] = Example(("w1 w2", "w9"), 0)
    elif change == "order":
        examples = examples[::-1]
    elif change == "tokenizer":
        tok = Tokenizer(vocab_size=200)
    elif change == "n_ctx":
        n_ctx = 6
    elif change == "split":
        split = "validation"
    elif change == "kind":
        task = TaskSpec(name="t", kind="similarity", load=None, metrics=("accuracy",))
    elif change == "library":  # e.g. another ftfy, whose normalisation may change the ids
        versions = encoded._library_versions()
        monkeypatch.setattr(encoded, "_library_versions", lambda: {**versions, "ftfy": "99"})
    calls = tok.calls
    out = encoded.encode(task, split, examples, tok, n_ctx, str(tmp_path))
    assert tok.calls == calls + 1
    assert_same(out, transforms.encode(task, examples, Tokenizer(tok.vocab_size), n_ctx))


def test_an_unreadable_file_is_encoded_again_and_replaced(tmp_path, caplog):
    tok = Tokenizer()
    encoded.encode(TASK, "train", EXAMPLES, tok, 16, str(tmp_path))
    (file,) = tmp_path.glob("encoded/t/train-*.npz")
    file.write_bytes(file.read_bytes()[:50])  # torn
    with caplog.at_level(logging.WARNING):
        out = encoded.encode(TASK, "train", EXAMPLES, tok, 16, str(tmp_path))
    assert tok.calls == 2 and "cannot read" in caplog.text
    assert_same(out, transforms.encode(TASK, EXAMPLES, Tokenizer(), 16))
    encoded.encode(TASK, "train", EXAMPLES, tok, 16, str(tmp_path))
    assert tok.calls == 2  # the replaced file reads
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # no temporary left


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        out = encoded.encode(TASK, "train", EXAMPLES, Tokenizer(), 16, str(blocked))
    assert "cannot cache" in caplog.text
    assert_same(out, transforms.encode(TASK, EXAMPLES, Tokenizer(), 16))
