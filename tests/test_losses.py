import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import losses


def logits_targets_weights(shape=(3, 7), vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(scale=4.0, size=(*shape, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)
    # Fractional, as the auxiliary LM loss's 1/length weights are, and 0 for padding.
    weights = jnp.asarray(rng.random(shape) * (rng.random(shape) > 0.3), jnp.float32)
    return logits, targets, weights


def optax_lm_loss(logits, targets, weights):
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(per_token * weights), jnp.sum(weights)


@pytest.mark.parametrize("shape", [(3, 7), (11,)])
def test_lm_loss_and_its_gradient_equal_optax(shape):
    logits, targets, weights = logits_targets_weights(shape)
    total, count = losses.lm_loss(logits, targets, weights)
    want_total, want_count = optax_lm_loss(logits, targets, weights)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    assert float(count) == float(want_count)

    # A mean, scaled as an objective's term is (lm_coef): the gradient must carry the
    # cotangent's size, not only its sign.
    def mine(x):
        total, count = losses.lm_loss(x, targets, weights)
        return 0.37 * total / count

    def theirs(x):
        total, count = optax_lm_loss(x, targets, weights)
        return 0.37 * total / count

    np.testing.assert_allclose(jax.grad(mine)(logits), jax.grad(theirs)(logits), atol=1e-6)
    # Unweighted positions get no gradient; each weighted row's gradient sums to 0.
    grad = np.asarray(jax.jit(jax.grad(mine))(logits))
    assert not grad[np.asarray(weights) == 0].any()
    np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-6)


def test_the_gradient_is_one_element_wise_expression_without_a_scatter():
    """Why the loss has its own gradient: differentiating `take_along_axis` scatters
    the targets' -1 into a separate copy of the logits' gradient (an extra pass over
    the logits on a GPU)."""
    logits, targets, weights = logits_targets_weights()

    def hlo(loss):
        grad = jax.grad(lambda x: loss(x, targets, weights)[0])
        return jax.jit(grad).lower(logits).as_text()

    assert "scatter" in hlo(optax_lm_loss)
    assert "scatter" not in hlo(losses.lm_loss)


@pytest.mark.parametrize("kind", ["lm", "classes", "regression"])
def test_a_padding_entry_that_overflowed_changes_neither_loss_nor_gradient(kind):
    """NaN x weight 0 would be NaN: one non-finite padding row must not poison the batch."""
    rng = np.random.default_rng(0)
    out = jnp.asarray(rng.normal(size=(3, 5) if kind != "regression" else (3,)), jnp.float32)
    labels = jnp.array([1, 4, 2]) if kind != "regression" else jnp.array([0.5, 2.0, 4.0])
    weights = jnp.array([1.0, 1.0, 0.0])

    def loss(out):
        if kind == "lm":  # three positions of one sequence
            total, count = losses.lm_loss(out[None], labels[None], weights[None])
        else:
            total, count = losses.task_loss(out, labels, weights, kind == "regression")
        return total / count

    clean_loss, clean_grad = jax.value_and_grad(loss)(out)
    poisoned = out.at[2].set(jnp.nan)  # the padding row
    poisoned_loss, poisoned_grad = jax.value_and_grad(loss)(poisoned)
    assert np.isfinite(clean_loss)
    np.testing.assert_allclose(poisoned_loss, clean_loss, rtol=1e-6)
    np.testing.assert_allclose(poisoned_grad[:2], clean_grad[:2], rtol=1e-6)
    np.testing.assert_array_equal(poisoned_grad[2], np.zeros_like(poisoned_grad[2]))


def test_a_nan_weight_still_makes_the_loss_and_gradient_nan():
    """Only weight 0 is padding: a NaN weight is a fault, and the step must see it as
    non-finite (the optimiser then skips it)."""
    logits = jnp.zeros((1, 3, 5))
    weights = jnp.array([[1.0, jnp.nan, 0.0]])

    def loss(logits):
        total, count = losses.lm_loss(logits, jnp.array([[1, 2, 3]]), weights)
        return total / count

    value, grad = jax.value_and_grad(loss)(logits)
    assert np.isnan(value) and np.isnan(np.asarray(grad)).any()
