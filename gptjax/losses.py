"""Losses. Only the language-modelling loss for now; task losses join it for fine-tuning."""

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
