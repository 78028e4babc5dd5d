"""The optimiser: Adam with decoupled weight decay, global-norm clipping and a warmup schedule."""

import jax
import ml_collections
import optax


def warmup_steps(train_cfg: ml_collections.ConfigDict, total_steps: int) -> int:
    """`train.warmup_fraction` of the run if set (fine-tuning: 0.2%), else
    `train.warmup_steps`; never more than the run."""
    fraction = train_cfg.get("warmup_fraction")
    warmup = train_cfg.warmup_steps if fraction is None else round(fraction * total_steps)
    return min(warmup, total_steps)


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


def make_optimizer(
    train_cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Clip the gradients' global norm, then AdamW. Optax's AdamW decay is decoupled and
    scaled by the learning rate (w -= lr * wd * w), exactly the original's "modified L2".

    Wrapped in `apply_if_finite`: an update whose gradients hold a NaN or Inf is skipped
    (parameters and Adam moments unchanged), so a non-finite state is never reached.
    """
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
