"""A fine-tuned run's results: which checkpoint to score (the best by the first eval
metric, or the latest), its scores next to the paper's in results.json and results.md,
and the test splits' predictions (for GLUE, its submission files)."""

import json
import logging
import math
import os
from typing import TYPE_CHECKING

import jax

from gptjax import checkpoint
from gptjax.atomic import replacing
from gptjax.errors import UserError
from gptjax.metrics import read_metrics

if TYPE_CHECKING:
    from gptjax.finetune import FineTune

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def choose_step(workdir: str, key: str, which: str) -> int:
    """The checkpoint to evaluate: the latest, or the best by the eval row `key`."""
    steps = checkpoint.all_steps(workdir)
    if not steps:
        raise UserError(f"no checkpoint in {workdir}: fine-tune there first (--mode=train)")
    if which == "latest":
        return steps[-1]
    try:
        rows = read_metrics(workdir)
    except (OSError, ValueError) as e:  # e.g. a converted run, which has no evaluations
        logging.warning("no evaluations to choose from in %s (%s): using the latest", workdir, e)
        return steps[-1]
    evaluated = {
        r["step"]: r[key]
        for r in rows
        # A NaN score (e.g. Pearson of non-finite predictions) would win every comparison.
        if key in r and math.isfinite(r[key])
    }
    scored = {step: value for step, value in evaluated.items() if step in steps}
    if not scored:
        logging.warning("no evaluated checkpoint in %s: using the latest", workdir)
        return steps[-1]
    best = max(scored, key=lambda s: (scored[s], s))
    overall = max(evaluated, key=lambda s: (evaluated[s], s))
    if evaluated[overall] > scored[best]:
        why = (
            "more were saved after it than train.keep_checkpoints keeps (raise it, or "
            "evaluate less often)"
            if overall < steps[0]
            else "none was saved at that step (make train.eval_every a multiple of "
            "train.ckpt_every), or it was lost to a kill"
        )
        logging.warning(
            "the best evaluation (step %d, %s %.4g) has no checkpoint: %s; using the best "
            "kept, step %d (%.4g)",
            overall,
            key,
            evaluated[overall],
            why,
            best,
            scored[best],
        )
    return best


def evaluate_checkpoint(run: "FineTune", splits=None) -> dict:
    """Restores the run's best (or latest: `eval.checkpoint`) checkpoint, scores the
    eval splits, predicts the test splits, and writes results.json, results.md and, for
    GLUE test splits, the submission TSVs."""
    config, workdir = run.config, run.workdir
    step = choose_step(workdir, run.selection_key, config.eval.checkpoint)
    other = "choose another with --config.eval.checkpoint=latest, or re-run training"
    params = checkpoint.restore_params(workdir, run.abstract.params, step, other)
    splits = splits or (*run.task.eval_splits, *run.task.test_splits)
    results = []
    for name, out in run.predict_splits(params, splits).items():
        scores = run.score(out)
        if scores:
            results.append({"split": name, **scores})
        if name in run.task.test_splits:
            write_predictions(run, name, out)
    report = {
        "task": run.task.name,
        "checkpoint_step": step,
        "selected_by": config.eval.checkpoint,
        "init_from": config.init_from,
        "lm_coef": config.finetune.lm_coef,
        # What it was trained with (`n_transfer`, `clf_dropout`, `tokenizer`, ...) and
        # whether domain adaptation ran first: the variants of a sweep tell apart.
        "finetune": config.finetune.to_dict(),
        "adapt": config.adapt.to_dict() if "adapt" in config else None,
        "results": results,
        "paper": run.task.paper,
    }
    if jax.process_index() == 0:
        with replacing(os.path.join(workdir, RESULTS_JSON)) as f:
            json.dump(report, f, indent=2)
        table = results_table(report)
        with replacing(os.path.join(workdir, RESULTS_MD)) as f:
            f.write(table)
        logging.info("results of checkpoint %d:\n%s", step, table)
        logging.info(
            "wrote %s and %s", *(os.path.join(workdir, n) for n in (RESULTS_JSON, RESULTS_MD))
        )
    return report


def results_table(report: dict) -> str:
    """Markdown: each split and metric next to the paper's (test-set) number."""
    lines = [
        f"Task `{report['task']}`, checkpoint {report['checkpoint_step']} "
        f"({report['selected_by']}); the paper's numbers are on the test sets.",
        "",
        "| split | metric | gptjax | paper |",
        "|---|---|---|---|",
    ]
    for row in report["results"]:
        for metric, value in row.items():
            if metric == "split":
                continue
            paper = report["paper"].get(f"{row['split']}/{metric}", report["paper"].get(metric))
            paper = "" if paper is None else f"{paper:.1f}"
            lines.append(f"| {row['split']} | {metric} | {value:.1f} | {paper} |")
    return "\n".join(lines) + "\n"


def predictions_file(task, split: str) -> str:
    """Where a test split's predictions go: GLUE's submission file name, or
    `predictions_<split>.tsv`."""
    return task.submission.get(split, f"predictions_{split}.tsv")


def write_predictions(run: "FineTune", split: str, out: dict):
    """A test split's predictions, `index<TAB>prediction` (`predict`'s outputs `out`): the
    example's id (GLUE's `idx`, a task file's row) or else its position, and the label
    by name, the number GLUE scores for its binary tasks and STS-B, or the choice."""
    task = run.task
    examples = run.split(split).examples
    preds = run.predictions(out["output"])
    numeric = task.regression or not task.label_names or task.name in GLUE_NUMERIC
    path = os.path.join(run.workdir, predictions_file(task, split))
    if jax.process_index() != 0:
        return
    rows = []
    for i, (ex, p) in enumerate(zip(examples, preds, strict=True)):
        if task.regression:
            value = f"{p:.3f}"
        else:
            value = str(int(p)) if numeric else task.label_names[int(p)]
        rows.append((i if ex.uid is None else ex.uid, value))
    if len({type(index) for index, _ in rows}) == 1:
        rows.sort()  # in the test file's order (TFDS stores its records shuffled)
    with replacing(path) as f:
        f.write("index\tprediction\n")
        f.writelines(f"{index}\t{value}\n" for index, value in rows)
    logging.info("wrote the %s predictions of %s to %s", split, task.name, path)


# GLUE's binary tasks whose submissions are 0/1, not label names.
GLUE_NUMERIC = ("cola", "sst2", "mrpc", "qqp")
