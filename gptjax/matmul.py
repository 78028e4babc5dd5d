"""The model's weight products as 2-D matmuls on CPUs, where that saves XLA's CPU
compiler from copying their operands.

A projection contracts [B, L, D] activations with a kernel that may have several axes
([D, 3, H, K] for the fused QKV, [H, K, D] for attention's output); the backward pass
then contracts the gradient over both batch axes B and L for the kernel's gradient, and
the LM head's gradient contracts [B, L, V] over them too. XLA's CPU compiler
canonicalises such multi-axis products into matrix products through physical transposed
copies of the [B x L, n] operands: 37 copies a `bench-cpu` step (12.6 MB for each MLP
layer, 67 MB for the LM head's gradient). Written as one [B x L, in] x [in, out] matmul
(reshapes are free), every product of the forward and backward passes is one oneDNN or
YNNPACK call reading its operands as they lie, with no copies: the `bench-cpu` CPU train
step 1.045-1.064x faster, `gpt1`'s 1.05-1.11x (docs/benchmarks.md, "Speed work"). The
values are the same products.

Elsewhere the products stay as written (`jnp.tensordot`, `jnp.einsum`): GPU and TPU
compilers fold transposes into their matmuls, and merging a kernel's axes when one of
them (the heads) is split over a mesh axis would make XLA gather the kernel. Not
measured on accelerators, so not changed there.
"""

import math

import jax
import jax.numpy as jnp


def _as_matmuls() -> bool:
    return jax.default_backend() == "cpu"


def project(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """`jnp.tensordot(x, kernel, n_in)`: the last `n_in` axes of `x` contracted with
    the first `n_in` of `kernel`, which may have several output axes."""
    if not _as_matmuls():
        return jnp.tensordot(x, kernel, axes=n_in)
    lead, out = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
    x_MxI = x.reshape(math.prod(lead), -1)
    kernel_IxO = kernel.reshape(x_MxI.shape[1], math.prod(out))
    return (x_MxI @ kernel_IxO).reshape(lead + out)


def unembed(h: jax.Array, embedding_VxD: jax.Array, dtype) -> jax.Array:
    """The tied LM head, h [..., D] times the embedding [V, D] transposed: logits
    [..., V] accumulated and returned in float32, the product's inputs in `dtype`."""
    h, embedding_VxD = h.astype(dtype), embedding_VxD.astype(dtype)
    if not _as_matmuls():
        return jnp.einsum("...d,vd->...v", h, embedding_VxD, preferred_element_type=jnp.float32)
    h_MxD = h.reshape(-1, h.shape[-1])
    logits_MxV = jnp.einsum("md,vd->mv", h_MxD, embedding_VxD, preferred_element_type=jnp.float32)
    return logits_MxV.reshape(h.shape[:-1] + embedding_VxD.shape[:1])
