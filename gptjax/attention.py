"""Causal self-attention's computation, once Q, K and V are projected: XLA's masked
softmax(Q K^T / sqrt(K)) V (`attend`, in query blocks: `attend_causal`), Pallas's flash
kernel on GPUs (`flash.py`) or `jax.nn.dot_product_attention` ("fused"), chosen per
platform by `attention_kernel`; all but "fused" compute the same values and the same
dropout mask. Generation's attention over its key/value cache is `kv_cache.attend`."""

import functools
import itertools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from gptjax import flash, sharding
from gptjax.dropout import dropout

if TYPE_CHECKING:
    from gptjax.model import ModelConfig


def attend(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask, dtype: str, drop=None) -> jax.Array:
    """softmax(Q K^T / sqrt(K), masked) V over S keys, with `drop` (a function, e.g. a
    bound Dropout) applied to the probabilities. `mask` (broadcast to [B, H, L, S]) is
    True where a query may see a key. Scores and softmax are float32; both matmuls run
    in `dtype`, the probabilities cast back before P V (Flax's attention keeps them in
    float32 there, which makes a bfloat16 model's P V a float32 matmul)."""
    q_BxLxHxK = q_BxLxHxK * jnp.asarray(q_BxLxHxK.shape[-1] ** -0.5, dtype)
    s_BxHxLxS = jnp.einsum(
        "blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32
    )
    s_BxHxLxS = jnp.where(mask, s_BxHxLxS, jnp.finfo(jnp.float32).min)
    p_BxHxLxS = jax.nn.softmax(s_BxHxLxS, axis=-1)
    if drop is not None:
        p_BxHxLxS = drop(p_BxHxLxS)
    return jnp.einsum("bhls,bshk->blhk", p_BxHxLxS.astype(dtype), v_BxSxHxK)


def attend_causal(
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, dtype: str, dropout_key=None, rate=0.0, blocks: int = 1
) -> jax.Array:
    """Causal `attend` of a sequence over itself, with its queries split into `blocks`
    consecutive blocks that each see only the keys up to their own last position, and
    dropout at `rate` on the probabilities (given a `dropout_key`).

    The values are those of one masked L x L attention, dropout included (each block
    draws its part of the whole [B, H, L, L] mask); what changes is the work. A single
    block computes every score, half of which the mask then discards; n blocks compute
    (n + 1) / 2n of them (5/8 for 4), in more, smaller matmuls and a bigger program to
    compile. docs/benchmarks.md has what that buys on a CPU.
    """
    batch, length, heads, _ = q_BxLxHxK.shape
    edges = sorted({(i * length) // blocks for i in range(blocks + 1)})
    outs = []
    for start, end in itertools.pairwise(edges):
        mask_QxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        drop = None
        if dropout_key is not None and rate > 0:
            within = ((batch, heads, length, length), (0, 0, start, 0))
            drop = functools.partial(dropout, rate=rate, key=dropout_key, within=within)
        q_BxQxHxK = q_BxLxHxK[:, start:end]
        outs.append(
            attend(q_BxQxHxK, k_BxLxHxK[:, :end], v_BxLxHxK[:, :end], mask_QxS, dtype, drop)
        )
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attention_kernel(
    cfg: "ModelConfig", shape_BxLxHxK: tuple[int, ...], dropping: bool, backend: str | None = None
) -> str:
    """The attention that runs for queries of this shape: `cfg.attention`, with "auto"
    resolved for the backend (default: `sharding.platform()`). "auto" is "pallas" on
    GPUs wherever the kernel takes the shape (on an H200 it made the paper's bfloat16
    step 1.20x faster than "xla" in two blocks: docs/benchmarks.md), otherwise "xla" (on
    CPUs and TPUs the Triton kernel would only run in Pallas's interpreter). Both compute
    the same values and dropout masks, so the choice changes speed and memory, not the
    model."""
    if cfg.attention != "auto":
        return cfg.attention
    if (backend or sharding.platform()) != "gpu":
        return "xla"
    return "xla" if flash.unsupported(shape_BxLxHxK, cfg.flash_block, dropping) else "pallas"


def causal(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, cfg: "ModelConfig", dropout_key=None):
    """A sequence's causal self-attention by the kernel `attention_kernel` picks, with
    dropout at `cfg.dropout` on the probabilities given a `dropout_key` ("fused" has no
    attention dropout: `config.validate` refuses it with dropout on)."""
    if cfg.attention == "fused":
        # cuDNN's flash attention needs a GPU and 16-bit inputs; elsewhere XLA's.
        cudnn = sharding.platform() == "gpu" and cfg.dtype == "bfloat16"
        return jax.nn.dot_product_attention(
            q_BxLxHxK,
            k_BxLxHxK,
            v_BxLxHxK,
            is_causal=True,
            implementation="cudnn" if cudnn else None,
        )
    qkv = (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
    if attention_kernel(cfg, q_BxLxHxK.shape, dropout_key is not None) == "pallas":
        # The same values and mask in one kernel (GPUs).
        return flash.causal_attention(
            *qkv, cfg.dtype, dropout_key, cfg.dropout, block=cfg.flash_block
        )
    return attend_causal(*qkv, cfg.dtype, dropout_key, cfg.dropout, cfg.attention_blocks)
