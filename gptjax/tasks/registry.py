"""Every task by name: the paper's TFDS tasks, the offline BBC News task, users' files."""

import ml_collections

from gptjax.errors import UserError
from gptjax.tasks import bbc_news, files, tfds_tasks
from gptjax.tasks.spec import TaskSpec

NAMES = ("custom", bbc_news.BBC_NEWS.name, *tfds_tasks.TFDS_TASKS)


def get_task(task_cfg: ml_collections.ConfigDict) -> TaskSpec:
    """The task `config.task` names (for `custom`, read and checked from its files)."""
    name = task_cfg.name
    if name == "custom":
        return files.load_file_task(
            task_cfg.kind,
            task_cfg.train_path,
            task_cfg.eval_path,
            task_cfg.text_fields,
            task_cfg.label_field,
            choices_field=task_cfg.choices_field,
            regression=task_cfg.regression,
            encoding=task_cfg.encoding,
            test_path=task_cfg.test_path,
            positive_label=task_cfg.get("positive_label", ""),
        )
    if task_cfg.get("positive_label"):
        raise UserError(
            f"task.positive_label is for your own files (task custom); {name}'s classes "
            "and metrics are the benchmark's: unset it"
        )
    if name == bbc_news.BBC_NEWS.name:
        return bbc_news.BBC_NEWS
    if name in tfds_tasks.TFDS_TASKS:
        return tfds_tasks.TFDS_TASKS[name]
    raise UserError(
        f"unknown task {name!r}; use configs/finetune.py:TASK with TASK one of {', '.join(NAMES)}"
    )
