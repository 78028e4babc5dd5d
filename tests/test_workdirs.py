"""A run's workdir: what a resumed pretraining (or fine-tuning) run must keep of its config
and may change, the lock against a second training command, and the checks that it can
be written."""

import json
import logging
import os
import runpy

import pytest

from gptjax import workdirs
from gptjax.errors import UserError

from conftest import ROOT, tiny_config


def saved(config) -> dict:
    return json.loads(config.to_json_best_effort())  # as config.json holds it


def test_the_same_config_resumes_without_a_word(caplog):
    config = tiny_config()
    with caplog.at_level(logging.WARNING):
        workdirs.check_resumable("run", saved(config), config)
    assert not caplog.records


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("model.d_model", 64, "another model (model.d_model=32 there, 64 here)"),
        ("train.batch_size", 8, "train.batch_size=4 (the saved data position"),
        ("train.seed", 7, "train.seed=0 (the saved data position"),
        ("train.scan_layers", False, "train.scan_layers=True (another parameter layout"),
    ],
)
def test_what_a_resumed_run_must_keep(key, value, words):
    config = tiny_config()
    before = saved(config)
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match="resume") as error:
        workdirs.check_resumable("run", before, config)
    assert words in str(error.value)


def test_a_fine_tune_resumes_only_on_its_task():
    config = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("custom")
    before = saved(config)
    config.task.test_path = "test.jsonl"  # training never reads it
    workdirs.check_resumable("run", before, config)
    was, config.task.train_path = config.task.train_path, "other.jsonl"
    with pytest.raises(UserError, match=r"another task \(task.train_path=") as error:
        workdirs.check_resumable("run", before, config)
    assert f"task.train_path={was!r} there, 'other.jsonl' here" in str(error.value)
    config.task.train_path, config.task.kind = was, "entailment"
    with pytest.raises(UserError, match=r"its own task: the config and --config.task.\*"):
        workdirs.check_resumable("run", before, config, evaluating=True)

    # A run saved before task.positive_label existed resumes with it unset, not set.
    config = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("custom")
    older = saved(config)
    del older["task"]["positive_label"]
    workdirs.check_resumable("run", older, config)
    config.task.positive_label = "yes"  # it would swap the label ids
    with pytest.raises(UserError, match=r"task.positive_label=None there, .yes. here"):
        workdirs.check_resumable("run", older, config)


def test_a_changed_schedule_is_named_in_a_warning(caplog):
    config = tiny_config()
    before = saved(config)
    config.train.num_steps = 12
    config.train.schedule = "linear"
    config.train.weight_decay = 0.0
    with caplog.at_level(logging.WARNING):
        workdirs.check_resumable("run", before, config)
    [record] = caplog.records
    for change in ("train.num_steps 6 -> 12", "schedule cosine -> linear", "decay 0.01 -> 0.0"):
        assert change in record.getMessage()
    assert "schedule and optimiser are rebuilt" in record.getMessage()


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


def test_evaluating_a_checkpoint_checks_only_the_model_and_its_layout(caplog):
    """--mode=eval reads the parameters and trains nothing: another batch size, seed,
    schedule or dtype is free there (no error, no warning), another model or parameter
    layout is not."""
    config = tiny_config()
    before = saved(config)
    for key, value in [
        ("train.batch_size", 8),
        ("train.seed", 7),
        ("train.lr", 1.0),
        ("train.compute_dtype", "bfloat16"),
    ]:
        section, name = key.split(".")
        config[section][name] = value
    with caplog.at_level(logging.WARNING):
        workdirs.check_resumable("run", before, config, evaluating=True)
    assert not caplog.records
    with pytest.raises(UserError, match=r"resume with --config.train.batch_size=4"):
        workdirs.check_resumable("run", before, config)
    config.train.scan_layers = False
    with pytest.raises(UserError, match=r"evaluate with --config.train.scan_layers=True$"):
        workdirs.check_resumable("run", before, config, evaluating=True)
    config.model.d_model = 64
    with pytest.raises(UserError, match="another model .*evaluate it with its model's sizes"):
        workdirs.check_resumable("run", before, config, evaluating=True)


def test_a_fine_tune_resumes_from_what_it_started_from(tmp_path, monkeypatch):
    """Its record names the run it started from, the tokenizer and the adaptation: another
    would be recorded for a model that was not trained from it."""
    config = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("custom")
    (tmp_path / "runs" / "gpt1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config.init_from = "runs/gpt1"
    before = saved(config)
    for same in ("runs/gpt1/", str(tmp_path / "runs" / "gpt1"), "./runs/../runs/gpt1"):
        config.init_from = same  # the same run, written otherwise
        workdirs.check_resumable("run", before, config)
    for key, value in (("init_from", "runs/other"), ("finetune.tokenizer", "runs/other")):
        changed = config.copy_and_resolve_references()
        changed.init_from = "runs/gpt1"
        if key == "init_from":
            changed.init_from = value
        else:
            changed.finetune.tokenizer = value
        with pytest.raises(UserError, match=f"{key}=.* its record names.*--config.{key}="):
            workdirs.check_resumable("run", before, changed)
        workdirs.check_resumable("run", before, changed, evaluating=True)  # eval: the saved
    config.init_from, config.adapt.enabled = "runs/gpt1", True
    with pytest.raises(UserError, match="adapt.enabled=False .whether it ran domain adapt"):
        workdirs.check_resumable("run", before, config)


def test_a_fine_tune_and_a_pretraining_run_do_not_resume_each_other():
    pretraining = tiny_config()
    fine_tune = tiny_config()
    with fine_tune.unlocked():
        fine_tune.task = {"name": "custom", "kind": "classification", "train_path": "a.jsonl"}
        fine_tune.finetune = {"lm_coef": 0.5, "clf_dropout": 0.1, "n_transfer": None}
    # Also a fine-tuning config whose model sizes are not resolved yet (an evaluation's
    # come from the run): which kind of run it is comes first.
    unresolved = tiny_config()
    with unresolved.unlocked():
        unresolved.task, unresolved.finetune = fine_tune.task, fine_tune.finetune
        unresolved.model.update({k: None for k in workdirs.MODEL_SIZES})
    for evaluating in (False, True):
        with pytest.raises(UserError, match=r"holds a fine-tune \(task custom\), not a pre"):
            workdirs.check_resumable("run", saved(fine_tune), pretraining, evaluating)
        for config in (fine_tune, unresolved):
            with pytest.raises(UserError, match="holds a pretraining run, not a fine-tune"):
                workdirs.check_resumable("run", saved(pretraining), config, evaluating)
    # A fine-tune resumes with the objective it was trained with; evaluated, its files
    # may have moved, but not its task.
    before = saved(fine_tune)
    fine_tune.finetune.lm_coef = 0.0
    with pytest.raises(UserError, match=r"finetune.lm_coef=0.5 \(the objective it was"):
        workdirs.check_resumable("run", before, fine_tune)
    fine_tune.task.train_path = "moved/a.jsonl"
    workdirs.check_resumable("run", before, fine_tune, evaluating=True)
    # Its texts' order is part of the task (written with spaces or not); a converted
    # model's task is the conversion's template, whatever the files name its texts.
    pair = tiny_config()
    with pair.unlocked():
        pair.task = {**fine_tune.task, "kind": "entailment", "text_fields": "premise,hypothesis"}
        pair.finetune = fine_tune.finetune
    trained = saved(pair)
    pair.task.text_fields = "premise, hypothesis"
    workdirs.check_resumable("run", trained, pair, evaluating=True)
    pair.task.text_fields = "hypothesis,premise"
    with pytest.raises(UserError, match="task.text_fields='premise,hypothesis' there"):
        workdirs.check_resumable("run", trained, pair, evaluating=True)
    converted = {**trained, "converted_from": {"format": "huggingface", "source": "/x"}}
    workdirs.check_resumable("run", converted, pair, evaluating=True)
    fine_tune.task.kind = "entailment"
    with pytest.raises(
        UserError,
        match=r"task.kind='classification' there, 'entailment' here\); evaluate it with its own",
    ):
        workdirs.check_resumable("run", before, fine_tune, evaluating=True)


def test_changed_numerics_are_named_in_a_warning(caplog):
    """Micro-batches draw other dropout masks and bfloat16 rounds otherwise: a resumed
    run's steps then differ from those it would have taken, and it says so."""
    config = tiny_config()
    before = saved(config)
    config.train.microbatches = 2
    config.train.compute_dtype = "bfloat16"
    with caplog.at_level(logging.WARNING):
        workdirs.check_resumable("run", before, config)
    [record] = caplog.records
    message = record.getMessage()
    assert "train.microbatches 1 -> 2, train.compute_dtype float32 -> bfloat16" in message
    assert "other dropout masks" in message
    config.train.remat = "full"  # the same values, recomputed: no word about it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        workdirs.check_resumable("run", saved(config), config)
    assert not caplog.records


def test_a_converted_workdir_is_evaluated_not_resumed():
    """Converted weights have no optimiser state or data position: training there is
    refused (its restore would have read the missing state as damage); evaluating not."""
    config = tiny_config()
    converted = {**saved(config), "converted_from": {"format": "huggingface", "source": "/x"}}
    with pytest.raises(UserError, match=r"holds converted weights \(huggingface\), not a run"):
        workdirs.check_resumable("run", converted, config)
    workdirs.check_resumable("run", converted, config, evaluating=True)


def test_a_resume_without_config_json_says_it_cannot_check(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        workdirs.check_workdir(str(tmp_path), tiny_config(), resuming=True, evaluating=True)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        workdirs.check_workdir(str(tmp_path), tiny_config(), resuming=True)
    assert "config.json is missing, so this config cannot be checked" in caplog.text
