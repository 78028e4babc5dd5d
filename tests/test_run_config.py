"""A run's saved config: what a resume (or an evaluation) must keep of it, and what it
may change with a warning."""

import json
import logging
import runpy

import pytest

from gptjax import run_config
from gptjax.errors import UserError

from conftest import ROOT, tiny_config


def saved(config) -> dict:
    return json.loads(config.to_json_best_effort())  # as config.json holds it


def test_the_same_config_resumes_without_a_word(caplog):
    config = tiny_config()
    with caplog.at_level(logging.WARNING):
        run_config.check_resumable("run", saved(config), config)
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
        run_config.check_resumable("run", before, config)
    assert words in str(error.value)


def test_a_fine_tune_resumes_only_on_its_task():
    config = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("custom")
    before = saved(config)
    config.task.test_path = "test.jsonl"  # training never reads it
    run_config.check_resumable("run", before, config)
    was, config.task.train_path = config.task.train_path, "other.jsonl"
    with pytest.raises(UserError, match=r"another task \(task.train_path=") as error:
        run_config.check_resumable("run", before, config)
    assert f"task.train_path={was!r} there, 'other.jsonl' here" in str(error.value)
    config.task.train_path, config.task.kind = was, "entailment"
    with pytest.raises(UserError, match=r"its own task: the config and --config.task.\*"):
        run_config.check_resumable("run", before, config, evaluating=True)

    # A run saved before task.positive_label existed resumes with it unset, not set.
    config = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("custom")
    older = saved(config)
    del older["task"]["positive_label"]
    run_config.check_resumable("run", older, config)
    config.task.positive_label = "yes"  # it would swap the label ids
    with pytest.raises(UserError, match=r"task.positive_label=None there, .yes. here"):
        run_config.check_resumable("run", older, config)


def test_a_changed_schedule_is_named_in_a_warning(caplog):
    config = tiny_config()
    before = saved(config)
    config.train.num_steps = 12
    config.train.schedule = "linear"
    config.train.weight_decay = 0.0
    with caplog.at_level(logging.WARNING):
        run_config.check_resumable("run", before, config)
    [record] = caplog.records
    for change in ("train.num_steps 6 -> 12", "schedule cosine -> linear", "decay 0.01 -> 0.0"):
        assert change in record.getMessage()
    assert "schedule and optimiser are rebuilt" in record.getMessage()


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
        run_config.check_resumable("run", before, config, evaluating=True)
    assert not caplog.records
    with pytest.raises(UserError, match=r"resume with --config.train.batch_size=4"):
        run_config.check_resumable("run", before, config)
    config.train.scan_layers = False
    with pytest.raises(UserError, match=r"evaluate with --config.train.scan_layers=True$"):
        run_config.check_resumable("run", before, config, evaluating=True)
    config.model.d_model = 64
    with pytest.raises(UserError, match="another model .*evaluate it with its model's sizes"):
        run_config.check_resumable("run", before, config, evaluating=True)


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
        run_config.check_resumable("run", before, config)
    for key, value in (("init_from", "runs/other"), ("finetune.tokenizer", "runs/other")):
        changed = config.copy_and_resolve_references()
        changed.init_from = "runs/gpt1"
        if key == "init_from":
            changed.init_from = value
        else:
            changed.finetune.tokenizer = value
        with pytest.raises(UserError, match=f"{key}=.* its record names.*--config.{key}="):
            run_config.check_resumable("run", before, changed)
        run_config.check_resumable("run", before, changed, evaluating=True)  # eval: the saved
    config.init_from, config.adapt.enabled = "runs/gpt1", True
    with pytest.raises(UserError, match="adapt.enabled=False .whether it ran domain adapt"):
        run_config.check_resumable("run", before, config)


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
        unresolved.model.update({k: None for k in run_config.MODEL_SIZES})
    for evaluating in (False, True):
        with pytest.raises(UserError, match=r"holds a fine-tune \(task custom\), not a pre"):
            run_config.check_resumable("run", saved(fine_tune), pretraining, evaluating)
        for config in (fine_tune, unresolved):
            with pytest.raises(UserError, match="holds a pretraining run, not a fine-tune"):
                run_config.check_resumable("run", saved(pretraining), config, evaluating)
    # A fine-tune resumes with the objective it was trained with; evaluated, its files
    # may have moved, but not its task.
    before = saved(fine_tune)
    fine_tune.finetune.lm_coef = 0.0
    with pytest.raises(UserError, match=r"finetune.lm_coef=0.5 \(the objective it was"):
        run_config.check_resumable("run", before, fine_tune)
    fine_tune.task.train_path = "moved/a.jsonl"
    run_config.check_resumable("run", before, fine_tune, evaluating=True)
    # Its texts' order is part of the task (written with spaces or not); a converted
    # model's task is the conversion's template, whatever the files name its texts.
    pair = tiny_config()
    with pair.unlocked():
        pair.task = {**fine_tune.task, "kind": "entailment", "text_fields": "premise,hypothesis"}
        pair.finetune = fine_tune.finetune
    trained = saved(pair)
    pair.task.text_fields = "premise, hypothesis"
    run_config.check_resumable("run", trained, pair, evaluating=True)
    pair.task.text_fields = "hypothesis,premise"
    with pytest.raises(UserError, match="task.text_fields='premise,hypothesis' there"):
        run_config.check_resumable("run", trained, pair, evaluating=True)
    converted = {**trained, "converted_from": {"format": "huggingface", "source": "/x"}}
    run_config.check_resumable("run", converted, pair, evaluating=True)
    fine_tune.task.kind = "entailment"
    with pytest.raises(
        UserError,
        match=r"task.kind='classification' there, 'entailment' here\); evaluate it with its own",
    ):
        run_config.check_resumable("run", before, fine_tune, evaluating=True)


def test_changed_numerics_are_named_in_a_warning(caplog):
    """Micro-batches draw other dropout masks and bfloat16 rounds otherwise: a resumed
    run's steps then differ from those it would have taken, and it says so."""
    config = tiny_config()
    before = saved(config)
    config.train.microbatches = 2
    config.train.compute_dtype = "bfloat16"
    with caplog.at_level(logging.WARNING):
        run_config.check_resumable("run", before, config)
    [record] = caplog.records
    message = record.getMessage()
    assert "train.microbatches 1 -> 2, train.compute_dtype float32 -> bfloat16" in message
    assert "other dropout masks" in message
    config.train.remat = "full"  # the same values, recomputed: no word about it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_config.check_resumable("run", saved(config), config)
    assert not caplog.records


def test_a_converted_workdir_is_evaluated_not_resumed():
    """Converted weights have no optimiser state or data position: training there is
    refused (its restore would have read the missing state as damage); evaluating not."""
    config = tiny_config()
    converted = {**saved(config), "converted_from": {"format": "huggingface", "source": "/x"}}
    with pytest.raises(UserError, match=r"holds converted weights \(huggingface\), not a run"):
        run_config.check_resumable("run", converted, config)
    run_config.check_resumable("run", converted, config, evaluating=True)
