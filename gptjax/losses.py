"""Losses, as (sum, count) pairs: the language-modelling loss and the fine-tuning task losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def lm_loss(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over the weighted positions, and the weight total.

    Returning the sum and the count (not the mean) lets callers average exactly over
    micro-batches, devices and evaluation batches.
    """
    losses_BxL = token_cross_entropy(logits_BxLxV.astype(jnp.float32), targets_BxL)
    return _weighted_sum(losses_BxL, weights_BxL)


def _weighted_sum(losses: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of losses x weights, sum of weights), where a weight-0 entry (padding) counts
    as 0 even when its loss is not finite: NaN x 0 is NaN, and one overflowed padding row
    would otherwise make the batch's loss and every gradient NaN. (Only an exact 0: a
    NaN weight is a fault to surface, and it still makes the step non-finite.)"""
    weights = weights.astype(jnp.float32)
    return jnp.sum(jnp.where(weights != 0, losses, 0.0) * weights), jnp.sum(weights)


@jax.custom_vjp
def token_cross_entropy(logits_NxV: jax.Array, targets_N: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] for each position (float32 logits [..., V], integer
    targets [...]): `optax.softmax_cross_entropy_with_integer_labels`'s values, with a
    gradient written as one element-wise expression, softmax - one_hot(target).

    Why: differentiated as written, the loss's gradient over GPT-1's logits (64 x 512 x
    40,478 float32 numbers in a step, 5.3 GB) took three passes on a GPU: the softmax's
    gradient written in float32, the target's -1 scattered into it, and the copy padded
    for the LM head and rounded to bfloat16 (docs/benchmarks.md: 6.3 ms of an H100's
    83 ms step). This form fuses into the one pass that reads the logits and writes the
    head's padded gradient."""
    return _log_sum_exp(logits_NxV) - _target_logit(logits_NxV, targets_N)


def _log_sum_exp(logits_NxV):
    return jax.nn.logsumexp(logits_NxV, axis=-1)


def _target_logit(logits_NxV, targets_N):
    return jnp.take_along_axis(logits_NxV, targets_N[..., None], axis=-1)[..., 0]


def _cross_entropy_forward(logits_NxV, targets_N):
    lse_N = _log_sum_exp(logits_NxV)
    return lse_N - _target_logit(logits_NxV, targets_N), (logits_NxV, targets_N, lse_N)


def _cross_entropy_backward(residuals, g_N):
    logits_NxV, targets_N, lse_N = residuals
    vocab = jax.lax.broadcasted_iota(targets_N.dtype, logits_NxV.shape, logits_NxV.ndim - 1)
    one_hot = (vocab == targets_N[..., None]).astype(logits_NxV.dtype)
    grad = (jnp.exp(logits_NxV - lse_N[..., None]) - one_hot) * g_N[..., None]
    # A position with no weight (padding) has no gradient, even when its logits are not
    # finite (NaN x 0 is NaN): see `_weighted_sum`.
    grad = jnp.where(g_N[..., None] != 0, grad, 0.0)
    return grad, np.zeros(targets_N.shape, jax.dtypes.float0)


token_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def task_loss(
    out: jax.Array, labels_B: jax.Array, weights_B: jax.Array, regression: bool
) -> tuple[jax.Array, jax.Array]:
    """Summed task loss over the weighted examples, and the weight total: cross-entropy of
    class (or choice) logits [B, C] against integer labels, or the squared error of a
    predicted score [B] (STS-B's similarity is regressed on its 0-5 score)."""
    out = out.astype(jnp.float32)
    # Padding rows' outputs set to 0 before the loss, so that neither their loss nor
    # its gradient is NaN when they are not finite (see `_weighted_sum`).
    padding = (weights_B == 0).reshape(weights_B.shape + (1,) * (out.ndim - 1))
    out = jnp.where(padding, 0.0, out)
    if regression:
        losses_B = jnp.square(out - labels_B.astype(jnp.float32))
    else:
        losses_B = optax.softmax_cross_entropy_with_integer_labels(out, labels_B)
    return _weighted_sum(losses_B, weights_B)
