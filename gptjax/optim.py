"""The optimiser: Adam with decoupled weight decay, global-norm clipping and a warmup schedule."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import optax


def warmup_steps(train_cfg: ml_collections.ConfigDict, total_steps: int) -> int:
    """`train.warmup_fraction` of the run if set (fine-tuning: 0.2%; at least one step
    when above 0, so that a short run, under 250 steps, still starts from a zero rate
    as the original's does), else `train.warmup_steps`; never more than the run."""
    fraction = train_cfg.get("warmup_fraction")
    if fraction is None:
        warmup = train_cfg.warmup_steps
    else:
        warmup = max(round(fraction * total_steps), 1 if fraction > 0 else 0)
    return min(warmup, total_steps)


def warn_if_untrained(
    train_cfg: ml_collections.ConfigDict, total_steps: int, num_sequences: int | None = None
):
    """Says so when a training run's only update would apply learning rate 0, when its
    warmup is longer than the run, or when its batch is larger than its `num_sequences`
    (windows, or a fine-tune's examples: each batch repeats some). Called by the runs
    that train, not by an evaluation, which compiles a one-step schedule."""
    if num_sequences is not None and num_sequences < train_cfg.batch_size:
        logging.warning(
            "train.batch_size=%d is more than the %d training sequences: every batch repeats "
            "some of them; lower train.batch_size (or give more data)",
            train_cfg.batch_size,
            num_sequences,
        )
    if total_steps == 1 and warmup_steps(train_cfg, total_steps) == 1:
        logging.warning(
            "a run of one update trains at learning rate 0 (warmup starts from 0, as the "
            "original's does), so it changes no weight; give it more updates "
            "(train.num_steps, train.epochs, or a smaller train.batch_size)"
        )
    elif train_cfg.get("warmup_fraction") is None and train_cfg.warmup_steps > total_steps:
        logging.warning(
            "train.warmup_steps=%d is longer than the run's %d updates: the learning rate "
            "warms up over the whole run, never decays, and never reaches train.lr at the "
            "schedule the warmup was meant for; lower train.warmup_steps",
            train_cfg.warmup_steps,
            total_steps,
        )


def lr_schedule(train_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then to 0 at `total_steps`: cosine annealing for pretraining
    (Section 4.1 of the paper), linear decay for fine-tuning (`train.schedule`)."""
    warmup = warmup_steps(train_cfg, total_steps)
    if train_cfg.get("schedule", "cosine") == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, train_cfg.lr, warmup),
                optax.linear_schedule(train_cfg.lr, 0.0, max(total_steps - warmup, 1)),
            ],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def decay_mask(params):
    """True for the tensors that get weight decay: the original release decays every
    tensor of rank > 1 in its layout, i.e. all weight matrices and embeddings, never
    biases or LayerNorm gains and biases. Selected by name, not rank, because our fused
    QKV bias is stored as (3, heads, head_dim) where the original's was a vector."""

    def is_matrix(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] in ("kernel", "embedding")

    return jax.tree.map_with_path(is_matrix, params)


def scheduled_lr(schedule: optax.Schedule, opt_state) -> jax.Array:
    """The learning rate the next update applies: the schedule at the optimiser's own
    count of updates, which a skipped (non-finite) update does not advance, unlike the
    train step's counter. (The state of `make_optimizer` and `optax_optimizer` alike.)"""
    _, (_, _, schedule_state) = opt_state.inner_state
    return schedule(schedule_state.count)


def optax_optimizer(
    train_cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Clip the gradients' global norm, then AdamW, as optax composes them: optax's AdamW
    decay is decoupled and scaled by the learning rate (w -= lr * wd * w), the
    original's "modified L2" (which also scaled it by Adam's bias correction: see the
    README's table of how gptjax follows the paper). Wrapped in `apply_if_finite`: an
    update whose gradients hold a NaN or Inf is skipped (parameters and Adam moments
    unchanged), so a non-finite state is never reached. `make_optimizer` computes the
    same with the skip fused into the update; this is its reference (tests/test_optim.py)."""
    adamw = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(
            learning_rate=lr_schedule(train_cfg, total_steps),
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
    return optax.apply_if_finite(adamw, max_consecutive_errors=NEVER_APPLY_NONFINITE)


# apply_if_finite applies non-finite updates after this many in a row; never do that.
NEVER_APPLY_NONFINITE = 2**31 - 1


def make_optimizer(
    train_cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """`optax_optimizer`'s update, with its state (so checkpoints are the same), written
    so that XLA can fuse it: the skip of a non-finite update is a select on each new
    value instead of `apply_if_finite`'s `lax.cond`, across which XLA fuses nothing (it
    wrote the update out and read it back, and checked the gradients in a pass of their
    own): the update 2.1x faster at GPT-1's size on a CPU, its train step 1.057x
    (docs/benchmarks.md). The steps are optax's own (`optax.tree.update_moment`,
    `bias_correction`, ...), in its order, and the clip a product by max_norm / norm
    (which XLA fuses into both moments; optax divides by the norm, then multiplies), so
    the values are optax's to float32 rounding. One difference: the update is skipped
    when the gradients' global norm is not finite, which is also the case of finite
    gradients whose norm overflows float32 (optax would apply them clipped to zero)."""
    optax_tx = optax_optimizer(train_cfg, total_steps)
    schedule = lr_schedule(train_cfg, total_steps)
    b1, b2, eps, weight_decay = train_cfg.b1, train_cfg.b2, train_cfg.eps, train_cfg.weight_decay
    max_norm = train_cfg.grad_clip

    def update(grads, state: optax.ApplyIfFiniteState, params):
        clip_state, (adam, decay_state, schedule_state) = state.inner_state
        norm = optax.tree.norm(grads)
        finite = jnp.isfinite(norm)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        clipped = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)

        def kept(new, old):  # the new value, or the old one when the update is skipped
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        # The moments as they will be stored; the update is computed from them (a skipped
        # one is zeroed below), so that XLA can update them in place.
        mu = kept(optax.tree.update_moment(clipped, adam.mu, b1, 1), adam.mu)
        nu = kept(optax.tree.update_moment_per_elem_norm(clipped, adam.nu, b2, 2), adam.nu)
        count = optax.safe_increment(adam.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        step = -schedule(schedule_state.count)

        def change(m, v, p, decays):
            u = m / (jnp.sqrt(v) + eps)
            if decays:
                u = u + weight_decay * p
            return jnp.where(finite, u * step, jnp.zeros_like(u))

        updates = jax.tree.map(change, mu_hat, nu_hat, params, decay_mask(params))
        adam = adam._replace(count=kept(count, adam.count), mu=mu, nu=nu)
        schedule_state = schedule_state._replace(
            count=kept(optax.safe_increment(schedule_state.count), schedule_state.count)
        )
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(finite, 0, optax.safe_increment(state.notfinite_count)),
            last_finite=finite,
            total_notfinite=jnp.where(
                finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)
            ),
            inner_state=(clip_state, (adam, decay_state, schedule_state)),
        )

    return optax.GradientTransformation(optax_tx.init, update)
