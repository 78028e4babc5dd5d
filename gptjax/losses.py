"""Losses, as (sum, count) pairs: the language-modelling loss and the fine-tuning task losses."""

import jax
import jax.numpy as jnp
import optax


def lm_loss(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over the weighted positions, and the weight total.

    Returning the sum and the count (not the mean) lets callers average exactly over
    micro-batches, devices and evaluation batches.
    """
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL
    )
    weights_BxL = weights_BxL.astype(jnp.float32)
    return jnp.sum(losses_BxL * weights_BxL), jnp.sum(weights_BxL)


def task_loss(
    out: jax.Array, labels_B: jax.Array, weights_B: jax.Array, regression: bool
) -> tuple[jax.Array, jax.Array]:
    """Summed task loss over the weighted examples, and the weight total: cross-entropy of
    class (or choice) logits [B, C] against integer labels, or the squared error of a
    predicted score [B] (STS-B's similarity is regressed on its 0-5 score)."""
    out = out.astype(jnp.float32)
    if regression:
        losses_B = jnp.square(out - labels_B.astype(jnp.float32))
    else:
        losses_B = optax.softmax_cross_entropy_with_integer_labels(out, labels_B)
    weights_B = weights_B.astype(jnp.float32)
    return jnp.sum(losses_B * weights_B), jnp.sum(weights_B)
