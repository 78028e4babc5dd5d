"""Dropout whose random bits are cheap to draw: one hash for four elements.

GPT-1 drops 10% of the embeddings, the residual branches and the attention
probabilities (B x H x L x L per layer, the largest of them): at GPT-1's shape and batch
of 64 a train step decides 1.2 billion attention probabilities (those the causal mask
leaves) and 0.6 billion other elements. Each decision needs random bits, and the hash
that makes them, Threefry-2x32 (Salmon et al., 2011; JAX's), is the costly part: 20
rounds of integer arithmetic for 64 bits. With one hash an element, as
`jax.random.bits` draws 32-bit words, dropout cost 12 ms of an H100's 83 ms GPT-1 step,
most of it hashing in the flash-attention kernel (docs/benchmarks.md). Here each hash
decides four elements, 16 bits each (`keep_mask`): a quarter of the hashing (the step
1.1x faster with the loss's fused gradient), the keep probability rounded to 1/65,536.

The hash's counter is the number of an element's group of four (`keep_mask`), built
from per-axis iotas, so the mask depends neither on how the array is sharded nor on
which block of it is drawn (`flash` draws its blocks inside the kernel and gets the same
mask). On CPUs `jax.random.bits`'s Threefry lowers as a loop of five passes over the
array; `threefry2x32` is the same hash as one unrolled expression that XLA fuses into a
single loop, about 12x faster there (the `bench-cpu` step: 1.12x), bit for bit the same
(tests/test_dropout.py).
"""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jax_random

from gptjax import sharding

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

# Each hash's 64 bits decide four elements, 16 bits each (see the module's docstring).
DECISIONS_PER_HASH, DECISION_BITS = 4, 16
# The hash's counter is one 32-bit word: the groups of four elements it numbers.
MAX_GROUPS = 2**32


def keep_threshold(rate: float) -> jax.Array:
    """The 16-bit integer from which an element's random bits keep it: 1 - rate of them,
    to within 2**-16 (GPT-1's 0.1 drops 6,554 of 65,536: 0.100006)."""
    return jnp.uint32(_dropped_numbers(rate))


def _dropped_numbers(rate: float) -> int:
    return min(round(rate * 2**DECISION_BITS), 2**DECISION_BITS - 1)


def keep_scale(rate: float) -> float:
    """What `keep_mask`'s kept elements are multiplied by: 1 / the probability that it
    keeps one, its 1 - rate rounded to 2**-16 (GPT-1's 0.1: 65,536 / 58,982, not 1 / 0.9),
    so that dropout leaves every element's expectation exactly as it was."""
    return 2**DECISION_BITS / (2**DECISION_BITS - _dropped_numbers(rate))


def hash_groups(k0, k1, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two 32-bit words of Threefry-2x32 hashing the counter (0, `index`) under the
    key words (k0, k1): `jax.extend.random.threefry_2x32`'s, drawn by the unrolled
    `threefry2x32` where that is faster (a CPU compiling with XLA's optimisations) and
    by JAX's own Threefry elsewhere (GPUs have their own kernel; without optimisations
    (the tests) the bigger unrolled expression only adds compile time)."""
    zeros = jnp.zeros_like(index)
    if sharding.platform() != "cpu" or _optimisations_off():
        return tuple(jax_random.threefry2x32_p.bind(k0, k1, zeros, index))
    return threefry2x32(k0, k1, zeros, index)


def split_decisions(high: jax.Array, low: jax.Array) -> jax.Array:
    """The four 16-bit numbers of each hash (..., g) as elements (..., 4g + t): t = 0
    and 1 the low and high halves of `high`, 2 and 3 those of `low`. Written as two
    interleavings of pairs, the form Triton takes (`flash` builds its blocks' masks so)."""
    words = _interleave(high, low)
    return _interleave(words & jnp.uint32(0xFFFF), words >> jnp.uint32(16))


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., n) and (..., n) as (..., 2n): a's elements at even positions, b's at odd."""
    return jnp.stack([a, b], axis=-1).reshape(a.shape[:-1] + (2 * a.shape[-1],))


def keep_mask(
    key: jax.Array, shape: tuple[int, ...], rate: float, block: Block | None = None
) -> jax.Array:
    """Which elements of an array of `shape` dropout at `rate` keeps: a boolean array
    of `shape`, or with `block` = (start, size) that block of it, computed without the
    rest. Each row's elements are taken in groups of four along the last axis; a
    group's number (its flat index among all the groups) is hashed under the key, and
    its four elements compare the hash's four 16-bit numbers with `keep_threshold`.
    So each element's decision depends only on its index (not on the array's sharding
    or the block), and one hash serves four elements. Other key kinds draw
    `jax.random.bernoulli` (the whole array, then the block)."""
    words = threefry_key_words(key)
    if words is None:
        return _block_of(jax.random.bernoulli(key, 1.0 - rate, shape), block)
    if not shape:  # one element: the first of a row of one
        return keep_mask(key, (1,), rate).reshape(())
    groups = math.prod(shape[:-1]) * -(-shape[-1] // DECISIONS_PER_HASH)
    if groups >= MAX_GROUPS:
        raise ValueError(
            f"a dropout mask of {shape} needs {groups:,} hashes, more than a 32-bit "
            "counter numbers; use smaller batches (train.microbatches)"
        )
    return _keep_mask(words, tuple(shape), rate, block)


def _block_of(bits: jax.Array, block: Block | None) -> jax.Array:
    if block is None:
        return bits
    start, size = block
    return jax.lax.slice(bits, start, tuple(s + n for s, n in zip(start, size, strict=True)))


# Jitted so that tracing a model builds the expression once per shape, not once per
# layer: its ~200 operations, traced at each of a 12-layer model's 37 dropout sites,
# were about a third of the train step's tracing time (the compiled step is the same).
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float, block: Block | None):
    start, size = block or ((0,) * len(shape), shape)
    # The groups of four covering the block's columns, and where the block starts in
    # their first.
    per = DECISIONS_PER_HASH
    first_group, end_group = start[-1] // per, -(-(start[-1] + size[-1]) // per)
    group_shape = (*shape[:-1], -(-shape[-1] // per))
    group_start = (*start[:-1], first_group)
    group_size = (*size[:-1], end_group - first_group)
    strides = np.cumprod((*group_shape[1:], 1)[::-1])[::-1]
    index = sum(
        (jax.lax.broadcasted_iota(jnp.uint32, group_size, axis) + jnp.uint32(first))
        * jnp.uint32(stride)
        for axis, (first, stride) in enumerate(zip(group_start, strides, strict=True))
    )
    # Hashed once into memory, whatever XLA's fusion would decide: the hash is an
    # element-wise producer, which XLA may copy into each fusion reading it, and here each
    # of its words is read by four elements (and again in the backward pass). On a CPU
    # XLA keeps one copy with or without the barrier (checked on the compiled gradient);
    # on a GPU it is untested without it (the H100's 75.4 ms step had it).
    high, low = jax.lax.optimization_barrier(hash_groups(key[0], key[1], index))
    offset = start[-1] - first_group * per
    decisions = split_decisions(high, low)[..., offset : offset + size[-1]]
    return decisions >= keep_threshold(rate)


def threefry_key_words(key: jax.Array) -> jax.Array | None:
    """The two uint32 words of a Threefry key, typed or raw; None for other kinds."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(key) != "threefry2x32":
            return None
        key = jax.random.key_data(key)
    return key.astype(jnp.uint32) if key.shape == (2,) else None


def dropout(
    x: jax.Array, rate: float, key: jax.Array, broadcast_dims=(), within: Block | None = None
) -> jax.Array:
    """Inverted dropout: each element kept with probability 1 - rate (to within 2**-16;
    `keep_mask`) and scaled by 1 / that probability (`keep_scale`), one mask shared along
    `broadcast_dims`. The scale is a product (no uniform floats, no division). With
    `within` = (shape, start), `x` is the block of a larger array of that shape starting
    there, and gets that block of its mask."""
    shape = tuple(1 if axis in broadcast_dims else n for axis, n in enumerate(x.shape))
    if within is None:
        keep = keep_mask(key, shape, rate)
    else:
        if broadcast_dims:
            raise ValueError("dropout of a block (within=...) shares no mask along axes")
        full_shape, start = within
        keep = keep_mask(key, full_shape, rate, (start, shape))
    exact = threefry_key_words(key) is None  # jax.random.bernoulli's 1 - rate
    scale = 1.0 / (1.0 - rate) if exact else keep_scale(rate)
    # Multiplied in float32 and rounded once: a bfloat16 scale (1.109375 for GPT-1's
    # 1.1111) would shrink every kept element of a bfloat16 branch by 0.16%.
    wide = jnp.promote_types(x.dtype, jnp.float32)
    scaled = (x.astype(wide) * jnp.asarray(scale, wide)).astype(x.dtype)
    return jnp.where(keep, scaled, jnp.zeros((), x.dtype))


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
