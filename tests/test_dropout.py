import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jax_random

from gptjax import dropout as dropout_lib
from gptjax.dropout import Dropout, dropout, keep_mask

KEYS = {
    "raw": jax.random.PRNGKey(7),
    "folded": jax.random.fold_in(jax.random.PRNGKey(123), 45),
    "typed": jax.random.key(3),
}


def reference_mask(key, shape, rate):
    """The documented scheme, from JAX's own Threefry: each row's elements in groups of
    four, a group's flat number hashed as the counter (0, number), and its four elements
    given the hash's words' low and high halves in turn."""
    words = (
        jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    )
    groups = (*shape[:-1], -(-shape[-1] // 4))
    count = np.arange(np.prod(groups), dtype=np.uint32)
    hashed = np.asarray(
        jax_random.threefry_2x32(words.astype(jnp.uint32), np.concatenate([0 * count, count]))
    )
    high, low = hashed[: count.size].reshape(groups), hashed[count.size :].reshape(groups)
    pieces = np.stack([high & 0xFFFF, high >> 16, low & 0xFFFF, low >> 16], axis=-1)
    pieces = pieces.reshape(*groups[:-1], 4 * groups[-1])[..., : shape[-1]]
    return pieces >= round(rate * 2**16)


@pytest.mark.parametrize("shape", [(8, 6, 32, 32), (5,), (3, 1, 7), (1,), (2, 3, 10)])
@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
@pytest.mark.parametrize("optimised", [True, False], ids=["unrolled", "jax-threefry"])
def test_masks_follow_the_documented_scheme(shape, key, optimised, monkeypatch):
    """Both ways of hashing (the unrolled expression a CPU compiles with optimisations,
    and JAX's Threefry elsewhere) give the scheme's masks."""
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0" if optimised else "1")
    dropout_lib._keep_mask.clear_cache()  # traced under the other setting
    mask = keep_mask(key, shape, 0.3)
    assert mask.dtype == jnp.bool_ and mask.shape == shape
    np.testing.assert_array_equal(mask, reference_mask(key, shape, 0.3))


def test_the_unrolled_hash_is_jaxs_threefry():
    index = jnp.arange(1000, dtype=jnp.uint32) * jnp.uint32(2654435761)
    k0, k1 = jnp.uint32(0x12345678), jnp.uint32(0x9ABCDEF0)
    mine = dropout_lib.threefry2x32(k0, k1, jnp.zeros_like(index), index)
    want = jax_random.threefry2x32_p.bind(k0, k1, jnp.zeros_like(index), index)
    for got, expected in zip(mine, want, strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
def test_a_block_of_the_mask_is_that_slice_of_the_whole(key):
    # What blocked attention draws: its block of the [B, H, L, L] probabilities' mask,
    # here also from a column that starts a group's middle.
    shape = (2, 3, 12, 12)
    whole = keep_mask(key, shape, 0.5)
    for start, size in (((0, 0, 4, 0), (2, 3, 4, 8)), ((1, 1, 3, 3), (1, 2, 5, 6))):
        block = keep_mask(key, shape, 0.5, (start, size))
        want = whole[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))]
        np.testing.assert_array_equal(block, want)
    x = jnp.ones((2, 3, 4, 8))
    np.testing.assert_array_equal(
        dropout(x, 0.5, key, within=(shape, (0, 0, 4, 0))),
        dropout(jnp.ones(shape), 0.5, key)[:, :, 4:8, :8],
    )


def test_other_key_kinds_draw_bernoulli():
    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(
        keep_mask(key, (4, 5), 0.25), jax.random.bernoulli(key, 0.75, (4, 5))
    )


def test_the_threshold_is_the_rate_in_16_bits():
    assert int(dropout_lib.keep_threshold(0.1)) == 6554  # drops 6,554 of 65,536
    assert int(dropout_lib.keep_threshold(0.0)) == 0
    assert int(dropout_lib.keep_threshold(0.99999999)) == 2**16 - 1  # keeps one


def test_a_mask_beyond_the_counter_is_refused():
    with pytest.raises(ValueError, match="smaller batches"):
        keep_mask(KEYS["raw"], (2**20, 2**14 + 1), 0.1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's lowering")
def test_the_unrolled_hash_is_one_fused_loop_not_a_while_loop():
    """On a CPU, JAX's Threefry lowers to a rolled loop; `threefry2x32` does not."""
    index = jnp.arange(64 * 64, dtype=jnp.uint32)

    def unrolled(k, x):
        return dropout_lib.threefry2x32(k[0], k[1], 0 * x, x)

    def jaxs(k, x):
        return jax_random.threefry2x32_p.bind(k[0], k[1], 0 * x, x)

    key = KEYS["raw"].astype(jnp.uint32)
    assert "while" not in jax.jit(unrolled).lower(key, index).as_text()
    assert "while" in jax.jit(jaxs).lower(key, index).as_text()


def test_dropout_keeps_the_right_fraction_and_scales_the_rest():
    x = jnp.full((1000, 1000), 2.0)
    y = np.asarray(dropout(x, 0.1, KEYS["raw"]))
    kept = y != 0
    # 1e6 Bernoulli(0.9) draws: the fraction is within 5 standard deviations (0.0015).
    assert abs(kept.mean() - 0.9) < 0.0015
    # Kept ones are scaled by 1 / the mask's keep probability, 58,982 of 65,536.
    np.testing.assert_allclose(y[kept], 2.0 * 65536 / 58982, rtol=1e-7)
    assert abs(y.mean() - 2.0) < 0.01  # expectation preserved
    # Rows and columns are not correlated (a counter bug would give stripes).
    assert np.ptp(kept.mean(axis=0)) < 0.2 and np.ptp(kept.mean(axis=1)) < 0.2
    # Each of a hash's four 16-bit numbers keeps 0.9 (250,000 draws each: 5 standard
    # deviations are 0.003), and a group's four decisions are independent: pairs agree
    # as often as independent draws would (0.9^2 + 0.1^2 = 0.82).
    pieces = kept.reshape(1000, 250, 4)
    for t in range(4):
        assert abs(pieces[..., t].mean() - 0.9) < 0.003, t
        for u in range(t + 1, 4):
            assert abs((pieces[..., t] == pieces[..., u]).mean() - 0.82) < 0.004, (t, u)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9999])
def test_dropout_keeps_each_elements_expectation_exactly(rate):
    """Kept elements are scaled by 1 / the probability that the mask's 16-bit comparison
    keeps one, not by 1 / (1 - rate): at 0.9999 the mask keeps 7 numbers of 65,536
    (1.068e-4), 7% more than 1e-4, and 1 / (1 - rate) would inflate the expectation so."""
    keep_probability = (2**16 - int(dropout_lib.keep_threshold(rate))) / 2**16
    x = jnp.full((1000, 1000), 3.0)
    y = np.asarray(dropout(x, rate, KEYS["raw"]))
    kept = y[y != 0]
    assert kept.size > 50  # 1e6 draws: ~107 kept at 0.9999
    np.testing.assert_allclose(kept * keep_probability, 3.0, rtol=1e-7)
    # Other key kinds draw jax.random.bernoulli(1 - rate): 1 / (1 - rate) is exact there.
    z = np.asarray(dropout(x, rate, jax.random.key(0, impl="rbg")))
    np.testing.assert_allclose(z[z != 0] * (1 - rate), 3.0, rtol=1e-6)


def test_bfloat16_elements_are_scaled_exactly_and_rounded_once():
    """A residual branch in bfloat16 (train.compute_dtype): its kept elements are x times
    the float32 scale, rounded once; bfloat16's own 1.109375 for 1.1111 would shrink them
    all by 0.16%."""
    x = jax.random.normal(jax.random.key(1), (256, 256)).astype(jnp.bfloat16)
    y = dropout(x, 0.1, KEYS["raw"])
    kept = np.asarray(y != 0)
    exact = (x.astype(jnp.float32) * dropout_lib.keep_scale(0.1)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y)[kept], np.asarray(exact)[kept])
    assert y.dtype == jnp.bfloat16


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
