"""The train state and the pure train and eval steps, compiled for the mesh (the loop
that drives them is `loop.py`)."""

import dataclasses
import functools
import logging
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from gptjax import losses, optim, sharding
from gptjax.model import GPT, stack_layers


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the base dropout key (step keys are folded from it, so the
    randomness of step s is the same whether or not the run was resumed)."""

    rng: jax.Array


def loss_and_grads(
    params, batch, rng: jax.Array, objective: losses.Objective, microbatches: int = 1
):
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
    objective: losses.Objective,
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
    loss_sum, count = losses.lm_objective(model).terms(params, batch, None)["lm"]
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
    shapes = nn.unbox(boxed)
    return shapes, sharding.logical_sharding(mesh, nn.get_partition_spec(boxed), shapes)


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
    shapes = nn.unbox(boxed)
    return abstract_state(
        shapes, sharding.logical_sharding(mesh, nn.get_partition_spec(boxed), shapes)
    )


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
    objective: losses.Objective, schedule: optax.Schedule, mesh, state_shardings, train_cfg
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


@dataclasses.dataclass
class Training:
    """What a phase trains with (`build`): its learning-rate schedule, its train state
    (arrays; built without `initialise`, only their shapes and shardings, a restore
    target), the state's shardings, and the compiled train step."""

    schedule: optax.Schedule
    state: TrainState
    shardings: Any
    p_train: Any


def build(
    model: nn.Module,
    objective: losses.Objective,
    train_cfg,
    total_steps: int,
    mesh,
    initialise: bool = True,
    init_inputs: tuple | None = None,
) -> Training:
    """The schedule, optimiser, train state and train step of `total_steps` updates of
    `objective` with `train_cfg`'s settings, in that order: every phase (pretraining,
    domain adaptation, fine-tuning) and the benchmark build them so. `initialise`
    creates the state from `train_cfg.seed`; without it nothing is allocated."""
    schedule = optim.lr_schedule(train_cfg, total_steps)
    tx = optim.make_optimizer(train_cfg, total_steps)
    n_ctx = model.cfg.n_ctx
    if initialise:
        state, shardings = create_state(model, tx, train_cfg.seed, n_ctx, mesh, init_inputs)
    else:
        state, shardings = abstract_train_state(model, tx, n_ctx, mesh, init_inputs)
    p_train = compile_train_step(objective, schedule, mesh, shardings, train_cfg)
    return Training(schedule, state, shardings, p_train)


def compile_eval_step(model: GPT, mesh, state_shardings):
    """The jitted LM eval step (pretraining, domain adaptation): summed loss and count."""
    p_eval = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    return sharding.under_axis_rules(p_eval, mesh)
