"""Unsupervised pretraining (Section 3.1): set up a run from its config and drive the loop."""

import functools
import json
import logging
import math
import os

import jax
import ml_collections

from gptjax import checkpoint, loop, losses, optim, sharding, train
from gptjax.atomic import replacing
from gptjax.data import lm_data
from gptjax.data.pipeline import train_iterator, unigram_perplexity
from gptjax.errors import UserError
from gptjax.model import count_params, flops_per_token, language_model
from gptjax.results import RESULTS_JSON
from gptjax.run_config import CONFIG_FILE, read_config, take_saved_model, write_config
from gptjax.workdirs import check_workdir


class Run:
    """Everything a pretraining run is made of, built from its config. `read_only`
    (evaluation) allocates no train state (`state` is then its shapes and shardings, for
    restoring a checkpoint's parameters) and writes nothing but the token streams of the
    run's own corpus when they are not cached yet."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, read_only: bool = False):
        self.config, self.workdir = config, workdir
        self.resume_step = checkpoint.agreed_resume_step(workdir)
        resuming = self.resume_step is not None
        check_workdir(workdir, config, resuming, evaluating=read_only)
        self.mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch(config, self.mesh)
        self.data = lm_data.prepare(config, workdir, resuming, evaluating=read_only)
        self.model = language_model(config)
        self.model_cfg = self.model.cfg
        self.total_steps = loop.total_steps(config.train, len(self.data.windows["train"]))
        if not read_only:
            optim.warn_if_untrained(config.train, self.total_steps, len(self.data.windows["train"]))
        # An evaluation restores parameters into the state's layout: shapes suffice.
        built = train.build(
            self.model,
            losses.lm_objective(self.model),
            config.train,
            self.total_steps,
            self.mesh,
            initialise=not read_only,
        )
        self.schedule, self.state, self.shardings = built.schedule, built.state, built.shardings
        self.num_params = count_params(self.state.params)
        self.p_train = built.p_train
        self.p_eval = train.compile_eval_step(self.model, self.mesh, self.shardings)
        self.ckpt = checkpoint.manager(
            workdir,
            config.train.keep_checkpoints,
            read_only=read_only,
            schedule=(config.train.ckpt_every, self.total_steps),
        )

    def eval_data(self):
        return loop.lm_eval_batches(self.data.windows["validation"], self.config.train)

    def take_state(self):
        state, self.state = self.state, None
        return state

    def evaluate(self, params) -> dict[str, float]:
        return loop.evaluate(self.p_eval, params, self.eval_data(), self.mesh)

    def summary(self) -> str:
        n = self.num_params
        d, cfg = self.data, self.config
        tokens_per_step = cfg.train.batch_size * cfg.model.n_ctx
        return "\n".join(
            [
                f"model: {n:,} parameters, {flops_per_token(self.model_cfg, n) / 1e9:.3f} "
                "GFLOP per trained token (6N + 12 * n_layer * d_model * n_ctx)",
                sharding.describe(self.mesh),
                f"data: {d.description}; train {d.num_books['train']} books, "
                f"{d.tokens['train'].size:,} tokens, {len(d.windows['train']):,} windows; "
                f"validation {d.num_books['validation']} books, "
                f"{d.tokens['validation'].size:,} tokens",
                f"steps: {self.total_steps:,} of {cfg.train.batch_size} x {cfg.model.n_ctx} "
                f"= {tokens_per_step:,} tokens "
                f"({self.total_steps * tokens_per_step / d.tokens['train'].size:.2f} epochs)",
            ]
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Pretrains, resuming from the workdir's latest checkpoint if there is one. Returns
    the final held-out metrics."""
    run = Run(config, workdir)
    data_iter = train_iterator(
        run.data.windows["train"],
        config.train.batch_size,
        config.train.seed,
        jax.process_index(),
        jax.process_count(),
    )
    if jax.process_index() == 0:
        logging.info("run summary:\n%s", run.summary())
    # The loop owns the state from here (its buffers are donated to the first step).
    state, eval_metrics = loop.run_phase(
        run.take_state(),
        run.shardings,
        run.p_train,
        run.evaluate,
        data_iter,
        run.mesh,
        config.train,
        run.total_steps,
        config.train.batch_size * config.model.n_ctx,
        workdir,
        run.ckpt,
        run.resume_step,
        record_config=functools.partial(write_config, workdir, config),
    )
    if not eval_metrics:  # already trained to the end: evaluate what is there
        eval_metrics = run.evaluate(state.params)
    report(run, {**eval_metrics, "step": int(jax.device_get(state.step))})
    return eval_metrics


def eval_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config that evaluates the pretraining run in `workdir` (--mode=eval): the
    command's, with the run's own model and parameter layout (its config.json) in place
    of the command's, so that `configs/gpt1.py` evaluates a run of any size (or a
    converted release); and the run's own corpus when the command names none (no
    `data.books`: `configs/gpt1.py` on a run of the demo's Shakespeare). The command gives
    the evaluation's settings (`train.eval_batches`, the mesh) and may name other books.
    A fine-tune's workdir is left to `check_resumable`, which names it."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return config
    saved = read_config(path, "restore it from a copy")
    if "task" in saved:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        take_saved_model(config, saved)
        if config.data.corpus == "books" and not config.data.books:
            corpus = ("corpus", "books", "encoding", "validation_fraction")
            config.data.update({k: v for k, v in saved.get("data", {}).items() if k in corpus})
    return config


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Restores the workdir's latest checkpoint and reports held-out perplexity."""
    if checkpoint.latest_step(workdir) is None:
        raise UserError(f"no checkpoint in {workdir}: train there first (--mode=train)")
    run = Run(config, workdir, read_only=True)
    run.ckpt.close()
    # Only the parameters (a read-only Run's state is their shapes and shardings).
    abstract = run.take_state().params
    fallback = "or run --mode=train once to fall back to the previous checkpoint"
    params = checkpoint.restore_params(workdir, abstract, run.resume_step, fallback)
    metrics = run.evaluate(params)
    report(run, {"step": run.resume_step, **metrics})
    return metrics


def report(run: Run, metrics: dict):
    """Held-out perplexity (of checkpoint `metrics["step"]`) next to a unigram model of
    the same tokens, to results.json, with the evaluation's cap (`train.eval_batches`,
    null: the whole held-out split, which the unigram model always scores)."""
    tokens = run.data.tokens
    unigram = unigram_perplexity(tokens["train"], tokens["validation"], run.model_cfg.vocab_size)
    cap = run.config.train.eval_batches
    results = {**metrics, "unigram_ppl": unigram, "eval_batches": cap}
    results["corpus"] = run.data.description  # what was scored (eval may name other books)
    if jax.process_index() == 0:
        available = math.ceil(len(run.data.windows["validation"]) / run.config.train.batch_size)
        logging.info(
            "held-out perplexity %.2f%s at step %s (a unigram model of the whole held-out "
            "split: %.2f)",
            metrics["eval_ppl"],
            f" on the first {cap} of {available} batches" if cap and cap < available else "",
            metrics.get("step"),
            unigram,
        )
        path = os.path.join(run.workdir, RESULTS_JSON)
        with replacing(path) as f:
            json.dump(results, f, indent=2)
        logging.info(
            "wrote %s; checkpoints in %s; curves: tensorboard --logdir %s "
            "(pip install tensorboard)",
            path,
            os.path.join(run.workdir, checkpoint.CHECKPOINT_DIR),
            run.workdir,
        )
    return results
