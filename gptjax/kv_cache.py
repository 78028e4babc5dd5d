"""Generation's key/value cache: its layout, the writes into it, and attention over it.

`GPT.decode` keeps one cache per layer. Each new token writes its keys and values at its
row's position and attends over the whole cache under a mask, so a token costs one
position's work instead of a pass over the prefix. A cache holds `span` positions, not
always n_ctx: the generator starts it short and doubles it as the rows advance
(`span_for`, `resize`), so that early tokens do not read keys and values never written
(the whole 512-position cache is 38 MB a token at `gpt1`'s shape, 8% of its reads).
The layout is chosen for XLA on CPUs, where decoding is bound by memory bandwidth:
anything that makes XLA copy a cache at every token (a transpose or reshape between the
cache and a matmul, a scatter) costs as much as reading a third of the parameters (see
`init_cache` and `write_rows`).
"""

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from gptjax import sharding

if TYPE_CHECKING:
    from gptjax.model import ModelConfig


def init_cache(cfg: "ModelConfig", batch: int, span: int | None = None) -> list[dict]:
    """Empty key/value caches for `GPT.decode`, one per layer, in the compute dtype,
    with every row at position 0: keys [B x H, K, C] and values [B x H, C, K] (C =
    `span` positions, by default n_ctx). Rows and heads share one axis and keys are
    stored transposed, so that both attention matmuls read the cache as it is: any
    reshape or transpose between the cache and a matmul made XLA on CPUs copy each
    layer's cache at every token, which cost a third of a `gpt1` token's time."""
    n, span = batch * cfg.n_head, span or cfg.n_ctx
    k = jnp.zeros((n, cfg.head_dim, span), cfg.dtype)
    v = jnp.zeros((n, span, cfg.head_dim), cfg.dtype)
    pos = jnp.zeros((batch,), jnp.int32)
    return [{"k": k, "v": v, "pos": pos} for _ in range(cfg.n_layer)]


def span_for(positions: int, n_ctx: int, smallest: int) -> int:
    """The cache length that holds `positions` positions: `smallest` doubled as often as
    needed, at most n_ctx. Doubling bounds how many lengths (and so compilations of the
    decoding loop) a generation meets at log2(n_ctx / smallest) + 1, while the positions
    read a token stay under twice those written."""
    span = min(smallest, n_ctx)
    while span < min(positions, n_ctx):
        span *= 2
    return min(span, n_ctx)


def resize(caches: list[dict], span: int) -> list[dict]:
    """`caches` lengthened to `span` positions; the new positions are zero (and masked
    until written)."""

    def grow(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, span - x.shape[axis])
        return jnp.pad(x, widths)

    return [{**c, "k": grow(c["k"], 2), "v": grow(c["v"], 1)} for c in caches]


def write_rows(cache: jax.Array, new: jax.Array, pos_B: jax.Array, axis: int, loop=None):
    """`cache` [B x H, ...] with `new` [B x H, ...] written in along `axis`, each row's
    H slices from that row's position `pos_B[row]`. With `loop` (the default on CPUs)
    one in-place update per row in a loop: a vmapped update becomes a scatter, which XLA
    on CPUs answers with a copy of the whole cache at every token. Elsewhere one scatter
    (a loop would launch a kernel per row on a GPU; neither is measured there)."""
    batch = pos_B.shape[0]
    n_head = cache.shape[0] // batch
    loop = sharding.platform() == "cpu" if loop is None else loop

    def start(first, pos):
        return tuple(pos if i == axis else first if i == 0 else 0 for i in range(cache.ndim))

    if not loop:
        per_row = cache.reshape(batch, n_head, *cache.shape[1:])
        new_rows = new.reshape(batch, n_head, *new.shape[1:])
        write = jax.vmap(lambda c, x, p: jax.lax.dynamic_update_slice(c, x, start(0, p)))
        return write(per_row, new_rows, pos_B).reshape(cache.shape)

    def write_row(row, cache):
        first = row * n_head
        rows = jax.lax.dynamic_slice_in_dim(new, first, n_head)
        return jax.lax.dynamic_update_slice(cache, rows, start(first, pos_B[row]))

    return jax.lax.fori_loop(0, batch, write_row, cache)


def _heads_first(x_BxLxHxK: jax.Array) -> jax.Array:
    """[B, L, H, K] -> [B x H, L, K], the layout of `init_cache`."""
    batch, length, n_head, head_dim = x_BxLxHxK.shape
    return x_BxLxHxK.swapaxes(1, 2).reshape(batch * n_head, length, head_dim)


def attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, cache: dict, dtype: str):
    """Writes the L new tokens' keys and values into the cache at each row's positions
    (`cache["pos"]` [B], the first of them), then attends over the whole cache (its C
    positions) with every key at or before the query's position. Returns the
    attention output [B, L, H, K] and the updated cache (N = B x H below)."""
    batch, length, n_head, head_dim = q_BxLxHxK.shape
    pos_B = cache["pos"]
    k_NxKxL = _heads_first(k_BxLxHxK).swapaxes(1, 2).astype(cache["k"].dtype)
    v_NxLxK = _heads_first(v_BxLxHxK).astype(cache["v"].dtype)
    k_NxKxC = write_rows(cache["k"], k_NxKxL, pos_B, axis=2)
    v_NxCxK = write_rows(cache["v"], v_NxLxK, pos_B, axis=1)
    context = k_NxKxC.shape[-1]
    query_pos_BxL = pos_B[:, None] + jnp.arange(length)
    mask_Bx1xLxC = (jnp.arange(context) <= query_pos_BxL[:, :, None])[:, None]
    q_NxLxK = _heads_first(q_BxLxHxK * jnp.asarray(head_dim**-0.5, dtype))
    s_NxLxC = jnp.einsum("nlk,nkc->nlc", q_NxLxK, k_NxKxC, preferred_element_type=jnp.float32)
    s_BxHxLxC = s_NxLxC.reshape(batch, n_head, length, context)
    s_BxHxLxC = jnp.where(mask_Bx1xLxC, s_BxHxLxC, jnp.finfo(jnp.float32).min)
    p_NxLxC = jax.nn.softmax(s_BxHxLxC, axis=-1).reshape(s_NxLxC.shape).astype(dtype)
    out_NxLxK = jnp.einsum("nlc,nck->nlk", p_NxLxC, v_NxCxK)
    out_BxLxHxK = out_NxLxK.reshape(batch, n_head, length, head_dim).swapaxes(1, 2)
    return out_BxLxHxK, {"k": k_NxKxC, "v": v_NxCxK, "pos": pos_B}
