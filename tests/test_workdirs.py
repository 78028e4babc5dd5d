"""A run's workdir: what a resumed pretraining (or fine-tuning) run must keep of its config
and may change, the lock against a second training command, and the checks that it can
be written."""

import logging
import os

import pytest

from gptjax import workdirs
from gptjax.errors import UserError

from conftest import tiny_config


def test_an_unreadable_saved_config_is_a_user_error(tmp_path):
    (tmp_path / workdirs.CONFIG_FILE).write_text('{"model": {"vocab')
    with pytest.raises(UserError, match="config.json is unreadable"):
        workdirs.check_workdir(str(tmp_path), tiny_config(), resuming=True)


def test_a_workdir_that_is_a_file_is_named_so(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(UserError, match="run is a file, not a directory"):
        workdirs.check_workdir(str(tmp_path / "run"), tiny_config(), resuming=False)
    assert (tmp_path / "run").read_text() == "a file"


def test_a_second_training_command_on_a_workdir_is_refused(tmp_path):
    """The lock is the directory's: a second holder (another process, or another open
    of it here) is refused while the first holds it, and nothing is written into it."""
    workdir = str(tmp_path / "run")
    with workdirs.workdir_lock(workdir):
        with (
            pytest.raises(UserError, match="another gptjax command is training in"),
            workdirs.workdir_lock(workdir),
        ):
            pass
        assert os.listdir(workdir) == []
    with workdirs.workdir_lock(workdir):  # released with the first
        pass


def test_a_command_that_fails_leaves_no_directory_it_made(tmp_path, capsys):
    """A bad mesh is found after the lock made the workdir: the failed command removes
    the directories it made (here two levels), and nothing that was there before."""
    from cli import error_in_process

    workdir = tmp_path / "new" / "run"
    error_in_process(capsys, workdir, "--config.mesh.data=3", words=["needs 3 devices"])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    error_in_process(capsys, tmp_path / "kept", "--config.mesh.data=3")
    assert (tmp_path / "kept").is_dir()
    with pytest.raises(RuntimeError), workdirs.workdir_lock(str(workdir)):
        (workdir / "written").write_text("a file")
        raise RuntimeError
    assert (workdir / "written").read_text() == "a file"


def test_a_failed_command_removes_no_directory_another_one_holds(tmp_path, monkeypatch):
    """Two commands started together on a new workdir both find it missing: the one
    refused must not remove the other's. And a command on sweep/run1, which made
    sweep, leaves sweep when another command holds it as its workdir."""
    new = tmp_path / "new"
    with workdirs.workdir_lock(str(new)):
        monkeypatch.setattr(workdirs, "_first_missing", lambda path: str(new))  # (the race)
        with (
            pytest.raises(UserError, match="another gptjax command"),
            workdirs.workdir_lock(str(new)),
        ):
            pass
        monkeypatch.undo()
        assert new.is_dir()
    sweep = tmp_path / "sweep"
    first = workdirs.workdir_lock(str(sweep / "run1"))
    first.__enter__()
    second = workdirs.workdir_lock(str(sweep))
    second.__enter__()
    first.__exit__(RuntimeError, RuntimeError(), None)  # the first command fails
    assert sweep.is_dir() and not (sweep / "run1").exists()
    second.__exit__(None, None, None)


@pytest.mark.parametrize("mode", ["eval", "zeroshot", "estimate"])
def test_a_read_only_workdir_is_refused_before_the_work(mode, capsys):
    """These modes write their results into the workdir at the end: an unwritable one
    (here /proc, which root cannot write either) is named before anything runs."""
    from cli import main_in_process

    status, last = main_in_process("/proc", f"--mode={mode}", capsys=capsys)
    assert status == 2 and "workdir /proc is not writable" in last, last


@pytest.mark.parametrize("mode", ["eval", "zeroshot", "estimate", "train"])
@pytest.mark.parametrize("below", [False, True])
def test_a_workdir_that_is_a_file_is_refused_before_the_work(mode, below, tmp_path, capsys):
    """A file (or a path under one) as the workdir of a mode that writes its results at
    the end is named at the start, the file untouched."""
    from cli import main_in_process

    (tmp_path / "afile").write_text("mine")
    workdir = tmp_path / "afile" / "sub" if below else tmp_path / "afile"
    status, last = main_in_process(workdir, f"--mode={mode}", capsys=capsys)
    words = "afile, a file; pick another" if below else "afile is a file, not a directory"
    assert status == 2 and last.startswith("error: ") and words in last, last
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize(
    "name, make",
    [
        ("checkpoints", "file"),
        ("results.json", "dir"),
        ("metrics.jsonl", "dir"),
        ("data", "file"),
        ("results.md", "dir"),
        ("zeroshot.json", "dir"),
        ("zeroshot.png", "dir"),
        ("estimate.json", "dir"),
    ],
)
def test_something_in_the_way_in_a_workdir_is_named_before_the_work(tmp_path, name, make):
    """A file where the run keeps a directory, or the reverse, failed at the first save
    (after ckpt_every steps) or after training; it is named at the start, untouched."""
    path = tmp_path / name
    if make == "dir":
        path.mkdir()
    else:
        path.write_text("mine")
    with pytest.raises(UserError, match=f"{name} is a (file|directory), where the run keeps"):
        workdirs.check_workdir(str(tmp_path), tiny_config(), resuming=False)
    assert path.is_dir() if make == "dir" else path.read_text() == "mine"


def test_a_directory_where_a_command_writes_a_file_is_one_line(tmp_path, capsys):
    """Files named after the task (a fine-tune's predictions) cannot all be checked
    first: a directory in their way ends the command with one line, not a traceback."""
    from gptjax.atomic import replacing
    from gptjax.errors import reported

    (tmp_path / "predictions_test.tsv").mkdir()
    path = str(tmp_path / "predictions_test.tsv")
    with pytest.raises(SystemExit) as stop, reported(), replacing(path) as f:
        f.write("index\tprediction\n")
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {tmp_path / 'predictions_test.tsv'}: Is a directory; move")
    with pytest.raises(ZeroDivisionError), reported():  # a bug keeps its traceback
        raise ZeroDivisionError


def test_an_empty_workdir_is_refused_except_by_estimate(capsys):
    from cli import main_in_process

    status, last = main_in_process("", capsys=capsys)
    assert (
        status == 2
        and last == "error: --workdir is empty: give the run's directory (e.g. runs/NAME)"
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("estimate.accelerator=nope", "estimate.accelerator='nope' is unknown"),
        ("estimate.tokens_per_epoch=0", "estimate.tokens_per_epoch=0: give the corpus's"),
        ("estimate.tokens_per_epoch=-5", "estimate.tokens_per_epoch=-5: give the corpus's"),
    ],
)
def test_a_refused_estimate_makes_no_workdir(tmp_path, capsys, flag, message):
    from cli import main_in_process

    flags = ["--mode=estimate", f"--config.{flag}"]
    status, last = main_in_process(tmp_path / "new", *flags, capsys=capsys)
    assert status == 2 and message in last, last
    assert not (tmp_path / "new").exists()


def test_a_resume_without_config_json_says_it_cannot_check(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        workdirs.check_workdir(str(tmp_path), tiny_config(), resuming=True, evaluating=True)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        workdirs.check_workdir(str(tmp_path), tiny_config(), resuming=True)
    assert "config.json is missing, so this config cannot be checked" in caplog.text
