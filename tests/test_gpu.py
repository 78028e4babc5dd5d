"""Checks that need a GPU: the code paths only a GPU takes (cuDNN flash attention) and
the GPU's numbers against the CPU's. Skipped elsewhere (CI has no GPU); run them on a GPU
machine with `pytest tests/test_gpu.py` (docs/benchmarks.md has the figures of one)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import flash
from gptjax.attention import attend_causal
from gptjax.model import GPT, ModelConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

# A shape cuDNN's flash attention takes: head dim 64, bfloat16.
CFG = ModelConfig(
    vocab_size=512, n_ctx=128, n_layer=2, n_head=4, d_model=256, d_mlp=1024, dropout=0.0
)


def params_and_tokens(cfg: ModelConfig):
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, cfg.n_ctx))
    params = nn.unbox(GPT(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    return params, tokens


def test_float32_logits_on_the_gpu_equal_the_cpus():
    params, tokens = params_and_tokens(CFG)
    # XLA's GPU default lets float32 matmuls use TF32; "highest" asks for full float32.
    with jax.default_matmul_precision("highest"):
        gpu = jax.jit(GPT(CFG).apply)({"params": params}, tokens)
    cpu_device = jax.devices("cpu")[0]
    with jax.default_device(cpu_device):
        cpu_params = jax.device_put(params, cpu_device)
        cpu = jax.jit(GPT(CFG).apply)({"params": cpu_params}, tokens)
    assert gpu.devices() != cpu.devices()
    np.testing.assert_allclose(np.asarray(gpu), np.asarray(cpu), rtol=1e-4, atol=1e-4)


def test_cudnn_flash_attention_matches_xla_attention_in_bfloat16():
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    params, tokens = params_and_tokens(bf16)
    fused = dataclasses.replace(bf16, attention="fused")
    # The fused path really lowers to cuDNN's kernel on this GPU.
    hlo = jax.jit(GPT(fused).apply).lower({"params": params}, tokens).compile().as_text()
    assert "cudnn" in hlo.lower()
    xla_logits = jax.jit(GPT(bf16).apply)({"params": params}, tokens)
    cudnn_logits = jax.jit(GPT(fused).apply)({"params": params}, tokens)
    with jax.default_matmul_precision("highest"):
        f32_logits = jax.jit(GPT(CFG).apply)({"params": params}, tokens)
    # Both bfloat16 paths are as close to float32 as each other (bfloat16 keeps about
    # 3 significant digits), and close to each other.
    err_xla = float(jnp.max(jnp.abs(xla_logits - f32_logits)))
    err_cudnn = float(jnp.max(jnp.abs(cudnn_logits - f32_logits)))
    assert err_cudnn < 0.05 and err_xla < 0.05, (err_cudnn, err_xla)
    np.testing.assert_allclose(cudnn_logits, xla_logits, atol=0.05)
    assert not np.array_equal(cudnn_logits, xla_logits)  # two different kernels ran


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_pallas_flash_attention_matches_xla_attention(dtype, tolerance):
    """The Triton-compiled kernel (not the interpreter the CPU tests run) against XLA's
    attention with the same dropout: values and gradients."""
    shape = (2, 256, 4, 64)
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
    key = jax.random.PRNGKey(1)

    def run(attention):
        fn = jax.jit(lambda q, k, v: attention(q, k, v, dtype, key, 0.1))
        out, vjp = jax.vjp(fn, q, k, v)
        return fn.lower(q, k, v).as_text(), [x.astype(jnp.float32) for x in (out, *vjp(do))]

    with jax.default_matmul_precision("highest"):
        hlo, ours = run(flash.causal_attention)
        _, xla = run(attend_causal)
    assert "triton" in hlo.lower()  # compiled for the GPU, not interpreted
    for got, want in zip(ours, xla, strict=True):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, atol=tolerance * scale)
