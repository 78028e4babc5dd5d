import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import matmul
from gptjax.matmul import project, unembed
from gptjax.sharding import MESH_AXES


def _normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


@pytest.mark.parametrize(
    "x_shape, kernel_shape, n_in",
    [
        ((2, 5, 8), (8, 12), 1),  # an MLP layer
        ((2, 5, 8), (8, 3, 2, 4), 1),  # the fused QKV projection, [D, 3, H, K]
        ((2, 5, 2, 4), (2, 4, 8), 2),  # attention's output projection, [H, K, D]
        ((7, 8), (8, 6), 1),
    ],
)
def test_project_and_its_gradients_are_tensordots(x_shape, kernel_shape, n_in):
    x, kernel = _normal(0, x_shape), _normal(1, kernel_shape)
    weights = _normal(2, x_shape[: len(x_shape) - n_in] + kernel_shape[n_in:])

    def loss(contract, x, kernel):
        return jnp.sum(jnp.tanh(contract(x, kernel)) * weights)

    ours = jax.jit(
        jax.value_and_grad(lambda x, k: loss(lambda x, k: project(x, k, n_in), x, k), (0, 1))
    )
    want = jax.value_and_grad(
        lambda x, k: loss(lambda x, k: jnp.tensordot(x, k, n_in), x, k), (0, 1)
    )
    (value, grads), (want_value, want_grads) = ours(x, kernel), want(x, kernel)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_unembed_and_its_gradients_are_the_tied_head():
    h, embedding = _normal(0, (2, 5, 8)), _normal(1, (11, 8))
    targets = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 11)

    def loss(head, h, embedding):
        logits = head(h, embedding)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    ours = jax.value_and_grad(
        lambda h, e: loss(lambda h, e: unembed(h, e, "float32"), h, e), (0, 1)
    )
    want = jax.value_and_grad(
        lambda h, e: loss(lambda h, e: jnp.einsum("bld,vd->blv", h, e), h, e), (0, 1)
    )
    (value, grads), (want_value, want_grads) = jax.jit(ours)(h, embedding), want(h, embedding)
    assert unembed(h, embedding, "float32").dtype == jnp.float32
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_products_keep_float32_logits():
    h, embedding = _normal(0, (2, 3, 8)), _normal(1, (11, 8))
    logits = unembed(h, embedding, "bfloat16")
    assert logits.dtype == jnp.float32
    want = jnp.einsum("bld,vd->blv", h, embedding)
    np.testing.assert_allclose(logits, want, rtol=0.05, atol=0.05)


def _transposed_copies(contract, head) -> int:
    """Transposing copies in the optimised CPU program of the gradients of a fused-QKV
    style projection ([D, 3, H, K] kernel), an MLP layer and a tied LM head."""

    def loss(params, x):
        a, b, embedding = params
        h = jnp.tanh(contract(x, a, 1)).reshape(x.shape[:2] + (-1,))
        return jnp.sum(jax.nn.logsumexp(head(contract(h, b, 1), embedding), axis=-1))

    params = (_normal(1, (64, 3, 4, 16)), _normal(2, (192, 64)), _normal(3, (512, 64)))
    x = _normal(0, (4, 128, 64))
    # Optimised whatever the test environment says: the layout is what is tested.
    options = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}
    compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(params, x).compile()
    entry = compiled.as_text().split("ENTRY", 1)[1]
    return len(
        re.findall(
            r"= f32\[[\d,]*\]\{[\d,]*\} (?:copy|transpose)\(|(?:copy|transpose)\w*fusion[.\d]* =",
            entry,
        )
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout of XLA's CPU compiler")
def test_weight_gradients_need_no_transposed_copies_on_cpus():
    # As multi-axis contractions, XLA copies operands into transposed layouts for the
    # backward pass's products; as 2-D matmuls it does not.
    def einsum_head(h, embedding):
        return jnp.einsum("bld,vd->blv", h, embedding)

    assert _transposed_copies(jnp.tensordot, einsum_head) > 0
    assert _transposed_copies(jnp.tensordot, lambda h, e: unembed(h, e, "float32")) > 0
    assert _transposed_copies(project, einsum_head) > 0
    assert _transposed_copies(project, lambda h, e: unembed(h, e, "float32")) == 0


@pytest.mark.parametrize("mesh_shape, as_matmuls", [((2, 1, 1), True), ((1, 2, 2), False)])
def test_a_mesh_that_splits_heads_keeps_the_kernels_axes(mesh_shape, as_matmuls):
    # Merging [D, 3, H, K] into [D, 3 x H x K] with H split over "tensor" would make XLA
    # gather the kernel, so under such a mesh (and off CPUs) no reshapes are traced.
    mesh = jax.sharding.AbstractMesh(
        mesh_shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    )
    x, kernel = _normal(0, (2, 5, 8)), _normal(1, (8, 3, 2, 4))
    with jax.sharding.use_abstract_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda x, k: project(x, k, 1))(x, kernel))
    on_cpu = jax.default_backend() == "cpu"
    assert ("reshape" in jaxpr) == (as_matmuls and on_cpu)


def _head_loss(targets, grad_in_dtype, h, embedding):
    logits = unembed(h, embedding, "bfloat16", grad_in_dtype)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))


@pytest.mark.parametrize("as_matmuls", [True, False])  # the CPU's 2-D form, and the einsum
def test_lm_head_backward_in_the_compute_dtype(as_matmuls, monkeypatch):
    """grad_in_dtype (train.lm_head_backward="compute") rounds the logits' float32
    gradient to bfloat16, so both backward products take bfloat16 operands; the
    gradients are those products, by hand."""
    monkeypatch.setattr(matmul, "_as_matmuls", lambda: as_matmuls)
    h, embedding = _normal(0, (2, 5, 8)), _normal(1, (11, 8))
    targets = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 11)
    grads = {
        rounded: jax.grad(functools.partial(_head_loss, targets, rounded), (0, 1))(h, embedding)
        for rounded in (False, True)
    }
    # By hand: the loss's gradient at the logits, rounded, times each bfloat16 input.
    bf16, f32 = jnp.bfloat16, jnp.float32
    logits = unembed(h, embedding, "bfloat16")
    g = jax.grad(
        lambda z: -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1))
    )(logits).astype(bf16)
    want_dh = jnp.einsum("blv,vd->bld", g, embedding.astype(bf16), preferred_element_type=f32)
    want_de = jnp.einsum("blv,bld->vd", g, h.astype(bf16), preferred_element_type=f32)
    for got, want in zip(grads[True], (want_dh, want_de), strict=True):
        np.testing.assert_array_equal(got, want.astype(bf16).astype(f32))
    # Without it the gradient reaches the products unrounded: close, not the same.
    for rounded, unrounded in zip(grads[True], grads[False], strict=True):
        np.testing.assert_allclose(rounded, unrounded, rtol=0.05, atol=0.02)
        assert not np.array_equal(rounded, unrounded)

    def operand_dtypes(rounded):
        loss = functools.partial(_head_loss, targets, rounded)
        jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(h, embedding)
        return {
            str(v.aval.dtype)
            for eqn in _equations(jaxpr.jaxpr)
            if eqn.primitive.name == "dot_general"
            for v in eqn.invars
        }

    assert operand_dtypes(True) == {"bfloat16"}
    assert "float32" in operand_dtypes(False)


@pytest.mark.parametrize("as_matmuls", [True, False])
@pytest.mark.parametrize("grad_in_dtype", [True, False])
def test_a_padded_lm_head_computes_the_same_values(as_matmuls, grad_in_dtype, monkeypatch):
    """pad_to (train.lm_head_pad_to) runs the head's three products over a vocabulary of
    zero rows padded to a multiple (11 -> 16 here) and gives the same logits and
    gradients (to float32 rounding: the library may tile the sums differently), shaped
    by the real vocabulary."""
    monkeypatch.setattr(matmul, "_as_matmuls", lambda: as_matmuls)
    h, embedding = _normal(0, (2, 5, 8)), _normal(1, (11, 8))
    targets = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 11)

    def loss(pad_to, h, embedding):
        logits = unembed(h, embedding, "bfloat16", grad_in_dtype, pad_to)
        assert logits.shape == (2, 5, 11)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    def value_and_grads(pad_to):
        return jax.jit(jax.value_and_grad(functools.partial(loss, pad_to), (0, 1)))(h, embedding)

    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    jax.tree.map(close, value_and_grads(16), value_and_grads(1))
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, 16), (0, 1)))(h, embedding)
    vocab_sides = {
        v.aval.shape[axis]
        for eqn in _equations(jaxpr.jaxpr)
        if eqn.primitive.name == "dot_general"
        for v in eqn.invars
        for axis in range(v.aval.ndim)
        if v.aval.shape[axis] in (11, 16)
    }
    assert vocab_sides == {16}  # all three products see the padded vocabulary


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (custom VJPs, jits) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _equations(getattr(inner, "jaxpr", inner))
