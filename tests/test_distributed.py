"""A real multi-process run on this CPU: two processes, one device each, train together
through JAX's distributed runtime (gloo collectives), as hosts of a TPU slice would."""

import json
import os
import socket

import pytest
from cli import assert_one_line_error, error_in_process, run_main, start_main

from gptjax.metrics import read_metrics

from conftest import write_books

FT = "configs/finetune.py:custom"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(workdir, *flags, **kw):
    """Two processes of one run (the CLI with `flags`), met through a local coordinator."""
    port = free_port()
    join = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [start_main(workdir, *join, f"--process_id={i}", *flags, **kw) for i in range(2)]


def finish(procs) -> list[tuple[str, str]]:
    """Waits for the processes; each must succeed. Their (stdout, stderr)."""
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.mark.slow
def test_two_processes_train_like_one_and_one_restores_their_checkpoint(tmp_path):
    books, cache = write_books(tmp_path / "books"), tmp_path / "cache"
    single = run_main(tmp_path / "one", books=books, cache=cache)
    assert single.returncode == 0, single.stderr[-3000:]

    # FSDP across the processes: each holds, and checkpoints, half of every array.
    fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=2"]
    outputs = finish(start_two(tmp_path / "two", *fsdp, books=books, cache=cache))
    assert "process 0 of 2" in outputs[0][1] and "process 1 of 2" in outputs[1][1]
    assert "'fsdp': 2" in outputs[0][1]  # one mesh over both processes' devices

    one = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "one") if "loss" in r]
    two = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert [s for s, _ in two] == [s for s, _ in one]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=2e-5)

    # The checkpoint both processes wrote restores in a single process.
    result = run_main(tmp_path / "two", "--mode=eval", books=books, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = json.loads((tmp_path / "two" / "results.json").read_text())
    final = [r for r in read_metrics(tmp_path / "two") if "eval_ppl" in r][-1]
    assert restored["step"] == 4
    assert restored["eval_ppl"] == pytest.approx(final["eval_ppl"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_fine_tune_like_one(pretrained, tmp_path):
    """Fine-tuning as on a TPU slice's hosts: each process reads its half of every batch
    (data parallel over both); the losses and the scores (process 0 writes them) equal one
    process's."""
    rows = [
        {"text": f"the king is {'good' if i % 3 else 'bad'}", "label": i % 2} for i in range(12)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    flags = [
        f"--config.init_from={pretrained / 'run'}",
        f"--config.task.train_path={path}",
        f"--config.task.eval_path={path}",
        "--config.train.batch_size=4",
        "--config.train.num_steps=3",
        "--config.train.log_every=1",
    ]
    cache = pretrained / "cache"
    single = run_main(tmp_path / "one", *flags, cache=cache, config=FT)
    assert single.returncode == 0, single.stderr[-3000:]

    outputs = finish(start_two(tmp_path / "two", *flags, cache=cache, config=FT))
    assert "on 2 process(es); mesh {'data': 2" in outputs[0][1]  # one mesh over both

    def losses(workdir):
        return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2, 3]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=2e-5)
    scores = [json.loads((tmp_path / w / "results.json").read_text()) for w in ("one", "two")]
    assert scores[1]["results"] == scores[0]["results"]


def test_bad_process_flags_are_one_line_errors(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    error_in_process(capsys, workdir, "--num_processes=2", words=["--coordinator_address"])
    flags = ["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"]
    error_in_process(capsys, workdir, *flags, words=["--process_id=2"])
    error_in_process(capsys, workdir, "--num_processes=0", words=["--num_processes=0", "1 or more"])
    flags = ["--num_processes=2", "--coordinator_address=nohost"]  # JAX: an IndexError
    error_in_process(capsys, workdir, *flags, words=["=nohost must be HOST:PORT"])
    # Forgotten --num_processes: each host would train alone.
    flags = ["--coordinator_address=127.0.0.1:1234"]
    error_in_process(capsys, workdir, *flags, words=["without --num_processes"])
    # Process 0 not there: one line once the wait is over, not JAX's abort 300 s later.
    monkeypatch.setenv("GPTJAX_JOIN_TIMEOUT_S", "1")
    flags = [
        "--num_processes=2",
        "--process_id=1",
        f"--coordinator_address=127.0.0.1:{free_port()}",
    ]
    error_in_process(capsys, workdir, *flags, words=["process 0 did not answer", "within 1 s"])
    # A join the environment asked for, outside the cluster it is meant for.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    error_in_process(capsys, workdir, words=["(SLURM_NTASKS=2)", "srun"])


def test_a_process_that_never_joins_is_one_line_for_those_waiting(tmp_path, monkeypatch):
    """Process 0 of two, alone: JAX waits for the other to register, then aborts the
    process with a C++ stack trace (exit 134) 300 s later; instead one line once
    GPTJAX_JOIN_TIMEOUT_S is over, the workdir untouched."""
    monkeypatch.setenv("GPTJAX_JOIN_TIMEOUT_S", "3")
    join = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
    result = run_main(tmp_path / "run", *join, "--process_id=0")
    last = assert_one_line_error(
        result, "not all 2 processes joined", "within 3 s", workdir=tmp_path / "run"
    )
    assert "--process_id" in last and "Check failure" not in result.stderr


@pytest.mark.slow
def test_a_preemption_notice_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to one worker is what a TPU VM gets before maintenance: JAX's preemption
    service tells every process, and all stop at one step, checkpoint it and exit 75."""
    import os
    import signal
    import time

    books, cache, workdir = write_books(tmp_path / "books"), tmp_path / "cache", tmp_path / "run"
    long_run = ["--config.train.num_steps=100000", "--config.train.ckpt_every=100000"]
    procs = start_two(workdir, *long_run, books=books, cache=cache)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        rows = read_metrics(workdir) if (workdir / "metrics.jsonl").exists() else []
        if len([r for r in rows if "loss" in r]) >= 3:
            break
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # the worker, not the coordinator
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], [err[-2000:] for _, err in outputs]
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints"))
    assert len(steps) == 1 and steps[0] >= 3
    for _, err in outputs:
        assert f"at step {steps[0]}; checkpoint saved" in err, err[-2000:]


@pytest.mark.slow
def test_a_workdir_in_use_stops_every_process_not_just_process_0(tmp_path):
    """Process 0 takes the lock for all; the others learn its answer instead of waiting
    for it in their first collective."""
    import fcntl
    import os

    workdir = tmp_path / "run"
    workdir.mkdir()
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another command training there
    try:
        procs = start_two(workdir, books=tmp_path / "books", cache=tmp_path / "cache")
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        os.close(fd)
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error: another gptjax command")
    assert os.listdir(workdir) == []


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_workdir_not_shared_by_the_processes_stops_them_before_any_work(
    mode, tmp_path, monkeypatch
):
    """Hosts that each train in a directory of their own disk would leave checkpoints the
    run cannot resume from (and evaluations would read different runs). Two processes given
    different directories stand for that. The books do not exist: the check comes first."""
    monkeypatch.setenv("GPTJAX_SHARED_WAIT_S", "1")  # how long a process looks (60 s)
    (tmp_path / "host0").mkdir()  # (training makes it; evaluation reads a run there)
    port = free_port()
    join = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--mode={mode}"]
    books, cache = tmp_path / "books", tmp_path / "cache"
    procs = [
        start_main(tmp_path / f"host{i}", *join, f"--process_id={i}", books=books, cache=cache)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: workdir {tmp_path / f'host{i}'} is not shared"), last
        assert "process(es) 1 do not see" in last, last
    assert os.listdir(tmp_path / "host0") == []  # the check's file is gone again
    assert not (tmp_path / "host1").exists()
