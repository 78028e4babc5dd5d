"""The loop every training phase shares (pretraining, domain adaptation, fine-tuning):
resume from the latest good checkpoint, step, log, evaluate and checkpoint under a
preemption guard, and the held-out evaluation it runs."""

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np

from gptjax import checkpoint, sharding
from gptjax.data.pipeline import eval_batches
from gptjax.errors import Preempted, UserError
from gptjax.metrics import (
    MetricsWriter,
    Progress,
    Throughput,
    evaluated_at,
    format_duration,
    log_progress,
)
from gptjax.preemption import PreemptionGuard
from gptjax.train import TrainState, abstract_state


def total_steps(train_cfg: ml_collections.ConfigDict, num_windows: int) -> int:
    """`train.num_steps` if set, else `train.epochs` passes over the training windows."""
    if train_cfg.num_steps is not None:
        return train_cfg.num_steps
    return max(1, train_cfg.epochs * num_windows // train_cfg.batch_size)


def lm_eval_batches(windows, train_cfg) -> Iterable[dict]:
    """The held-out `windows` for `evaluate`, this process's rows, in microbatches (an
    evaluation holds the logits of a whole batch), at most `train_cfg.eval_batches`
    batches of `train_cfg.batch_size` windows: the same windows whatever the microbatches."""
    k, cap = train_cfg.microbatches, train_cfg.eval_batches
    return eval_batches(
        windows,
        train_cfg.batch_size // k,
        None if cap is None else cap * k,
        jax.process_index(),
        jax.process_count(),
    )


def evaluate(p_eval: Callable, params, batches: Iterable[dict], mesh) -> dict[str, float]:
    """Token-weighted held-out loss and perplexity over all `batches`, with a progress
    line every 30 s (a 1% split of BookCorpus is hundreds of batches)."""
    sums = []
    progress = Progress("evaluating", len(batches) if hasattr(batches, "__len__") else None)
    for b in batches:
        sums.append(p_eval(params, sharding.global_batch(mesh, b)))
        if progress.due():
            jax.block_until_ready(sums[-1])  # what is done, not what is queued
            progress.log(len(sums))
    sums = jax.device_get(sums)
    loss = float(sum(s["loss_sum"] for s in sums) / max(sum(s["count"] for s in sums), 1.0))
    return {"eval_loss": loss, "eval_ppl": float(np.exp(loss))}


def summarize(pending: list[tuple[int, dict]], train_cfg) -> dict[str, float]:
    """One log row from the steps since the last one (a single device sync): loss and
    gradient norm averaged over the finite steps, the learning rate of the last step, and
    the number of skipped non-finite steps. A non-finite step is an error naming it with
    `train.nonfinite="stop"`, and so are `train.nonfinite_limit` of them in a row with
    "skip" (every update skipped: the run has diverged and would only burn time)."""
    steps = [step for step, _ in pending]
    host = jax.device_get([m for _, m in pending])
    bad = [step for step, m in zip(steps, host, strict=True) if m["nonfinite"]]
    for step in bad:
        logging.warning("step %d: non-finite loss or gradients; the update was skipped", step)
    if bad and train_cfg.nonfinite == "stop":
        raise UserError(
            f"non-finite loss or gradients at step {bad[0]} (the update was not applied and "
            "no later state was saved); lower --config.train.lr, or set "
            "--config.train.nonfinite=skip to skip such steps"
        )
    limit = train_cfg.nonfinite_limit
    diverged = [s for s, m in zip(steps, host, strict=True) if m["nonfinite_run"] >= limit]
    if diverged:
        raise UserError(
            f"{limit} non-finite steps in a row up to step {diverged[0]}, every update "
            "skipped: the run has diverged. Resume from an earlier checkpoint with a lower "
            "--config.train.lr, or allow more with --config.train.nonfinite_limit"
        )
    good = [m for m in host if not m["nonfinite"]] or host
    averaged = [k for k in host[-1] if k not in ("lr", "nonfinite", "nonfinite_run")]
    row = {k: float(np.mean([m[k] for m in good])) for k in averaged}
    row["lr"] = float(host[-1]["lr"])
    row["skipped_steps"] = len(bad)
    return row


def fit(
    state: TrainState,
    p_train: Callable,
    evaluate_fn: Callable[[Any], dict[str, float]],
    train_iter,
    mesh,
    train_cfg,
    total_steps: int,
    tokens_per_step: int,
    writer,
    save_checkpoint: Callable,
    guard,
) -> tuple[TrainState, dict[str, float]]:
    """Runs optimiser steps until `total_steps`, logging, evaluating (`evaluate_fn` of
    the parameters gives the eval row) and checkpointing.

    The host does not read metrics between log points: step N is dispatched while step
    N-1 still runs, the host then waits for step N-1 to finish (not for step N), and
    metrics are fetched only every `log_every` steps, before a
    checkpoint (so no state after a non-finite step under `nonfinite="stop"` is saved),
    and when `guard` reports a stop signal (then a checkpoint is written synchronously and
    `Preempted` is raised). A step's checkpoint is saved before its evaluation, which a
    stop signal ends at once (`evaluate_and_write`): the step's rows and checkpoint are
    written, then `Preempted` is raised.
    """
    step = first = int(jax.device_get(state.step))
    pending: list[tuple[int, dict]] = []
    eval_metrics: dict[str, float] = {}

    def write_row():  # the steps since the last row, as one row
        nonlocal pending
        row = summarize(pending, train_cfg)
        pending = []
        row["tokens_per_sec"], eta = throughput.update(step, total_steps)
        writer.write(step, row)
        log_progress(step, total_steps, row, eta)

    while step < total_steps:
        batch = sharding.global_batch(mesh, next(train_iter))
        if step == first:
            logging.info("compiling the train step (or reading it from the compilation cache)")
            compiling = time.time()
        state, metrics = p_train(state, batch)
        if step == first:  # compiled (or loaded from the cache): the clock starts now
            logging.info("train step ready in %s", format_duration(time.time() - compiling))
            throughput = Throughput(step, tokens_per_step)
        step += 1
        pending.append((step, metrics))
        if len(pending) > 1:
            # Step N-1 done before step N+1 is dispatched: one step queued behind the
            # running one keeps the device busy, and a stop signal is acted on within
            # about a step (unbounded, the host would run up to log_every steps ahead,
            # and the stop's synchronous save would wait for all of them).
            jax.block_until_ready(pending[-2][1])
        last = step == total_steps
        stop = guard.should_stop(step)
        save = step % train_cfg.ckpt_every == 0 or last or stop
        if step % train_cfg.log_every == 0 or save:
            write_row()
        # The save comes first, and a stop signal before or during an evaluation ends it
        # (there may be no time for one): the resumed run makes it up (`evaluate_missed`,
        # or the final evaluation of a run trained to the end).
        evaluate = (step % train_cfg.eval_every == 0 or last) and not (stop and not last)
        if save:
            save_checkpoint(state, train_iter.get_state(), force=last or stop, wait=stop)
        if evaluate:
            try:
                eval_metrics = evaluate_and_write(step, state.params, evaluate_fn, writer, guard)
            except Preempted:
                if not save:  # the stop's row and checkpoint, as at a stop after a step
                    if pending:
                        write_row()
                    save_checkpoint(state, train_iter.get_state(), force=True, wait=True)
                raise
        if evaluate or save:
            throughput.update(step, total_steps)  # evaluating and saving are not training
        if stop and not last:
            raise Preempted(step, guard.signal_name)
    return state, eval_metrics


def evaluate_and_write(
    step: int, params, evaluate_fn: Callable, writer, guard: PreemptionGuard
) -> dict[str, float]:
    """`evaluate_fn(params)`, written as the eval row of `step` and logged; a stop signal
    ends it at once (`PreemptionGuard.interruptible`), before anything is written."""
    with guard.interruptible(step):
        eval_metrics = evaluate_fn(params)
    writer.write(step, eval_metrics)
    logging.info("step %d %s", step, " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    return eval_metrics


def evaluate_missed(
    state, evaluate_fn, writer, workdir: str, train_cfg, total_steps: int, guard
) -> dict[str, float]:
    """At a resume from an evaluation step (or the last step), that step's evaluation if
    the stopped run did not finish it (a stop signal before or during one ends it); its
    metrics, or {} when none was due."""
    step = int(jax.device_get(state.step))
    due = 0 < step <= total_steps and (step % train_cfg.eval_every == 0 or step == total_steps)
    if due and not evaluated_at(workdir, step):
        return evaluate_and_write(step, state.params, evaluate_fn, writer, guard)
    return {}


def run_phase(
    state: TrainState,
    shardings,
    p_train: Callable,
    evaluate_fn: Callable,
    data_iter,
    mesh,
    train_cfg,
    total_steps: int,
    tokens_per_step: int,
    workdir: str,
    ckpt,
    resume_step: int | None,
    *,
    record_config: Callable[[], None],
) -> tuple[TrainState, dict[str, float]]:
    """A training phase in `workdir`: resumes from the latest good checkpoint when there
    is one (the fresh `state` then only gives shapes and is freed first: pass it without
    keeping a reference), then `fit` under a preemption guard, with metrics written to
    the workdir.

    `record_config` writes the run's config into the workdir; it is called once the
    state is settled, after a resume's restore, and the metrics file has been read, so
    that a config the checkpoint refuses (another shape), or a run that cannot go on
    (its metrics file unreadable), is never recorded: the workdir's config stays as it
    was."""
    start = 0
    if resume_step is not None:
        abstract = abstract_state(state, shardings)
        del state
        state, data_state, start = checkpoint.restore_latest_good(ckpt, abstract)
        data_iter.set_state(data_state)
        if start > total_steps:  # not re-reported as if it were this config's run
            raise UserError(
                f"the checkpoint in {workdir} is at step {start:,}, past the "
                f"{total_steps:,} steps this config trains for (train.num_steps or "
                f"train.epochs lowered); set them to at least {start:,} steps to go on, "
                "use a new --workdir, or score the checkpoint with --mode=eval"
            )
        logging.info("resumed from the checkpoint at step %d", start)
    writer = MetricsWriter(workdir, resume_step=start)  # (a damaged metrics file: no config)
    failed = True
    try:
        record_config()
        with PreemptionGuard() as guard:
            missed = evaluate_missed(
                state, evaluate_fn, writer, workdir, train_cfg, total_steps, guard
            )
            state, eval_metrics = fit(
                state,
                p_train,
                evaluate_fn,
                data_iter,
                mesh,
                train_cfg,
                total_steps,
                tokens_per_step,
                writer,
                functools.partial(checkpoint.save, ckpt),
                guard,
            )
        failed = False
    except Preempted:
        failed = False  # the stop's checkpoint may still be writing: finish waits for it
        raise
    finally:
        writer.close()
        checkpoint.finish(ckpt, failed)
    return state, eval_metrics or missed  # (fit's are {} when resumed at the last step)
