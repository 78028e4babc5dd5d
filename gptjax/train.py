"""The train state, pure train and eval steps, and the loop that drives them."""

import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from gptjax import checkpoint, losses, optim, sharding
from gptjax.data.pipeline import eval_batches
from gptjax.errors import Preempted, UserError
from gptjax.metrics import MetricsWriter, evaluated_at
from gptjax.model import GPT, stack_layers
from gptjax.preemption import PreemptionGuard


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the base dropout key (step keys are folded from it, so the
    randomness of step s is the same whether or not the run was resumed)."""

    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss made of weighted terms, each a mean over its own count (tokens for the LM
    loss, examples for a task loss): loss = sum_k weights[k] * sum_k / count_k.

    `terms(params, batch, rng)` gives {name: (sum, count)} with dropout on iff `rng` is
    given; `counts(batch)` gives the same counts from the batch alone, so that slices of a
    batch can be divided by the whole batch's counts (exact gradient accumulation).
    """

    terms: Callable
    counts: Callable
    weights: tuple[tuple[str, float], ...]

    def loss(self, params, batch, rng, totals: dict | None = None):
        """The weighted loss and each term's mean (over `totals`, default the batch's)."""
        totals = self.counts(batch) if totals is None else totals
        sums = self.terms(params, batch, rng)
        means = {k: s / jnp.maximum(totals[k], 1.0) for k, (s, _) in sums.items()}
        return sum(w * means[k] for k, w in self.weights), means


def lm_objective(model: GPT) -> Objective:
    """Next-token prediction over packed windows (pretraining, domain adaptation)."""

    def terms(params, batch, rng):
        tokens_BxL1 = batch["tokens"]
        logits_BxLxV = model.apply(
            {"params": params},
            tokens_BxL1[:, :-1],
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )
        return {"lm": losses.lm_loss(logits_BxLxV, tokens_BxL1[:, 1:], batch["weights"])}

    return Objective(terms, lambda batch: {"lm": jnp.sum(batch["weights"])}, (("lm", 1.0),))


def loss_and_grads(params, batch, rng: jax.Array, objective: Objective, microbatches: int = 1):
    """The batch's loss, each term's mean and the loss's gradient, accumulated over
    `microbatches` slices of the batch (a scan, so one slice's activations are alive at a
    time). Each slice's sums are divided by the whole batch's counts, so the result equals
    the full batch's (with dropout off: each slice draws its own dropout mask)."""

    def loss(p, piece, piece_rng, totals):
        return objective.loss(p, piece, piece_rng, totals)

    totals = objective.counts(batch)
    if microbatches == 1:
        (value, means), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, rng, totals)
        return value, means, grads
    # Slice i takes rows i, i + k, i + 2k, ...: every device holds an equal share of it.
    slices = jax.tree.map(lambda x: x.reshape(-1, microbatches, *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(grads, i_and_slice):
        i, piece = i_and_slice
        (value, means), piece_grads = jax.value_and_grad(loss, has_aux=True)(
            params, piece, jax.random.fold_in(rng, i), totals
        )
        return jax.tree.map(jnp.add, grads, piece_grads), (value, means)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (values, means) = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), slices))
    return jnp.sum(values), jax.tree.map(jnp.sum, means), grads


def train_step(
    state: TrainState,
    batch,
    *,
    objective: Objective,
    schedule: optax.Schedule,
    microbatches: int = 1,
):
    """One optimiser update. Pure: the step's dropout key is derived from the state."""
    rng = jax.random.fold_in(state.rng, state.step)
    loss, means, grads = loss_and_grads(state.params, batch, rng, objective, microbatches)
    new_state = state.apply_gradients(grads=grads)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": optim.scheduled_lr(schedule, state.opt_state),  # after a skip, not step's
        # Whether the optimiser (optim.make_optimizer) skipped this update: read from its
        # state (optax's apply_if_finite's), so the loop reports exactly what it did.
        "nonfinite": ~new_state.opt_state.last_finite,
        "nonfinite_run": new_state.opt_state.notfinite_count,  # in a row, up to this one
    }
    if len(means) > 1:  # each term of a combined loss, e.g. task_loss and lm_loss
        metrics.update({f"{k}_loss": v for k, v in means.items()})
    return new_state, metrics


def eval_step(params, batch, *, model: GPT):
    """Summed LM loss and target count of a batch, without dropout."""
    loss_sum, count = lm_objective(model).terms(params, batch, None)["lm"]
    return {"loss_sum": loss_sum, "count": count}


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    n_ctx: int,
    mesh,
    init_inputs: tuple | None = None,
) -> tuple[TrainState, Any]:
    """A freshly initialised train state, created directly in its sharded layout.

    Returns the state and its shardings (from the parameters' logical axis names). The
    initial values do not depend on `model.scan_layers`: a scanned model starts from the
    unrolled model's parameters, stacked. `init_inputs` are example inputs for
    `model.init` (default: one window of n_ctx tokens, for GPT).
    """
    inputs = init_inputs or (jnp.zeros((1, n_ctx), jnp.int32),)

    def make_state(params):
        return TrainState.create(
            apply_fn=model.apply,
            params=params,
            tx=tx,
            rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),  # dropout, not init
        )

    def init_params(rng):
        if model.scan_layers:
            unrolled = model.clone(scan_layers=False).init({"params": rng}, *inputs)["params"]
            return stack_layers(nn.unbox(unrolled), model.cfg.n_layer)
        return nn.unbox(model.init({"params": rng}, *inputs)["params"])

    init_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    _, shardings = state_layout(model, tx, n_ctx, mesh, init_inputs)
    # Parameters are placed by `out_shardings` (initialisation is not traced under the
    # axis rules: the parameters' own constraints would bind to the unrolled layout).
    state = jax.jit(lambda r: make_state(init_params(r)), out_shardings=shardings)(init_rng)
    return state, shardings


def state_layout(model: nn.Module, tx, n_ctx: int, mesh, init_inputs: tuple | None = None):
    """The train state `create_state` makes, as shapes (`jax.ShapeDtypeStruct`), and its
    shardings (from the parameters' logical axis names), without allocating anything."""
    inputs = init_inputs or (jnp.zeros((1, n_ctx), jnp.int32),)

    def make_state(rng):
        params = model.init({"params": rng}, *inputs)["params"]
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng)

    boxed = jax.eval_shape(make_state, jax.random.PRNGKey(0))
    return nn.unbox(boxed), sharding.logical_sharding(mesh, nn.get_partition_spec(boxed))


def abstract_train_state(model: nn.Module, tx, n_ctx: int, mesh, init_inputs: tuple | None = None):
    """The train state `create_state` makes, as shapes with their shardings (a restore
    or compilation target), and those shardings, without allocating anything."""
    shapes, shardings = state_layout(model, tx, n_ctx, mesh, init_inputs)
    return abstract_state(shapes, shardings), shardings


def abstract_params(model: nn.Module, n_ctx: int, mesh, init_inputs: tuple | None = None):
    """The parameters `model.init` makes, as shapes with their shardings (a restore
    target), without allocating them."""
    inputs = init_inputs or (jnp.zeros((1, n_ctx), jnp.int32),)
    init = lambda rng: model.init({"params": rng}, *inputs)["params"]  # noqa: E731
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.logical_sharding(mesh, nn.get_partition_spec(boxed))
    return abstract_state(nn.unbox(boxed), shardings)


def abstract_state(state: TrainState, shardings) -> TrainState:
    """Shape, dtype and sharding of every array of `state` (a restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


# XLA's options for oneDNN matmuls on CPUs (`train.cpu_matmuls="onednn"`): dot fusions
# only; oneDNN's element-wise and reduction fusions measured no faster.
ONEDNN_CPU_OPTIONS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
}


def compiler_options(train_cfg) -> dict | None:
    """XLA options for the train step from `config.train` (the same values, to float32
    rounding). Ignored off CPUs.

    `cpu_vector_width`: the vector width, in bits, XLA's CPU compiler prefers for
    element-wise code; its default, 256, leaves half of AVX-512's registers unused
    (512: `bench-cpu`'s step about 2% faster, mostly in dropout's masks).

    `cpu_matmuls`: "xla" leaves the CPU's matmuls to XLA (YNNPACK, and Eigen for the
    products YNNPACK does not take); "onednn" runs them through oneDNN, whose batched
    products (attention's) are 1.1-3x faster on an AVX-512 Xeon: `bench-cpu`'s step
    1.02-1.07x, none at `gpt1`'s batch 1. XLA cannot store such an executable in the
    persistent compilation cache, so every start compiles afresh (docs/benchmarks.md).
    """
    if sharding.platform() != "cpu":
        return None
    options = {"xla_cpu_prefer_vector_width": train_cfg.cpu_vector_width}
    if train_cfg.cpu_matmuls == "onednn":
        # JAX warns at every compile that the cache entry could not be written; once
        # said here is enough.
        warnings.filterwarnings(
            "ignore", r"Error writing persistent compilation cache entry.*onednn", UserWarning
        )
        logging.info("train.cpu_matmuls=onednn: the train step compiles afresh at every start")
        options.update(ONEDNN_CPU_OPTIONS)
    return options


def compile_train_step(
    objective: Objective, schedule: optax.Schedule, mesh, state_shardings, train_cfg
):
    """The jitted train step, with shardings declared once and the train state's buffers
    donated (updated in place); `train_cfg` (`config.train`) gives its gradient
    accumulation (`microbatches`) and XLA's options (`compiler_options`)."""
    p_train = jax.jit(
        functools.partial(
            train_step,
            objective=objective,
            schedule=schedule,
            microbatches=train_cfg.microbatches,
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(train_cfg),
    )
    return sharding.under_axis_rules(p_train, mesh)


def compile_steps(model: GPT, schedule: optax.Schedule, mesh, state_shardings, train_cfg):
    """The jitted LM train and eval steps (pretraining, domain adaptation)."""
    p_train = compile_train_step(lm_objective(model), schedule, mesh, state_shardings, train_cfg)
    p_eval = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    return p_train, sharding.under_axis_rules(p_eval, mesh)


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


class Progress:
    """A line for long work over batches, at most every `every_s` seconds: "WHAT: K of N
    batches in T, ETA E" (without N and the ETA when the total is not known)."""

    def __init__(self, what: str, total: int | None, every_s: float = 30.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.started = self.last = time.time()

    def due(self) -> bool:
        return time.time() - self.last > self.every_s

    def log(self, done: int):
        self.last = time.time()
        elapsed = self.last - self.started
        of, eta = "", ""
        if self.total:
            of = f" of {self.total}"
            eta = ", ETA " + format_duration(elapsed / done * (self.total - done))
        logging.info("%s: %d%s batches in %s%s", self.what, done, of, format_duration(elapsed), eta)


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


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def log_progress(step: int, total: int, metrics: dict, eta_s: float):
    """The periodic training line; a fine-tune's loss is also shown in its parts (task
    loss and LM loss: the task's is the one to watch, the sum hides it)."""
    parts = "".join(
        f" {k} {v:.4f}" for k, v in metrics.items() if k.endswith("_loss") and k != "loss"
    )
    logging.info(
        "step %d/%d (%.0f%%) loss %.4f%s lr %.3g grad_norm %.3f %s tok/s ETA %s",
        step,
        total,
        100 * step / total,
        metrics["loss"],
        parts,
        metrics["lr"],
        metrics["grad_norm"],
        f"{metrics['tokens_per_sec']:,.0f}",
        format_duration(eta_s),
    )


class Throughput:
    """Tokens per second and time left, measured between log points."""

    def __init__(self, step: int, tokens_per_step: int):
        self.step, self.time, self.tokens_per_step = step, time.time(), tokens_per_step

    def update(self, step: int, total: int) -> tuple[float, float]:
        now = time.time()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate * self.tokens_per_step, (total - step) / max(rate, 1e-9)


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
