"""The Pallas flash attention (gptjax/flash.py) against XLA's attention
(`attention.attend_causal`): the same values, gradients and dropout mask, here in Pallas's
interpreter on the CPU (a GPU compiles the same kernels with Triton: tests/test_gpu.py);
and under meshes that split the batch and the heads, the same values as on one device."""

import collections
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from gptjax import config as config_lib
from gptjax import estimate, flash, losses, optim, sharding, train
from gptjax.attention import attend_causal, attention_kernel
from gptjax.model import GPT, ModelConfig, layer_options

from conftest import ROOT, tiny_config

# Two examples, two heads, 256 positions: four blocks of 64 queries and keys, two of
# flash.DEFAULT_BLOCK's 128.
SHAPE = (2, 256, 2, 16)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Float32 matmuls in float32 on a GPU too (its default rounds them to TF32), so
    that there these tests check the compiled kernel as closely as the interpreted one."""
    with jax.default_matmul_precision("highest"):
        yield


def inputs(shape=SHAPE, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
    return (q, k, v), do


def value_and_grads(attention, qkv, do, dtype, key, rate):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, dtype, key, rate), *qkv)
    return out, vjp(do)


@pytest.mark.parametrize("rate, block", [(0.0, 64), (0.1, 64), (0.5, 64), (0.1, 32), (0.1, 128)])
def test_values_and_gradients_equal_xla_attention(rate, block):
    """At every dropout rate, and in blocks of any size (`train.flash_block`)."""
    qkv, do = inputs()
    key = jax.random.PRNGKey(7)
    attention = functools.partial(flash.causal_attention, block=block)
    out, grads = jax.jit(value_and_grads, static_argnums=(0, 3, 5))(
        attention, qkv, do, "float32", key, rate
    )
    want, want_grads = value_and_grads(attend_causal, qkv, do, "float32", key, rate)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


def test_a_typed_key_draws_its_raw_words_mask_and_other_kinds_are_refused():
    qkv, _ = inputs((1, 16, 1, 16))
    raw = flash.causal_attention(*qkv, "float32", jax.random.PRNGKey(4), 0.5)
    typed = flash.causal_attention(*qkv, "float32", jax.random.key(4), 0.5)
    np.testing.assert_array_equal(typed, raw)
    with pytest.raises(ValueError, match="Threefry"):
        flash.causal_attention(*qkv, "float32", jax.random.key(4, impl="rbg"), 0.5)


def test_bfloat16_is_close_to_xla_attention():
    qkv, do = inputs(dtype=jnp.bfloat16)
    key = jax.random.PRNGKey(3)
    out, grads = value_and_grads(flash.causal_attention, qkv, do, "bfloat16", key, 0.1)
    want, want_grads = value_and_grads(attend_causal, qkv, do, "bfloat16", key, 0.1)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), atol=0.05)
    for got, expected in zip(grads, want_grads, strict=True):
        scale = float(jnp.abs(expected.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            got.astype(np.float32), expected.astype(np.float32), atol=0.03 * scale
        )


@pytest.mark.parametrize("block", [64, 128])
def test_the_kernels_lower_to_triton_for_a_gpu(block):
    """On this CPU-only machine, lower the compiled (not interpreted) kernels for CUDA:
    Pallas turns each into Triton IR here, and fails on anything Triton cannot express.
    (Compiling that IR to GPU code needs a GPU: tests/test_gpu.py.)"""

    def train_step_attention(q, k, v, key):
        def f(q, k, v):
            out = flash.causal_attention(
                q, k, v, "bfloat16", key, 0.1, interpret=False, block=block
            )
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    gpt1_head = jax.ShapeDtypeStruct((2, 512, 2, 64), jnp.bfloat16)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = export.export(
        jax.jit(train_step_attention), platforms=["cuda"], disabled_checks=[triton]
    )(gpt1_head, gpt1_head, gpt1_head, key)
    module = exported.mlir_module()
    for kernel in ("forward", "dq", "dkdv"):
        assert module.count(f'name = "gptjax_flash_{kernel}"') == 1, kernel
    # The grid runs one program per block of the 512 positions, example and head; with
    # blocks of 128 every kernel gets 8 warps, with 64 dK/dV alone.
    assert module.count(f"grid_x = {512 // block} : i32") == 3
    assert module.count("num_warps = 8 : i32") == (3 if block > 64 else 1)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a GPU compiles the kernels")
def test_running_interpreted_is_said_once(caplog):
    """Off GPUs the kernels run in the interpreter, far slower: one warning says so and
    names the alternative, however many times attention is traced."""
    flash._warn_interpreted.cache_clear()
    qkv, _ = inputs((1, 16, 1, 16))
    for _ in range(2):
        flash.causal_attention(*qkv, "float32")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "interpreter" in warnings[0]
    assert "use train.attention=xla" in warnings[0]


def export_train_step_for_cuda(config) -> str:
    """The train step of `config` lowered for CUDA (Triton's kernels allowed), as text."""
    config_lib.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    model = GPT(ModelConfig.from_config(config.model, config.train), **layer_options(config.train))
    tx = optim.make_optimizer(config.train, 10)
    state, shardings = train.abstract_train_state(model, tx, config.model.n_ctx, mesh)
    step = train.compile_train_step(
        losses.lm_objective(model),
        optim.lr_schedule(config.train, 10),
        mesh,
        shardings,
        config.train,
    )
    batch = estimate.abstract_batch(config.train.batch_size, config.model.n_ctx, mesh)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with sharding.axis_rules(mesh):
        exported = export.export(step.__wrapped__, platforms=["cuda"], disabled_checks=[triton])(
            state, batch
        )
    return exported.mlir_module()


def triton_kernels(module: str) -> collections.Counter:
    """How many times each of flash.py's kernels is called in a lowered module."""
    calls = re.findall(r'custom_call @__gpu\$xla\.gpu\.triton.*name = "gptjax_flash_(\w+)"', module)
    return collections.Counter(calls)


@pytest.mark.parametrize("remat, forwards", [("none", 1), ("full", 2)])
def test_the_train_step_lowers_for_a_gpu(remat, forwards, monkeypatch):
    """The whole train step with `train.attention=pallas` (bfloat16, the LM head padded,
    the state donated, the layers scanned; with remat the forward kernel runs again in
    the backward pass) lowers for CUDA with the kernels compiled by Triton, as the
    benchmark's GPU run will build it."""
    config = tiny_config()
    config.train.update(
        attention="pallas", compute_dtype="bfloat16", lm_head_pad_to=128, remat=remat
    )
    compiled_kernels = functools.partial(flash.causal_attention, interpret=False)
    monkeypatch.setattr(flash, "causal_attention", compiled_kernels)
    kernels = triton_kernels(export_train_step_for_cuda(config))
    # Each kernel once in the layer's body: a function the step calls for every layer,
    # which the exporter inlines, once per layer, when the process runs on a GPU.
    layers = 1 if jax.default_backend() != "gpu" else config.model.n_layer
    assert kernels == {"forward": forwards * layers, "dq": layers, "dkdv": layers}


@pytest.mark.parametrize("backend", ["gpu", "cpu", "tpu"])
def test_auto_attention_runs_the_kernels_on_gpus_only(backend, monkeypatch):
    """`train.attention=auto` (the default) builds the step with the pallas kernels when
    JAX runs on a GPU, and with XLA's attention on CPUs and TPUs (where the kernels would
    only be interpreted)."""
    config = tiny_config()
    assert config.train.attention == "auto"
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    kernels = triton_kernels(export_train_step_for_cuda(config))
    if backend == "gpu":
        assert kernels and set(kernels) == {"forward", "dq", "dkdv"}
    else:
        assert not kernels


def test_a_cpu_computation_in_a_gpu_process_uses_xla_attention(monkeypatch):
    """`jax.default_device(cpu)` on a GPU machine runs the model on the CPU, where the
    kernels cannot compile: "auto" follows the device, not JAX's default backend."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = ModelConfig(
        vocab_size=64, n_ctx=64, n_layer=1, n_head=2, d_model=32, d_mlp=128, dropout=0.1
    )
    shape = (1, 64, 2, 16)
    assert sharding.platform() == "gpu"
    assert attention_kernel(cfg, shape, dropping=True) == "pallas"
    with jax.default_device(jax.devices("cpu")[0]):
        assert sharding.platform() == "cpu"
        assert attention_kernel(cfg, shape, dropping=True) == "xla"


@pytest.mark.parametrize(
    "length, head, block, ok",
    [(512, 64, 64, True), (16, 16, 64, True), (48, 16, 64, False), (64, 16, 48, False)],
)
def test_supported_shapes(length, head, block, ok):
    assert flash.supports(length, head, block) == ok
    if not ok:
        qkv, _ = inputs((1, length, 1, head))
        with pytest.raises(ValueError, match="powers of two"):
            flash.causal_attention(*qkv, "float32", block=block)


def test_a_dropout_mask_beyond_its_index_is_refused_only_when_drawn():
    """2**32 probabilities or more have no 32-bit index: refused with dropout, taken
    without (evaluation), checked from the shapes alone."""
    big = jax.ShapeDtypeStruct((2048, 512, 12, 64), jnp.bfloat16)  # 2**32 + 2**31
    key = jax.random.PRNGKey(0)
    assert "2**32" in flash.unsupported(big.shape, 128, dropping=True)
    assert flash.unsupported(big.shape, 128, dropping=False) is None
    with pytest.raises(ValueError, match="use smaller batches"):
        jax.eval_shape(lambda q: flash.causal_attention(q, q, q, "bfloat16", key, 0.1), big)
    shape = jax.eval_shape(lambda q: flash.causal_attention(q, q, q, "bfloat16", None, 0.1), big)
    assert shape.shape == big.shape


MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 4, 2)]


def mesh_worker(out_dir: str):
    """Run in a process with 8 CPU devices: the attention and its gradients under each
    mesh, written for the test to compare."""
    qkv, do = inputs((8, 128, 8, 16))
    key = jax.random.PRNGKey(5)
    attention = functools.partial(flash.causal_attention, block=64)  # 2 blocks of 128
    results = {}
    for shape in [(1, 1, 1), *MESHES]:
        config = {"data": shape[0], "fsdp": shape[1], "tensor": shape[2]}
        mesh = sharding.make_mesh(config, jax.devices()[: int(np.prod(shape))])
        run = jax.jit(value_and_grads, static_argnums=(0, 3, 5))
        with sharding.axis_rules(mesh):
            out, grads = run(attention, qkv, do, "float32", key, 0.1)
        results[str(shape)] = [np.asarray(x).tolist() for x in (out, *grads)]
    with open(os.path.join(out_dir, "flash_meshes.json"), "w") as f:
        json.dump(results, f)


def test_meshes_give_one_devices_values(tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_flash; "
        f"test_flash.mesh_worker({str(tmp_path)!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "flash_meshes.json").read_text())
    one = results[str((1, 1, 1))]
    for shape in MESHES:
        for got, want in zip(results[str(shape)], one, strict=True):
            # Float32 rounding at the array's scale: a row whose gradient cancels to 0 on
            # one device may come out as a few ulps of its neighbours' values on another.
            scale = np.abs(np.asarray(want)).max()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale, err_msg=str(shape))
