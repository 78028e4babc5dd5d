"""The model's weight products as 2-D matmuls on CPUs, where that saves XLA's CPU
compiler from copying their operands.

A projection contracts [B, L, D] activations with a kernel that may have several axes
([D, 3, H, K] for the fused QKV, [H, K, D] for attention's output); the backward pass
then contracts the gradient over both batch axes B and L for the kernel's gradient, and
the LM head's gradient contracts [B, L, V] over them too. XLA's CPU compiler
canonicalises such multi-axis products into matrix products through physical transposed
copies of the [B x L, n] operands: 37 copies a `bench-cpu` step (12.6 MB for each MLP
layer, 67 MB for the LM head's gradient). Written as one [B x L, in] x [in, out] matmul
(reshapes are free), every product of the forward and backward passes is one library
call (YNNPACK, Eigen or oneDNN) reading its operands as they lie, with no copies: the
`bench-cpu` CPU train step 1.045-1.064x faster, `gpt1`'s 1.11x (docs/benchmarks.md,
"Speed work"). The values are the same products.

The products stay as written (`jnp.tensordot`, `jnp.einsum`) on GPUs and TPUs, whose
compilers fold transposes into their matmuls (not measured there, so not changed), and
on CPUs under a mesh that splits the heads (tensor parallelism; also what
`--mode=estimate` compiles for an accelerator's mesh): merging the QKV kernel's
(3, H, K) axes with H split over devices would make XLA gather the kernel.

`unembed` runs the LM head's backward products in the compute dtype
(`train.lm_head_backward="compute"`, the default; faster on accelerators in bfloat16);
see its docstring.
"""

import math

import jax
import jax.numpy as jnp

from gptjax import sharding
from gptjax.sharding import LOGICAL_AXIS_RULES

_HEADS_AXIS = dict(LOGICAL_AXIS_RULES)["heads"]  # the mesh axis that splits heads


def _as_matmuls() -> bool:
    """Whether the products are traced as 2-D matmuls: on CPUs, unless the mesh being
    traced for splits the heads."""
    if sharding.platform() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or dict(mesh.shape).get(_HEADS_AXIS, 1) == 1


def project(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """`jnp.tensordot(x, kernel, n_in)`: the last `n_in` axes of `x` contracted with
    the first `n_in` of `kernel`, which may have several output axes."""
    if not _as_matmuls():
        return jnp.tensordot(x, kernel, axes=n_in)
    lead, out = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
    x_MxI = x.reshape(math.prod(lead), -1)
    kernel_IxO = kernel.reshape(x_MxI.shape[1], math.prod(out))
    return (x_MxI @ kernel_IxO).reshape(lead + out)


def unembed(
    h: jax.Array, embedding_VxD: jax.Array, dtype, grad_in_dtype: bool = False, pad_to: int = 1
) -> jax.Array:
    """The tied LM head, h [..., D] times the embedding [V, D] transposed: logits
    [..., V] accumulated and returned in float32, the product's inputs in `dtype`.

    The loss makes the logits' gradient float32, so without `grad_in_dtype` the head's
    two backward products run in float32 whatever `dtype` is (TF32 on a GPU: the largest
    matmuls of a bfloat16 GPT-1 step). `grad_in_dtype` (`train.lm_head_backward=
    "compute"`, the default) rounds that gradient to `dtype` first, so that they run in
    `dtype` too (accumulated in float32), as PyTorch's autocast does: the H200's bfloat16
    step at GPT-1's shape 1.14x faster (docs/benchmarks.md).

    `pad_to` (`train.lm_head_pad_to`) computes the products over the vocabulary padded
    with zero rows to a multiple of it, and drops the extra logits: the same values (to
    float32 rounding) from matmuls whose vocabulary side is aligned (GPT-1's 40,478
    words are 2 x 20,239, which suits no GPU tile; 128 makes it 40,576): the H200's
    bfloat16 step 1.07x faster."""
    h, embedding_VxD = h.astype(dtype), embedding_VxD.astype(dtype)
    vocab = embedding_VxD.shape[0]
    padded = -(-vocab // pad_to) * pad_to
    if padded != vocab:
        embedding_VxD = jnp.pad(embedding_VxD, ((0, padded - vocab), (0, 0)))
    head = _head_grad_in_input_dtype if grad_in_dtype else _head
    if not _as_matmuls():
        return head(h, embedding_VxD)[..., :vocab]
    logits_MxV = head(h.reshape(-1, h.shape[-1]), embedding_VxD)[:, :vocab]
    return logits_MxV.reshape(h.shape[:-1] + (vocab,))


def _head(h, embedding_VxD):
    return jnp.einsum("...d,vd->...v", h, embedding_VxD, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _head_grad_in_input_dtype(h, embedding_VxD):
    return _head(h, embedding_VxD)


def _head_forward(h, embedding_VxD):
    return _head(h, embedding_VxD), (h, embedding_VxD)


def _head_backward(inputs, g):
    h, embedding_VxD = inputs
    g = g.astype(h.dtype)
    f32 = jnp.float32
    dh = jnp.einsum("...v,vd->...d", g, embedding_VxD, preferred_element_type=f32)
    de = jnp.einsum("...v,...d->vd", g, h, preferred_element_type=f32)
    return dh.astype(h.dtype), de.astype(embedding_VxD.dtype)


_head_grad_in_input_dtype.defvjp(_head_forward, _head_backward)
