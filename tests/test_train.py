import collections
import contextlib
import json
import logging
import math
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import optim, pretrain, sharding, train
from gptjax.errors import UserError
from gptjax.estimate import compile_step
from gptjax.measure import fresh_compilation_cache
from gptjax.metrics import read_metrics
from gptjax.model import GPT, ModelConfig

from conftest import tiny_books_config, tiny_config


def make_steps(config):
    mesh = sharding.make_mesh(config.mesh)
    model = GPT(ModelConfig.from_config(config.model))
    total = config.train.num_steps
    tx = optim.make_optimizer(config.train, total)
    state, shardings = train.create_state(model, tx, config.train.seed, config.model.n_ctx, mesh)
    p_train, p_eval = train.compile_steps(
        model, optim.lr_schedule(config.train, total), mesh, shardings, config.train
    )
    return mesh, state, p_train, p_eval


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


def test_resume_continues_exactly(books, tmp_path):
    """Interrupted after the step-3 checkpoint and resumed, a run logs exactly the
    losses of an uninterrupted run: params, Adam state, step, dropout key and data
    position all come back."""
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=6, ckpt_every=3, eval_every=100)
    straight = tmp_path / "straight"
    pretrain.train_and_evaluate(config, str(straight))

    resumed = tmp_path / "resumed"
    pretrain.train_and_evaluate(config, str(resumed))
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after the step-3 save
    pretrain.train_and_evaluate(config, str(resumed))

    def losses(workdir):
        return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]

    assert [s for s, _ in losses(resumed)] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == losses(straight)


def test_a_run_past_a_lowered_step_count_is_refused_untouched(books, tmp_path):
    """A checkpoint past `train.num_steps` (lowered after the run) is not re-reported
    as this config's result: one error, and the workdir's files stay as they were."""
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=6, ckpt_every=3, eval_every=100)
    workdir = tmp_path / "run"
    pretrain.train_and_evaluate(config, str(workdir))
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    config.train.num_steps = 4
    with pytest.raises(UserError, match=r"at step 6, past the 4 steps .* at least 6 steps"):
        pretrain.train_and_evaluate(config, str(workdir))
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before
    config.train.num_steps = 6  # the run's own count still re-reports it
    pretrain.train_and_evaluate(config, str(workdir))


def test_an_evaluation_a_stop_skipped_is_made_up_at_the_resume(books, tmp_path):
    """A stop signal at an evaluation step saves without evaluating; the resumed run
    evaluates that step first, once, with the values of the uninterrupted run."""
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=6, ckpt_every=3, eval_every=3)
    straight = tmp_path / "straight"
    pretrain.train_and_evaluate(config, str(straight))

    def evals(workdir):
        return [r for r in read_metrics(workdir) if "loss" not in r]

    assert [r["step"] for r in evals(straight)] == [3, 6]
    for skipped in (True, False):  # stopped at step 3 (no eval row); killed after it
        resumed = tmp_path / f"resumed-{skipped}"
        shutil.copytree(straight, resumed)
        shutil.rmtree(resumed / "checkpoints" / "6")
        rows = [r for r in read_metrics(resumed) if r["step"] <= 3]
        if skipped:
            rows = [r for r in rows if r["step"] < 3 or "loss" in r]
        (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        pretrain.train_and_evaluate(config, str(resumed))
        assert evals(resumed) == evals(straight)


def test_total_steps_from_epochs_unless_num_steps_set():
    train_cfg = tiny_config().train
    train_cfg.update(num_steps=None, epochs=3, batch_size=4)
    assert pretrain.total_steps(train_cfg, num_windows=10) == 7
    train_cfg.num_steps = 5
    assert pretrain.total_steps(train_cfg, num_windows=10) == 5


def test_a_long_evaluation_says_how_far_it_is(monkeypatch, caplog):
    """A progress line every 30 s of evaluation, and the token-weighted loss of all."""
    clock = iter(range(0, 10_000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(train.sharding, "global_batch", lambda mesh, batch: batch)

    def p_eval(params, batch):
        return {"loss_sum": jnp.float32(batch["loss"] * 2), "count": jnp.float32(2)}

    batches = [{"loss": float(i)} for i in range(6)]
    with caplog.at_level(logging.INFO):
        result = train.evaluate(p_eval, None, iter(batches), mesh=None)
    assert result["eval_loss"] == pytest.approx(2.5)
    progress = [r.getMessage() for r in caplog.records if "evaluating:" in r.getMessage()]
    assert progress == [
        f"evaluating: {n} batches in {t}" for n, t in ((2, "1m00s"), (4, "2m00s"), (6, "3m00s"))
    ]
    # Batches that know their number (`eval_batches`'): how many, and the time left.
    clock = iter(range(0, 10_000, 20))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.evaluate(p_eval, None, batches, mesh=None)
    progress = [r.getMessage() for r in caplog.records if "evaluating:" in r.getMessage()]
    assert progress[0] == "evaluating: 2 of 6 batches in 1m00s, ETA 2m00s"


def test_an_evaluation_cap_covers_the_same_windows_whatever_the_microbatches():
    """`train.eval_batches` counts batches of `train.batch_size` windows: evaluating in
    microbatches (4 windows at a time instead of 8) must not halve what is scored."""
    from gptjax.data.pipeline import PackedWindows

    windows = PackedWindows(np.arange(50 * 4 + 1), n_ctx=4, pad_id=0)

    def scored(microbatches):
        cfg = types.SimpleNamespace(batch_size=8, microbatches=microbatches, eval_batches=3)
        batches = list(train.lm_eval_batches(windows, cfg))
        assert {len(b["tokens"]) for b in batches} == {8 // microbatches}
        return np.concatenate([b["tokens"] for b in batches])

    assert len(scored(1)) == 24
    np.testing.assert_array_equal(scored(2), scored(1))
    np.testing.assert_array_equal(scored(4), scored(1))


def test_the_first_rows_speed_leaves_out_compiling(books, tmp_path, monkeypatch):
    """tokens/s and the ETA of the first row measure training, not the compilation the
    first step waits for (a fake clock: compiling takes 100 s, each step 1 s)."""
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=4, log_every=2, eval_every=100, ckpt_every=100)
    clock = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    real = train.compile_steps

    def compile_steps(*args, **kwargs):
        p_train, p_eval = real(*args, **kwargs)

        def timed(state, batch):
            clock[0] += 1.0 if clock[0] else 100.0  # compiling first, then a step
            return p_train(state, batch)

        return timed, p_eval

    monkeypatch.setattr(train, "compile_steps", compile_steps)
    pretrain.train_and_evaluate(config, str(tmp_path / "run"))
    speeds = [r["tokens_per_sec"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(speeds) == 2 and speeds[0] >= speeds[1]  # not 1/50th of it


def test_the_host_runs_at_most_one_step_ahead(monkeypatch):
    """Between log points the host reads no metrics, but it waits for step N-1 before it
    dispatches step N+1: a stop signal is acted on within about a step, not after every
    step queued up to the next log point (fakes record the order of dispatches and waits)."""
    events = []

    class Loss(float):  # a step's metric, which says when the loop waits for it
        def block_until_ready(self):
            events.append(("wait", self.step))
            return self

    def p_train(state, batch):
        step = state.step + 1
        events.append(("dispatch", step))
        loss = Loss(1.0)
        loss.step = step
        metrics = dict(loss=loss, grad_norm=1.0, lr=0.1, nonfinite=False, nonfinite_run=0)
        return types.SimpleNamespace(step=step, params=None), metrics

    class Batches:
        def __next__(self):
            return {}

        def get_state(self):
            return {}

    guard = types.SimpleNamespace(
        should_stop=lambda step: False,
        signal_name=None,
        interruptible=lambda step: contextlib.nullcontext(),
    )
    writer = types.SimpleNamespace(write=lambda step, row: None)
    monkeypatch.setattr(train.sharding, "global_batch", lambda mesh, batch: batch)
    train_cfg = types.SimpleNamespace(
        log_every=100, ckpt_every=100, eval_every=100, nonfinite="skip", nonfinite_limit=10
    )
    state = types.SimpleNamespace(step=0, params=None)
    save = lambda *args, **kwargs: None  # noqa: E731
    train.fit(
        state, p_train, lambda params: {}, Batches(), None, train_cfg, 6, 1, writer, save, guard
    )
    dispatched = [n for kind, n in events if kind == "dispatch"]
    assert dispatched == [1, 2, 3, 4, 5, 6]
    for n in range(3, 7):
        assert events.index(("wait", n - 2)) < events.index(("dispatch", n))
        assert ("wait", n - 1) not in events[: events.index(("dispatch", n))]


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
