"""Preemption, crashes and non-finite steps: a run never loses more than a checkpoint
interval, never resumes from something half-written, and never saves a non-finite state."""

import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
from cli import assert_one_line_error, error_in_process, run_main, start_main

from gptjax import optim, pretrain, sharding
from gptjax.errors import UserError
from gptjax.metrics import read_metrics

from conftest import tiny_books_config, tree_bytes, write_books


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


def wait_for_rows(workdir, count, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(read_metrics(workdir)) >= count:
            return True
        time.sleep(0.05)
    return False


LONG = [
    "--config.train.num_steps=30",
    "--config.train.ckpt_every=3",
    "--config.train.eval_every=1000",
]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_losses(tmp_path):
    books, cache = write_books(tmp_path / "books"), tmp_path / "cache"
    straight = start_main(tmp_path / "straight", *LONG, books=books, cache=cache)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    expected = losses(tmp_path / "straight")
    assert [s for s, _ in expected] == list(range(1, 31))

    workdir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        seen = len(read_metrics(workdir)) if (workdir / "metrics.jsonl").exists() else 0
        proc = start_main(workdir, *LONG, books=books, cache=cache)
        # Let it make progress past where it was, then kill at a random moment (with a
        # save every 3 steps, often in the middle of an asynchronous save).
        if wait_for_rows(workdir, seen + 1, proc):
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 3
    final = start_main(workdir, *LONG, books=books, cache=cache)
    assert final.wait(timeout=600) == 0, final.stderr.read()[-3000:]
    assert losses(workdir) == expected


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path):
    books, cache = write_books(tmp_path / "books"), tmp_path / "cache"
    workdir = tmp_path / "run"
    flags = ["--config.train.num_steps=100000", "--config.train.ckpt_every=100000"]
    proc = start_main(workdir, *flags, books=books, cache=cache)
    assert wait_for_rows(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    stderr = proc.stderr.read()
    assert "SIGTERM received" in stderr and "run the same command to resume" in stderr
    last_logged = losses(workdir)[-1][0]
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [last_logged]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_before_the_first_step_exits_75(tmp_path, sig):
    """While the corpus is read, the tokenizer trained and the step compiled (minutes on
    BookCorpus) a scheduler's SIGTERM, or a Ctrl-C, must still end in the status that
    requeues, with one line and no traceback."""
    books, cache = write_books(tmp_path / "books"), tmp_path / "cache"
    workdir = tmp_path / "run"
    proc = start_main(workdir, books=books, cache=cache)
    deadline = time.time() + 120
    while not workdir.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the workdir is made once the command holds it
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    # At once, or, when the handler ran inside a garbage-collection callback (whose
    # exceptions Python only prints), at the end of the first step, saved.
    if f"stopped by {sig.name} outside the training loop" in stderr:
        assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    else:
        assert f"stopped by {sig.name} at step 1; checkpoint saved" in stderr, stderr[-2000:]
        assert os.listdir(workdir / "checkpoints") == ["1"]


def run_with_nan_at(config, workdir, monkeypatch, nan_step):
    """Trains with the loss weights of batch `nan_step` (a number or a range) made NaN
    (so its loss and gradients are NaN)."""
    nan_steps = nan_step if isinstance(nan_step, range) else (nan_step,)
    real = sharding.global_batch
    calls = {"n": 0}

    def poisoned(mesh, batch):
        calls["n"] += 1
        if calls["n"] in nan_steps:
            batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
        return real(mesh, batch)

    monkeypatch.setattr(sharding, "global_batch", poisoned)
    return pretrain.train_and_evaluate(config, str(workdir))


def test_nonfinite_step_is_skipped_and_counted(books, tmp_path, monkeypatch):
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=6, ckpt_every=2, eval_every=100, nonfinite="skip")
    metrics = run_with_nan_at(config, tmp_path / "run", monkeypatch, nan_step=4)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert rows[4]["skipped_steps"] == 1 and np.isnan(rows[4]["loss"])
    assert all(rows[s]["skipped_steps"] == 0 for s in (1, 2, 3, 5, 6))
    assert all(np.isfinite(rows[s]["loss"]) for s in (5, 6))
    assert np.isfinite(metrics["eval_loss"])
    # The logged LR is the one applied: the skipped update did not advance the schedule,
    # so (row s is step index s - 1) step 5 applies the LR of step index 3, as step 4 would have.
    schedule = optim.lr_schedule(config.train, 6)
    assert rows[5]["lr"] == pytest.approx(float(schedule(3))) == rows[4]["lr"]
    assert rows[6]["lr"] == pytest.approx(float(schedule(4)))


def test_a_diverged_run_stops_after_nonfinite_limit_skipped_steps(books, tmp_path, monkeypatch):
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=12, ckpt_every=2, log_every=1, eval_every=100)
    config.train.update(nonfinite="skip", nonfinite_limit=3)
    with pytest.raises(UserError, match="3 non-finite steps in a row up to step 6"):
        run_with_nan_at(config, tmp_path / "run", monkeypatch, nan_step=range(4, 13))
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in sorted(rows)] == [0, 0, 0, 1, 1]


def test_nonfinite_step_stops_the_run_under_stop(books, tmp_path, monkeypatch):
    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=8, ckpt_every=2, eval_every=100, nonfinite="stop")
    with pytest.raises(UserError, match="non-finite loss or gradients at step 5"):
        run_with_nan_at(config, tmp_path / "run", monkeypatch, nan_step=5)
    # Step 4 was saved; nothing after the bad step was.
    assert sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints")) == [2, 4]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    books, cache = write_books(tmp_path / "books"), tmp_path / "cache"
    result = run_main(tmp_path / "straight", books=books, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = tmp_path / "run"
    result = run_main(workdir, books=books, cache=cache)
    assert result.returncode == 0
    # Truncate every file of the newest checkpoint, as a dying disk might.
    for root, _, files in os.walk(workdir / "checkpoints" / "4"):
        for name in files:
            open(os.path.join(root, name), "w").close()
    older = {p: p.read_bytes() for p in (workdir / "checkpoints" / "2").rglob("*") if p.is_file()}
    result = run_main(workdir, books=books, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint 4 is unreadable" in result.stderr
    assert "resumed from the checkpoint at step 2" in result.stderr
    [moved] = os.listdir(workdir / "corrupt_checkpoints")
    assert moved.startswith("4-")  # step 4, stamped with the time it was moved
    assert losses(workdir) == losses(tmp_path / "straight")
    assert {p: p.read_bytes() for p in older} == older  # the good one untouched


def test_unwritable_workdir(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    books, cache = write_books(tmp_path / "books"), tmp_path / "cache"
    words = ["file/run is under", "file, a file; pick another --workdir"]
    error_in_process(capsys, tmp_path / "file" / "run", books=books, cache=cache, words=words)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    books, cache = write_books(tmp_path / "books"), tmp_path / "cache"
    workdir = tmp_path / "run"
    assert run_main(workdir, books=books, cache=cache).returncode == 0
    for step in ("2", "4"):
        for root, _, files in os.walk(workdir / "checkpoints" / step):
            for name in files:
                open(os.path.join(root, name), "w").close()
    metrics = (workdir / "metrics.jsonl").read_bytes()
    result = run_main(workdir, books=books, cache=cache)
    assert_one_line_error(result, "could be restored", "corrupt_checkpoints")
    assert (workdir / "metrics.jsonl").read_bytes() == metrics  # the history is kept
    # Run again, it still does not start afresh over that history.
    result = run_main(workdir, books=books, cache=cache)
    assert_one_line_error(result, "no checkpoint", "delete corrupt_checkpoints/")
    assert (workdir / "metrics.jsonl").read_bytes() == metrics


def small_files_only(kib: int) -> tuple[str, ...]:
    """A command prefix under which writing past `kib` KiB into any file fails with an OS
    error (EFBIG), as on a full disk (Python ignores the SIGXFSZ that comes with it)."""
    return ("bash", "-c", f'ulimit -f {kib} && exec "$@"', "bash")


def test_a_save_that_cannot_be_written_keeps_the_previous_checkpoint(pretrained, tmp_path):
    books, cache, workdir = pretrained / "books", pretrained / "cache", tmp_path / "run"
    shutil.copytree(pretrained / "run", workdir)  # trained to step 4, checkpoints 2 and 4
    before = tree_bytes(workdir / "checkpoints")
    # Two more steps; the step-6 checkpoint's larger files cannot be written, the logs can.
    longer = "--config.train.num_steps=6"
    limited = small_files_only(24)
    result = run_main(workdir, longer, books=books, cache=cache, wrapper=limited)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-3000:]
    assert last.startswith("error: could not write a checkpoint"), last
    assert "File too large" in last and "checkpoint 4 is intact" in last, last
    after = tree_bytes(workdir / "checkpoints")
    assert {p: after[p] for p in before} == before  # checkpoints 2 and 4 untouched
    assert not (workdir / "checkpoints" / "6").exists()  # only a temporary leftover
    # With room again, the same command resumes from step 4 and finishes.
    result = run_main(workdir, longer, books=books, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint at step 4" in result.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_outside_the_loop_is_never_read_as_a_failure(sig):
    """Checkpoint reads and writes turn any Exception into "damaged" or "disk full"; a
    signal during them must stop the command instead (and leave the checkpoint alone)."""
    from gptjax import preemption
    from gptjax.errors import Preempted

    read_as_damage = []
    with (
        pytest.raises(Preempted, match=f"stopped by {sig.name}"),
        preemption.stop_outside_the_loop(),
    ):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs here
        except Exception as e:  # as checkpoint.restore_latest_good's handler
            read_as_damage.append(e)
    assert read_as_damage == []


def test_a_stop_that_lands_in_a_gc_callback_still_stops(capsys):
    """Python runs a signal handler wherever the main thread is; in a garbage-collection
    callback its exception is only printed as "ignored" and the work goes on (a CI run
    exited 0 after a SIGTERM so). The signal is kept: the loop's guard stops at its first
    step, and work that ends normally ends with the stop, without the "ignored" trace."""
    import gc

    from gptjax import preemption
    from gptjax.errors import Preempted

    def signal_in_gc(phase, info):
        if phase == "start":
            gc.callbacks.remove(signal_in_gc)
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = pytest.raises(Preempted, match="stopped by SIGTERM outside the training loop")
    with stopped, preemption.stop_outside_the_loop():
        gc.callbacks.append(signal_in_gc)
        gc.collect()  # the handler's exception is raised, and swallowed, in there
        with preemption.PreemptionGuard() as guard:
            assert guard.should_stop(1)  # the loop would stop after its first step
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not None and not preemption._pending


@pytest.mark.parametrize("stop_at", [2, 6])
def test_a_stop_during_an_evaluation_ends_it_at_once(books, tmp_path, monkeypatch, stop_at):
    """An evaluation can take minutes at BookCorpus scale, and a spot VM's notice is 30 s:
    a SIGTERM during one ends it at once, with the step's checkpoint saved (step 2 is not
    a checkpoint step, so it is saved on the way out; step 6 is the last), no step after
    it, and the evaluation made up by the resumed run."""
    from gptjax import loop
    from gptjax.errors import Preempted

    config = tiny_books_config(books, tmp_path / "cache")
    config.train.update(num_steps=6, ckpt_every=4, eval_every=2, log_every=4)
    workdir = str(tmp_path / "run")
    real, calls, finished = loop.evaluate, [], []

    def slow_evaluate(p_eval, params, batches, mesh):
        calls.append(2 * (len(calls) + 1))  # the step evaluated: 2, 4, 6
        if calls[-1] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # a long evaluation, which the signal must cut short
            finished.append(stop_at)
        return real(p_eval, params, batches, mesh)

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    with pytest.raises(Preempted, match=f"stopped by SIGTERM at step {stop_at}; checkpoint"):
        pretrain.train_and_evaluate(config, workdir)
    assert finished == []
    assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == stop_at
    # The steps up to the stop are logged (step 2 is no log step), none after it.
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r][-1] == stop_at
    assert max(r["step"] for r in read_metrics(workdir)) == stop_at
    assert not [r for r in read_metrics(workdir) if r["step"] == stop_at and "eval_ppl" in r]

    monkeypatch.setattr(loop, "evaluate", real)
    final = pretrain.train_and_evaluate(config, workdir)
    evaluated = [r["step"] for r in read_metrics(workdir) if "eval_ppl" in r]
    assert evaluated == [2, 4, 6] and final["eval_ppl"] > 0
