import logging
import math
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import optim
from gptjax.model import GPT, ModelConfig, TaskModel, stack_layers

from conftest import ROOT, gpt1_config, tiny_config


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (1000, 1.25e-4),  # half-way up the linear warmup
        (2000, 2.5e-4),  # the peak
        (51_000, 1.25e-4),  # cosine half-way between warmup end and the last step
        (100_000, 0.0),
    ],
)
def test_gpt1_schedule(step, expected):
    schedule = optim.lr_schedule(gpt1_config().train, total_steps=100_000)
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-10)


def test_schedule_is_cosine_after_warmup():
    schedule = optim.lr_schedule(gpt1_config().train, total_steps=10_000)
    for step in (3000, 6000, 9000):
        progress = (step - 2000) / 8000
        assert float(schedule(step)) == pytest.approx(
            2.5e-4 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-5
        )


def finetune_train_config():
    return runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("custom").train


@pytest.mark.parametrize(
    "total, warmup",
    [
        (6314, 13),  # 0.2% of 3 epochs of SST-2 (67,349 sentences in batches of 32), rounded
        (233, 1),  # 3 epochs of RTE: 0.47 steps round to none; at least one
    ],
)
def test_finetune_schedule_warms_up_then_decays_linearly(total, warmup):
    schedule = optim.lr_schedule(finetune_train_config(), total_steps=total)
    at = lambda step: float(schedule(step))  # noqa: E731
    assert at(0) == 0.0
    assert at(warmup) == pytest.approx(6.25e-5, rel=1e-6)
    if warmup > 1:
        assert at(warmup // 2) == pytest.approx(6.25e-5 * (warmup // 2) / warmup, rel=1e-5)
    middle = warmup + (total - warmup) // 2
    assert at(middle) == pytest.approx(6.25e-5 * (total - middle) / (total - warmup), rel=1e-5)
    assert at(total) == 0.0


def test_a_one_update_run_is_told_it_trains_at_rate_zero(caplog):
    """Warmup starts from 0, so the only update of a one-step run (a tiny task's domain
    adaptation, a batch larger than the task) applies lr 0: said, not silent."""
    with caplog.at_level(logging.WARNING):
        optim.warn_if_untrained(finetune_train_config(), total_steps=1)
    schedule = optim.lr_schedule(finetune_train_config(), total_steps=1)
    assert float(schedule(0)) == 0.0
    assert "one update trains at learning rate 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        optim.warn_if_untrained(finetune_train_config(), total_steps=2)
        # An evaluation compiles its step with a one-step schedule: it trains nothing.
        optim.lr_schedule(finetune_train_config(), total_steps=1)
        optim.make_optimizer(finetune_train_config(), total_steps=1)
    assert not caplog.records


def tiny_params():
    cfg = ModelConfig.from_config(tiny_config().model)
    tokens = jnp.zeros((1, cfg.n_ctx), jnp.int32)
    return nn.unbox(GPT(cfg).init(jax.random.PRNGKey(0), tokens)["params"])


def test_decay_mask_excludes_biases_and_layernorm():
    mask = optim.decay_mask(tiny_params())
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree.leaves_with_path(mask)}
    assert flat["tokens_embed/embedding"] and flat["positions_embed/embedding"]
    assert flat["h_0/attn/c_attn/kernel"] and flat["h_1/mlp/c_proj/kernel"]
    assert not flat["h_0/attn/c_attn/bias"] and not flat["h_0/mlp/c_fc/bias"]
    assert not flat["h_0/ln_1/scale"] and not flat["h_0/ln_2/bias"]
    decayed = {k for k, v in flat.items() if v}
    assert decayed == {k for k in flat if k.endswith(("kernel", "embedding"))}


def test_decay_mask_of_a_fine_tune_decays_the_head_kernel_not_its_bias():
    """The original's fine-tuning decays every matrix, its classifier's included."""
    cfg = ModelConfig.from_config(tiny_config().model)
    model = TaskModel(cfg, "classification", 3)
    inputs = (jnp.zeros((1, 1, 8), jnp.int32), jnp.zeros((1, 1), jnp.int32))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), *inputs)["params"])
    mask = optim.decay_mask(params)
    assert mask["head"] == {"kernel": True, "bias": False}
    assert mask["transformer"] == optim.decay_mask(params["transformer"])
    assert mask["transformer"]["tokens_embed"]["embedding"]


def test_decay_mask_is_the_same_in_the_stacked_layout():
    # Stacked (train.scan_layers), biases and LayerNorm parameters are rank 2: the mask
    # goes by name, so they still get no decay.
    params = tiny_params()
    assert optim.decay_mask(stack_layers(params, 2))["h"] == optim.decay_mask(params)["h_0"]


def test_decoupled_weight_decay_only_on_masked_tensors():
    # With a zero gradient, Adam's update is zero, so only the decay moves parameters:
    # w <- w - lr * wd * w for rank > 1 tensors, nothing for biases and LN.
    train_cfg = tiny_config().train
    train_cfg.update(warmup_steps=0, weight_decay=0.5, lr=0.1)
    tx = optim.make_optimizer(train_cfg, total_steps=1000)
    params = tiny_params()
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    kernel = params["h_0"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(
        new["h_0"]["mlp"]["c_fc"]["kernel"], kernel * (1 - 0.1 * 0.5), rtol=1e-6
    )
    np.testing.assert_array_equal(new["h_0"]["ln_1"]["scale"], params["h_0"]["ln_1"]["scale"])


def test_gradients_clipped_to_global_norm_before_adam():
    # Adam is invariant to a constant gradient scale, so clipping shows only when the
    # norm changes between steps: a norm-10 step then a norm-0.5 step must act like
    # plain AdamW fed the clipped norm-1 step then the same norm-0.5 step.
    train_cfg = tiny_config().train
    train_cfg.update(warmup_steps=0, weight_decay=0.0, grad_clip=1.0, lr=0.1)
    ours = optim.make_optimizer(train_cfg, total_steps=10**6)
    plain = optax.adamw(optim.lr_schedule(train_cfg, 10**6), weight_decay=0.0)
    params = {"w": jnp.zeros((2, 2))}
    g1 = {"w": jnp.array([[6.0, 8.0], [0.0, 0.0]])}  # norm 10
    g2 = {"w": jnp.array([[0.0, 0.3], [0.4, 0.0]])}  # norm 0.5, under the threshold

    def run(tx, grads):
        state, out = tx.init(params), []
        for g in grads:
            update, state = tx.update(g, state, params)
            out.append(update["w"])
        return out

    clipped_g1 = jax.tree.map(lambda g: g / 10.0, g1)
    expected = run(plain, [clipped_g1, g2])
    got = run(ours, [g1, g2])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)
    assert not np.allclose(run(plain, [g1, g2])[1], expected[1], rtol=1e-3)


def _steps(tx, params, grads_seq):
    """(updates, state) after each of `grads_seq`, the parameters moved by each."""
    state, out = tx.init(params), []
    for grads in grads_seq:
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append((updates, state))
    return out


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))


def _grads(params, seed, scale):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noise = [
        scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


def test_the_fused_update_is_optaxs_and_keeps_its_state():
    """make_optimizer computes optax's clip + AdamW + apply_if_finite (optax_optimizer)
    with the same state, so checkpoints of either restore into the other: the same
    updates and moments, step by step, with the clip on (large gradients) and off."""
    train_cfg = tiny_config().train
    train_cfg.update(warmup_steps=2, lr=1e-2, grad_clip=1.0)
    params = tiny_params()
    ours, reference = (optim.make_optimizer(train_cfg, 20), optim.optax_optimizer(train_cfg, 20))
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(reference.init(params))
    grads = [_grads(params, seed, scale) for seed, scale in enumerate((1.0, 1e-3, 3.0, 1e-4))]
    steps = zip(_steps(ours, params, grads), _steps(reference, params, grads), strict=True)
    for (u, s), (ru, rs) in steps:
        # The clip is a product by max_norm / norm here, a quotient then a product in
        # optax: the same to float32 roundings (relative to each array's scale, since a
        # moment near zero is a difference of larger numbers).
        jax.tree.map(_close, u, ru)
        jax.tree.map(_close, s, rs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_a_nonfinite_update_is_skipped_and_counted(bad):
    """Gradients with a NaN, an Inf, or a norm beyond float32 change nothing but the
    skip counters; the next finite step is optax's after its own skip."""
    train_cfg = tiny_config().train
    train_cfg.update(warmup_steps=0, lr=1e-2)
    params = tiny_params()
    ours = optim.make_optimizer(train_cfg, 20)
    good = _grads(params, 0, 1.0)
    spoilt = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(bad), good)
    (u1, s1), (u2, s2), (u3, s3) = _steps(ours, params, [good, spoilt, good])
    jax.tree.map(np.testing.assert_array_equal, u2, jax.tree.map(jnp.zeros_like, u2))
    jax.tree.map(np.testing.assert_array_equal, s2.inner_state, s1.inner_state)

    def counters(s):  # (this one applied, skipped in a row, skipped in all)
        return bool(s.last_finite), int(s.notfinite_count), int(s.total_notfinite)

    assert [counters(s) for s in (s1, s2, s3)] == [(True, 0, 0), (False, 1, 1), (True, 0, 1)]
    if bad != 1e30:  # optax skips these too (and applies the overflowing one, clipped)
        reference = optim.optax_optimizer(train_cfg, 20)
        ru3, rs3 = _steps(reference, params, [good, spoilt, good])[2]
        jax.tree.map(_close, u3, ru3)
        jax.tree.map(_close, s3, rs3)


def test_the_scheduled_lr_is_the_one_applied_after_a_skipped_update():
    train_cfg = tiny_config().train  # warmup over 2 steps: the LR moves at every step
    tx, schedule = optim.make_optimizer(train_cfg, 20), optim.lr_schedule(train_cfg, 20)
    params = {"kernel": jnp.ones((2, 3))}
    good, bad = {"kernel": jnp.ones((2, 3))}, {"kernel": jnp.full((2, 3), jnp.nan)}
    _, once = tx.update(good, tx.init(params), params)
    _, skipped = tx.update(bad, once, params)  # counted by the step, not by the optimiser
    assert float(optim.scheduled_lr(schedule, skipped)) == float(schedule(1)) != schedule(2)
    after_skip, _ = tx.update(good, skipped, params)
    straight, _ = tx.update(good, once, params)
    np.testing.assert_array_equal(after_skip["kernel"], straight["kernel"])


def test_a_warmup_longer_than_the_run_and_a_batch_larger_than_the_data_are_told(caplog):
    train_cfg = gpt1_config().train  # warmup_steps=2000
    with caplog.at_level(logging.WARNING):
        optim.warn_if_untrained(train_cfg, total_steps=2000)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        optim.warn_if_untrained(train_cfg, total_steps=100)
    assert "train.warmup_steps=2000 is longer than the run's 100 updates" in caplog.text
    # A batch larger than the data: each batch repeats sequences; said, not silent.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        optim.warn_if_untrained(train_cfg, total_steps=2000, num_sequences=64)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        optim.warn_if_untrained(train_cfg, total_steps=2000, num_sequences=10)
    assert "train.batch_size=64 is more than the 10 training sequences" in caplog.text
