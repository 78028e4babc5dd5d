"""A run's saved config (`config.json` in its workdir): reading it, what a resumed run
(or an evaluation of its checkpoints) must keep of it and what it may change with a
warning, and writing it once the run has started."""

import json
import logging
import os
from collections.abc import Sequence

import jax
import ml_collections

from gptjax.atomic import replacing
from gptjax.errors import UserError
from gptjax.tasks.files import text_field_names

CONFIG_FILE = "config.json"


def take_saved_model(config: ml_collections.ConfigDict, saved: dict):
    """`config` (unlocked) given the saved run's model and parameter layout: what an
    evaluation of that run's checkpoints must build, whatever the command's config says."""
    config.model.update({k: v for k, v in saved["model"].items() if k in config.model})
    config.train.scan_layers = bool((saved.get("train") or {}).get("scan_layers"))


# The sizes a run's saved config holds in `model`: what reading a checkpoint needs.
MODEL_SIZES = ("vocab_size", "n_ctx", "n_layer", "n_head", "d_model", "d_mlp")


def read_config(path: str, fix: str) -> dict:
    """A run's saved config (config.json) as a dict; UserError naming the file and `fix`
    when it does not parse or holds no model sizes (a damaged or foreign file)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); {fix}") from None
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict) or not all(isinstance(model.get(k), int) for k in MODEL_SIZES):
        if isinstance(saved, dict) and ("model_type" in saved or "architectures" in saved):
            directory = os.path.dirname(path) or "."
            raise UserError(
                f"{directory} is a Hugging Face model directory, not a gptjax workdir; "
                f"convert it first: python -m gptjax.convert from-hf {directory} NEW_WORKDIR"
            )
        raise UserError(f"{path} is not a gptjax run's config (no model sizes); {fix}")
    return saved


def saved_config(workdir: str, role: str) -> dict:
    """The saved config of the run in `workdir`, which the command reads as `role` (e.g.
    "init_from"): UserError when it is not a gptjax workdir or its config is damaged."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{role} {workdir} is not a gptjax workdir (no {CONFIG_FILE}); point it at a "
            "run's --workdir"
        )
    return read_config(path, "restore it from a copy")


def check_classes(workdir: str, classes: Sequence[str], evaluating: bool):
    """UserError when the fine-tune in `workdir` learned other `classes` (or the same in
    another order) than the task as configured now has: its scores and predictions would
    be of swapped labels. A run saved before the classes were recorded is not checked."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    saved = read_config(path, "restore it from a copy").get(TASK_CLASSES)
    if saved is None or list(saved) == list(classes):
        return
    raise UserError(
        f"{workdir} was trained on the classes {saved} (in this order), the task as given "
        f"here has {list(classes)}; {'evaluate' if evaluating else 'resume'} it with the "
        "training file and task.positive_label it was trained with"
    )


# What the parameters' layout depends on beyond the model's sizes: evaluating a
# checkpoint needs these too, and nothing else of RESUME_FIXED.
LAYOUT_FIXED = ("train.scan_layers",)
# What makes a fine-tune's task the same task, when its checkpoint is evaluated: also the
# order of its texts (a premise and a hypothesis swapped are another task), and the
# classes in the order its head learned them (`TASK_CLASSES`, checked once they are read).
TASK_IDENTITY = ("name", "kind", "regression", "text_fields")
# In a fine-tune's config.json: its classes, in the order of the head's outputs. A task
# file's classes come from its training file and `task.positive_label`, so the same
# settings can give another order when the file or the setting changes.
TASK_CLASSES = "task_classes"
# What a resumed run must keep, and why: the checkpoint's parameters, a fine-tune's
# objective (its record would otherwise name one it was not trained with), and the data
# position, which counts batches of `train.batch_size` windows in `train.seed`'s shuffle.
RESUME_FIXED = {
    "train.scan_layers": "another parameter layout",
    "finetune.lm_coef": "the objective it was trained with",
    "finetune.clf_dropout": "the objective it was trained with",
    "finetune.n_transfer": "the blocks it started from",
    "init_from": "the run its parameters started from, which its record names",
    "finetune.tokenizer": "the tokenizer its record names",
    "adapt.enabled": "whether it ran domain adaptation first",
    "train.batch_size": "the saved data position counts batches of that size",
    "train.seed": "the saved data position is in that seed's shuffle",
}
# What a resumed run may change, with a warning: the learning-rate schedule is rebuilt,
# or the optimiser updates differently from there.
RESUME_SCHEDULE = (
    "train.num_steps",
    "train.epochs",
    "train.warmup_steps",
    "train.warmup_fraction",
    "train.schedule",
    "train.lr",
    "train.weight_decay",
    "train.grad_clip",
    "train.b1",
    "train.b2",
    "train.eps",
)

# Settings a run may resume with changed that change its steps' values, not what it
# trains: micro-batches draw their own dropout masks (and sum in another order), and
# the compute dtype rounds differently. (train.remat recomputes the same values.)
RESUME_NUMERICS = ("train.microbatches", "train.compute_dtype")


def _same_setting(key: str, was, now) -> bool:
    """Whether a saved setting and the command's agree; paths (`init_from`,
    `finetune.tokenizer`) agree when they name the same file, however written."""
    if key in ("init_from", "finetune.tokenizer") and was and now:
        return os.path.realpath(os.path.expanduser(was)) == os.path.realpath(
            os.path.expanduser(now)
        )
    return was == now


def check_kind(workdir: str, saved: dict, config: ml_collections.ConfigDict):
    """Refuses a pretraining config on the fine-tune saved in `workdir` (its config.json,
    `saved`), and a fine-tuning config on a pretraining run: in any mode."""
    if ("task" in saved) == ("task" in config):
        return
    if "task" in saved:
        raise UserError(
            f"{workdir} holds a fine-tune (task {saved['task'].get('name')}), not a "
            "pretraining run; use its fine-tuning config (configs/finetune.py:TASK) or "
            "a new --workdir"
        )
    raise UserError(
        f"{workdir} holds a pretraining run, not a fine-tune; fine-tune from it with "
        f"--config.init_from={workdir} and a new --workdir"
    )


def check_resumable(
    workdir: str, saved: dict, config: ml_collections.ConfigDict, evaluating: bool = False
):
    """Refuses to resume the run saved in `workdir` (its config.json, `saved`) with a
    config that would not continue it; warns where the schedule or the numerics change.
    `evaluating` (reading its checkpoint without training on) refuses only another
    model or parameter layout: the batch size, seed and schedule are free there."""

    def lookup(tree, dotted):
        for key in dotted.split("."):
            if not isinstance(tree, dict) or key not in tree:
                return None
            tree = tree[key]
        return tree

    source = saved.get("converted_from")
    if isinstance(source, dict) and not evaluating:
        raise UserError(
            f"{workdir} holds converted weights ({source.get('format')}), "
            "not a run to resume: no optimiser state or data position; fine-tune from it "
            f"with --config.init_from={workdir}, or evaluate, generate or score it there"
        )
    current = json.loads(config.to_json_best_effort())  # as saved: tuples as lists
    check_kind(workdir, saved, config)
    saved_model = saved.get("model") or {}
    if saved_model != current["model"]:
        changed = ", ".join(
            f"model.{k}={saved_model.get(k)!r} there, {current['model'].get(k)!r} here"
            for k in sorted(set(saved_model) | set(current["model"]))
            if saved_model.get(k) != current["model"].get(k)
        )
        raise UserError(
            f"{workdir} holds a run of another model ({changed}); "
            + (
                "evaluate it with its model's sizes"
                if evaluating
                else "resume it with the same config or use a new --workdir"
            )
        )
    # A fine-tune's task, except its test file, which training never reads (evaluating,
    # only which task it is: its files may have moved). A key that a run saved before it
    # existed (task.positive_label) reads as its empty default.
    saved_task = saved.get("task") or {}
    current_task = current.get("task", {})
    if evaluating:
        # A converted multiple-choice model's task is the template's: its texts are
        # whatever the evaluated files name them.
        converted = isinstance(source, dict)
        identity = [k for k in TASK_IDENTITY if not (k == "text_fields" and converted)]
        saved_task, current_task = (
            {
                k: ",".join(text_field_names(v or ())) if k == "text_fields" else v
                for k, v in task.items()
                if k in identity
            }
            for task in (saved_task, current_task)
        )

    def differs(k: str) -> bool:
        if k not in saved_task:
            return bool(current_task[k])
        return saved_task[k] != current_task.get(k)

    changed = sorted(
        k for k in set(saved_task) | set(current_task) if k != "test_path" and differs(k)
    )
    if "task" in current and changed:
        shown = ", ".join(
            f"task.{k}={saved_task.get(k)!r} there, {current_task.get(k)!r} here" for k in changed
        )
        raise UserError(
            f"{workdir} holds a fine-tune of another task ({shown}); "
            + (
                "evaluate it with its own task: the config and --config.task.* settings it "
                "was trained with"
                if evaluating
                else "resume it with the same task or use a new --workdir"
            )
        )
    for key, why in RESUME_FIXED.items():
        if evaluating and key not in LAYOUT_FIXED:
            continue
        was = lookup(saved, key)
        if key == "train.scan_layers":
            was = bool(was)  # runs from before the stacked layout saved none
        if was is not None and not _same_setting(key, was, lookup(current, key)):
            fix = "evaluate" if evaluating else "resume"
            raise UserError(
                f"{workdir} was trained with {key}={was} ({why}); {fix} with "
                f"--config.{key}={was}" + ("" if evaluating else " or use a new --workdir")
            )
    if evaluating:
        return

    def changes(keys) -> str:
        return ", ".join(
            f"{key} {lookup(saved, key)} -> {lookup(current, key)}"
            for key in keys
            if lookup(saved, key) != lookup(current, key)
        )

    if changed := changes(RESUME_SCHEDULE):
        logging.warning(
            "resuming with %s: the learning-rate schedule and optimiser are rebuilt with the "
            "new values, so the steps from here differ from a run started with them",
            changed,
        )
    if changed := changes(RESUME_NUMERICS):
        logging.warning(
            "resuming with %s: the run goes on correctly, but its steps from here are not "
            "those it would have taken (other dropout masks, other rounding)",
            changed,
        )


def write_config(workdir: str, config: ml_collections.ConfigDict, extra: dict | None = None):
    """config.json: the run's config, and `extra` top-level keys of what the run derived
    from it (a fine-tune's classes, `TASK_CLASSES`)."""
    if jax.process_index() == 0:
        with replacing(os.path.join(workdir, CONFIG_FILE)) as f:
            saved = json.loads(config.to_json_best_effort())
            f.write(json.dumps({**saved, **(extra or {})}, indent=2))
