import collections
import math
import re

import jax
import numpy as np
import pytest

from gptjax import losses, sharding, train
from gptjax.estimate import compile_step
from gptjax.measure import fresh_compilation_cache
from gptjax.model import GPT, ModelConfig

from conftest import tiny_config


def make_steps(config):
    mesh = sharding.make_mesh(config.mesh)
    model = GPT(ModelConfig.from_config(config.model))
    objective = losses.lm_objective(model)
    built = train.build(model, objective, config.train, config.train.num_steps, mesh)
    return mesh, built.state, built.p_train, train.compile_eval_step(model, mesh, built.shardings)


def fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.model.n_ctx + 1)
    return {
        "tokens": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
        "weights": np.ones((shape[0], shape[1] - 1), np.float32),
    }


def test_initial_loss_is_close_to_uniform():
    config = tiny_config()
    config.model.vocab_size = 1000
    mesh, state, _, p_eval = make_steps(config)
    sums = p_eval(state.params, sharding.global_batch(mesh, fixed_batch(config)))
    loss = float(sums["loss_sum"] / sums["count"])
    assert abs(loss - math.log(1000)) < 0.1


def test_loss_falls_on_fixed_text():
    config = tiny_config()
    config.train.update(num_steps=60, warmup_steps=5, lr=1e-2)
    mesh, state, p_train, _ = make_steps(config)
    # Fixed, repetitive text: a counting sequence the model can learn to continue.
    tokens = (np.arange(config.model.n_ctx + 1)[None] + np.arange(4)[:, None]) % 20
    batch = sharding.global_batch(
        mesh,
        {"tokens": tokens.astype(np.int32), "weights": np.ones((4, config.model.n_ctx))},
    )
    losses = []
    for _ in range(60):
        state, metrics = p_train(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.2 * losses[0]
    assert int(state.step) == 60


def test_onednn_matmuls_change_no_value():
    """train.cpu_matmuls="onednn" hands the step's matmuls to oneDNN instead of XLA's
    YNNPACK; the losses and the updated parameters stay the same."""
    runs = {}
    for library in ("xla", "onednn"):
        config = tiny_config()
        config.train.cpu_matmuls = library
        mesh, state, p_train, _ = make_steps(config)
        batch = sharding.global_batch(mesh, fixed_batch(config))
        hlo = compile_step(p_train, mesh, state, batch).as_text()
        losses = []
        for _ in range(3):
            state, metrics = p_train(state, batch)
            losses.append(float(metrics["loss"]))
        runs[library] = hlo, losses, jax.device_get(state.params)
    assert "__onednn_fusion" not in runs["xla"][0]
    assert "__onednn_fusion" in runs["onednn"][0]
    np.testing.assert_allclose(runs["onednn"][1], runs["xla"][1], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        runs["onednn"][2],
        runs["xla"][2],
    )


def avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


OPTIMISED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def vector_widths(ir_dir) -> tuple[set[str], int]:
    """The `prefer-vector-width` attributes and the most used float vector length of the
    LLVM IR XLA dumped for a CPU compile (its fusions' kernels)."""
    text = "".join(p.read_text() for p in ir_dir.glob("*jit_train_step*ir-with-opt.ll"))
    preferred = set(re.findall(r'"prefer-vector-width"="(\d+)"', text))
    lengths = collections.Counter(re.findall(r"<(\d+) x float>", text))
    return preferred, int(lengths.most_common(1)[0][0])


def test_cpu_vector_width_reaches_the_train_steps_code(tmp_path, monkeypatch):
    """train.cpu_vector_width is the vector width XLA's CPU compiler prefers for the
    train step's element-wise kernels: mostly 16 floats a vector with 512 on an AVX-512
    CPU, 8 with XLA's default 256 (elsewhere 512 changes nothing)."""
    real = train.compiler_options
    widths = {}
    for bits in (256, 512):
        dump = tmp_path / str(bits)
        # The step's own options, plus XLA's dump of what it compiled, optimised whatever
        # the test environment says (LLVM's vectoriser is what is tested).
        extra = {"xla_dump_to": str(dump), **OPTIMISED}
        monkeypatch.setattr(train, "compiler_options", lambda cfg, e=extra: {**real(cfg), **e})
        config = tiny_config()
        # Rows long enough for the vectoriser to fill 16 lanes (the tiny model's are not).
        config.model.update(n_ctx=64, d_model=128, d_mlp=512, vocab_size=512)
        config.train.cpu_vector_width = bits
        mesh, state, p_train, _ = make_steps(config)
        # Compiled afresh: an executable read from a persistent compilation cache (an
        # earlier test's command may have set one up) dumps no LLVM IR.
        with fresh_compilation_cache():
            compile_step(p_train, mesh, state, sharding.global_batch(mesh, fixed_batch(config)))
        widths[bits] = vector_widths(dump)
    assert widths[256][0] == {"256"} and widths[512][0] == {"512"}
    assert widths[256][1] <= 8  # 4 on a CPU without AVX
    assert widths[512][1] == (16 if avx512() else widths[256][1])


def test_train_step_metrics_and_schedule():
    config = tiny_config()
    mesh, state, p_train, _ = make_steps(config)
    batch = sharding.global_batch(mesh, fixed_batch(config))
    state, m0 = p_train(state, batch)
    state, m1 = p_train(state, batch)
    assert float(m0["lr"]) == 0.0  # warmup starts at zero
    assert float(m1["lr"]) == pytest.approx(config.train.lr / config.train.warmup_steps)
    assert float(m0["grad_norm"]) > 0


def test_weights_mask_padding_out_of_the_loss():
    config = tiny_config()
    mesh, state, _, p_eval = make_steps(config)
    batch = fixed_batch(config)
    half = dict(batch, weights=batch["weights"].copy())
    half["weights"][:, 8:] = 0
    changed = dict(half, tokens=half["tokens"].copy())
    changed["tokens"][:, 10:] = 3  # only positions whose targets have weight 0
    a = p_eval(state.params, sharding.global_batch(mesh, half))
    b = p_eval(state.params, sharding.global_batch(mesh, changed))
    assert float(a["count"]) == 4 * 8
    assert float(a["loss_sum"]) == pytest.approx(float(b["loss_sum"]), rel=1e-6)


def test_remat_lowers_the_planned_memory_with_the_layers_in_a_loop():
    """train.remat keeps fewer activations for the backward pass. XLA's CPU compiler
    plans the saving when the blocks run in a loop (`scan_unroll=1`; unrolled, it plans
    the same peak: docs/scaling.md)."""
    from gptjax import estimate

    def temporaries(remat):
        config = tiny_config()
        config.model.update(n_layer=4, n_ctx=64, d_model=64, d_mlp=256)
        config.train.update(batch_size=8, remat=remat, scan_unroll=1)
        return estimate.estimate(config)["memory_per_device"]["temp_bytes"]

    assert temporaries("full") < 0.5 * temporaries("none")
