"""Losses, as (sum, count) pairs: the language-modelling loss and the fine-tuning task
losses; and the objectives made of them (`Objective`): next-token prediction, and a
fine-tune's task loss + lm_coef x LM loss (Section 3.2)."""

import dataclasses
from collections.abc import Callable

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


def lm_objective(model) -> Objective:
    """Next-token prediction over packed windows (pretraining, domain adaptation)."""

    def terms(params, batch, rng):
        tokens_BxL1 = batch["tokens"]
        logits_BxLxV = model.apply(
            {"params": params},
            tokens_BxL1[:, :-1],
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )
        return {"lm": lm_loss(logits_BxLxV, tokens_BxL1[:, 1:], batch["weights"])}

    return Objective(terms, lambda batch: {"lm": jnp.sum(batch["weights"])}, (("lm", 1.0),))


def task_objective(model, lm_coef: float, regression: bool) -> Objective:
    """L = L_task + lm_coef * L_LM (the LM term only when lm_coef > 0)."""

    def lm_weights(batch):
        # The LM term is a mean over sequences of each sequence's mean over its real
        # targets, as in the paper's code: each target weighs 1 / (its sequence's targets),
        # so a long input counts no more than a short one, and the count is the number of
        # sequences with a target.
        b, s, length = batch["tokens"].shape
        # Target t (token t + 1) is real when t + 1 < length of its sequence.
        real_BxSxL1 = (jnp.arange(length - 1) < (batch["lengths"][..., None] - 1)).astype(
            jnp.float32
        )
        per_sequence_BxSxL1 = real_BxSxL1 / jnp.maximum(real_BxSxL1.sum(-1, keepdims=True), 1.0)
        return (per_sequence_BxSxL1 * batch["weight"][:, None, None]).reshape(b * s, length - 1)

    def task_weights(batch):
        return batch["weight"] * batch["labelled"]

    def terms(params, batch, rng):
        tokens_BxSxL = batch["tokens"].astype(jnp.int32)
        out, lm_logits_NxLxV = model.apply(
            {"params": params},
            tokens_BxSxL,
            batch["clf_pos"],
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )
        sums = {"task": task_loss(out, batch["label"], task_weights(batch), regression)}
        if lm_coef > 0:
            targets_NxL1 = tokens_BxSxL.reshape(-1, tokens_BxSxL.shape[-1])[:, 1:]
            sums["lm"] = lm_loss(lm_logits_NxLxV[:, :-1], targets_NxL1, lm_weights(batch))
        return sums

    def counts(batch):
        # The LM count, the sum of lm_weights, taken exactly: a sum of the fractional
        # weights carries float32 rounding, which would differ with the device count.
        with_targets_BxS = (batch["lengths"] > 1).astype(jnp.float32)
        lm = jnp.sum(batch["weight"][:, None] * with_targets_BxS)
        return {"task": jnp.sum(task_weights(batch)), "lm": lm}

    weights = (("task", 1.0),) + ((("lm", lm_coef),) if lm_coef > 0 else ())
    return Objective(terms, counts, weights)
