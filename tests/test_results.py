"""The results files of a fine-tuned run (the runs themselves: test_finetune.py)."""

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
