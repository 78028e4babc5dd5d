import contextlib
import dataclasses
import json
import logging
import shutil
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import loop, metrics, pretrain, train
from gptjax.errors import UserError
from gptjax.metrics import read_metrics

from conftest import tiny_books_config, tiny_config


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


def eval_rows(workdir):
    return [r for r in read_metrics(workdir) if "loss" not in r]


@pytest.mark.parametrize(
    "num_steps, ckpt_every, stop_at, skipped, evaluated",
    [
        (6, 3, 3, True, [3, 6]),  # stopped at step 3, during its evaluation
        (6, 3, 3, False, [3, 6]),  # killed after step 3's evaluation
        # The last step, evaluated though not a multiple of eval_every: stopped during it.
        (5, 5, 5, True, [3, 5]),
    ],
)
def test_an_evaluation_a_stop_skipped_is_made_up_at_the_resume(
    books, tmp_path, num_steps, ckpt_every, stop_at, skipped, evaluated
):
    """A stop signal at an evaluation step saves without evaluating; the resumed run
    evaluates that step first, once, with the values of the uninterrupted run."""
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=num_steps, ckpt_every=ckpt_every, eval_every=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain.train_and_evaluate(config, str(straight))
    assert [r["step"] for r in eval_rows(straight)] == evaluated
    shutil.copytree(straight, resumed)
    for later in (d for d in (resumed / "checkpoints").iterdir() if int(d.name) > stop_at):
        shutil.rmtree(later)
    rows = [r for r in read_metrics(resumed) if r["step"] <= stop_at]
    if skipped:
        rows = [r for r in rows if r["step"] < stop_at or "loss" in r]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pretrain.train_and_evaluate(config, str(resumed))
    assert eval_rows(resumed) == eval_rows(straight)


def test_a_log_row_averages_the_finite_steps_and_takes_the_last_lr():
    """Three steps in one row, the middle one non-finite (skipped): loss and gradient
    norm are the finite steps' mean, lr the row's last step's, one step skipped."""
    nan = float("nan")
    pending = [
        (1, dict(loss=1.0, grad_norm=2.0, lr=0.1, nonfinite=False, nonfinite_run=0)),
        (2, dict(loss=nan, grad_norm=nan, lr=0.2, nonfinite=True, nonfinite_run=1)),
        (3, dict(loss=3.0, grad_norm=4.0, lr=0.3, nonfinite=False, nonfinite_run=0)),
    ]
    cfg = types.SimpleNamespace(nonfinite="skip", nonfinite_limit=5)
    row = loop.summarize(pending, cfg)
    assert row == {"loss": 2.0, "grad_norm": 3.0, "lr": 0.3, "skipped_steps": 1}


def test_total_steps_from_epochs_unless_num_steps_set():
    train_cfg = tiny_config().train
    train_cfg.update(num_steps=None, epochs=3, batch_size=4)
    assert loop.total_steps(train_cfg, num_windows=10) == 7
    train_cfg.num_steps = 5
    assert loop.total_steps(train_cfg, num_windows=10) == 5


def test_a_long_evaluation_says_how_far_it_is(monkeypatch, caplog):
    """A progress line every 30 s of evaluation, and the token-weighted loss of all."""
    clock = iter(range(0, 10_000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(loop.sharding, "global_batch", lambda mesh, batch: batch)

    def p_eval(params, batch):  # batch i: i + 1 tokens of loss i (a last batch is short)
        count = batch["loss"] + 1
        return {"loss_sum": jnp.float32(batch["loss"] * count), "count": jnp.float32(count)}

    batches = [{"loss": float(i)} for i in range(6)]
    with caplog.at_level(logging.INFO):
        result = loop.evaluate(p_eval, None, iter(batches), mesh=None)
    # A mean over the tokens (70 / 21), not over the batches (2.5).
    assert result["eval_loss"] == pytest.approx(70 / 21)
    assert result["eval_ppl"] == pytest.approx(np.exp(70 / 21))
    progress = [r.getMessage() for r in caplog.records if "evaluating:" in r.getMessage()]
    assert progress == [
        f"evaluating: {n} batches in {t}" for n, t in ((2, "1m00s"), (4, "2m00s"), (6, "3m00s"))
    ]
    # Batches that know their number (`eval_batches`'): how many, and the time left.
    clock = iter(range(0, 10_000, 20))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loop.evaluate(p_eval, None, batches, mesh=None)
    progress = [r.getMessage() for r in caplog.records if "evaluating:" in r.getMessage()]
    assert progress[0] == "evaluating: 2 of 6 batches in 1m00s, ETA 2m00s"


def test_an_evaluation_cap_covers_the_same_windows_whatever_the_microbatches():
    """`train.eval_batches` counts batches of `train.batch_size` windows: evaluating in
    microbatches (4 windows at a time instead of 8) must not halve what is scored."""
    from gptjax.data.pipeline import PackedWindows

    windows = PackedWindows(np.arange(50 * 4 + 1), n_ctx=4, pad_id=0)

    def scored(microbatches):
        cfg = types.SimpleNamespace(batch_size=8, microbatches=microbatches, eval_batches=3)
        batches = list(loop.lm_eval_batches(windows, cfg))
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
    fake_time = types.SimpleNamespace(time=lambda: clock[0], time_ns=time.time_ns)
    monkeypatch.setattr(loop, "time", fake_time)  # the compile timer
    monkeypatch.setattr(metrics, "time", fake_time)  # tokens/s
    real = train.build

    def build(*args, **kwargs):
        built = real(*args, **kwargs)

        def timed(state, batch):
            clock[0] += 1.0 if clock[0] else 100.0  # compiling first, then a step
            return built.p_train(state, batch)

        return dataclasses.replace(built, p_train=timed)

    monkeypatch.setattr(train, "build", build)
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
    monkeypatch.setattr(loop.sharding, "global_batch", lambda mesh, batch: batch)
    train_cfg = types.SimpleNamespace(
        log_every=100, ckpt_every=100, eval_every=100, nonfinite="skip", nonfinite_limit=10
    )
    state = types.SimpleNamespace(step=0, params=None)
    save = lambda *args, **kwargs: None  # noqa: E731
    loop.fit(
        state, p_train, lambda params: {}, Batches(), None, train_cfg, 6, 1, writer, save, guard
    )
    dispatched = [n for kind, n in events if kind == "dispatch"]
    assert dispatched == [1, 2, 3, 4, 5, 6]
    for n in range(3, 7):
        assert events.index(("wait", n - 2)) < events.index(("dispatch", n))
        assert ("wait", n - 1) not in events[: events.index(("dispatch", n))]
