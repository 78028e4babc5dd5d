import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.dropout import Dropout, dropout, threefry_bits, unrolled_threefry_bits

KEYS = {
    "raw": jax.random.PRNGKey(7),
    "folded": jax.random.fold_in(jax.random.PRNGKey(123), 45),
    "typed": jax.random.key(3),
}


@pytest.mark.parametrize("shape", [(8, 6, 32, 32), (5,), (3, 1, 7), (1,)])
@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
def test_bits_equal_jax_random_bits(shape, key):
    want = jax.random.bits(key, shape, jnp.uint32)
    for bits in (unrolled_threefry_bits, threefry_bits):
        mine = jax.jit(bits, static_argnums=1)(key, shape)
        assert mine.dtype == jnp.uint32 and mine.shape == shape
        np.testing.assert_array_equal(mine, want)


@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
def test_a_block_of_the_bits_is_that_slice_of_jax_random_bits(key):
    # What blocked attention draws: its block of the [B, H, L, L] probabilities' mask.
    shape, start, size = (2, 3, 12, 12), (0, 0, 4, 0), (2, 3, 4, 8)
    want = jax.random.bits(key, shape, jnp.uint32)[:, :, 4:8, :8]
    for bits in (unrolled_threefry_bits, threefry_bits):
        mine = jax.jit(bits, static_argnums=(1, 2))(key, shape, (start, size))
        np.testing.assert_array_equal(mine, want)
    x = jnp.ones(size)
    np.testing.assert_array_equal(
        dropout(x, 0.5, key, within=(shape, start)),
        dropout(jnp.ones(shape), 0.5, key)[:, :, 4:8, :8],
    )


def test_other_key_kinds_use_jax_random_bits():
    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(
        unrolled_threefry_bits(key, (4, 5)), jax.random.bits(key, (4, 5), jnp.uint32)
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's lowering")
def test_bits_are_one_fused_loop_not_a_while_loop():
    """The point of the module: on a CPU, jax.random.bits lowers to a rolled loop."""
    hlo = jax.jit(unrolled_threefry_bits, static_argnums=1).lower(KEYS["raw"], (64, 64))
    assert "while" not in hlo.as_text()
    assert "while" in jax.jit(lambda k: jax.random.bits(k, (64, 64))).lower(KEYS["raw"]).as_text()


def test_dropout_keeps_the_right_fraction_and_scales_the_rest():
    x = jnp.full((1000, 1000), 2.0)
    y = np.asarray(dropout(x, 0.1, KEYS["raw"]))
    kept = y != 0
    # 1e6 Bernoulli(0.9) draws: the fraction is within 5 standard deviations (0.0015).
    assert abs(kept.mean() - 0.9) < 0.0015
    np.testing.assert_allclose(y[kept], 2.0 / 0.9, rtol=1e-6)
    assert abs(y.mean() - 2.0) < 0.01  # expectation preserved
    # Rows and columns are not correlated (a counter bug would give stripes).
    assert np.ptp(kept.mean(axis=0)) < 0.2 and np.ptp(kept.mean(axis=1)) < 0.2


def test_dropout_masks_differ_by_key_and_repeat_for_the_same_key():
    x = jnp.ones((64, 64))
    a, b = (dropout(x, 0.5, KEYS[k]) for k in ("raw", "folded"))
    np.testing.assert_array_equal(a, dropout(x, 0.5, KEYS["raw"]))
    assert 0.4 < float(jnp.mean((a == 0) != (b == 0))) < 0.6  # independent masks


def test_broadcast_dims_share_one_mask():
    y = np.asarray(dropout(jnp.ones((4, 3, 50)), 0.3, KEYS["raw"], broadcast_dims=(1,)))
    for j in (1, 2):
        np.testing.assert_array_equal(y[:, 0], y[:, j])
    assert 0 < (y == 0).mean() < 1


def test_layer_is_identity_when_deterministic_or_rate_zero():
    x = jnp.arange(12.0).reshape(3, 4)
    rngs = {"dropout": KEYS["raw"]}
    np.testing.assert_array_equal(Dropout(0.5).apply({}, x, True, rngs=rngs), x)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, False, rngs=rngs), x)
    dropped = Dropout(0.5).apply({}, x, False, rngs=rngs)
    assert not np.array_equal(dropped, x)
    with pytest.raises(ValueError, match="not in"):
        Dropout(1.0).apply({}, x, False, rngs=rngs)


def test_layer_draws_from_the_dropout_stream():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = Dropout(0.5)
            return layer(x, False), layer(x, False)

    a, b = Two().apply({}, jnp.ones((32, 32)), rngs={"dropout": KEYS["raw"]})
    assert not np.array_equal(a, b)  # each call takes a fresh key
