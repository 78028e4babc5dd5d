import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import attention
from gptjax import dropout as dropout_lib
from gptjax.attention import attention_kernel
from gptjax.model import (
    GPT,
    ModelConfig,
    count_params,
    flops_per_token,
    stack_layers,
)

from conftest import gpt1_config, tiny_config


def init(cfg: ModelConfig, seed=0):
    tokens = jnp.zeros((1, cfg.n_ctx), jnp.int32)
    return nn.unbox(GPT(cfg).init(jax.random.PRNGKey(seed), tokens)["params"])


def test_gpt1_parameter_count_and_shapes():
    cfg = ModelConfig.from_config(gpt1_config().model)
    tokens = jax.ShapeDtypeStruct((1, cfg.n_ctx), jnp.int32)
    variables = jax.eval_shape(GPT(cfg).init, jax.random.PRNGKey(0), tokens)
    params = nn.unbox(variables["params"])
    assert count_params(params) == 116_534_784
    assert params["tokens_embed"]["embedding"].shape == (40478, 768)
    assert params["positions_embed"]["embedding"].shape == (512, 768)
    block = params["h_11"]
    assert block["attn"]["c_attn"]["kernel"].shape == (768, 3, 12, 64)  # fused 768 -> 2304
    assert block["attn"]["c_proj"]["kernel"].shape == (12, 64, 768)
    assert block["mlp"]["c_fc"]["kernel"].shape == (768, 3072)
    assert block["mlp"]["c_proj"]["kernel"].shape == (3072, 768)
    assert set(block) == {"attn", "ln_1", "mlp", "ln_2"}
    assert "h_12" not in params and not any(k.startswith("ln_f") for k in params)  # no final LN
    # 6N + 12 * L * d * T, about 0.76 GFLOP per token (the reference's figure).
    assert flops_per_token(cfg, 116_534_784) == 6 * 116_534_784 + 12 * 12 * 768 * 512
    assert abs(flops_per_token(cfg, 116_534_784) / 1e9 - 0.756) < 0.01


def test_parameters_carry_logical_axes():
    cfg = ModelConfig.from_config(tiny_config().model)
    tokens = jax.ShapeDtypeStruct((1, cfg.n_ctx), jnp.int32)
    specs = nn.get_partition_spec(jax.eval_shape(GPT(cfg).init, jax.random.PRNGKey(0), tokens))
    specs = specs["params"]
    assert tuple(specs["tokens_embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["h_0"]["attn"]["c_attn"]["kernel"]) == ("embed", "qkv", "heads", "kv")
    assert tuple(specs["h_0"]["mlp"]["c_fc"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["h_0"]["ln_1"]["scale"]) == ("embed",)


def test_init_statistics():
    cfg = ModelConfig.from_config(gpt1_config().model).__class__(
        vocab_size=1000, n_ctx=64, n_layer=1, n_head=4, d_model=256, d_mlp=1024, dropout=0.1
    )
    params = init(cfg)
    # Every weight matrix and both embeddings: N(0, 0.02) (Section 4.1).
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jax.tree_util.keystr(path).endswith(("['kernel']", "['embedding']")):
            leaf = np.asarray(leaf)
            assert abs(leaf.std() - 0.02) < 0.001 and abs(leaf.mean()) < 0.001, path
    assert np.all(np.asarray(params["h_0"]["mlp"]["c_fc"]["bias"]) == 0)
    assert np.all(np.asarray(params["h_0"]["ln_1"]["scale"]) == 1)


@pytest.mark.parametrize("blocks, dropout", [(1, False), (1, True), (3, True)])
def test_causal(blocks, dropout):
    # With dropout, both passes draw the same masks from the same key.
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    model = GPT(dataclasses.replace(cfg, attention_blocks=blocks))
    rngs = {"dropout": jax.random.PRNGKey(2)}
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, cfg.n_ctx), 0, cfg.vocab_size)
    base = model.apply({"params": params}, tokens, not dropout, rngs=rngs)
    for t in (0, 5, cfg.n_ctx - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
        out = model.apply({"params": params}, changed, not dropout, rngs=rngs)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def test_lm_head_is_tied_to_token_embedding():
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    model = GPT(cfg)
    tokens = jnp.arange(cfg.n_ctx)[None] % cfg.vocab_size
    hidden = model.apply({"params": params}, tokens, method=GPT.encode)
    logits = model.apply({"params": params}, tokens)
    expected = hidden @ params["tokens_embed"]["embedding"].T
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # No separate head: the embeddings and the layers are all there is.
    assert set(params) == {"tokens_embed", "positions_embed"} | {
        f"h_{i}" for i in range(cfg.n_layer)
    }


def test_post_ln_block_output_is_normalised():
    # With post-LN (and no final LN) every block's output is a LayerNorm output:
    # zero mean and unit variance per position at initialisation (gain 1, bias 0).
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    tokens = jnp.arange(cfg.n_ctx)[None] % cfg.vocab_size
    hidden = GPT(cfg).apply({"params": params}, tokens, method=GPT.encode)
    np.testing.assert_allclose(hidden.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(hidden.var(-1), 1, atol=1e-2)


def test_dropout_only_with_rng_and_not_deterministic():
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    model = GPT(cfg)
    tokens = jnp.arange(cfg.n_ctx)[None] % cfg.vocab_size
    det = model.apply({"params": params}, tokens)
    a = model.apply({"params": params}, tokens, False, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply({"params": params}, tokens, False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, det) and not np.allclose(a, b)


def test_dropout_sites_are_the_embeddings_and_each_blocks_three(monkeypatch):
    """Embeddings, then per block the attention probabilities and the two residual
    branches (Section 4.1's "residual, embedding, and attention dropouts"), each with
    its own key."""
    cfg = ModelConfig.from_config(tiny_config().model)
    calls = []
    real = dropout_lib.dropout

    def recorded(x, rate, key, *args, **kwargs):
        calls.append((x.shape, tuple(np.asarray(jax.random.key_data(key)).ravel())))
        return real(x, rate, key, *args, **kwargs)

    monkeypatch.setattr(dropout_lib, "dropout", recorded)  # the Dropout layer's
    monkeypatch.setattr(attention, "dropout", recorded)  # attention's
    tokens = jnp.zeros((2, cfg.n_ctx), jnp.int32)
    GPT(cfg).apply({"params": init(cfg)}, tokens, False, rngs={"dropout": jax.random.key(0)})
    stream = (2, cfg.n_ctx, cfg.d_model)
    probs = (2, cfg.n_head, cfg.n_ctx, cfg.n_ctx)
    assert [shape for shape, _ in calls] == [stream, *[probs, stream, stream] * cfg.n_layer]
    assert len({key for _, key in calls}) == len(calls) == 1 + 3 * cfg.n_layer


def test_too_long_sequence_rejected():
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    with pytest.raises(ValueError, match="n_ctx"):
        GPT(cfg).apply({"params": params}, jnp.zeros((1, cfg.n_ctx + 1), jnp.int32))


def reference_gpt1(params, cfg: ModelConfig, tokens):
    """GPT-1's forward pass written out in NumPy from the paper and the original code
    (fused QKV as one (D, 3D) matrix, post-LN, tanh-GELU, tied head)."""

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    p = jax.tree.map(np.asarray, params)
    emb = p["tokens_embed"]["embedding"]
    length = tokens.shape[1]
    x = emb[tokens] + p["positions_embed"]["embedding"][:length]
    d, h, k = cfg.d_model, cfg.n_head, cfg.head_dim
    causal = np.tril(np.ones((length, length), bool))
    for i in range(cfg.n_layer):
        b = p[f"h_{i}"]
        qkv = x @ b["attn"]["c_attn"]["kernel"].reshape(d, 3 * d)
        qkv = qkv + b["attn"]["c_attn"]["bias"].reshape(3 * d)
        q, kk, v = (t.reshape(*x.shape[:2], h, k) for t in np.split(qkv, 3, -1))
        att = np.einsum("bqhk,bshk->bhqs", q, kk) / np.sqrt(k)
        att = np.where(causal, att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        a = np.einsum("bhqs,bshk->bqhk", att, v).reshape(*x.shape[:2], d)
        a = a @ b["attn"]["c_proj"]["kernel"].reshape(d, d) + b["attn"]["c_proj"]["bias"]
        n = ln(x + a, b["ln_1"]["scale"], b["ln_1"]["bias"])
        m = gelu(n @ b["mlp"]["c_fc"]["kernel"] + b["mlp"]["c_fc"]["bias"])
        m = m @ b["mlp"]["c_proj"]["kernel"] + b["mlp"]["c_proj"]["bias"]
        x = ln(n + m, b["ln_2"]["scale"], b["ln_2"]["bias"])
    return x @ emb.T


# scale 1e-3: every parameter but the LayerNorms' that small, so the LayerNorms' inputs
# have a variance (~1e-7) below their epsilon (1e-5), which then decides their outputs.
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_matches_a_numpy_reference_of_gpt1(scale):
    cfg = ModelConfig.from_config(tiny_config().model)
    rng = np.random.default_rng(0)
    # Perturb every parameter (biases and LN included) so that no term is trivially zero.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            (np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32))
            * (1.0 if "ln_" in jax.tree_util.keystr(path) else scale)
        ),
        init(cfg),
    )
    tokens = rng.integers(0, cfg.vocab_size, (2, cfg.n_ctx))
    logits = GPT(cfg).apply({"params": params}, tokens)
    expected = reference_gpt1(params, cfg, tokens)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.n_ctx))
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init(bf16)))
    full = GPT(cfg).apply({"params": params}, tokens)
    half = GPT(bf16).apply({"params": params}, tokens)
    assert half.dtype == jnp.float32
    # bfloat16 keeps ~3 significant digits: close, and not bit-identical.
    np.testing.assert_allclose(half, full, atol=0.05)
    assert not np.array_equal(half, full)


def test_lm_head_backward_lever_rounds_only_a_low_precision_gradient():
    """train.lm_head_backward="compute" changes the parameters' gradients in bfloat16
    (a little: the logits' gradient is rounded at the head) and nothing in float32."""
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.n_ctx))

    def grads(cfg, head):
        model = GPT(dataclasses.replace(cfg, lm_head_backward=head))

        def loss(p):
            return jnp.sum(model.apply({"params": p}, tokens) ** 2 / 100)

        return jax.jit(jax.grad(loss))(params)

    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    rounded, unrounded = grads(bf16, "compute"), grads(bf16, "float32")
    embedding = ("tokens_embed", "embedding")
    a, b = (g[embedding[0]][embedding[1]] for g in (rounded, unrounded))
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(b))))
    jax.tree.map(np.testing.assert_array_equal, grads(cfg, "compute"), grads(cfg, "float32"))


def test_lm_head_pad_to_lever_pads_the_head_and_changes_no_value():
    """train.lm_head_pad_to reaches the LM head (its product sees the padded
    vocabulary) and leaves the logits and gradients as they were, to rounding."""
    cfg = ModelConfig.from_config(tiny_config().model)
    params = init(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.n_ctx))
    padded_vocab = -(-cfg.vocab_size // 64) * 64  # 96 -> 128
    assert padded_vocab != cfg.vocab_size

    def loss(pad_to, p):
        model = GPT(dataclasses.replace(cfg, lm_head_pad_to=pad_to))
        return jnp.sum(model.apply({"params": p}, tokens) ** 2 / 100)

    def value_and_grads(pad_to):
        return jax.jit(jax.value_and_grad(functools.partial(loss, pad_to)))(params)

    # The same sums, tiled differently by the matmul library: equal to float32 rounding.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    jax.tree.map(close, value_and_grads(64), value_and_grads(1))
    jaxpr = str(jax.make_jaxpr(functools.partial(loss, 64))(params))
    assert f"{padded_vocab},{cfg.d_model}]" in jaxpr.replace(" ", "")


def test_fused_attention_equals_xla_attention_without_dropout():
    cfg = dataclasses.replace(ModelConfig.from_config(tiny_config().model), dropout=0.0)
    params = init(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.n_ctx))
    xla = GPT(cfg).apply({"params": params}, tokens)
    fused = GPT(dataclasses.replace(cfg, attention="fused")).apply({"params": params}, tokens)
    np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks, length, train", [(3, 16, True), (4, 5, True), (16, 3, False)])
def test_attention_blocks_change_no_value(blocks, length, train):
    # Blocks of queries that see only the keys up to their own end give one L x L
    # attention's logits and gradients, whether or not they divide the length, and
    # with dropout each block draws its part of the same mask.
    cfg = dataclasses.replace(ModelConfig.from_config(tiny_config().model), n_layer=1)
    params = init(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, length))
    rngs = {"dropout": jax.random.PRNGKey(3)}

    @functools.partial(jax.jit, static_argnums=0)
    def loss_and_grads(model_cfg, params):
        def loss(params):
            logits = GPT(model_cfg).apply({"params": params}, tokens, not train, rngs=rngs)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, one), one_grads = loss_and_grads(cfg, params)
    blocked = dataclasses.replace(cfg, attention_blocks=blocks)
    (_, split), split_grads = loss_and_grads(blocked, params)
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(split_grads), jax.tree.leaves(one_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_pallas_attention_is_xla_attention_with_its_dropout():
    # train.attention=pallas (the flash kernel, here in Pallas's interpreter) in a
    # training step: the logits and gradients of "xla", the same attention dropout.
    cfg = dataclasses.replace(ModelConfig.from_config(tiny_config().model), n_layer=1)
    params = init(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.n_ctx))

    def loss_and_grads(model_cfg, seed):
        def loss(params):
            rngs = {"dropout": jax.random.PRNGKey(seed)}
            logits = GPT(model_cfg).apply({"params": params}, tokens, False, rngs=rngs)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, xla), xla_grads = loss_and_grads(cfg, 3)
    pallas = dataclasses.replace(cfg, attention="pallas")
    (_, ours), our_grads = loss_and_grads(pallas, 3)
    np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(xla_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_attention_is_pallas_on_gpus_where_the_kernel_takes_the_shape():
    config = gpt1_config()
    cfg = ModelConfig.from_config(config.model, config.train)
    assert cfg.attention == "auto"  # the config's default
    gpt1 = (64, 512, 12, 64)  # queries: batch, length, heads, head size
    assert attention_kernel(cfg, gpt1, True, "gpu") == "pallas"
    assert attention_kernel(cfg, gpt1, True, "cpu") == attention_kernel(cfg, gpt1, True, "tpu")
    assert attention_kernel(cfg, gpt1, True, "tpu") == "xla"
    # Where the kernel cannot run, XLA's attention: a length or head size that is not a
    # power of two, or a dropout mask beyond the kernel's 2**32 indices.
    assert attention_kernel(cfg, (64, 500, 12, 64), True, "gpu") == "xla"
    assert attention_kernel(cfg, (64, 512, 16, 48), True, "gpu") == "xla"
    big = (2048, 512, 12, 64)  # 2**32 + 2**31 probabilities
    assert attention_kernel(cfg, big, True, "gpu") == "xla"
    assert attention_kernel(cfg, big, False, "gpu") == "pallas"  # no mask drawn
    for chosen in ("xla", "fused", "pallas"):
        assert attention_kernel(dataclasses.replace(cfg, attention=chosen), gpt1, True) == chosen


@pytest.mark.parametrize("scan_unroll, loops", [(0, False), (1, True), (2, False)])
def test_scan_unroll_decides_whether_the_layers_loop(scan_unroll, loops):
    # scan_unroll=0 (or n_layer) runs the stacked blocks without a loop: the compiled
    # step is the per-layer model's, traced from one block.
    cfg = ModelConfig.from_config(tiny_config().model)
    stacked = stack_layers(init(cfg), cfg.n_layer)
    model = GPT(cfg, scan_layers=True, scan_unroll=scan_unroll)
    tokens = jnp.zeros((1, cfg.n_ctx), jnp.int32)
    hlo = jax.jit(model.apply).lower({"params": stacked}, tokens).as_text()
    assert ("stablehlo.while" in hlo) == loops
    np.testing.assert_allclose(
        model.apply({"params": stacked}, tokens),
        GPT(cfg).apply({"params": init(cfg)}, tokens),
        rtol=1e-5,
        atol=1e-5,
    )
