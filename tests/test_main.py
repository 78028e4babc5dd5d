"""The command line end to end, in subprocesses (as a user runs it)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli import assert_one_line_error, error_in_process, main_in_process, run_main

from gptjax.metrics import read_metrics

from conftest import ROOT, write_books


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    books = write_books(root / "books")
    result = run_main(root / "run", books=books, cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_cli_trains_and_fills_the_workdir(trained):
    root, result = trained
    workdir = root / "run"
    assert (workdir / "tokenizer.model").exists()
    assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "4"
    assert any(
        p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir()
    )
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert eval_rows[-1]["eval_ppl"] == pytest.approx(np.exp(eval_rows[-1]["eval_loss"]))
    results = json.loads((workdir / "results.json").read_text())
    assert results["eval_ppl"] == pytest.approx(eval_rows[-1]["eval_ppl"])
    assert results["step"] == 4 and results["eval_batches"] is None  # the whole split
    assert results["corpus"].startswith("books: ") and "books, " in results["corpus"]
    # The one start-up summary.
    for pattern in (
        r"model: [\d,]+ parameters, [\d.]+ GFLOP per trained token",
        r"devices: 1 x cpu .* mesh \{'data': 1, 'fsdp': 1, 'tensor': 1\}",
        r"train \d+ books, [\d,]+ tokens, [\d,]+ windows",
        r"steps: 4 of 8 x 16",
    ):
        assert re.search(pattern, result.stderr), pattern


def test_cli_eval_mode_restores_the_latest_checkpoint(trained):
    root, _ = trained
    result = run_main(root / "run", "--mode=eval", books=root / "books", cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((root / "run" / "results.json").read_text())
    final = [r for r in read_metrics(root / "run") if "eval_ppl" in r][-1]
    assert results["step"] == 4
    assert results["eval_ppl"] == pytest.approx(final["eval_ppl"], rel=1e-5)
    # A command that names no books evaluates the run's own (as configs/gpt1.py on a
    # run of the demo corpus).
    result = run_main(root / "run", "--mode=eval", cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((root / "run" / "results.json").read_text())
    assert (again["eval_ppl"], again["corpus"]) == (results["eval_ppl"], results["corpus"])
    # An evaluation continues nothing: another seed or schedule is neither refused nor
    # warned about, and the score is the checkpoint's.
    result = run_main(
        root / "run",
        "--mode=eval",
        "--config.train.seed=7",
        "--config.train.lr=0.5",
        books=root / "books",
        cache=root / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resum" not in result.stderr
    again = json.loads((root / "run" / "results.json").read_text())
    assert again["eval_ppl"] == pytest.approx(results["eval_ppl"], rel=1e-6)


def test_rerun_of_a_finished_run_trains_nothing_more(trained):
    root, _ = trained
    before = read_metrics(root / "run")
    result = run_main(root / "run", books=root / "books", cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint at step 4" in result.stderr
    assert [r for r in read_metrics(root / "run") if "loss" in r] == [
        r for r in before if "loss" in r
    ]


def test_eight_devices_give_the_same_losses_as_one(trained, tmp_path):
    root, _ = trained
    eight = run_main(tmp_path / "eight", books=root / "books", cache=root / "cache", devices=8)
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert "'data': 8" in eight.stderr
    one = [r["loss"] for r in read_metrics(root / "run") if "loss" in r]
    many = [r["loss"] for r in read_metrics(tmp_path / "eight") if "loss" in r]
    np.testing.assert_allclose(many, one, rtol=2e-5)


def test_missing_corpus(tmp_path, capsys):
    error_in_process(
        capsys,
        tmp_path / "run",
        books=tmp_path / "nowhere",
        cache=tmp_path / "cache",
        words=["nowhere", "--config.data.books"],
    )


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    books, cache = tmp_path / "empty", tmp_path / "cache"
    error_in_process(capsys, tmp_path / "run", books=books, cache=cache, words=["empty"])


def test_non_utf8_book(tmp_path, capsys):
    books = write_books(tmp_path / "books")
    (books / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    words = ["latin1.txt", "--config.data.encoding"]
    error_in_process(capsys, tmp_path / "run", books=books, cache=tmp_path / "cache", words=words)


def test_corpus_shorter_than_a_window(tmp_path, capsys):
    books = write_books(tmp_path / "books", num_books=2, words_per_book=300)
    error_in_process(
        capsys,
        tmp_path / "run",
        "--config.model.n_ctx=512",
        books=books,
        cache=tmp_path / "cache",
        words=["fewer than one window", "n_ctx"],
    )


def test_unknown_override(tmp_path, capsys):
    words = ["--config.train.nonsense", "no such config key"]
    error_in_process(capsys, tmp_path / "run", "--config.train.nonsense=3", words=words)


def test_misspelled_override_names_the_flag_and_the_likely_key(tmp_path, capsys):
    last = error_in_process(capsys, tmp_path / "run", "--config.trian.batch_size=4")
    assert last.startswith("error: --config.trian.batch_size: no such config key 'trian'"), last
    assert 'Did you mean "train"' in last and "\\" not in last, last


@pytest.mark.parametrize(
    "source, words",
    [
        ("def get_config(:\n", ["SyntaxError", "line 1"]),
        ("def get_config():\n    raise RuntimeError('boom')\n", ["RuntimeError: boom"]),
        ("X = 1\n", ["defines no get_config()"]),
        ("def get_config():\n    return {'model': {}}\n", ["a dict, not an ml_collections"]),
    ],
)
def test_a_config_file_that_does_not_load(tmp_path, source, words):
    (tmp_path / "bad.py").write_text(source)
    result = run_main(tmp_path / "run", config=str(tmp_path / "bad.py"))
    loading = [] if "return {" in source else ["could not load the config"]
    assert_one_line_error(result, *loading, *words, workdir=tmp_path / "run")


def test_wrongly_typed_override(tmp_path, capsys):
    words = ["batch_size", "many"]
    error_in_process(capsys, tmp_path / "run", "--config.train.batch_size=many", words=words)


def test_missing_config_file(tmp_path, capsys):
    error_in_process(capsys, tmp_path / "run", "--config=configs/nope.py", words=["nope.py"])


def test_inconsistent_config(tmp_path, capsys):
    error_in_process(capsys, tmp_path / "run", "--config.model.n_head=3", words=["model.n_head"])


def test_a_tilde_in_the_workdir_and_config_paths_means_home(trained):
    # `--workdir=~/run` reaches the program unexpanded (the shell expands ~ only at a
    # word's start); it names the home directory, not a directory called "~".
    root, _ = trained
    result = run_main(
        "~/run",
        "--mode=eval",
        books="~/books",
        cache=root / "cache",
        wrapper=("env", f"HOME={root}"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (ROOT / "~").exists()
    assert json.loads((root / "run" / "results.json").read_text())["eval_ppl"] > 0


@pytest.mark.parametrize("flag", ["--workdir", "--config.data.cache_dir", "--config.data.books"])
def test_a_url_for_a_path_is_one_line_not_a_local_directory(flag, tmp_path, capsys):
    """`--workdir=gs://bucket/run` made a directory `gs:` in the current one."""
    url = "gs://bucket/run"
    workdir = url if flag == "--workdir" else tmp_path / "run"
    flags = [] if flag == "--workdir" else [f"{flag}={url}"]
    error_in_process(capsys, workdir, *flags, words=[f"{flag}={url} is a URL"], fresh=False)
    assert not os.path.exists("gs:") and list(tmp_path.iterdir()) == []


def test_other_model_in_workdir_is_refused(trained, tmp_path):
    root, _ = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(copy)], check=True)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    result = run_main(copy, "--config.model.d_model=64", books=root / "books", cache=root / "cache")
    assert_one_line_error(result, "another model")
    after = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before  # nothing touched


def test_an_evaluation_takes_the_runs_own_model(trained, tmp_path):
    """A run of any size (a converted release too) is evaluated with configs/gpt1.py's
    flags: the model and its layout come from the run's config.json, not the command."""
    root, _ = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(copy)], check=True)
    other = [
        "--config.model.d_model=64",
        "--config.model.n_layer=3",
        "--config.train.scan_layers=False",
    ]
    result = run_main(copy, "--mode=eval", *other, books=root / "books", cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in read_metrics(copy) if "eval_ppl" in r][-1]
    evaluated = json.loads((copy / "results.json").read_text())
    assert evaluated["eval_ppl"] == pytest.approx(final["eval_ppl"], rel=1e-5)


def test_an_evaluation_initialises_no_train_state(trained, monkeypatch):
    """--mode=eval restores the parameters into their layout: no fresh parameters and
    Adam moments are made first (1.4 GB at gpt1's size)."""
    from gptjax import train

    root, _ = trained

    def refuse(*args, **kwargs):
        raise AssertionError("an evaluation initialised a train state")

    monkeypatch.setattr(train, "create_state", refuse)
    status, _ = main_in_process(
        root / "run", "--mode=eval", books=root / "books", cache=root / "cache"
    )
    assert status == 0
    final = [r for r in read_metrics(root / "run") if "eval_ppl" in r][-1]
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["eval_ppl"] == pytest.approx(final["eval_ppl"], rel=1e-5)


def test_a_refused_shape_is_not_recorded_when_the_config_file_is_gone(trained, tmp_path):
    """Without config.json (its error message offers deleting it), a resume is checked
    only against the checkpoint: a config of another shape is refused there, and must
    not be written as the run's config, or the right config would be refused next."""
    root, _ = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(copy)], check=True)
    (copy / "config.json").unlink()
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    flags = dict(books=root / "books", cache=root / "cache")
    result = run_main(copy, "--config.model.d_mlp=96", **flags)
    assert_one_line_error(result, "another shape", "resume with the config it was written with")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    result = run_main(copy, **flags)  # the run's own config still resumes
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((copy / "config.json").read_text())["model"]["d_mlp"] != 96


def test_eval_of_a_damaged_checkpoint_ends_in_one_line(trained, tmp_path):
    root, _ = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(copy)], check=True)
    latest = max((copy / "checkpoints").iterdir(), key=lambda p: int(p.name))
    biggest = max((latest / "params").rglob("*"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated
    result = run_main(copy, "--mode=eval", books=root / "books", cache=root / "cache")
    assert_one_line_error(result, f"checkpoint {latest.name}", "is unreadable")
    assert "Task exception was never retrieved" not in result.stderr


def test_another_batch_size_in_workdir_is_refused(trained, tmp_path):
    root, _ = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(copy)], check=True)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    result = run_main(
        copy, "--config.train.batch_size=4", books=root / "books", cache=root / "cache"
    )
    assert_one_line_error(result, "train.batch_size=8", "data position")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_other_parameter_layout_in_workdir_is_refused(trained, tmp_path):
    root, _ = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(root / "run"), str(copy)], check=True)
    result = run_main(
        copy, "--config.train.scan_layers=False", books=root / "books", cache=root / "cache"
    )
    assert_one_line_error(result, "train.scan_layers=True")


@pytest.mark.parametrize("module", ["gptjax.main", "gptjax.ablate"])
def test_help_lists_the_flags(module):
    """Asked for, the help is printed and the command succeeds (absl exits 1)."""
    for flag in ("--helpfull", "--help"):
        result = subprocess.run(
            [sys.executable, "-m", module, flag],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (flag, result.stderr[-2000:])
        assert "--workdir" in result.stdout and "--config" in result.stdout


def test_bfloat16_run_tracks_the_float32_run(trained, tmp_path):
    root, _ = trained
    result = run_main(
        tmp_path / "bf16",
        "--config.train.compute_dtype=bfloat16",
        books=root / "books",
        cache=root / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    f32 = [r["loss"] for r in read_metrics(root / "run") if "loss" in r]
    bf16 = [r["loss"] for r in read_metrics(tmp_path / "bf16") if "loss" in r]
    np.testing.assert_allclose(bf16, f32, rtol=0.02)
    assert bf16 != f32  # bfloat16 really was used


def test_every_command_ends_alike_on_bad_input_and_on_a_signal(tmp_path):
    from gptjax.errors import EXIT_PREEMPTED, Preempted, UserError, reported

    with pytest.raises(SystemExit) as stop, reported():
        raise Preempted(3, "SIGTERM")
    assert stop.value.code == EXIT_PREEMPTED == 75
    with pytest.raises(SystemExit) as stop, reported():
        raise UserError("bad")
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop, reported():  # as XLA reports it
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 61803911478020 bytes.")
    assert stop.value.code == 2
    with pytest.raises(ZeroDivisionError), reported():  # a bug keeps its traceback
        raise ZeroDivisionError
    # gptjax.ablate as gptjax.main: a config file that is not there is one line.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptjax.ablate",
            "--config=configs/nope.py",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, "could not load the config", "nope.py")
    # An empty --workdir is refused, not the current directory trained in.
    demo_finetune = "configs/demo_finetune.py"
    result = subprocess.run(
        [sys.executable, "-m", "gptjax.ablate", f"--config={ROOT / demo_finetune}", "--workdir="],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, "--workdir is empty")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_an_evaluation_ends_with_status_75(tmp_path, monkeypatch, sig, caplog):
    """Every mode, not only training, ends on a Ctrl-C or SIGTERM with one line and the
    requeue status (a KeyboardInterrupt traceback, or a silent 143, before)."""
    from gptjax import pretrain

    def interrupted(config, workdir):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal was not handled")

    def unhandled(signum, frame):  # what the test sees if gptjax installs no handler
        raise AssertionError(f"{signal.Signals(signum).name} reached the default handler")

    monkeypatch.setattr(pretrain, "evaluate_checkpoint", interrupted)
    previous = signal.signal(sig, unhandled)
    try:
        status, _ = main_in_process(tmp_path, "--mode=eval", config="configs/demo.py")
    finally:
        signal.signal(sig, previous)
    assert status == 75
    assert f"stopped by {sig.name} outside the training loop" in caplog.text
