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
    weights = jnp.asarray(rng.random(shape) > 0.3, jnp.float32)
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

    def mine(x):
        return losses.lm_loss(x, targets, weights)[0]

    def theirs(x):
        return optax_lm_loss(x, targets, weights)[0]

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
