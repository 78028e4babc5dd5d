"""Zero-shot evaluation: the span log-probability equals a direct log-softmax of the model's
own forward pass (padding, truncation, ordinary vocabulary only), each heuristic picks what
a hand computation says, CoLA's threshold maximises training MCC, and `run` scores every
checkpoint of a pretraining run from user files, writing the table and the figure."""

import functools
import itertools
import json
import logging
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import main_in_process

from gptjax import generate, metrics, zeroshot, zeroshot_data
from gptjax.errors import UserError
from gptjax.model import GPT, ModelConfig
from gptjax.tasks.spec import Example, TaskSpec

from conftest import gpt1_config

VOCAB = 40  # ordinary ids; the model has 3 more rows, the fine-tuning specials
CFG = ModelConfig(
    vocab_size=VOCAB + 3, n_ctx=24, n_layer=2, n_head=2, d_model=32, d_mlp=64, dropout=0.0
)


class IdTokenizer:
    """Just what Scorer reads: text "3 4 5" is ids [3, 4, 5]."""

    vocab_size, eos_id = VOCAB, 2

    def encode_texts(self, texts):
        return [[int(t) for t in text.split()] for text in texts]


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens_BxL):
    return model.apply({"params": params}, tokens_BxL)


def direct_logprob(model, params, vocab_size, window, start, pad_to=0, all_rows=False):
    """Sum of log p(window[j] | window[:j]) for j >= start from one forward pass over
    `window` (right-padded to `pad_to` tokens when given), log-softmax over the first
    `vocab_size` logits (or over every row, specials included)."""
    tokens = list(window) + [0] * max(0, pad_to - len(window))
    logits = np.asarray(forward(model, params, jnp.asarray([tokens])))[0, : len(window)]
    logits = logits if all_rows else logits[:, :vocab_size]
    logp = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
    return sum(float(logp[j - 1, window[j]]) for j in range(start, len(window)))


def test_span_logprob_is_a_direct_log_softmax_with_padding_and_truncation():
    model = GPT(CFG)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    scorer = zeroshot.Scorer(model, params, IdTokenizer(), batch_size=2)
    prefixes = [
        [5, 6, 7],
        [1],
        list(range(3, 33)),  # 30 tokens + 3 > n_ctx: keeps its last 21
        [3],
        [1, 2],
        [9, 8, 7, 6],
    ]
    continuations = [[8, 9], [2, 3, 4, 5], [10, 11, 12], [], list(range(4, 34)), [1]]
    sums, counts = scorer.ids_logprob(prefixes, continuations)
    # By hand: the context keeps its end; a too-long continuation its first n_ctx - 1.
    windows = [
        ([5, 6, 7, 8, 9], 3),
        ([1, 2, 3, 4, 5], 1),
        (list(range(12, 33)) + [10, 11, 12], 21),
        ([3], 1),  # nothing to score: 0
        ([2, *range(4, 27)], 1),
        ([9, 8, 7, 6, 1], 4),
    ]
    assert counts.tolist() == [2, 4, 3, 0, 23, 1]
    expected = [
        direct_logprob(model, params, VOCAB, w, s) if s < len(w) else 0.0 for w, s in windows
    ]
    np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-4)
    # Normalising over the specials' rows too would give other numbers.
    with_specials = direct_logprob(model, params, VOCAB, *windows[1], all_rows=True)
    assert abs(with_specials - expected[1]) > 1e-3
    # Text: eos first, then the prefix's tokens and the continuation's.
    text_sums, text_counts = scorer.sequence_logprob(["5 6", ""], ["7 8", "4 5 6 7"])
    np.testing.assert_allclose(
        text_sums,
        [
            direct_logprob(model, params, VOCAB, w, s)
            for w, s in (([2, 5, 6, 7, 8], 3), ([2, 4, 5, 6, 7], 1))
        ],
        rtol=1e-5,
        atol=1e-4,
    )
    assert text_counts.tolist() == [2, 4]


def stub(table):
    """A LogProb from hand-set (sum, count) of each (prefix, continuation) it may be asked;
    any other query is a KeyError, so the heuristic's exact texts are checked too."""

    def logprob(prefixes, continuations):
        pairs = [table[pair] for pair in zip(prefixes, continuations, strict=True)]
        return np.array([s for s, _ in pairs], float), np.array([c for _, c in pairs])

    return logprob


def test_sst2_compares_the_whole_words_after_very():
    logprob = stub(
        {
            # "positive" is two tokens, average -2 (better) but probability e^-4 (worse).
            ("a gripping film very", "positive"): (-4.0, 2),
            ("a gripping film very", "negative"): (-3.0, 1),
            ("dull very", "positive"): (-1.0, 1),
            ("dull very", "negative"): (-2.0, 1),
        }
    )
    examples = [Example(("a gripping film ",), 1), Example(("dull",), 1)]
    assert zeroshot.sst2_predict(logprob, [ex.texts[0] for ex in examples]).tolist() == [0, 1]
    row = zeroshot.score_task("sst2", logprob, examples)
    assert row["metric"] == "accuracy" and row["value"] == pytest.approx(50.0)


def test_fit_threshold_maximises_training_mcc_by_hand():
    # Top 1 acceptable: MCC 3/sqrt(24) = .61; top 2: 1/6; top 3: 4/6 = .67 (best); top 4: .41.
    scores = np.array([-3.0, -1.0, -5.0, -2.0, -4.0])
    labels = np.array([1, 1, 0, 0, 0])
    assert zeroshot.fit_threshold(scores, labels) == pytest.approx(-3.5)
    assert zeroshot.fit_threshold(np.array([-1.0, -2.0, -3.0, -4.0]), np.array([1, 1, 0, 0])) == (
        pytest.approx(-2.5)
    )


def test_fit_threshold_takes_the_highest_of_equally_good_splits():
    # Top 1 and top 3 acceptable both have MCC 2/sqrt(12); the higher split wins.
    scores, labels = np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0])
    assert zeroshot.fit_threshold(scores, labels) == pytest.approx(2.5)
    # No split beats one class (MCC exactly 0: every sentence acceptable): the top score.
    assert zeroshot.fit_threshold(np.array([2.0, 1.0]), np.array([1, 1])) == 2.0


def test_fit_threshold_prefers_one_class_to_a_split_worse_than_none():
    # Scores that run against acceptability: every split between two scores has MCC < 0.
    scores = np.array([-1.0, -2.0, -3.0, -4.0, -5.0])
    labels = np.array([0, 0, 1, 0, 1])
    threshold = zeroshot.fit_threshold(scores, labels)
    from gptjax.tasks import metrics

    predictions = (scores > threshold).astype(int)
    assert predictions.tolist() == [0] * 5 and threshold == -1.0
    assert metrics.compute("mcc", predictions, labels)["mcc"] == 0.0


def test_fit_threshold_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # with ties
    labels = (scores + rng.normal(size=60) > 0).astype(int)
    threshold = zeroshot.fit_threshold(scores, labels)
    from gptjax.tasks import metrics

    def mcc(t):
        return metrics.compute("mcc", (scores > t).astype(int), labels)["mcc"]

    best = max(mcc(t) for t in np.unique(scores))
    assert mcc(threshold) == pytest.approx(best) and best > 0


def test_cola_thresholds_the_average_log_probability():
    fit = [
        Example((f"fit {i}",), label) for i, label in enumerate([1, 0, 1, 0, 0])
    ]  # averages -1 .. -5: threshold -3.5 (above)
    table = {("", f"fit {i}"): (-(i + 1) * 2.0, 2) for i in range(5)}
    evaluated = [Example(("s0",), 1), Example(("s1",), 0), Example(("s2",), 0), Example(("s3",), 0)]
    # Averages -3.0, -3.6 (a sum of -7.2 over 2 tokens), -1.0, -4.0: predictions 1, 0, 1, 0.
    table.update({("", "s0"): (-3.0, 1), ("", "s1"): (-7.2, 2), ("", "s2"): (-1.0, 1)})
    table[("", "s3")] = (-12.0, 3)
    row = zeroshot.score_task("cola", stub(table), evaluated, fit)
    assert row["threshold"] == pytest.approx(-3.5)
    # tp 1, fp 1, fn 0, tn 2: MCC = (1*2 - 1*0) / sqrt(2*1*3*2) = 0.577.
    assert row["metric"] == "mcc" and row["value"] == pytest.approx(100 / np.sqrt(3))
    # A score equal to the threshold is not above it: predicted unacceptable (tn 3).
    table[("", "s4")] = (-7.0, 2)
    row = zeroshot.score_task("cola", stub(table), [*evaluated, Example(("s4",), 0)], fit)
    assert row["value"] == pytest.approx(100 * 3 / np.sqrt(24))


def test_race_picks_the_highest_average_log_probability():
    logprob = stub(
        {
            ("Doc. Q?", "yes"): (-3.0, 3),  # average -1: best (though the lowest sum)
            ("Doc. Q?", "no"): (-1.5, 1),
            ("Doc. Q?", "maybe"): (-2.5, 2),
            ("Other. Q2?", "yes"): (-4.0, 1),
            ("Other. Q2?", "no"): (-3.0, 1),
            ("Other. Q2?", "maybe"): (-1.0, 2),  # average -0.5
        }
    )
    choices = ("yes", "no", "maybe")
    examples = [Example(("Doc. Q?",), 0, choices), Example(("Other. Q2?",), 1, choices)]
    predictions = zeroshot.choice_predict(logprob, ["Doc. Q?", "Other. Q2?"], [choices] * 2)
    assert predictions.tolist() == [0, 2]
    row = zeroshot.score_task("race", logprob, examples)
    assert (row["value"], row["chance"]) == (pytest.approx(50.0), pytest.approx(100 / 3))


def test_dprd_substitutes_each_candidate_and_scores_the_rest():
    trophy = "The trophy doesn't fit in the suitcase because _ is too big."
    call = "Paul tried to call George, but _ wasn't available."
    logprob = stub(
        {
            ("The trophy doesn't fit in the suitcase because the trophy", "is too big."): (-4, 4),
            ("The trophy doesn't fit in the suitcase because the suitcase", "is too big."): (-6, 4),
            ("Paul tried to call George, but Paul", "wasn't available."): (-9.0, 3),
            ("Paul tried to call George, but George", "wasn't available."): (-6.0, 3),
        }
    )
    candidates = [("the trophy", "the suitcase"), ("Paul", "George")]
    assert zeroshot.dprd_predict(logprob, [trophy, call], candidates).tolist() == [0, 1]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def task_files(directory):
    sentences = ["The king sees the queen.", "Horse the a river.", "One dog keeps a cat."]
    cola = [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences + ["Town the."])]
    race_context = "The old knight follows the young horse near the river. Who follows?"
    dprd = "The king loves the queen because _ is young."
    return {
        "sst2_path": write_jsonl(
            directory / "sst2.jsonl",
            [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences)],
        ),
        "cola_path": write_jsonl(directory / "cola.jsonl", cola[:3]),
        "cola_train_path": write_jsonl(directory / "cola_train.jsonl", cola),
        "race_path": write_jsonl(
            directory / "race.jsonl",
            [
                {
                    "context": race_context,
                    "choices": ["the knight", "the dog", "a cat"],
                    "label": 0,
                },
                {"context": "A dog sees a cat. What?", "choices": ["a cat", "a hill"], "label": 1},
            ],
        ),
        "dprd_path": write_jsonl(
            directory / "dprd.jsonl",
            [{"sentence": dprd, "candidates": ["the king", "the queen"], "label": 1}] * 2,
        ),
    }


def zeroshot_config(paths, **settings):
    config = gpt1_config()
    config.zeroshot.update({"tasks": "sst2,cola,race,dprd", "batch_size": 4, **paths, **settings})
    return config


def test_run_scores_every_checkpoint_and_draws_the_curve(pretrained, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained / "run", workdir)  # the fixture's run is never written to
    paths = task_files(tmp_path)
    rows = zeroshot.run(zeroshot_config(paths, all_checkpoints=True), str(workdir))

    written = json.loads((workdir / "zeroshot.json").read_text())
    assert written == rows
    tasks = ["sst2", "cola", "race", "dprd"]
    assert [(r["step"], r["task"]) for r in written] == list(itertools.product([2, 4], tasks))
    examples = {"sst2": 3, "cola": 3, "race": 2, "dprd": 2}
    chance = {"sst2": 50.0, "cola": 0.0, "race": 100 * (1 / 3 + 1 / 2) / 2, "dprd": 50.0}
    for row in written:
        assert row["metric"] == zeroshot.METRIC[row["task"]]
        assert row["examples"] == examples[row["task"]]
        assert row["chance"] == pytest.approx(chance[row["task"]])
        low = -100.0 if row["metric"] == "mcc" else 0.0
        assert low <= row["value"] <= 100.0
    assert (workdir / "zeroshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same numbers from a scorer written here: full forward passes, one text at a time.
    generator, tokenizer = generate.load(str(workdir), 4)
    model, params = generator.model, generator.params

    def reference(prefixes, continuations):
        sums, counts = [], []
        for prefix, continuation in zip(prefixes, continuations, strict=True):
            p = [tokenizer.eos_id, *tokenizer.encode_text(prefix)]
            c = tokenizer.encode_text(continuation)[: model.cfg.n_ctx - 1]
            window = (p + c)[-model.cfg.n_ctx :]
            start = len(window) - len(c)
            n_ctx = model.cfg.n_ctx  # padded: one compilation (padding is checked above)
            sums.append(direct_logprob(model, params, tokenizer.vocab_size, window, start, n_ctx))
            counts.append(len(c))
        return np.array(sums), np.array(counts)

    for name in tasks:
        data = zeroshot_data.load_examples(zeroshot_config(paths), name)
        expected = zeroshot.score_task(name, reference, *data)
        [row] = [r for r in written if r["step"] == 4 and r["task"] == name]
        assert row["value"] == pytest.approx(expected["value"]), name
        if name == "cola":
            assert row["threshold"] == pytest.approx(expected["threshold"], abs=1e-4)

    # A rerun scores nothing it scored before (a stopped run resumes) and keeps the rows of
    # the tasks it is not given; other data (here fewer examples) is scored again.
    scored = []
    real_score = zeroshot.score_task
    monkeypatch.setattr(
        zeroshot, "score_task", lambda name, *a: scored.append(name) or real_score(name, *a)
    )
    two = {k: v for k, v in paths.items() if k.startswith(("sst2", "race"))}
    config = zeroshot_config(two, tasks="sst2,race", all_checkpoints=True)
    assert zeroshot.run(config, str(workdir)) == written and not scored
    config.zeroshot.max_examples = 1
    rows = zeroshot.run(config, str(workdir))
    assert scored == ["sst2", "race"] * 2
    assert [(r["step"], r["task"]) for r in rows] == [
        (2, "cola"), (2, "dprd"), (2, "sst2"), (2, "race"),
        (4, "cola"), (4, "dprd"), (4, "sst2"), (4, "race"),
    ]  # fmt: skip
    assert all(r["examples"] == 1 for r in rows if r["task"] in ("sst2", "race"))
    assert json.loads((workdir / "zeroshot.json").read_text()) == rows


def test_a_checkpoint_removed_while_scoring_is_skipped(pretrained, tmp_path, monkeypatch, caplog):
    """A run still training removes its old checkpoints (`train.keep_checkpoints`)."""
    workdir = tmp_path / "run"
    shutil.copytree(pretrained / "run", workdir)
    listed = zeroshot.checkpoint.all_steps
    calls = []

    def all_steps(directory):  # the first listing also has a step 3, gone since
        calls.append(directory)
        return sorted(listed(directory) + ([3] if len(calls) == 1 else []))

    monkeypatch.setattr(zeroshot.checkpoint, "all_steps", all_steps)
    sst2 = {"sst2_path": task_files(tmp_path)["sst2_path"]}
    with caplog.at_level(logging.WARNING):
        rows = zeroshot.run(zeroshot_config(sst2, tasks="sst2", all_checkpoints=True), str(workdir))
    assert [r["step"] for r in rows] == [2, 4]
    assert "checkpoint 3 of" in caplog.text and "no longer there: skipped" in caplog.text


def test_long_scoring_says_how_far_it_is(pretrained, monkeypatch, caplog):
    """A progress line every 30 s (a fake clock: each reading 31 s on)."""
    generator, tokenizer = generate.load(str(pretrained / "run"))
    scorer = zeroshot.Scorer(generator.model, generator.params, tokenizer, batch_size=2)
    clock = [0.0]

    def time_now():
        clock[0] += 31.0
        return clock[0]

    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=time_now))
    with caplog.at_level(logging.INFO):
        scorer.sequence_logprob(["The king"] * 5, [" is here"] * 5)
    assert "scoring: 1 of 3 batches in " in caplog.text and ", ETA " in caplog.text
    assert "scoring: 3 of 3 batches" in caplog.text


def test_zeroshot_mode_scores_the_latest_checkpoint_by_default(pretrained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained / "run", workdir)
    sst2 = task_files(tmp_path)["sst2_path"]
    flags = ["--mode=zeroshot", "--config.zeroshot.tasks=sst2"]
    flags += [f"--config.zeroshot.sst2_path={sst2}", "--config.zeroshot.max_examples=2"]
    status, _ = main_in_process(workdir, *flags)
    assert status == 0
    rows = json.loads((workdir / "zeroshot.json").read_text())
    assert [(r["step"], r["task"], r["examples"]) for r in rows] == [(4, "sst2", 2)]


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"tasks": "sst2,mnli"}, ["mnli", "zeroshot.tasks"]),
        ({"tasks": "sst2,dprd", "dprd_path": ""}, ["dprd_path"]),
        ({"tasks": "sst2", "dprd_path": "x.jsonl"}, ["dprd", "zeroshot.tasks"]),
        ({"tasks": "sst2", "cola_train_path": "x.jsonl"}, ["cola_train_path", "tasks=sst2,cola"]),
        ({"tasks": "dprd", "dprd_path": "/no/such/dprd.jsonl"}, ["/no/such/dprd.jsonl"]),
        ({"tasks": "cola", "cola_train_path": ""}, ["cola_train_path"]),
        ({"tasks": "dprd", "dprd_path": "BAD"}, ["line 1", "'_'"]),
        ({"tasks": "sst2", "batch_size": 0}, ["batch_size"]),
    ],
)
def test_bad_settings_name_the_problem(tmp_path, settings, words):
    paths = task_files(tmp_path)
    bad = {"sentence": "No pronoun here.", "candidates": ["a", "b"], "label": 0}
    if settings.get("dprd_path") == "BAD":
        settings = {**settings, "dprd_path": write_jsonl(tmp_path / "bad.jsonl", [bad])}
    chosen = settings["tasks"].split(",")
    config = zeroshot_config(
        {k: v for k, v in paths.items() if k.split("_")[0] in chosen}, **settings
    )
    with pytest.raises(UserError) as error:
        zeroshot.run(config, str(tmp_path / "nothing"))
    for word in words:
        assert word in str(error.value)


def test_no_checkpoint_is_a_user_error_before_any_tfds_data_is_fetched(tmp_path, monkeypatch):
    """Local files are read first (their errors are settings errors), TFDS tasks only
    once a checkpoint is known to be there: their data can take minutes to fetch."""
    paths = task_files(tmp_path)
    config = zeroshot_config({"sst2_path": paths["sst2_path"]}, tasks="sst2,race")
    read = []
    monkeypatch.setattr(zeroshot, "load_examples", lambda _, name: read.append(name))
    with pytest.raises(UserError, match="no checkpoint"):
        zeroshot.run(config, str(tmp_path / "empty"))
    assert read == ["sst2"]
    assert not (tmp_path / "empty").exists()


def test_a_config_without_the_zeroshot_section_is_a_user_error(tmp_path):
    config = gpt1_config()
    del config["zeroshot"]
    with pytest.raises(UserError, match="the config has no zeroshot section"):
        zeroshot.run(config, str(tmp_path))


def test_tasks_without_files_come_from_the_registry(tmp_path, monkeypatch):
    """Validation split evaluated, CoLA's threshold fit on train, TFDS data in the cache."""
    calls = []

    def get_task(task_cfg):
        def load(split, data_dir):
            calls.append((task_cfg.name, split, data_dir))
            return [Example((f"{split} {i}",), i % 2) for i in range(10)]

        return TaskSpec(task_cfg.name, "classification", load, ("mcc",))

    monkeypatch.setattr(zeroshot_data.registry, "get_task", get_task)
    config = zeroshot_config({}, max_examples=4)
    config.data.cache_dir = str(tmp_path)
    evaluated, fit = zeroshot_data.load_examples(config, "cola")
    tfds_dir = str(tmp_path / "tfds")
    assert calls == [("cola", "validation", tfds_dir), ("cola", "train", tfds_dir)]
    assert len(evaluated) == len(fit) == 4
    assert {ex.texts[0].split()[0] for ex in evaluated} == {"validation"}
    assert zeroshot_data.load_examples(config, "cola") == (evaluated, fit)  # the same sample
