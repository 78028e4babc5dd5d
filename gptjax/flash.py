"""Causal flash attention with the paper's attention dropout: a Pallas kernel for GPUs.

Why: on a GPU, XLA's attention (`attention.attend_causal`) writes the B x H x L x L scores,
probabilities and dropout mask to memory and reads them back, forward and backward; at
GPT-1's shape that is most of what separates the paper's step from one with cuDNN's flash
attention (docs/benchmarks.md: 100 ms against 69 ms on an H200). cuDNN's kernel can drop
attention probabilities, but JAX hands it the dropout seed as a compile-time constant, so
every step would drop the same ones. This kernel never materialises the L x L arrays
(FlashAttention-2: an online softmax over blocks of keys, the backward recomputing the
probabilities from the saved log-sum-exp), and draws the dropout mask inside from the
decisions `dropout.dropout` makes (`dropout.keep_mask`: Threefry-2x32 under the step's
key of each group of four probabilities' number in the [B, H, L, L] array). So it keeps
exactly the probabilities `train.attention=xla` keeps, and computes the same values to
rounding (tests/test_flash.py).

With the dropped probabilities P' = P * keep * s (s = `dropout.keep_scale(rate)`, 1 /
(1 - rate) to within 2**-16) and O = P' V, the gradients are dV = P'^T dO,
dP = keep * s * (dO V^T), and dS = P * (dP - D) with
D = rowsum(dO * O) (= rowsum(P * dP)): two kernels, one over blocks of keys (dK, dV) and
one over blocks of queries (dQ), each recomputing P of its blocks and reading their mask,
which the forward pass stores (one byte a probability; see `_call`).

Under a mesh it runs per shard (`jax.shard_map` over the batch and heads axes of
`sharding.LOGICAL_AXIS_RULES`), each shard counting its global example and head in the
mask's index, so the mask does not depend on the mesh. Off GPUs the same kernel runs in
Pallas's interpreter: the same values, slowly (the tests use it, and also lower the
kernels to Triton for CUDA without a GPU).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec

from gptjax import dropout as dropout_lib
from gptjax import sharding
from gptjax.sharding import LOGICAL_AXIS_RULES

# Queries (and keys) per block (`train.flash_block`, a power of two): Triton's matmuls
# need at least 16 rows. On an H200 at GPT-1's shape 128 made the bfloat16 step 1.02-1.03x
# faster than 64; 256 needs more shared memory than the H200 has (docs/benchmarks.md).
MIN_BLOCK, DEFAULT_BLOCK = 16, 128
# The mask's elements are numbered in one 32-bit word.
MAX_MASK_ELEMENTS = 2**32
_MASKED = float(np.finfo(np.float32).min)  # a score the causal mask removes
_RULES = dict(LOGICAL_AXIS_RULES)
_F32 = jnp.float32


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=_F32)  # float32 accumulation


def tileable(n) -> bool:
    """Whether `n` can be a side of Triton's tiles: a power of two, and at least 16 for
    its matmuls."""
    return isinstance(n, int) and n >= MIN_BLOCK and n & (n - 1) == 0


def supports(length: int, head_dim: int, block: int = DEFAULT_BLOCK) -> bool:
    """Whether the kernel takes this sequence length, head size and block."""
    return all(map(tileable, (length, head_dim, block)))


def unsupported(shape_BxLxHxK: tuple[int, ...], block: int, dropping: bool) -> str | None:
    """Why the kernel cannot take queries of this shape in these blocks (`dropping`: with
    a dropout mask to draw), or None where it can."""
    batch, length, heads, head_dim = shape_BxLxHxK
    if not supports(length, head_dim, block):
        return (
            f"flash attention needs a length, head size and block that are powers of two "
            f"of at least {MIN_BLOCK}, not {length}, {head_dim} and {block}"
        )
    if dropping and batch * heads * length * length >= MAX_MASK_ELEMENTS:
        return (
            f"flash attention's dropout mask of {batch} x {heads} x {length} x {length} "
            "has 2**32 elements or more; use smaller batches (train.microbatches)"
        )
    return None


def causal_attention(
    q_BxLxHxK,
    k_BxLxHxK,
    v_BxLxHxK,
    dtype: str,
    dropout_key=None,
    rate: float = 0.0,
    interpret: bool | None = None,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """softmax(Q K^T / sqrt(K), causal) V with dropout at `rate` on the probabilities,
    the values of `attention.attend_causal` (the same mask for the same key). `interpret`:
    run the kernels in Pallas's interpreter (by default: unless `sharding.platform()` is a
    GPU);
    False also lowers them for a GPU from a machine without one (the tests do).
    `block`: queries and keys per program (at most the length): the same values to
    rounding."""
    _, length, heads, head_dim = q_BxLxHxK.shape
    dropping = dropout_key is not None and rate > 0
    if why := unsupported(q_BxLxHxK.shape, block, dropping):
        raise ValueError(why)
    q_BxLxHxK = q_BxLxHxK * jnp.asarray(head_dim**-0.5, dtype)
    q, k, v = (x.astype(dtype) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    if not dropping:
        key, rate = jnp.zeros((2,), jnp.uint32), 0.0
    else:
        key = dropout_lib.threefry_key_words(dropout_key)
        if key is None:
            raise ValueError("flash attention's dropout hashes a Threefry key; got another kind")
    if interpret is None:
        interpret = sharding.platform() != "gpu"
        if interpret:
            _warn_interpreted(sharding.platform())
    local = functools.partial(
        _local, rate=rate, heads_total=heads, interpret=interpret, block=min(block, length)
    )
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = tuple(a for a in _RULES["batch"] if _size(mesh, a) > 1)
    heads_axes = tuple(a for a in (_RULES["heads"],) if _size(mesh, a) > 1)
    if not batch_axes and not heads_axes:
        return local(q, k, v, key)
    spec = PartitionSpec(batch_axes or None, None, heads_axes or None, None)
    sharded = jax.shard_map(
        functools.partial(local, batch_axes=batch_axes, heads_axes=heads_axes),
        mesh=mesh,
        in_specs=(spec, spec, spec, PartitionSpec()),
        out_specs=spec,
        check_vma=False,
    )
    return sharded(q, k, v, key)


@functools.cache
def _warn_interpreted(backend: str):
    """Once per process: the kernels are for GPUs; elsewhere they run interpreted."""
    logging.warning(
        "train.attention=pallas on %s runs in Pallas's interpreter: the same values, many "
        "times slower (its kernels are Triton's, for GPUs; use train.attention=xla here)",
        backend,
    )


def _size(mesh, axis: str) -> int:
    return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def _local(q, k, v, key, rate, heads_total, interpret, block, batch_axes=(), heads_axes=()):
    """One shard's attention, its first example and head counted in the whole batch."""
    batch, _, heads, _ = q.shape
    first_b, first_h = _first(batch_axes, batch), _first(heads_axes, heads)
    meta = jnp.stack([key[0], key[1], first_b, first_h])
    return _flash(q, k, v, meta, heads_total, rate, interpret, block)


def _first(axes: tuple[str, ...], size: int) -> jax.Array:
    """This shard's first index along a dimension split over `axes`."""
    if not axes:
        return jnp.uint32(0)
    return jax.lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, meta, heads_total: int, rate: float, interpret: bool, block: int):
    """Attention of the (already scaled) queries; `meta` = (key, first example, first
    head) as uint32."""
    return _forward(q, k, v, meta, heads_total, rate, interpret, block)[0]


def _flash_forward(q, k, v, meta, heads_total, rate, interpret, block):
    o, lse, *keep = _forward(q, k, v, meta, heads_total, rate, interpret, block)
    return o, (q, k, v, meta, o, lse, keep)


def _flash_backward(heads_total, rate, interpret, block, residuals, do):
    q, k, v, meta, o, lse, keep = residuals
    delta = jnp.einsum("blhk,blhk->bhl", do.astype(_F32), o.astype(_F32))
    args = (q, k, v, do.astype(q.dtype), lse, delta, *keep)
    dq = _call(_dq_kernel, "dq", args, rate, interpret, block)
    dk, dv = _call(_dkdv_kernel, "dkdv", args, rate, interpret, block)
    return dq, dk, dv, np.zeros(meta.shape, jax.dtypes.float0)


_flash.defvjp(_flash_forward, _flash_backward)


def _forward(q, k, v, meta, heads_total, rate, interpret, block):
    """(output, log-sum-exp of each row's scores, and with dropout the mask kept)."""
    kernel = functools.partial(_forward_kernel, heads_total=heads_total)
    return _call(kernel, "forward", (q, k, v, meta), rate, interpret, block)


def _call(kernel, which: str, args, rate: float, interpret: bool, block: int):
    """`kernel` over a grid of (block of queries or keys, example, head). The forward
    pass writes the dropout mask it draws (int8 [B, H, L, L]; only the blocks on and
    below the diagonal), and the backward kernels read it: rather than hash every index
    three times, once, for 1 byte a probability (GPT-1's 512 positions: 201 MB a layer at
    batch 64, against the 805 MB of float32 probabilities XLA's attention keeps)."""
    q = args[0]
    batch, length, heads, head_dim = q.shape
    tile = pl.BlockSpec((None, block, None, head_dim), lambda i, b, h: (b, i, h, 0))
    whole = pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    row_tile = pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
    row_whole = pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))
    mask_rows = pl.BlockSpec((None, None, block, length), lambda i, b, h: (b, h, i, 0))
    mask_cols = pl.BlockSpec((None, None, length, block), lambda i, b, h: (b, h, 0, i))
    meta = pl.BlockSpec((4,), lambda i, b, h: (0,))
    like_q = jax.ShapeDtypeStruct(q.shape, q.dtype)
    rows = jax.ShapeDtypeStruct((batch, heads, length), _F32)
    mask = jax.ShapeDtypeStruct((batch, heads, length, length), jnp.int8)
    dropout = rate > 0.0
    # The blocks each program reads: its own tile of q (or of k and v), the whole of
    # the rest; and the rows (or columns) of the mask that go with its tile.
    in_specs, out_specs, out_shape = {
        "forward": (
            [tile, whole, whole, meta],
            [tile, row_tile] + [mask_rows] * dropout,
            [like_q, rows] + [mask] * dropout,
        ),
        "dq": (
            [tile, whole, whole, tile, row_tile, row_tile] + [mask_rows] * dropout,
            tile,
            like_q,
        ),
        "dkdv": (
            [whole, tile, tile, whole, row_whole, row_whole] + [mask_cols] * dropout,
            [tile, tile],
            [like_q, like_q],
        ),
    }[which]
    return pl.pallas_call(
        functools.partial(kernel, block=block, rate=rate),
        grid=(length // block, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(which, block),
        name=f"gptjax_flash_{which}",
    )(*args)


def _triton_params(which: str, block: int) -> pltriton.CompilerParams:
    """4 warps a program with blocks of up to 64; 8 for dK/dV, whose five tiles need 255
    registers a thread and spill with 4 and take 188 without spilling with 8 (ptxas
    for sm_90a, GPT-1's shape: docs/benchmarks.md), and 8 for every kernel with larger
    blocks (twice the rows per tile; blocks of 128 so were the faster on an H200)."""
    warps = 8 if which == "dkdv" or block > 64 else 4
    return pltriton.CompilerParams(num_warps=warps, num_stages=2)


def _hash_mask(meta_ref, heads_total: int, length: int, rate: float, block: int):
    """This program's dropout: `keep(rows, first_col)` says which probabilities of its
    example's and head's block of `rows` and the `block` columns from `first_col` on
    dropout keeps: `dropout.keep_mask`'s decisions for them in the whole [B, H, L, L]
    array (one hash for each four columns of a row, split into its four 16-bit
    numbers). (Read at the kernel's top level: Pallas's interpreter has no program ids
    inside its loops.)"""
    u32, per = jnp.uint32, dropout_lib.DECISIONS_PER_HASH
    b = meta_ref[2] + pl.program_id(1).astype(u32)
    h = meta_ref[3] + pl.program_id(2).astype(u32)
    first = (b * u32(heads_total) + h) * u32(length)  # the number of the block's row 0
    k0, k1, threshold = meta_ref[0], meta_ref[1], dropout_lib.keep_threshold(rate)

    def keep(rows, first_col):
        groups = first_col.astype(u32) // u32(per) + jnp.arange(block // per, dtype=u32)
        index = (first + rows.astype(u32))[:, None] * u32(length // per) + groups[None, :]
        high, low = dropout_lib.threefry2x32(k0, k1, jnp.zeros_like(index), index)
        return dropout_lib.split_decisions(high, low) >= threshold

    return keep


def _probabilities(q, k, lse, rows, cols):
    """exp(scores - log-sum-exp): the softmax's probabilities of a block, causal."""
    s = _dot(q, k.T)
    s = jnp.where(cols[None, :] <= rows[:, None], s, _MASKED)
    return jnp.exp(s - lse[:, None])


def _dropped(kept, x, rate: float):
    """Dropout of x by the mask `kept` (None: none), the kept ones scaled by 1 / their
    probability (`dropout.keep_scale`: 1 / (1 - rate) to within 2**-16)."""
    if kept is None:
        return x
    return jnp.where(kept, x * dropout_lib.keep_scale(rate), 0.0)


def _forward_kernel(
    q_ref, k_ref, v_ref, meta_ref, o_ref, lse_ref, *mask_ref, block, rate, heads_total
):
    i, length = pl.program_id(0), k_ref.shape[0]
    hashed = _hash_mask(meta_ref, heads_total, length, rate, block) if mask_ref else None
    q = q_ref[...]
    rows = i * block + jnp.arange(block)

    def over_keys(j, carry):
        acc, row_max, row_sum = carry
        keys = pl.ds(j * block, block)
        cols = j * block + jnp.arange(block)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _dot(q, k.T)
        s = jnp.where(cols[None, :] <= rows[:, None], s, _MASKED)
        m_next = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.exp(s - m_next[:, None])
        rescale = jnp.exp(row_max - m_next)
        row_sum = row_sum * rescale + jnp.sum(p, axis=1)  # before dropout
        kept = None
        if hashed is not None:
            kept = hashed(rows, j * block)
            mask_ref[0][:, keys] = kept.astype(jnp.int8)
        p = _dropped(kept, p, rate)
        acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, row_sum

    start = (jnp.zeros(q.shape, _F32), jnp.full((block,), _MASKED, _F32), jnp.zeros((block,), _F32))
    acc, row_max, row_sum = jax.lax.fori_loop(0, i + 1, over_keys, start)  # up to the diagonal
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = row_max + jnp.log(row_sum)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, block, rate):
    *mask_ref, dq_ref = refs
    i = pl.program_id(0)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = i * block + jnp.arange(block)

    def over_keys(j, dq):
        keys = pl.ds(j * block, block)
        cols = j * block + jnp.arange(block)
        k, v = k_ref[keys, :], v_ref[keys, :]
        p = _probabilities(q, k, lse, rows, cols)
        kept = mask_ref[0][:, keys] != 0 if mask_ref else None
        dp = _dropped(kept, _dot(do, v.T), rate)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, i + 1, over_keys, jnp.zeros(q.shape, _F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, block, rate):
    *mask_ref, dk_ref, dv_ref = refs
    j, length = pl.program_id(0), q_ref.shape[0]
    k, v = k_ref[...], v_ref[...]
    cols = j * block + jnp.arange(block)

    def over_queries(i, carry):
        dk, dv = carry
        queries = pl.ds(i * block, block)
        rows = i * block + jnp.arange(block)
        q, do = q_ref[queries, :], do_ref[queries, :]
        lse, delta = lse_ref[queries], delta_ref[queries]
        p = _probabilities(q, k, lse, rows, cols)
        kept = mask_ref[0][queries, :] != 0 if mask_ref else None
        dv = dv + _dot(_dropped(kept, p, rate).astype(do.dtype).T, do)
        dp = _dropped(kept, _dot(do, v.T), rate)
        ds = p * (dp - delta[:, None])
        return dk + _dot(ds.astype(q.dtype).T, q), dv

    zeros = jnp.zeros(k.shape, _F32)
    # Queries from the diagonal on: the earlier ones do not see these keys.
    dk, dv = jax.lax.fori_loop(j, length // block, over_queries, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
