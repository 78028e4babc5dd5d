"""Dropout whose random bits are cheap to draw on a CPU.

GPT-1 drops 10% of the embeddings, the residual branches and the attention
probabilities (B x H x L x L per layer, the largest of them), so a train step draws
tens of millions of random numbers. `jax.random.bits` lowers Threefry-2x32 on CPUs as a
loop of five passes over the whole array, and that costs a CPU more than the softmax it
feeds (about 50 ms against 5 ms for the 3.1M probabilities of `bench-cpu`'s layer, on 2
cores). `unrolled_threefry_bits` computes the same hash (Salmon et al., 2011), with
JAX's own counter layout, as one unrolled elementwise expression that XLA fuses into a
single loop: bit for bit the same as `jax.random.bits` (tests/test_dropout.py) and
about 12x faster there (the whole `bench-cpu` step: 1.12x). Each element's counter is
its flat index, built from per-axis iotas, so the bits do not depend on how the array
is sharded. `threefry_bits` picks whichever of the two is faster where it runs; the
masks are the same either way.
"""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32's rotation distances, alternating by group of four rounds, and the
# constant of its key schedule.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
    return (x << jnp.uint32(distance)) | (x >> jnp.uint32(32 - distance))


def threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds: the pair of words (x0, x1) hashed under (k0, k1)."""
    keys = (k0, k1, k0 ^ k1 ^ jnp.uint32(_KEY_PARITY))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for group in range(5):
        for distance in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, distance) ^ x0
        x0 = x0 + keys[(group + 1) % 3]
        x1 = x1 + keys[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def _optimisations_off() -> bool:
    """Whether XLA compiles without its optimisations (JAX's environment switch)."""
    value = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "")
    return value.strip().lower() in ("1", "true", "t", "yes", "y", "on")


Block = tuple[tuple[int, ...], tuple[int, ...]]  # (start, size) in each axis


def threefry_bits(key: jax.Array, shape: tuple[int, ...], block: Block | None = None) -> jax.Array:
    """`jax.random.bits(key, shape, jnp.uint32)`: the same bits, drawn by
    `unrolled_threefry_bits` where that is faster (a CPU compiling with XLA's
    optimisations) and by `jax.random.bits` itself elsewhere. GPUs have JAX's own
    Threefry kernel (the unrolled form measured 1.5% slower in a GPT-1 step on an H200);
    without optimisations (the tests) the bigger unrolled expression only adds compile
    time. With `block` = (start, size), only that block of the bits (see
    `unrolled_threefry_bits`)."""
    if jax.default_backend() != "cpu" or _optimisations_off():
        return _block_of(jax.random.bits(key, shape, jnp.uint32), block)
    return unrolled_threefry_bits(key, shape, block)


def unrolled_threefry_bits(
    key: jax.Array, shape: tuple[int, ...], block: Block | None = None
) -> jax.Array:
    """`jax.random.bits(key, shape, jnp.uint32)` for a Threefry key, as one fusible
    expression. With `block` = (start, size), the block of those bits of that size
    starting at that index, computed without the rest (each element's bits depend
    only on its index). Other key kinds, and arrays of 2**32 elements or more, go to
    `jax.random.bits`."""
    words = threefry_key_words(key)
    if words is None or math.prod(shape) >= 2**32:
        return _block_of(jax.random.bits(key, shape, jnp.uint32), block)
    return _counter_bits(words, tuple(shape), block)


def threefry_key_words(key: jax.Array) -> jax.Array | None:
    """The two uint32 words of a Threefry key, typed or raw; None for other kinds."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(key) != "threefry2x32":
            return None
        key = jax.random.key_data(key)
    return key.astype(jnp.uint32) if key.shape == (2,) else None


def _block_of(bits: jax.Array, block: Block | None) -> jax.Array:
    if block is None:
        return bits
    start, size = block
    return jax.lax.slice(bits, start, tuple(s + n for s, n in zip(start, size, strict=True)))


# Jitted so that tracing a model builds the expression once per shape, not once per
# layer: its ~200 operations, traced at each of a 12-layer model's 37 dropout sites,
# were about a third of the train step's tracing time (the compiled step is the same).
@functools.partial(jax.jit, static_argnums=(1, 2))
def _counter_bits(key: jax.Array, shape: tuple[int, ...], block: Block | None) -> jax.Array:
    # JAX counts elements by their flat index as a 64-bit number split in two words;
    # below 2**32 elements the high word is zero.
    start, size = block or ((0,) * len(shape), shape)
    strides = np.cumprod((*shape[1:], 1)[::-1])[::-1]
    index = sum(
        (jax.lax.broadcasted_iota(jnp.uint32, size, axis) + jnp.uint32(first)) * jnp.uint32(stride)
        for axis, (first, stride) in enumerate(zip(start, strides, strict=True))
    )
    high, low = threefry2x32(key[0], key[1], jnp.zeros(size, jnp.uint32), index)
    return high ^ low


def keep_threshold(rate: float) -> jax.Array:
    """The 32-bit integer from which random bits keep their element: 1 - rate of them."""
    return jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def dropout(
    x: jax.Array, rate: float, key: jax.Array, broadcast_dims=(), within: Block | None = None
) -> jax.Array:
    """Inverted dropout: each element kept with probability 1 - rate (to within 2**-32)
    and scaled by 1 / (1 - rate), one mask shared along `broadcast_dims`. The mask
    compares the raw 32-bit integers with a threshold, and the scale is a product (no
    uniform floats, no division). With `within` = (shape, start), `x` is the block of a
    larger array of that shape starting there, and gets that block of its mask."""
    shape = tuple(1 if axis in broadcast_dims else n for axis, n in enumerate(x.shape))
    threshold = keep_threshold(rate)
    if within is None:
        keep = threefry_bits(key, shape) >= threshold
    else:
        if broadcast_dims:
            raise ValueError("dropout of a block (within=...) shares no mask along axes")
        full_shape, start = within
        keep = threefry_bits(key, full_shape, (start, shape)) >= threshold
    scale = jnp.asarray(1.0 / (1.0 - rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """`dropout` as a Flax layer drawing from the "dropout" key stream; the identity
    when `deterministic` or the rate is 0."""

    rate: float
    broadcast_dims: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate {self.rate} is not in [0, 1)")
        return dropout(x, self.rate, self.make_rng("dropout"), self.broadcast_dims)
