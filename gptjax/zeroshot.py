"""Zero-shot behaviour of a pretrained LM: the paper's Section 5 heuristics and Figure 2 (right).

    python -m gptjax.main --config=configs/gpt1.py --workdir=runs/gpt1 --mode=zeroshot \
        --config.zeroshot.all_checkpoints=True

GPT-1 asks why generative pretraining helps by solving tasks with the language model
alone, with no fine-tuning, and tracking the result over pretraining updates:

* SST-2: append "very" to the sentence; predict the label word, "positive" or "negative",
  that the LM finds more likely next. Accuracy.
* CoLA: the sentence's average token log-probability, thresholded. Matthews correlation.
* RACE: the answer with the highest average token log-probability given the article and
  question. Accuracy.
* DPRD (Winograd schemas): substitute each candidate for the pronoun; the substitution
  under which the rest of the sentence (only the words after the pronoun: Trinh & Le's
  2018 "partial scoring") is more likely wins. Accuracy.

Everything rests on one number, `Scorer.sequence_logprob`: the log-probability of a
continuation after a prefix, and its token count. Choices the paper leaves open:

* Texts: the prefix and the continuation are encoded separately and concatenated, so the
  continuation starts a new word. Every sequence starts with the tokenizer's
  end-of-document id (SentencePiece's </s>; GPT-1's BPE has none and uses its line
  break), so a text's first token is predicted too, as at the start of a pretraining book.
* Truncation to n_ctx: the prefix loses its beginning (RACE keeps the end of the article,
  next to the question); a continuation longer than n_ctx - 1 tokens keeps its first
  n_ctx - 1 (the prefix then keeps its last token).
* Log-probabilities are over the ordinary vocabulary (the first `tokenizer.vocab_size`
  logits), never the fine-tuning specials. An empty continuation averages to -inf.
* CoLA's threshold is chosen per checkpoint on labelled *training* sentences (TFDS's
  train split, or `cola_train_path`), as the one maximising their MCC (`fit_threshold`;
  one class for every sentence, MCC 0, is a candidate); the evaluated sentences never
  choose it.
* `max_examples` keeps a fixed random sample (seed 0) of each split, in its order.

Tasks come from the fine-tuning task registry (TFDS) or from your JSON-lines files: see
`zeroshot_data`. DPRD is not in TFDS and needs its file.

Writes WORKDIR/zeroshot.json (one row per checkpoint and task: step, task, metric, value
in percent, examples, chance, CoLA's threshold, and the data it was scored on; a rerun
adds what the file lacks) and WORKDIR/zeroshot.png, the curve
of each task against pretraining updates, normalised as (value - chance) / (100 - chance):
0 is random guessing and 1 a perfect score (the paper normalises between random guessing
and the 2018 state of the art instead).
"""

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import checkpoint, generate, losses
from gptjax.atomic import replacing
from gptjax.errors import UserError
from gptjax.metrics import Progress
from gptjax.model import GPT
from gptjax.tasks import metrics as task_metrics
from gptjax.tasks.spec import Example
from gptjax.workdirs import ZEROSHOT_FILE, ZEROSHOT_PLOT
from gptjax.zeroshot_data import MARKER, load_examples, task_names

METRIC = {"sst2": "accuracy", "cola": "mcc", "race": "accuracy", "dprd": "accuracy"}
# The paper's SST-2 heuristic: "very", then the two label words (label 0, label 1).
SST2_CUE = "very"
SST2_WORDS = ("negative", "positive")
RESULTS_FILE, PLOT_FILE = ZEROSHOT_FILE, ZEROSHOT_PLOT
# Sequences are padded to a power of two of at least this many tokens (at most n_ctx):
# a handful of compiled shapes serves every length.
_MIN_BUCKET = 16

# (prefixes, continuations) -> (sum of log-probabilities, token count), one per pair.
LogProb = Callable[[Sequence[str], Sequence[str]], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------
# The scoring core.


@functools.partial(jax.jit, static_argnums=(0, 1))
def span_logprob(model: GPT, vocab_size: int, params, tokens_BxL, start_B, end_B):
    """Per row, the sum of log p(token_j | tokens before j) over start <= j < end, and the
    number of those tokens. Log-softmax over the first `vocab_size` logits only. Rows
    are right-padded; a causal model's predictions before `end` ignore the padding."""
    logits_BxTxV = model.apply({"params": params}, tokens_BxL)[:, :-1, :vocab_size]
    next_BxT = tokens_BxL[:, 1:]  # T = L - 1 predicted tokens, at positions 1 .. L-1
    logp_BxT = -losses.token_cross_entropy(logits_BxTxV.astype(jnp.float32), next_BxT)
    pos_T = jnp.arange(1, tokens_BxL.shape[1])
    in_span_BxT = (pos_T >= start_B[:, None]) & (pos_T < end_B[:, None])
    return jnp.where(in_span_BxT, logp_BxT, 0.0).sum(-1), in_span_BxT.sum(-1)


def _bucket(length: int, n_ctx: int) -> int:
    size = _MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, n_ctx)


class Scorer:
    """Log-probabilities of continuations under one GPT's parameters."""

    def __init__(self, model: GPT, params, tokenizer, batch_size: int):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = batch_size
        self.vocab_size = tokenizer.vocab_size  # the ordinary vocabulary: no specials

    def sequence_logprob(
        self, prefixes: Sequence[str], continuations: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per pair, log p(continuation | eos + prefix) summed over the continuation's
        tokens, and their number (texts encoded as the module docstring says)."""
        eos = self.tokenizer.eos_id
        prefix_ids = [[eos, *ids] for ids in self.tokenizer.encode_texts(list(prefixes))]
        return self.ids_logprob(prefix_ids, self.tokenizer.encode_texts(list(continuations)))

    def ids_logprob(
        self, prefixes: Sequence[list[int]], continuations: Sequence[list[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """`sequence_logprob` of token ids; each prefix needs at least one token."""
        n_ctx = self.model.cfg.n_ctx
        rows, starts = [], []
        for prefix, continuation in zip(prefixes, continuations, strict=True):
            if not prefix:
                raise ValueError("every prefix needs a token to predict the continuation from")
            continuation = list(continuation[: n_ctx - 1])
            prefix = list(prefix[max(0, len(prefix) - (n_ctx - len(continuation))) :])
            rows.append(prefix + continuation)
            starts.append(len(prefix))
        # Similar lengths share a batch; batches are padded to batch_size rows.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pending = []
        for first in range(0, len(order), self.batch_size):
            indices = order[first : first + self.batch_size]
            length = _bucket(max(len(rows[i]) for i in indices), n_ctx)
            tokens = np.zeros((self.batch_size, length), np.int32)
            start = np.zeros(self.batch_size, np.int32)
            end = np.zeros(self.batch_size, np.int32)
            for r, i in enumerate(indices):
                tokens[r, : len(rows[i])] = rows[i]
                start[r], end[r] = starts[i], len(rows[i])
            out = span_logprob(self.model, self.vocab_size, self.params, tokens, start, end)
            pending.append((indices, out))
        sums, counts = np.zeros(len(rows)), np.zeros(len(rows), np.int64)
        progress = Progress("scoring", len(pending))  # minutes a task at GPT-1's size
        for done, (indices, (sum_B, count_B)) in enumerate(pending, 1):  # dispatched: read
            sums[indices] = np.asarray(sum_B)[: len(indices)]
            counts[indices] = np.asarray(count_B)[: len(indices)]
            if progress.due():
                progress.log(done)
        return sums, counts


def average(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Average token log-probabilities; -inf where there is no token."""
    return np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)


# ----------------------------------------------------------------------------------------
# The heuristics (Section 5, "Zero-shot Behaviors"). Each takes a `LogProb`.


def sst2_predict(logprob: LogProb, sentences: Sequence[str]) -> np.ndarray:
    """SST-2 (Section 5): append "very" to each sentence and restrict the LM's next-word
    distribution to "positive" and "negative"; the likelier word is the prediction. A
    word's probability is that of all its tokens (log-probabilities summed), so the two
    compare fairly whatever their token counts. Labels: 1 positive, 0 negative."""
    prefixes = [f"{s.strip()} {SST2_CUE}" for s in sentences]
    n = len(prefixes)
    sums, _ = logprob(prefixes * 2, [SST2_WORDS[0]] * n + [SST2_WORDS[1]] * n)
    return (sums[n:] > sums[:n]).astype(np.int64)


def cola_scores(logprob: LogProb, sentences: Sequence[str]) -> np.ndarray:
    """CoLA (Section 5): each sentence's average token log-probability under the LM."""
    sums, counts = logprob([""] * len(sentences), [s.strip() for s in sentences])
    return average(sums, counts)


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """CoLA (Section 5) predicts by thresholding the score; the paper does not say how the
    threshold is set. Here: the one maximising the MCC of labelled sentences (acceptable,
    label 1, above it), the midpoint of two consecutive distinct scores, the highest of
    equally good ones. Predicting one class for every sentence (MCC 0) is a candidate too:
    when every split of the scores correlates negatively with the labels (an early
    checkpoint), the threshold is the highest training score, so no training sentence is
    called acceptable, rather than a split that is worse than no split. Fit it on training
    sentences, never the evaluated ones."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order].astype(np.float64)
    n, positives = len(scores), sorted_labels.sum()
    if n < 2 or not np.any(sorted_scores[:-1] > sorted_scores[1:]):
        return float(sorted_scores[0]) if n else 0.0  # nothing to separate
    # Predicting the top k acceptable, for k = 1 .. n-1.
    k = np.arange(1, n, dtype=np.float64)
    tp = np.cumsum(sorted_labels)[:-1]
    fp, fn = k - tp, positives - tp
    tn = n - positives - fp
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.where(denominator > 0, (tp * tn - fp * fn) / np.maximum(denominator, 1e-300), 0.0)
    mcc = np.where(sorted_scores[:-1] > sorted_scores[1:], mcc, -np.inf)  # real boundaries
    best = int(np.argmax(mcc))
    if mcc[best] <= 0:  # no split beats predicting one class; the highest such threshold
        return float(sorted_scores[0])
    return float((sorted_scores[best] + sorted_scores[best + 1]) / 2)


def choice_predict(
    logprob: LogProb, contexts: Sequence[str], choices: Sequence[Sequence[str]]
) -> np.ndarray:
    """RACE (Section 5): the answer with the highest average token log-probability given
    the document and question (the first of ties). Any multiple choice works alike."""
    prefixes = [c for c, options in zip(contexts, choices, strict=True) for _ in options]
    averages = average(*logprob(prefixes, [o for options in choices for o in options]))
    return _best_of_each(averages, [len(options) for options in choices])


def dprd_predict(
    logprob: LogProb, sentences: Sequence[str], candidates: Sequence[Sequence[str]]
) -> np.ndarray:
    """DPRD (Section 5): replace the definite pronoun (MARKER) with each referent and
    predict the one under which the rest of the sentence, after the substitution, has the
    higher average token log-probability (Trinh & Le's partial scoring: only the words
    after the pronoun are scored, given the sentence up to the referent)."""
    contexts, rests = [], []
    for sentence in sentences:
        before, after = sentence.split(MARKER)
        contexts.append(before)
        rests.append(after.strip())
    prefixes = [f"{b}{c}" for b, cands in zip(contexts, candidates, strict=True) for c in cands]
    conts = [r for r, cands in zip(rests, candidates, strict=True) for _ in cands]
    averages = average(*logprob(prefixes, conts))
    return _best_of_each(averages, [len(cands) for cands in candidates])


def _best_of_each(scores: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """The index of the highest score within each consecutive group of `sizes` scores
    (the first of ties)."""
    starts = np.cumsum([0, *sizes[:-1]])
    return np.array(
        [int(np.argmax(scores[i : i + n])) for i, n in zip(starts, sizes, strict=True)], np.int64
    )


def score_task(
    name: str, logprob: LogProb, examples: Sequence[Example], fit: Sequence[Example] = ()
) -> dict:
    """One task's metric in percent, its number of examples, the metric's value for random
    guessing and, for CoLA, the threshold chosen on the `fit` examples."""
    labels = np.array([ex.label for ex in examples], np.int64)
    texts = [ex.texts[0] for ex in examples]
    extra = {}
    if name == "sst2":
        predictions, chance = sst2_predict(logprob, texts), 50.0
    elif name == "cola":
        fit_labels = np.array([ex.label for ex in fit], np.int64)
        threshold = fit_threshold(cola_scores(logprob, [ex.texts[0] for ex in fit]), fit_labels)
        predictions = (cola_scores(logprob, texts) > threshold).astype(np.int64)
        chance, extra = 0.0, {"threshold": threshold}
    else:
        choices = [ex.choices for ex in examples]
        predict = choice_predict if name == "race" else dprd_predict
        predictions = predict(logprob, texts, choices)
        chance = float(np.mean([100.0 / len(c) for c in choices]))
    metric = METRIC[name]
    value = task_metrics.compute([metric], predictions, labels)[metric]
    return {
        "task": name,
        "metric": metric,
        "value": value,
        "examples": len(examples),
        "chance": chance,
        **extra,
    }


# ----------------------------------------------------------------------------------------
# The run: every checkpoint, every task, the table and the figure.


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """`--mode=zeroshot`: scores the workdir's latest checkpoint (or, with
    `zeroshot.all_checkpoints`, every one) on each task; writes and returns the rows."""
    if "zeroshot" not in config:
        raise UserError(
            "the config has no zeroshot section (its settings: configs/gpt1.py's "
            "`config.zeroshot`); copy it into your config, or use configs/gpt1.py"
        )
    zs = config.zeroshot
    names = task_names(zs)
    # Local files first (a bad one is a settings error), then the workdir, then the
    # TFDS tasks: their data may take minutes to fetch.
    data = {name: load_examples(config, name) for name in names if zs[f"{name}_path"]}
    steps = checkpoint.all_steps(workdir) if os.path.isdir(workdir) else []
    if not steps:
        raise UserError(
            f"no checkpoint in {workdir}: pretrain there first, or point --workdir at a run"
        )
    data.update({name: load_examples(config, name) for name in names if name not in data})
    steps = steps if zs.all_checkpoints else steps[-1:]
    # The rows of an earlier run are kept; those of the same checkpoint, task and data
    # are not scored again (a stopped run resumes; another task adds its rows).
    rows = previous_rows(workdir)
    done = {(r["step"], r["task"], json.dumps(r.get("data"))) for r in rows}
    for step in steps:
        todo = [n for n in names if (step, n, json.dumps(data_settings(zs, n))) not in done]
        if not todo:
            logging.info("zero-shot step %d: scored before (%s)", step, RESULTS_FILE)
            continue
        if step not in checkpoint.all_steps(workdir):  # removed by a run still training
            logging.warning("checkpoint %d of %s is no longer there: skipped", step, workdir)
            continue
        generator, tokenizer = generate.load(workdir, step)
        scorer = Scorer(generator.model, generator.params, tokenizer, zs.batch_size)
        for name in todo:
            started = time.time()
            row = {"step": step, **score_task(name, scorer.sequence_logprob, *data[name])}
            row["data"] = data_settings(zs, name)
            rows = [r for r in rows if (r["step"], r["task"]) != (step, name)] + [row]
            logging.info(
                "zero-shot step %d %s: %s %.2f (%d examples, chance %.1f, %.1f s)",
                step,
                name,
                row["metric"],
                row["value"],
                row["examples"],
                row["chance"],
                time.time() - started,
            )
        write_results(rows, workdir)  # after every checkpoint: a long run shows progress
        logging.info(
            "wrote %s and %s", *(os.path.join(workdir, f) for f in (RESULTS_FILE, PLOT_FILE))
        )
    return sorted(rows, key=lambda r: r["step"])


def data_settings(zs: ml_collections.ConfigDict, name: str) -> dict:
    """What a task's score was of: its files (empty: TFDS's) and `max_examples`."""
    paths = {k: zs[k] for k in zs if k.startswith(f"{name}_") and k.endswith("path")}
    return {**paths, "max_examples": zs.max_examples}


def previous_rows(workdir: str) -> list[dict]:
    """The rows of zeroshot.json, if it holds some; a file that is not one is replaced."""
    path = os.path.join(workdir, RESULTS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        logging.warning("%s is unreadable (%s): writing it anew", path, e)
        return []
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"step", "task", "value", "chance"} <= set(r) for r in rows
    ):
        logging.warning("%s holds no zero-shot rows: writing it anew", path)
        return []
    return sorted(rows, key=lambda r: r["step"])


def write_results(rows: list[dict], workdir: str):
    """zeroshot.json and zeroshot.png, each written whole under a temporary name first."""
    path = os.path.join(workdir, RESULTS_FILE)
    with replacing(path) as f:
        json.dump(sorted(rows, key=lambda r: r["step"]), f, indent=2)
    plot(rows, os.path.join(workdir, PLOT_FILE))


def normalised(row: dict) -> float:
    """0 for random guessing, 1 for a perfect score."""
    return (row["value"] - row["chance"]) / (100.0 - row["chance"])


def plot(rows: list[dict], path: str):
    """Figure 2 (right): each task's normalised score against pretraining updates."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for name in dict.fromkeys(row["task"] for row in rows):
        points = sorted((r["step"], normalised(r)) for r in rows if r["task"] == name)
        axes.plot(*zip(*points, strict=True), marker="o", label=f"{name} ({METRIC[name]})")
    axes.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("pretraining updates")
    axes.set_ylabel("(score - chance) / (100 - chance)")
    axes.set_title("Zero-shot performance over pretraining (GPT-1, Figure 2 right)")
    axes.legend()
    figure.tight_layout()
    with replacing(path, "wb") as f:
        figure.savefig(f, format="png", dpi=120)
