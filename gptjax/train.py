"""The train state, pure train and eval steps, and the loop that drives them."""

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from gptjax import losses, sharding
from gptjax.model import GPT


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the base dropout key (step keys are folded from it, so the
    randomness of step s is the same whether or not the run was resumed)."""

    rng: jax.Array


def loss_fn(params, batch: dict[str, jax.Array], rng: jax.Array | None, model: GPT):
    """Mean next-token loss of a batch of packed windows; dropout on iff `rng` is given."""
    tokens_BxL1 = batch["tokens"]
    logits_BxLxV = model.apply(
        {"params": params},
        tokens_BxL1[:, :-1],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )
    loss_sum, count = losses.lm_loss(logits_BxLxV, tokens_BxL1[:, 1:], batch["weights"])
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count}


def train_step(state: TrainState, batch, *, model: GPT, schedule: optax.Schedule):
    """One optimiser update. Pure: the step's dropout key is derived from the state."""
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(state.params, batch, rng, model)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return state.apply_gradients(grads=grads), metrics


def eval_step(params, batch, *, model: GPT):
    """Summed loss and target count of a batch, without dropout."""
    _, sums = loss_fn(params, batch, None, model)
    return sums


def create_state(
    model: GPT, tx: optax.GradientTransformation, seed: int, n_ctx: int, mesh
) -> tuple[TrainState, Any]:
    """A freshly initialised train state, created directly in its sharded layout.

    Returns the state and its shardings (from the parameters' logical axis names).
    """

    def init(rng):
        params = model.init({"params": rng}, jnp.zeros((1, n_ctx), jnp.int32))["params"]
        return TrainState.create(
            apply_fn=model.apply,
            params=params,
            tx=tx,
            rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),  # dropout, not init
        )

    init_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    boxed = jax.eval_shape(init, init_rng)
    shardings = sharding.logical_sharding(mesh, nn.get_partition_spec(boxed))
    # Parameters are placed by `out_shardings`. (Not traced under the axis rules: Flax's
    # DenseGeneral initialises kernels flat, before they take their logical shape.)
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(init_rng)
    return state, shardings


def abstract_state(state: TrainState, shardings) -> TrainState:
    """Shape, dtype and sharding of every array of `state` (a restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def compile_steps(model: GPT, schedule: optax.Schedule, mesh, state_shardings):
    """The jitted train and eval steps, with shardings declared once and the train state's
    buffers donated (updated in place)."""
    batch_sh = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    p_train = jax.jit(
        functools.partial(train_step, model=model, schedule=schedule),
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    p_eval = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_shardings.params, batch_sh),
        out_shardings=replicated,
    )
    return sharding.under_axis_rules(p_train, mesh), sharding.under_axis_rules(p_eval, mesh)


def evaluate(p_eval: Callable, params, batches: Iterable[dict], mesh) -> dict[str, float]:
    """Token-weighted held-out loss and perplexity over all `batches`."""
    sums = [p_eval(params, sharding.global_batch(mesh, b)) for b in batches]
    sums = jax.device_get(sums)
    loss = float(sum(s["loss_sum"] for s in sums) / max(sum(s["count"] for s in sums), 1.0))
    return {"eval_loss": loss, "eval_ppl": float(np.exp(loss))}


def mean_metrics(pending: list[dict]) -> dict[str, float]:
    """Loss and gradient norm averaged over the steps since the last log, the learning
    rate of the last of them (one device sync)."""
    host = jax.device_get(pending)
    row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    row["lr"] = float(host[-1]["lr"])
    return row


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def log_progress(step: int, total: int, metrics: dict, eta_s: float):
    logging.info(
        "step %d/%d (%.0f%%) loss %.4f lr %.3g grad_norm %.3f %s tok/s ETA %s",
        step,
        total,
        100 * step / total,
        metrics["loss"],
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
    p_eval: Callable,
    train_iter,
    eval_data: Callable[[], Iterable[dict]],
    mesh,
    train_cfg,
    total_steps: int,
    tokens_per_step: int,
    writer,
    save_checkpoint: Callable,
) -> tuple[TrainState, dict[str, float]]:
    """Runs optimiser steps until `total_steps`, logging, evaluating and checkpointing.

    The host never waits for the device between log points: step N is dispatched while
    step N-1 still runs, and metrics are fetched only every `log_every` steps.
    """
    step = int(jax.device_get(state.step))
    throughput = Throughput(step, tokens_per_step)
    pending: list[dict] = []
    eval_metrics: dict[str, float] = {}
    while step < total_steps:
        batch = sharding.global_batch(mesh, next(train_iter))
        state, metrics = p_train(state, batch)
        pending.append(metrics)
        step += 1
        last = step == total_steps
        if step % train_cfg.log_every == 0 or last:
            row = mean_metrics(pending)
            pending = []
            row["tokens_per_sec"], eta = throughput.update(step, total_steps)
            writer.write(step, row)
            log_progress(step, total_steps, row, eta)
        if step % train_cfg.eval_every == 0 or last:
            eval_metrics = evaluate(p_eval, state.params, eval_data(), mesh)
            writer.write(step, eval_metrics)
            logging.info(
                "step %d eval loss %.4f perplexity %.2f",
                step,
                eval_metrics["eval_loss"],
                eval_metrics["eval_ppl"],
            )
            throughput.update(step, total_steps)  # evaluation time is not training time
        if step % train_cfg.ckpt_every == 0 or last:
            save_checkpoint(state, train_iter.get_state(), force=last)
    return state, eval_metrics
