"""Fine-tuning: input transformations, the task head, the objective, weight transfer,
every TFDS task on mock data, and users' files end to end through the CLI."""

import dataclasses
import functools
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from cli import main_in_process
from tensorflow_datasets.core.data_sources import base as data_sources_base
from test_tfds_tasks import story_cloze_source, write_story_cloze

from gptjax import checkpoint, finetune, losses, results, train
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.metrics import read_metrics
from gptjax.model import GPT, ModelConfig, TaskModel, unstack_layers
from gptjax.tasks import transforms
from gptjax.tasks.spec import Example, TaskSpec
from gptjax.tasks.tfds_tasks import TFDS_TASKS

from conftest import ROOT, tree_bytes

# ----------------------------------------------------------------------------------------
# The transformations, with a tokenizer whose ids are easy to read.


class WordTokenizer:
    """Word i of a text -> id 10 + its number in the text ('w3' -> 13); vocab 100."""

    vocab_size, pad_id = 100, 1
    special_ids = {"_start_": 100, "_delimiter_": 101, "_classify_": 102}

    def encode_texts(self, texts):
        return [[10 + int(w[1:]) for w in t.split()] for t in texts]


S, D, E = 100, 101, 102
TOK = WordTokenizer()


def task(kind, **kw):
    return TaskSpec(name="t", kind=kind, load=None, metrics=("accuracy",), **kw)


def test_classification_and_entailment_layouts():
    out = transforms.encode(task("classification"), [Example(("w1 w2",), 1)], TOK, 8)
    assert out["tokens"].tolist() == [[[S, 11, 12, E]]]
    assert out["clf_pos"].tolist() == [[3]] and out["lengths"].tolist() == [[4]]
    out = transforms.encode(
        task("entailment"), [Example(("w1 w2", "w3"), 0), Example(("w4", "w5"), 2)], TOK, 8
    )
    pad = TOK.pad_id
    assert out["tokens"].tolist() == [[[S, 11, 12, D, 13, E]], [[S, 14, D, 15, E, pad]]]
    assert out["clf_pos"].tolist() == [[5], [4]]
    assert out["label"].tolist() == [0, 2] and out["weight"].tolist() == [1, 1]


def test_similarity_and_multiple_choice_layouts():
    out = transforms.encode(task("similarity"), [Example(("w1", "w2 w3"), 1)], TOK, 8)
    assert out["tokens"].tolist() == [[[S, 11, D, 12, 13, E], [S, 12, 13, D, 11, E]]]
    out = transforms.encode(
        task("multiple_choice"), [Example(("w1 w2",), 2, choices=("w3", "w4 w5", "w6"))], TOK, 8
    )
    assert out["tokens"].tolist() == [
        [[S, 11, 12, D, 13, E, 1], [S, 11, 12, D, 14, 15, E], [S, 11, 12, D, 16, E, 1]]
    ]
    assert out["clf_pos"].tolist() == [[5, 6, 5]] and out["label"].tolist() == [2]


def test_truncation_keeps_every_sequence_within_n_ctx():
    long = " ".join(f"w{i}" for i in range(20))
    out = transforms.encode(task("classification"), [Example((long,), 0)], TOK, 8)
    assert out["tokens"].tolist() == [[[S, 10, 11, 12, 13, 14, 15, E]]]  # its beginning
    # A long first part loses its beginning, a short second part is kept whole.
    out = transforms.encode(task("entailment"), [Example((long, "w1"), 0)], TOK, 8)
    assert out["tokens"].tolist() == [[[S, 26, 27, 28, 29, D, 11, E]]]
    # Both long: half each (n_ctx - 3 = 5 ids: 2 + 3), the second keeps its beginning.
    out = transforms.encode(task("entailment"), [Example((long, long), 0)], TOK, 8)
    assert out["tokens"].tolist() == [[[S, 28, 29, D, 10, 11, 12, E]]]
    assert transforms.fit_pair(list(range(9)), [], 5) == ([4, 5, 6, 7, 8], [])
    # Similarity's two orderings hold the same cut texts: A keeps its end in both.
    out = transforms.encode(task("similarity"), [Example((long, "w1 w2"), 0)], TOK, 8)
    assert out["tokens"].tolist() == [
        [[S, 27, 28, 29, D, 11, 12, E], [S, 11, 12, D, 27, 28, 29, E]]
    ]


def test_unlabelled_examples_are_marked():
    out = transforms.encode(task("classification"), [Example(("w1",), None, uid=7)], TOK, 8)
    assert out["labelled"].tolist() == [False] and out["label"].tolist() == [0]


# ----------------------------------------------------------------------------------------
# The head and the objective.

CFG = ModelConfig(vocab_size=103, n_ctx=8, n_layer=2, n_head=2, d_model=16, d_mlp=32, dropout=0.0)


def model_and_params(kind, num_outputs, regression=False, clf_dropout=0.1):
    model = TaskModel(
        CFG, kind=kind, num_outputs=num_outputs, regression=regression, clf_dropout=clf_dropout
    )
    s = {"similarity": 2, "multiple_choice": 3}.get(kind, 1)
    tokens = jnp.zeros((1, s, 8), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens, jnp.zeros((1, s), jnp.int32))["params"]
    params = nn.unbox(params)
    return model, params


def batch_of(kind, examples):
    arrays = transforms.encode(task(kind), examples, TOK, 8, length=8)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def test_head_reads_the_classify_position():
    model, params = model_and_params("classification", 3)
    batch = batch_of("classification", [Example(("w1 w2 w3",), 0)])
    out, _ = model.apply({"params": params}, batch["tokens"], batch["clf_pos"])
    after = batch["tokens"].at[0, 0, 5:].set(50)  # padding after _classify_ (position 4)
    out_after, _ = model.apply({"params": params}, after, batch["clf_pos"])
    np.testing.assert_array_equal(out, out_after)
    before = batch["tokens"].at[0, 0, 2].set(50)
    out_before, _ = model.apply({"params": params}, before, batch["clf_pos"])
    assert not np.allclose(out, out_before)
    # The head is exactly the linear map of the final hidden state at position 4.
    h = model.apply({"params": params}, batch["tokens"][:, 0], method=_encode)
    expected = h[0, 4] @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)


def _encode(module, tokens):
    return module.transformer.encode(tokens)


@pytest.mark.parametrize("regression", [False, True])
def test_similarity_is_symmetric(regression):
    model, params = model_and_params("similarity", 1 if regression else 2, regression)
    ab = batch_of("similarity", [Example(("w1 w2", "w3"), 0)])
    ba = batch_of("similarity", [Example(("w3", "w1 w2"), 0)])
    out_ab, _ = model.apply({"params": params}, ab["tokens"], ab["clf_pos"])
    out_ba, _ = model.apply({"params": params}, ba["tokens"], ba["clf_pos"])
    assert out_ab.shape == ((1,) if regression else (1, 2))
    np.testing.assert_allclose(out_ab, out_ba, rtol=1e-6)
    # The head reads the sum of both orderings' final states at their _classify_ tokens.
    h = model.apply({"params": params}, ab["tokens"][0], method=_encode)
    clf = np.asarray(ab["clf_pos"][0])
    summed = h[0, clf[0]] + h[1, clf[1]]
    expected = summed @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(out_ab[0], expected[0] if regression else expected, rtol=1e-5)


def head_inputs(model, params, batch, key=None):
    """What the classifier's dropout returns (the head's input): with `key`, in training."""
    _, state = model.apply(
        {"params": params},
        batch["tokens"],
        batch["clf_pos"],
        deterministic=key is None,
        rngs=None if key is None else {"dropout": key},
        capture_intermediates=lambda module, _: module.name == "dropout",
        mutable=["intermediates"],
    )
    (out,) = state["intermediates"]["dropout"]["__call__"]
    return np.asarray(out)


def test_classifier_dropout_shares_one_mask_over_an_examples_choices():
    model, params = model_and_params("multiple_choice", 1, clf_dropout=0.5)
    examples = [Example((f"w{i}",), 0, choices=("w2", "w3", "w4")) for i in range(8)]
    batch = batch_of("multiple_choice", examples)
    h_BxSxD = head_inputs(model, params, batch)  # no dropout: the final states
    dropped_BxSxD = head_inputs(model, params, batch, jax.random.PRNGKey(3))
    kept_BxSxD = dropped_BxSxD != 0
    np.testing.assert_allclose(dropped_BxSxD, np.where(kept_BxSxD, h_BxSxD / 0.5, 0), rtol=1e-6)
    assert (kept_BxSxD == kept_BxSxD[:, :1]).all()  # the same units over the choices
    assert len({m.tobytes() for m in kept_BxSxD[:, 0]}) == len(examples)  # one per example
    assert 0.3 < kept_BxSxD.mean() < 0.7


def test_multiple_choice_softmaxes_over_the_choices_of_one_example():
    model, params = model_and_params("multiple_choice", 1)
    examples = [
        Example(("w1",), 2, choices=("w2", "w3", "w4")),
        Example(("w5 w6",), 0, choices=("w7", "w8", "w9")),
    ]
    batch = batch_of("multiple_choice", examples)
    out, _ = model.apply({"params": params}, batch["tokens"], batch["clf_pos"])
    assert out.shape == (2, 3)
    objective = losses.task_objective(model, 0.0, regression=False)
    _, means = objective.loss(params, batch, None)
    by_hand = -np.mean(
        [jax.nn.log_softmax(out[0])[2], jax.nn.log_softmax(out[1])[0]]
    )  # each row's own choices
    np.testing.assert_allclose(means["task"], by_hand, rtol=1e-5)


def test_auxiliary_lm_loss_ignores_padding():
    model, params = model_and_params("entailment", 3)
    batch = batch_of("entailment", [Example(("w1 w2", "w3"), 0), Example(("w4", "w5"), 1)])
    objective = losses.task_objective(model, 0.5, regression=False)
    loss, means = objective.loss(params, batch, None)
    counts = objective.counts(batch)
    # The LM term counts sequences (each the mean of its own targets), the task examples.
    assert float(counts["lm"]) == 2.0 and float(counts["task"]) == 2.0
    assert float(loss) == pytest.approx(float(means["task"] + 0.5 * means["lm"]), rel=1e-6)
    padded = dict(batch, tokens=batch["tokens"].at[1, 0, 5:].set(77))  # after its length 5
    _, means_padded = objective.loss(params, padded, None)
    np.testing.assert_allclose(means["lm"], means_padded["lm"], rtol=1e-6)
    np.testing.assert_allclose(means["task"], means_padded["task"], rtol=1e-6)
    # A padding row (weight 0) counts for nothing.
    empty = dict(batch, weight=jnp.asarray([1.0, 0.0]))
    assert float(objective.counts(empty)["lm"]) == 1.0
    # Exactly the sequences, whatever their lengths (a sum of 1/length weights in float32
    # would be off by rounding, and differently on other device counts).
    words = [f"w{i % 9 + 1}" for i in range(60)]
    many = [Example((" ".join(words[:k]), "w3"), 0) for k in range(1, 60)]
    assert float(objective.counts(batch_of("entailment", many))["lm"]) == 59.0


def test_an_unlabelled_example_is_out_of_the_task_loss():
    """A row without a label (a test split's) adds nothing to the task term, whatever its
    label field holds; it still adds its text to the LM term."""
    model, params = model_and_params("entailment", 3)
    examples = [Example(("w1 w2", "w3"), 0), Example(("w4", "w5"), None)]
    batch = batch_of("entailment", examples)
    objective = losses.task_objective(model, 0.5, regression=False)
    assert float(objective.counts(batch)["task"]) == 1.0
    assert float(objective.counts(batch)["lm"]) == 2.0
    _, means = objective.loss(params, batch, None)
    for label in (1, 2):
        _, other = objective.loss(params, dict(batch, label=batch["label"].at[1].set(label)), None)
        np.testing.assert_array_equal(other["task"], means["task"])


def test_the_objectives_gradient_is_task_plus_half_lm_written_out():
    """d/dparams of L_task + 0.5 L_LM (Section 3.2) against the same loss written with
    log-softmax: the gradient must carry each term's weight and 1/count, not only its
    direction (Adam's scaling would hide a wrong balance in a loss curve)."""
    model, params = model_and_params("entailment", 3, clf_dropout=0.0)
    examples = [Example(("w1 w2 w3", "w4"), 0), Example(("w5", "w6 w7"), 2)]
    batch = batch_of("entailment", examples)
    objective = losses.task_objective(model, 0.5, regression=False)

    def written_out(params):
        out, lm_logits = model.apply({"params": params}, batch["tokens"], batch["clf_pos"])
        task = -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(2), batch["label"]])
        tokens = batch["tokens"].reshape(-1, 8)
        logp = jax.nn.log_softmax(lm_logits.astype(jnp.float32))
        per_sequence = []
        for n, length in enumerate(np.asarray(batch["lengths"]).reshape(-1)):
            picked = logp[n, jnp.arange(length - 1), tokens[n, 1:length]]
            per_sequence.append(-jnp.mean(picked))
        return task + 0.5 * jnp.mean(jnp.stack(per_sequence))

    got = jax.grad(lambda p: objective.loss(p, batch, None)[0])(params)
    want = jax.grad(written_out)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_predict_returns_each_example_once_without_the_padding_rows(monkeypatch):
    """5 examples in batches of 4: the last batch's 3 padding rows (weight 0, index 0,
    label 0) are neither outputs nor scored; the examples come back in their order, and
    a class is the output's argmax."""
    monkeypatch.setattr(finetune.sharding, "global_batch", lambda mesh, batch: batch)
    labels = [1, 0, 1, 1, 2]
    arrays = transforms.encode(
        task("classification"), [Example((f"w{i + 1}",), y) for i, y in enumerate(labels)], TOK, 8
    )
    order = [4, 0, 3, 1, 2]  # rows stored out of example order
    arrays = {k: v[order] for k, v in arrays.items()}

    def p_predict(params, batch):  # scores peaked on each row's own label
        out = np.eye(3)[batch["label"]] * 3.0 - 1.0
        return {"output": out, **{k: batch[k] for k in ("label", "weight", "labelled", "index")}}

    fake = types.SimpleNamespace(
        batch_size=4,
        config=types.SimpleNamespace(train=types.SimpleNamespace(microbatches=1)),
        p_predict=p_predict,
        mesh=None,
        task=types.SimpleNamespace(metrics=("accuracy", "mcc"), regression=False),
    )
    fake.predictions = types.MethodType(finetune.FineTune.predictions, fake)
    split = finetune.Split("validation", [], transforms.Rows(arrays), 8)
    out = finetune.FineTune.predict(fake, None, split)
    assert out["index"].tolist() == [0, 1, 2, 3, 4]
    assert out["label"].tolist() == labels
    assert fake.predictions(out["output"]).tolist() == labels
    assert finetune.FineTune.score(fake, out) == {"accuracy": 100.0, "mcc": 100.0}


def test_auxiliary_lm_loss_is_a_mean_over_sequences_of_their_mean_token_loss():
    """As in the paper's code: a long input weighs no more than a short one."""
    model, params = model_and_params("multiple_choice", 1)
    examples = [Example(("w1 w2 w3", "w4", "w5 w6"), 0), Example(("w7", "w8", "w9"), 1)]
    batch = batch_of("multiple_choice", examples)
    objective = losses.task_objective(model, 0.5, regression=False)
    _, means = objective.loss(params, batch, None)
    _, lm_logits = model.apply({"params": params}, batch["tokens"], batch["clf_pos"])
    tokens = np.asarray(batch["tokens"]).reshape(-1, 8)
    log_probs = np.asarray(jax.nn.log_softmax(lm_logits.astype(jnp.float32)))
    per_sequence = [
        -np.mean([log_probs[n, t, tokens[n, t + 1]] for t in range(length - 1)])
        for n, length in enumerate(np.asarray(batch["lengths"]).reshape(-1))
    ]
    assert len(set(np.asarray(batch["lengths"]).reshape(-1).tolist())) > 1  # lengths differ
    np.testing.assert_allclose(means["lm"], np.mean(per_sequence), rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Transfer from a pretraining run, and whole runs.


def finetune_config(pretrained, name="custom", **task):
    config = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"](name)
    config.init_from = str(pretrained / "run")
    config.data.cache_dir = str(pretrained / "cache")
    config.train.update(batch_size=4, num_steps=2, log_every=1)
    config.task.update(task)
    return config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def classification_files(tmp_path, n=8):
    rows = [{"text": f"the king is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(n)]
    return {
        "train_path": write_jsonl(tmp_path / "train.jsonl", rows),
        "eval_path": write_jsonl(tmp_path / "eval.jsonl", rows[:4]),
    }


@pytest.mark.parametrize("n_transfer", [None, 1])
def test_transfer_copies_exactly_the_pretrained_weights(pretrained, tmp_path, n_transfer):
    config = finetune_config(pretrained, **classification_files(tmp_path))
    config.finetune.n_transfer = n_transfer
    finetune.resolve_model(config)
    run = finetune.FineTune(config, str(tmp_path / "ft"))
    run.build(2)
    # Both runs use the default layout (train.scan_layers: stacked); compared per layer.
    fresh = unstack_layers(jax.device_get(run.state.params))
    params = jax.device_get(run.load_pretrained(run.state, str(pretrained / "run")).params)
    params = unstack_layers(params)
    lm = GPT(dataclasses.replace(run.model_cfg, vocab_size=96), scan_layers=True)
    shapes = lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(shapes))
    pre = unstack_layers(checkpoint.restore_params(str(pretrained / "run"), target))
    gpt = params["transformer"]
    np.testing.assert_array_equal(
        gpt["tokens_embed"]["embedding"][:96], pre["tokens_embed"]["embedding"]
    )
    # The specials' rows are the fresh N(0, 0.02) ones.
    specials = gpt["tokens_embed"]["embedding"][96:]
    np.testing.assert_array_equal(specials, fresh["transformer"]["tokens_embed"]["embedding"][96:])
    assert specials.shape == (3, 32) and 0.005 < specials.std() < 0.05
    np.testing.assert_array_equal(
        gpt["positions_embed"]["embedding"], pre["positions_embed"]["embedding"]
    )
    transferred = 2 if n_transfer is None else n_transfer
    for i in range(2):
        same = jax.tree.map(np.array_equal, gpt[f"h_{i}"], pre[f"h_{i}"])
        fresh_same = jax.tree.map(np.array_equal, gpt[f"h_{i}"], fresh["transformer"][f"h_{i}"])
        assert all(jax.tree.leaves(same if i < transferred else fresh_same)), i
    np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])


def test_a_second_run_on_a_task_reads_its_encoded_splits(pretrained, tmp_path, monkeypatch):
    config = finetune_config(pretrained, **classification_files(tmp_path))
    config.data.cache_dir = str(tmp_path / "cache")
    finetune.resolve_model(config)
    first = finetune.FineTune(config, str(tmp_path / "a")).split("train")
    assert list((tmp_path / "cache" / "encoded" / "custom").glob("train-*.npz"))

    def fail(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(transforms, "encode", fail)
    second = finetune.FineTune(config, str(tmp_path / "b")).split("train")
    assert first.examples == second.examples and first.length == second.length
    for name, array in first.rows.arrays.items():
        np.testing.assert_array_equal(second.rows.arrays[name], array)


FT = "configs/finetune.py:custom"


KIND_ROWS = {
    "classification": (
        {},
        [{"text": f"the king is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(8)],
    ),
    "entailment": (
        {"text_fields": "premise,hypothesis"},
        [{"premise": "a king", "hypothesis": "a queen", "label": "no"}] * 2
        + [{"premise": "a king", "hypothesis": "a king", "label": "yes"}] * 2,
    ),
    "similarity": (
        {"text_fields": "a,b", "regression": True},
        [{"a": "the dog", "b": "the cat", "label": 1.5}, {"a": "a hill", "b": "a hill", "label": 5}]
        * 2,
    ),
    "multiple_choice": (
        {"text_fields": "context", "choices_field": "choices"},
        [{"context": "the king sees", "choices": ["a dog", "a cat"], "label": 1}] * 4,
    ),
}


@pytest.mark.parametrize("kind", sorted(KIND_ROWS))
def test_custom_task_of_each_kind_end_to_end_through_the_cli(
    pretrained, tmp_path, monkeypatch, caplog, capsys, kind
):
    fields, rows = KIND_ROWS[kind]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    flags = [f"--config.init_from={pretrained / 'run'}", f"--config.task.kind={kind}"]
    flags += [f"--config.task.{k}_path={path}" for k in ("train", "eval")]
    flags += [f"--config.task.{k}={v}" for k, v in fields.items()]
    flags += ["--config.train.batch_size=4", "--config.train.num_steps=2"]
    workdir = tmp_path / "ft"
    status, _ = main_in_process(workdir, *flags, cache=pretrained / "cache", config=FT)
    assert status == 0
    report = json.loads((workdir / "results.json").read_text())
    metrics = report["results"][0]
    expected = {"pearson", "spearman"} if kind == "similarity" else {"accuracy"}
    assert set(metrics) - {"split"} == expected
    assert report["task"] == "custom"
    assert report["checkpoint_step"] in checkpoint.all_steps(str(workdir))
    assert f"| validation | {sorted(expected)[0]} |" in (workdir / "results.md").read_text()
    rows_logged = read_metrics(str(workdir))
    assert any("lm_loss" in r and "task_loss" in r for r in rows_logged)
    # --mode=eval restores the best checkpoint and reproduces its scores; with a test
    # file it also scores that and writes its predictions, row by row. It restores the
    # parameters into their layout, and initialises no train state first.
    (workdir / "results.json").unlink()
    monkeypatch.setattr(train, "create_state", refuse_to_initialise)
    cache = pretrained / "cache"
    test_flag = f"--config.task.test_path={path}"
    caplog.clear()
    status, _ = main_in_process(workdir, *flags, test_flag, "--mode=eval", cache=cache, config=FT)
    assert status == 0
    assert "learning rate 0" not in caplog.text  # (its step is built with 1 update)
    evaluated = json.loads((workdir / "results.json").read_text())["results"]
    assert evaluated[0] == report["results"][0] and evaluated[1]["split"] == "test"
    lines = (workdir / "predictions_test.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(len(rows))]
    values = [line.split("\t")[1] for line in lines[1:]]
    if kind == "similarity":  # a score
        assert all(np.isfinite(float(v)) for v in values)
    elif kind == "multiple_choice":  # the index of the chosen answer
        assert set(values) <= {"0", "1"}
    else:  # the label, as the file writes it
        assert set(values) <= {str(row["label"]) for row in rows}
    if kind != "classification":
        return
    # The run's own config.json says what it is: evaluated with an init_from that is gone
    # and another lm_coef, it scores the same and reports what it was trained from and
    # with; another task is refused.
    moved = [f"--config.init_from={tmp_path / 'gone'}", "--config.finetune.lm_coef=0"]
    status, _ = main_in_process(workdir, *flags, *moved, "--mode=eval", cache=cache, config=FT)
    assert status == 0
    again = json.loads((workdir / "results.json").read_text())
    assert (again["init_from"], again["lm_coef"]) == (str(pretrained / "run"), 0.5)
    assert again["finetune"]["lm_coef"] == 0.5 and "n_transfer" in again["finetune"]
    assert again["adapt"]["enabled"] is False
    assert again["results"][0] == report["results"][0]
    other = [*flags, "--config.task.kind=entailment", "--config.task.text_fields=text,text"]
    status, _ = main_in_process(workdir, *other, "--mode=eval", cache=cache, config=FT)
    assert status == 2
    # The same file read with another positive label has its classes in the other
    # order: scored as given, every label would be swapped. Refused, naming both.
    flipped = [*flags, "--config.task.positive_label=0"]
    capsys.readouterr()
    status, line = main_in_process(
        workdir, *flipped, "--mode=eval", cache=cache, config=FT, capsys=capsys
    )
    assert status == 2
    assert "trained on the classes ['0', '1']" in line and "has ['1', '0']" in line


def test_a_fine_tune_split_over_the_tensor_axis_equals_one_device(pretrained, tmp_path):
    """GPT-1's fine-tuning vocabulary (40,478 + 3 specials) is odd; here 96 + 3. The
    token embedding stays whole on each tensor-parallel device while the heads and the
    MLP are split, and the losses are one device's."""
    from cli import run_main

    flags = [f"--config.init_from={pretrained / 'run'}", "--config.task.kind=classification"]
    flags += [f"--config.task.{k}={v}" for k, v in classification_files(tmp_path).items()]
    flags += ["--config.train.batch_size=4", "--config.train.num_steps=3"]
    flags += ["--config.train.log_every=1", "--mode=train"]
    cache = pretrained / "cache"
    one = run_main(tmp_path / "one", *flags, cache=cache, config=FT)
    assert one.returncode == 0, one.stderr[-3000:]
    mesh = ["--config.mesh.data=1", "--config.mesh.tensor=2"]
    two = run_main(tmp_path / "two", *flags, *mesh, cache=cache, config=FT, devices=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "'tensor': 2" in two.stderr and "kept whole" in two.stderr

    def losses(workdir):
        keys = ("loss", "task_loss", "lm_loss")
        return [[r[k] for k in keys] for r in read_metrics(str(workdir)) if "loss" in r]

    assert len(losses(tmp_path / "one")) == 3
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def refuse_to_initialise(*args, **kwargs):
    raise AssertionError("an evaluation initialised a train state")


@pytest.fixture
def mock_reads(monkeypatch):
    # The mock's data source cannot read several records at once; read one at a time.
    monkeypatch.setattr(
        data_sources_base.BaseDataSource, "__getitems__", lambda self, ks: [self[k] for k in ks]
    )


@pytest.mark.parametrize("name", sorted(TFDS_TASKS))
def test_every_tfds_task_fine_tunes_on_mock_data(pretrained, tmp_path, mock_reads, name):
    config = finetune_config(pretrained, name)
    config.train.update(num_steps=1, batch_size=2)
    finetune.resolve_model(config)
    mock = {}
    if name == "story_cloze":  # a manual download; the generic mock cannot draw its labels
        write_story_cloze(pretrained / "cache" / "tfds")
        mock["as_data_source_fn"] = story_cloze_source
    workdir = tmp_path / "ft"
    predicted = []
    real_predict = finetune.FineTune.predict

    def predict(self, params, split):
        predicted.append(split.name)
        return real_predict(self, params, split)

    with (
        tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE, **mock),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr(finetune.FineTune, "predict", predict)
        report = finetune.train_and_evaluate(config, str(workdir))
        spec = TFDS_TASKS[name]
        assert [r["split"] for r in report["results"]] == list(spec.eval_splits)
        assert set(report["results"][0]) == {"split", *spec.metrics}
        if name in ("cola", "mnli", "race"):  # --mode=eval also writes the predictions
            results.evaluate_checkpoint(finetune.FineTune(config, str(workdir), read_only=True))
    if name == "race":  # both levels predicted, once each; the whole put together from them
        assert "validation" not in predicted and "validation_middle" in predicted
        scores = {r["split"]: r["accuracy"] for r in report["results"]}
        assert scores["validation"] == pytest.approx(
            (scores["validation_middle"] + scores["validation_high"]) / 2  # 4 questions each
        )
        lines = (workdir / "predictions_test.tsv").read_text().splitlines()[1:]
        assert len(lines) == 8 and all("/" in line.split("\t")[0] for line in lines)
    for split, filename in TFDS_TASKS[name].submission.items() if name in ("cola", "mnli") else ():
        lines = (workdir / filename).read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 5, (split, lines)
        predictions = {line.split("\t")[1] for line in lines[1:]}
        allowed = {"0", "1"} if name == "cola" else set(TFDS_TASKS[name].label_names)
        assert predictions <= allowed, predictions


@pytest.mark.parametrize(
    "rows,flags,words",
    [
        (
            [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}],
            [],
            ["'text'", "sentence"],
        ),
        ([], [], ["no examples"]),
        (None, [], ["'maybe'"]),
        (
            [
                {"c": "x", "ch": ["a", "b"], "label": 0},
                {"c": "y", "ch": ["a", "b", "c"], "label": 0},
            ],
            [
                "--config.task.kind=multiple_choice",
                "--config.task.text_fields=c",
                "--config.task.choices_field=ch",
            ],
            ["choices"],
        ),
        (
            [{"text": "a", "label": 0}, {"text": "b", "label": 1}],
            ["--config.model.n_layer=3"],
            ["another architecture", "n_layer=3"],
        ),
    ],
    ids=["missing-column", "empty-file", "unseen-eval-label", "ragged-choices", "architecture"],
)
def test_bad_task_inputs_are_one_line_errors(pretrained, tmp_path, capsys, rows, flags, words):
    train_rows = (
        rows if rows is not None else [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}]
    )
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    evals = (
        train
        if rows is not None
        else write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "maybe"}])
    )
    workdir = tmp_path / "ft"
    before = tree_bytes(pretrained / "run")
    status, last = main_in_process(
        workdir,
        f"--config.init_from={pretrained / 'run'}",
        f"--config.task.train_path={train}",
        f"--config.task.eval_path={evals}",
        *flags,
        config=FT,
        capsys=capsys,
    )
    assert status == 2 and last.startswith("error: "), last
    assert all(word in last for word in words), last
    assert not workdir.exists() or not list(workdir.iterdir())
    assert tree_bytes(pretrained / "run") == before  # the pretrained run is untouched


def test_a_start_that_fails_leaves_nothing_that_a_corrected_start_would_use(
    pretrained, tmp_path, capsys
):
    """init_from a run without a checkpoint: refused before anything is written. A
    tokenizer left in a workdir without a checkpoint is replaced by init_from's."""
    files = classification_files(tmp_path)
    task_flags = [f"--config.task.{k}={v}" for k, v in files.items()]
    empty_run = tmp_path / "no_checkpoint"
    empty_run.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (empty_run / name).write_bytes((pretrained / "run" / name).read_bytes())
    for adapting in (True, False):  # with domain adaptation first, too
        workdir = tmp_path / f"ft_{adapting}"
        adapt_flag = f"--config.adapt.enabled={adapting}"
        status, last = main_in_process(
            workdir,
            f"--config.init_from={empty_run}",
            adapt_flag,
            *task_flags,
            config=FT,
            capsys=capsys,
        )
        assert status == 2 and "no checkpoint" in last, last
        assert not workdir.exists() or not list(workdir.iterdir())
    # A stale tokenizer of the same size (another corpus) where a failed start left one.
    workdir.mkdir(exist_ok=True)
    letters = np.random.default_rng(0).choice(list("abcdefghijklmnopqrstuvwxyz"), (400, 60))
    texts = [" ".join("".join(row[i : i + 5]) for i in range(0, 60, 5)) for row in letters]
    tokenizer_lib.train_sentencepiece(texts, 96, 1000).save(str(workdir / "tokenizer.model"))
    status, _ = main_in_process(
        workdir,
        f"--config.init_from={pretrained / 'run'}",
        *task_flags,
        "--config.train.num_steps=1",
        config=FT,
    )
    assert status == 0
    ours = tokenizer_lib.load_dir(str(workdir)).digest
    assert ours == tokenizer_lib.load_dir(str(pretrained / "run")).digest


def test_domain_adaptation_trains_the_lm_on_the_task_texts_first(pretrained, tmp_path):
    config = finetune_config(pretrained, **classification_files(tmp_path))
    config.adapt.update(enabled=True, num_steps=2, lr=1e-2)
    finetune.resolve_model(config)
    workdir = tmp_path / "ft"
    finetune.train_and_evaluate(config, str(workdir))
    adapt_dir = str(workdir / "adapt")
    # The phase evaluates and checkpoints after each of its own epochs (the task's texts
    # make one batch of windows here), not at the fine-tuning epoch's interval.
    assert checkpoint.all_steps(adapt_dir) == [1, 2]
    assert [r["step"] for r in read_metrics(adapt_dir) if "eval_loss" in r] == [1, 2]
    assert finetune.FineTune(config, str(workdir), read_only=True).steps_per_epoch() > 1
    run = finetune.FineTune(config, str(tmp_path / "other"), read_only=True)
    adapted, original = run.restore_lm(adapt_dir), run.restore_lm(str(pretrained / "run"))
    kernel = ("h_0", "mlp", "c_fc", "kernel")
    a, o = adapted, original
    for k in kernel:
        a, o = a[k], o[k]
    assert not np.array_equal(a, o)  # the LM phase changed the weights the next one starts from
    # A rerun finds the phase complete and does not train it again.
    finetune.train_and_evaluate(config, str(workdir))
    assert checkpoint.all_steps(adapt_dir) == [1, 2]
    # Stopped during its last evaluation (its row not written, fine-tuning not started):
    # the rerun makes it up.
    shutil.rmtree(workdir / "checkpoints")
    metrics_file = workdir / "adapt" / "metrics.jsonl"
    rows = metrics_file.read_text().splitlines()
    kept = [r for r in rows if not (json.loads(r)["step"] == 2 and "eval_loss" in r)]
    metrics_file.write_text("\n".join(kept) + "\n")
    finetune.train_and_evaluate(config, str(workdir))
    assert [r["step"] for r in read_metrics(adapt_dir) if "eval_loss" in r] == [1, 2]
    assert checkpoint.all_steps(adapt_dir) == [1, 2]
    # A fine-tuned run (a GPT under "transformer", and a head) is named as such.
    with pytest.raises(UserError, match="another model's parameters .*a pretraining"):
        run.restore_lm(str(workdir))
    # The phase records its own steps and learning rate, and a resume of it is checked
    # against that record like any run's. (It resumes when fine-tuning has not started:
    # here its checkpoints are removed, and the phase is asked for 3 steps.)
    recorded = json.loads((workdir / "adapt" / "config.json").read_text())["train"]
    assert (recorded["num_steps"], recorded["lr"]) == (2, 1e-2)
    shutil.rmtree(workdir / "checkpoints")
    config.adapt.num_steps, config.train.seed = 3, config.train.seed + 1
    with pytest.raises(UserError, match=r"ft/adapt was trained with train.seed=0 \(the saved"):
        finetune.train_and_evaluate(config, str(workdir))
    assert checkpoint.all_steps(adapt_dir) == [1, 2]


def test_ablation_variants_and_side_by_side_table():
    from gptjax import ablate

    config = runpy.run_path(str(ROOT / "configs" / "demo_finetune.py"))["get_config"]()
    scratch = ablate.variant_config(config, "scratch")
    assert scratch.init_from == "" and scratch.finetune.tokenizer == "runs/demo"
    assert ablate.variant_config(config, "no_aux_lm").finetune.lm_coef == 0.0
    assert config.init_from == "runs/demo" and config.finetune.lm_coef == 0.5  # untouched
    reports = {
        "pretrained": {"results": [{"split": "validation", "accuracy": 91.25}]},
        "scratch": {"results": [{"split": "validation", "accuracy": 60.0}]},
    }
    assert ablate.table(reports).splitlines()[2] == "| validation | accuracy | 91.2 | 60.0 |"


def test_scores_of_a_partly_labelled_split_say_how_many_they_count(caplog):
    task = types.SimpleNamespace(metrics=("accuracy",), regression=False)
    run = types.SimpleNamespace(task=task)
    run.predictions = functools.partial(finetune.FineTune.predictions, run)
    out = {
        "labelled": np.array([1, 1, 0]),
        "output": np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]),
        "label": np.array([1, 0, 0]),
    }
    with caplog.at_level(logging.WARNING):
        assert finetune.FineTune.score(run, out) == {"accuracy": 100.0}
    assert "2 of 3 examples have a label" in caplog.text
    caplog.clear()
    out["labelled"][2] = 1
    with caplog.at_level(logging.WARNING):
        finetune.FineTune.score(run, out)
    assert not caplog.records


def test_a_fine_tune_resumes_exactly(pretrained, tmp_path):
    """Interrupted after its step-3 checkpoint and resumed, a fine-tune (its head, both
    losses, dropout and its own shuffled examples, 8 in batches of 4) logs exactly the
    losses of an uninterrupted one."""
    config = finetune_config(pretrained, **classification_files(tmp_path))
    config.train.update(num_steps=6, ckpt_every=3, eval_every=3, keep_checkpoints=3)
    finetune.resolve_model(config)
    straight = tmp_path / "straight"
    finetune.train_and_evaluate(config, str(straight))
    resumed = tmp_path / "resumed"
    finetune.train_and_evaluate(config, str(resumed))
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after the step-3 save
    finetune.train_and_evaluate(config, str(resumed))

    def losses(workdir):
        keys = ("step", "loss", "task_loss", "lm_loss")
        return [tuple(r[k] for k in keys) for r in read_metrics(str(workdir)) if "loss" in r]

    assert [row[0] for row in losses(resumed)] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == losses(straight)
    assert len({row[1] for row in losses(straight)}) == 6  # the steps differ: a real check


def test_domain_adaptation_resumes_exactly(pretrained, tmp_path):
    """Killed after its step-3 checkpoint (before fine-tuning started), the adaptation
    phase resumes there and logs exactly the uninterrupted phase's losses."""
    config = finetune_config(pretrained, **classification_files(tmp_path, n=24))
    config.adapt.update(enabled=True, num_steps=6, lr=1e-3)
    config.train.update(batch_size=1, num_steps=1, ckpt_every=3, eval_every=3, keep_checkpoints=3)
    finetune.resolve_model(config)
    straight = tmp_path / "straight"
    finetune.train_and_evaluate(config, str(straight))
    resumed = tmp_path / "resumed"
    finetune.train_and_evaluate(config, str(resumed))
    shutil.rmtree(resumed / "adapt" / "checkpoints" / "6")
    for name in ("checkpoints", "config.json", "metrics.jsonl", "tensorboard"):
        path = resumed / name  # fine-tuning had not started
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    finetune.train_and_evaluate(config, str(resumed))

    def losses(workdir):
        return [(r["step"], r["loss"]) for r in read_metrics(str(workdir / "adapt")) if "loss" in r]

    assert [step for step, _ in losses(resumed)] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == losses(straight)
    assert len({loss for _, loss in losses(straight)}) == 6


def test_ablate_refuses_a_variant_another_command_is_training(pretrained, tmp_path):
    """The ablation trains each variant as `gptjax.main` trains: under the workdir's lock
    (here held by this process, as a running command would), so two never collide."""
    from gptjax import workdirs

    files = classification_files(tmp_path)
    workdir = tmp_path / "ablation"
    command = [
        sys.executable,
        "-m",
        "gptjax.ablate",
        f"--config={FT}",
        f"--config.init_from={pretrained / 'run'}",
        f"--config.data.cache_dir={pretrained / 'cache'}",
        *(f"--config.task.{k}={v}" for k, v in files.items()),
        f"--workdir={workdir}",
        "--variants=pretrained",
    ]
    with workdirs.workdir_lock(str(workdir / "pretrained")):
        result = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "another gptjax command is training in" in result.stderr.strip().splitlines()[-1]
    assert not (workdir / "pretrained" / "checkpoints").exists()
    # A directory where its table goes: said before any training.
    (workdir / "ablation.md").mkdir()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: {workdir / 'ablation.md'} is a directory, where the ablation writes" + (
        "; move it away"
    )
    assert not (workdir / "pretrained" / "checkpoints").exists()
