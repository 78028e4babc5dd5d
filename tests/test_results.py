"""The results files of a fine-tuned run (the runs themselves: test_finetune.py)."""

import json
from types import SimpleNamespace

from gptjax import results
from gptjax.tasks.tfds_tasks import TFDS_TASKS


def test_results_table_puts_each_split_next_to_its_paper_number():
    report = {
        "task": "mnli",
        "checkpoint_step": 7,
        "selected_by": "best",
        "paper": TFDS_TASKS["mnli"].paper,
        "results": [
            {"split": "validation_matched", "accuracy": 80.04},
            {"split": "validation_mismatched", "accuracy": 79.96},
        ],
    }
    lines = results.results_table(report).splitlines()
    assert lines[-2:] == [
        "| validation_matched | accuracy | 80.0 | 82.1 |",
        "| validation_mismatched | accuracy | 80.0 | 81.4 |",
    ]


def test_the_best_checkpoint_is_chosen_among_finite_scores(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(results.checkpoint, "all_steps", lambda workdir: [100, 200, 300, 400])
    rows = [
        {"step": 100, "validation_pearson": float("nan")},  # NaN would win every comparison
        {"step": 200, "validation_pearson": 80.0},
        {"step": 300, "validation_pearson": 82.0},
        {"step": 350, "validation_pearson": 90.0},  # no checkpoint kept at that step
        {"step": 400, "validation_pearson": 81.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results.choose_step(str(tmp_path), "validation_pearson", "best") == 300
    # The better step 350 has no checkpoint: evaluated between two saves.
    assert "best evaluation (step 350, validation_pearson 90) has no checkpoint" in caplog.text
    assert "make train.eval_every a multiple of train.ckpt_every" in caplog.text
    caplog.clear()
    rows.insert(0, {"step": 50, "validation_pearson": 95.0})  # before the oldest kept
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results.choose_step(str(tmp_path), "validation_pearson", "best") == 300
    assert "step 50" in caplog.text and "than train.keep_checkpoints keeps" in caplog.text
    del rows[0]
    caplog.clear()
    assert results.choose_step(str(tmp_path), "validation_pearson", "latest") == 400
    rows[3]["validation_pearson"] = 70.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results.choose_step(str(tmp_path), "validation_pearson", "best") == 300
    assert "no checkpoint left" not in caplog.text
    rows[2]["validation_pearson"] = 81.0  # steps 300 and 400 tie: the later, trained more
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results.choose_step(str(tmp_path), "validation_pearson", "best") == 400
    # A run with no metrics file (one converted from HuggingFace's double-heads model) or
    # an unreadable one: the latest, and a warning saying why.
    (tmp_path / "metrics.jsonl").unlink()
    assert results.choose_step(str(tmp_path), "validation_pearson", "best") == 400
    assert "no evaluations to choose from" in caplog.text and "metrics.jsonl" in caplog.text
    (tmp_path / "metrics.jsonl").mkdir()
    assert results.choose_step(str(tmp_path), "validation_pearson", "best") == 400


def test_predictions_are_written_in_the_test_files_order(tmp_path):
    """TFDS hands a prepared split's records back shuffled; GLUE's server reads a
    submission in its `idx` order, so the rows are sorted by it."""
    from gptjax.tasks.spec import Example

    uids = [6, 1, 8, 9, 4, 3, 2, 7, 10, 5, 11, 0]
    examples = [Example((f"s{uid}",), None, uid=uid) for uid in uids]
    task = SimpleNamespace(name="cola", regression=False, label_names=("0", "1"), submission={})
    run = SimpleNamespace(
        task=task,
        workdir=str(tmp_path),
        split=lambda split: SimpleNamespace(examples=examples),
        predictions=lambda output: [uid % 2 for uid in uids],  # each row's answer: its parity
    )
    results.write_predictions(run, "test", {"output": None})
    lines = (tmp_path / "predictions_test.tsv").read_text().splitlines()
    assert lines == ["index\tprediction"] + [f"{i}\t{i % 2}" for i in range(12)]


def test_glue_binary_tasks_are_submitted_as_numbers_the_others_as_names(tmp_path):
    """GLUE's server scores CoLA, SST-2, MRPC and QQP predictions as 0/1 and the NLI tasks
    by label name: a submission in the other form scores nothing."""
    from gptjax.tasks.spec import Example

    def written(name, label_names):
        task = SimpleNamespace(name=name, regression=False, label_names=label_names, submission={})
        run = SimpleNamespace(
            task=task,
            workdir=str(tmp_path / name),
            split=lambda split: SimpleNamespace(
                examples=[Example(("a",), None, uid=0), Example(("b",), None, uid=1)]
            ),
            predictions=lambda output: [1, 0],
        )
        (tmp_path / name).mkdir()
        results.write_predictions(run, "test", {"output": None})
        lines = (tmp_path / name / "predictions_test.tsv").read_text().splitlines()
        return [line.split("\t")[1] for line in lines[1:]]

    assert written("sst2", ("negative", "positive")) == ["1", "0"]
    assert written("rte", ("entailment", "not_entailment")) == ["not_entailment", "entailment"]
