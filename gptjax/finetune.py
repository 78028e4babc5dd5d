"""Supervised fine-tuning (Section 3.2): a pretrained checkpoint carried into a task.

The GPT of a pretraining workdir (`config.init_from`) gets the three specials' embedding
rows appended (fresh, N(0, 0.02)) and a linear head on the `_classify_` token, and is
trained end to end with L = L_task + lm_coef * L_LM (the auxiliary LM loss over the
transformed inputs, masked to real tokens), a fresh optimiser, linear warmup and decay.
Ablations are config values: `init_from=""` (no pretraining), `finetune.lm_coef=0` (no
auxiliary LM), `finetune.n_transfer=K` (only the first K blocks transferred).
"""

import dataclasses
import functools
import logging
import os
import runpy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import adapt, checkpoint, loop, losses, optim, results, sharding, train
from gptjax import config as config_lib
from gptjax import tokenizer as tokenizer_lib
from gptjax.data.corpus import cache_dir
from gptjax.data.pipeline import eval_batches, train_iterator
from gptjax.errors import UserError
from gptjax.model import (
    GPT,
    ModelConfig,
    TaskModel,
    layer_options,
    stack_layers,
    unstack_layers,
)
from gptjax.run_config import (
    CONFIG_FILE,
    MODEL_SIZES,
    TASK_CLASSES,
    check_classes,
    check_resumable,
    read_config,
    saved_config,
    take_saved_model,
)
from gptjax.run_config import write_config as write_run_config
from gptjax.tasks import encoded, registry, transforms
from gptjax.tasks import metrics as task_metrics
from gptjax.tasks.spec import TaskSpec
from gptjax.workdirs import check_workdir


def resolve_model(config: ml_collections.ConfigDict):
    """Fills the unset `config.model` sizes from the `init_from` run (or, without one,
    from the paper's configs/gpt1.py); sizes that are set must match the checkpoint's."""
    if config.init_from:
        saved = saved_config(config.init_from, "init_from")["model"]
        wrong = [
            f"model.{k}={config.model[k]} (checkpoint: {saved[k]})"
            for k in MODEL_SIZES
            if config.model[k] is not None and config.model[k] != saved[k]
        ]
        if wrong:
            raise UserError(
                f"init_from {config.init_from} holds a model of another architecture: "
                f"{', '.join(wrong)}; leave these unset to take the checkpoint's"
            )
        source = saved
    else:
        gpt1 = config_lib.shipped_config("gpt1.py")
        source = runpy.run_path(gpt1)["get_config"]().model.to_dict()
    with config.unlocked():
        for k in MODEL_SIZES:
            if config.model[k] is None:
                config.model[k] = source[k]


def eval_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config that evaluates the fine-tune in `workdir` (--mode=eval): the command's,
    with what the run itself was (its config.json) in place of the command's values: the
    model, its parameter layout, and what it was trained from and with (`init_from`,
    `finetune.*`, `adapt.*`), which results.json reports. So the `init_from` run need not still be
    there, and an ablation variant re-scored is reported as what it was. The command
    gives the task's files and the evaluation's settings; evaluating another task is an
    error. Without a saved config (no run there), the model is resolved as for training."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        resolve_model(config)
        return config
    saved = read_config(path, "restore it from a copy")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if "task" in saved:  # else check_resumable names the pretraining run
            take_saved_model(config, saved)
            config.init_from = saved.get("init_from", config.init_from)
            for section in ("finetune", "adapt"):
                run_section = saved.get(section) or {}
                if section in config:
                    config[section].update(
                        {k: v for k, v in run_section.items() if k in config[section]}
                    )
    check_resumable(workdir, saved, config, evaluating=True)
    return config


def load_tokenizer(config, task: TaskSpec, workdir: str, data_dir: str, started: bool):
    """The workdir's tokenizer once the run has `started` (has a checkpoint); else
    `finetune.tokenizer` (a run directory or a tokenizer.model file), the `init_from`
    run's (SentencePiece, or GPT-1's BPE in a converted release), or (from scratch) one
    learned on the task's training texts. Not yet saved."""
    source = config.finetune.tokenizer or config.init_from
    if started and tokenizer_lib.has_tokenizer(workdir):
        tok = tokenizer_lib.load_dir(workdir)
    elif source and os.path.isfile(source):
        tok = tokenizer_lib.SentencePieceTokenizer.load(source)
    elif source:
        if not tokenizer_lib.has_tokenizer(source):
            raise UserError(
                f"no tokenizer in {source} (tokenizer.model, or vocab.json and merges.txt); "
                "set --config.finetune.tokenizer"
            )
        tok = tokenizer_lib.load_dir(source)
    else:
        texts = [t for ex in task.load(task.train_split, data_dir) for t in ex.texts + ex.choices]
        tok = tokenizer_lib.train_sentencepiece(
            texts, config.model.vocab_size, config.data.tokenizer_sample_lines
        )
    if tok.vocab_size != config.model.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} ids but model.vocab_size is "
            f"{config.model.vocab_size}; use the pretraining run's tokenizer and vocabulary"
        )
    return tok


def predict_step(params, batch, *, model: TaskModel):
    """Task outputs of a batch (no dropout), with the rows' labels and bookkeeping."""
    out, _ = model.apply({"params": params}, batch["tokens"].astype(jnp.int32), batch["clf_pos"])
    keep = ("label", "weight", "labelled", "index")
    return {"output": out, **{k: batch[k] for k in keep}}


def transfer(fresh: dict, pretrained: dict, n_transfer: int) -> dict:
    """The fine-tuning parameters (unrolled layout) with the pretrained embeddings and
    first `n_transfer` blocks copied in; the specials' rows, later blocks and the head stay
    as initialised."""
    gpt = dict(fresh["transformer"])
    vocab = pretrained["tokens_embed"]["embedding"].shape[0]
    embedding = gpt["tokens_embed"]["embedding"]
    gpt["tokens_embed"] = {
        "embedding": embedding.at[:vocab].set(pretrained["tokens_embed"]["embedding"])
    }
    gpt["positions_embed"] = pretrained["positions_embed"]
    for i in range(n_transfer):
        gpt[f"h_{i}"] = pretrained[f"h_{i}"]
    return {**fresh, "transformer": gpt}


def task_model(config: ml_collections.ConfigDict, task: TaskSpec) -> TaskModel:
    """The fine-tuning model of `config` (its sizes resolved, `resolve_model`) for `task`:
    the GPT with the three special tokens' rows, and the task's head."""
    model_cfg = ModelConfig.from_config(config.model, config.train)
    specials = len(tokenizer_lib.SPECIAL_TOKENS)
    return TaskModel(
        dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size + specials),
        kind=task.kind,
        num_outputs=task.num_outputs,
        regression=task.regression,
        clf_dropout=config.finetune.clf_dropout,
        **layer_options(config.train),
    )


def sequences_per_example(task: TaskSpec) -> int:
    """The input transformation's sequences per example (Figure 1): one, both orderings
    of a similarity pair, or one per answer of a multiple-choice question."""
    if task.kind == "similarity":
        return 2
    return max(1, task.num_choices) if task.kind == "multiple_choice" else 1


def init_inputs(task: TaskSpec) -> tuple:
    """Example inputs for `TaskModel.init` (tokens [1, S, 8], clf_pos [1, S])."""
    s = sequences_per_example(task)
    return (jnp.zeros((1, s, 8), jnp.int32), jnp.zeros((1, s), jnp.int32))


@dataclasses.dataclass
class Split:
    name: str
    examples: list
    rows: transforms.Rows
    length: int


class FineTune:
    """A fine-tuning run built from its config: task, tokenizer, data, model, steps.
    Training calls `build` once it knows its step count; `read_only` (an evaluation) is
    built at once, with the state only laid out (`abstract`) for restoring parameters."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, read_only=False):
        self.config, self.workdir = config, workdir
        self.data_dir = os.path.join(cache_dir(config.data), "tfds")
        self.task = registry.get_task(config.task)
        if not read_only:  # an evaluation's config has its model already (`eval_config`)
            resolve_model(config)
        self.resume_step = checkpoint.agreed_resume_step(workdir)
        if not read_only:
            check_workdir(workdir, config, resuming=self.resume_step is not None)
        if read_only or self.resume_step is not None:
            check_classes(workdir, self.task.label_names, evaluating=read_only)
        self.mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch(config, self.mesh, specials=len(tokenizer_lib.SPECIAL_TOKENS))
        # Started: a checkpoint of this run or of its domain adaptation. A tokenizer in a
        # workdir without one was left by a start that failed, and is replaced.
        self.started = self.resume_step is not None or (
            checkpoint.latest_step(os.path.join(workdir, "adapt")) is not None
        )
        self.tokenizer = load_tokenizer(config, self.task, workdir, self.data_dir, self.started)
        self.specials = len(tokenizer_lib.SPECIAL_TOKENS)
        self.model = task_model(config, self.task)
        self.model_cfg = self.model.cfg
        self.splits: dict[str, Split] = {}
        if read_only:
            self.build(1, initialise=False)

    def split(self, name: str) -> Split:
        """A split's examples, transformed and encoded (once per run, and once for all
        runs on this data and tokenizer: `tasks.encoded` keeps the arrays)."""
        if name not in self.splits:
            examples = self.task.load(name, self.data_dir)
            if not examples:
                raise UserError(f"task {self.task.name}: split {name!r} has no examples")
            n_ctx, cache = self.config.model.n_ctx, cache_dir(self.config.data)
            arrays = encoded.encode(self.task, name, examples, self.tokenizer, n_ctx, cache)
            length = arrays["tokens"].shape[-1]
            self.splits[name] = Split(name, examples, transforms.Rows(arrays), length)
            logging.info(f"{self.task.name} {name}: {len(examples)} examples of {length} tokens")
        return self.splits[name]

    def take_state(self):
        state, self.state = self.state, None
        return state

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size

    def total_steps(self) -> int:
        return loop.total_steps(self.config.train, len(self.split(self.task.train_split).rows))

    def steps_per_epoch(self) -> int:
        return max(1, len(self.split(self.task.train_split).rows) // self.batch_size)

    def build(self, total_steps: int, initialise: bool = True):
        """The schedule, train state and compiled steps. Without `initialise` (an
        evaluation, which restores parameters) the state is only laid out: `abstract`
        holds its shapes and shardings, `state` is None and nothing is allocated."""
        cfg = self.config
        if initialise:
            examples = len(self.split(self.task.train_split).rows)
            optim.warn_if_untrained(cfg.train, total_steps, examples)
        objective = losses.task_objective(self.model, cfg.finetune.lm_coef, self.task.regression)
        built = train.build(
            self.model,
            objective,
            cfg.train,
            total_steps,
            self.mesh,
            initialise=initialise,
            init_inputs=init_inputs(self.task),
        )
        self.schedule, self.shardings, self.p_train = built.schedule, built.shardings, built.p_train
        self.abstract = train.abstract_state(built.state, built.shardings)
        self.state = built.state if initialise else None
        self.p_predict = sharding.under_axis_rules(
            jax.jit(
                functools.partial(predict_step, model=self.model),
                in_shardings=(self.shardings.params, sharding.batch_sharding(self.mesh)),
                out_shardings=sharding.replicated(self.mesh),
            ),
            self.mesh,
        )

    def restore_lm(self, source: str) -> dict:
        """The GPT parameters of a run's latest checkpoint (`init_from`, or the adaptation
        phase), in the unrolled layout whatever layout that run used."""
        cfg = self.config
        saved_train = saved_config(source, "init_from").get("train")
        scanned = isinstance(saved_train, dict) and saved_train.get("scan_layers", False)
        lm = GPT(ModelConfig.from_config(cfg.model), scan_layers=scanned)
        abstract = train.abstract_params(lm, cfg.model.n_ctx, self.mesh)
        params = checkpoint.restore_params(source, abstract)
        return unstack_layers(params) if scanned else params

    def load_pretrained(self, state, source: str, pretrained: dict | None = None):
        """`state` with the weights of the run in `source` transferred (Section 3.2);
        `pretrained`: its LM parameters, when `restore_lm` has already read them."""
        cfg = self.config
        n_layer = cfg.model.n_layer
        n_transfer = n_layer if cfg.finetune.n_transfer is None else cfg.finetune.n_transfer
        pretrained = self.restore_lm(source) if pretrained is None else pretrained

        def combine(params, pretrained):
            ours = unstack_layers(params) if cfg.train.scan_layers else params
            ours = transfer(ours, pretrained, n_transfer)
            return stack_layers(ours, n_layer) if cfg.train.scan_layers else ours

        params = jax.jit(combine, out_shardings=self.shardings.params)(state.params, pretrained)
        logging.info(
            "transferred the embeddings and %d of %d blocks from %s", n_transfer, n_layer, source
        )
        return state.replace(params=params)

    def predict(self, params, split: Split) -> dict[str, np.ndarray]:
        """Outputs of every example of `split`, in example order (padding rows dropped)."""
        batches = eval_batches(
            split.rows,
            self.batch_size // self.config.train.microbatches,
            None,
            jax.process_index(),
            jax.process_count(),
        )
        outs = [self.p_predict(params, sharding.global_batch(self.mesh, b)) for b in batches]
        host = jax.device_get(outs)
        cat = {k: np.concatenate([o[k] for o in host]) for k in host[0]}
        real = cat["weight"] > 0
        order = np.argsort(cat["index"][real], kind="stable")
        return {k: v[real][order] for k, v in cat.items()}

    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        return outputs if self.task.regression else np.argmax(outputs, axis=-1)

    def score(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        """The task's metrics of `predict`'s outputs over the labelled examples ({} when
        none is labelled, as in GLUE's test splits)."""
        labelled = out["labelled"].astype(bool)
        if not labelled.any():
            return {}
        if not labelled.all():
            logging.warning(
                "%d of %d examples have a label: the scores are of those only",
                labelled.sum(),
                labelled.size,
            )
        return task_metrics.compute(
            self.task.metrics, self.predictions(out["output"])[labelled], out["label"][labelled]
        )

    def predict_splits(self, params, names) -> dict[str, dict[str, np.ndarray]]:
        """`predict`'s outputs of each split in `names`; a split made of others
        (`task.parts`: RACE's validation, of its two levels) is put together from
        theirs, so that each example is predicted once."""
        outs = {}

        def outputs(name):
            if name not in outs:
                parts = self.task.parts.get(name)
                if parts:
                    pieces = [outputs(part) for part in parts]
                    outs[name] = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
                else:
                    outs[name] = self.predict(params, self.split(name))
            return outs[name]

        return {name: outputs(name) for name in names}

    def evaluate(self, params, splits=None) -> dict[str, float]:
        """The task's metrics on each labelled eval split, keyed `{split}_{metric}`."""
        row = {}
        for name, out in self.predict_splits(params, splits or self.task.eval_splits).items():
            row.update({f"{name}_{k}": v for k, v in self.score(out).items()})
        return row

    @property
    def selection_key(self) -> str:
        return f"{self.task.eval_splits[0]}_{self.task.metrics[0]}"

    def summary(self, total_steps: int) -> str:
        train_split = self.split(self.task.train_split)
        return "\n".join(
            [
                f"task: {self.task.name} ({self.task.kind}; {self.task.description})",
                f"init: {self.config.init_from or 'random (no pretraining)'}; "
                f"lm_coef {self.config.finetune.lm_coef}",
                sharding.describe(self.mesh),
                f"train: {len(train_split.rows):,} examples of up to {train_split.length} "
                f"tokens; {total_steps:,} steps of {self.batch_size} "
                f"({total_steps * self.batch_size / len(train_split.rows):.2f} epochs)",
            ]
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes (resuming from the workdir's latest checkpoint), then scores the
    checkpoint `eval.checkpoint` names (the best on the validation split, or the latest)
    on the validation splits and writes results.json and results.md (the test splits'
    predictions: `--mode=eval`)."""
    run = FineTune(config, workdir)
    total_steps = run.total_steps()
    per_epoch = run.steps_per_epoch()
    source, pretrained = config.init_from, None
    if source and not run.started:
        # Read before anything is written: a missing or unreadable checkpoint in init_from
        # is an error that leaves the workdir as it was. (A started run, or its domain
        # adaptation, resumes from its own checkpoints and reads none of init_from's.)
        pretrained = run.restore_lm(source)
    if not run.started:
        tokenizer_lib.save_dir(run.tokenizer, workdir)
    if config.adapt.enabled and run.resume_step is None:
        # From init_from's parameters (unless it resumes), at its own intervals (the ones
        # below are per task epoch); fine-tuning then starts from what it trained.
        source, pretrained = adapt.adapt(run, pretrained), None
    with config.unlocked():
        # Unset: evaluate and checkpoint at the end of every epoch.
        config.train.eval_every = config.train.eval_every or per_epoch
        config.train.ckpt_every = config.train.ckpt_every or per_epoch
    run.build(total_steps)
    if run.resume_step is None and source:
        run.state = run.load_pretrained(run.state, source, pretrained)
    if jax.process_index() == 0:
        logging.info("run summary:\n%s", run.summary(total_steps))
    data_iter = train_iterator(
        run.split(run.task.train_split).rows,
        config.train.batch_size,
        config.train.seed,
        jax.process_index(),
        jax.process_count(),
    )
    ckpt = checkpoint.manager(
        workdir, config.train.keep_checkpoints, schedule=(config.train.ckpt_every, total_steps)
    )
    # An example is S sequences (2 for similarity, one per choice for multiple choice).
    _, s, length = run.split(run.task.train_split).rows.arrays["tokens"].shape
    tokens_per_step = config.train.batch_size * s * length
    state, _ = loop.run_phase(
        run.take_state(),  # no other reference: a resume frees it before restoring
        run.shardings,
        run.p_train,
        run.evaluate,
        data_iter,
        run.mesh,
        config.train,
        total_steps,
        tokens_per_step,
        workdir,
        ckpt,
        run.resume_step,
        record_config=functools.partial(
            write_run_config, workdir, config, {TASK_CLASSES: list(run.task.label_names)}
        ),
    )
    del state
    return results.evaluate_checkpoint(run, splits=run.task.eval_splits)
