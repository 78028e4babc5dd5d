"""Domain adaptation (`config.adapt`): before fine-tuning, the pretrained GPT continues
language-model training on the target task's own texts, each example's fields joined
into one document, packed into n_ctx windows like pretraining's books. The phase runs in
`workdir/adapt` with its own checkpoints and resumes like any run; fine-tuning then
starts from its latest checkpoint instead of `init_from`.
"""

import functools
import logging
import os
from typing import TYPE_CHECKING

import jax
import numpy as np

from gptjax import checkpoint, loop, losses, optim, train
from gptjax.data.pipeline import PackedWindows, train_iterator
from gptjax.metrics import evaluated_at
from gptjax.model import language_model, stack_layers
from gptjax.run_config import write_config as write_run_config
from gptjax.workdirs import check_workdir

if TYPE_CHECKING:
    from gptjax.finetune import FineTune


def adapt(run: "FineTune", pretrained: dict | None = None) -> str:
    """Phase 1 of `run`: continues LM training (the pretraining objective) on the task's
    own texts, in `workdir/adapt` with its own checkpoints; resumes or, when complete,
    does nothing. Starts from `pretrained` (init_from's LM parameters, as
    `run.restore_lm` reads them) when given, else reads them itself. Returns that
    directory (the next phase starts from its latest checkpoint)."""
    cfg, a = run.config, run.config.adapt
    workdir = os.path.join(run.workdir, "adapt")

    def windows(split):
        examples = run.task.load(split, run.data_dir)
        docs = run.tokenizer.encode_texts(["\n".join(ex.texts + ex.choices) for ex in examples])
        stream = np.concatenate([np.asarray(d + [run.tokenizer.eos_id], np.int32) for d in docs])
        return PackedWindows(stream, cfg.model.n_ctx, run.tokenizer.pad_id)

    train_windows, eval_windows = (
        windows(run.task.train_split),
        windows(run.task.eval_splits[0]),
    )
    phase_cfg = cfg.train.copy_and_resolve_references()
    with phase_cfg.unlocked():
        phase_cfg.update(epochs=a.epochs, num_steps=a.num_steps, lr=a.lr or cfg.train.lr)
    total = loop.total_steps(phase_cfg, len(train_windows))
    per_epoch = max(1, len(train_windows) // phase_cfg.batch_size)
    with phase_cfg.unlocked():
        phase_cfg.eval_every = phase_cfg.eval_every or per_epoch
        phase_cfg.ckpt_every = phase_cfg.ckpt_every or per_epoch
    # The phase's own record (config.json in its directory): its train section is the
    # phase's, so that a resume is checked against what the phase ran.
    phase_config = cfg.copy_and_resolve_references()
    with phase_config.unlocked():
        phase_config.train = phase_cfg
    resume = checkpoint.agreed_resume_step(workdir)
    # Complete: nothing to do, unless a stop (or a kill) came before its last evaluation
    # was written; then the phase is built again, and `run_phase` makes it up.
    if resume is not None and resume >= total and (resume > total or evaluated_at(workdir, total)):
        return workdir
    if resume is not None:
        check_workdir(workdir, phase_config, resuming=True)
    model = language_model(cfg)
    optim.warn_if_untrained(phase_cfg, total, len(train_windows))
    built = train.build(model, losses.lm_objective(model), phase_cfg, total, run.mesh)
    state, shardings, p_train = built.state, built.shardings, built.p_train
    if resume is None and cfg.init_from:
        params = run.restore_lm(cfg.init_from) if pretrained is None else pretrained
        if cfg.train.scan_layers:
            params = stack_layers(params, cfg.model.n_layer)
        state = state.replace(params=jax.device_put(params, shardings.params))
    p_eval = train.compile_eval_step(model, run.mesh, shardings)
    os.makedirs(workdir, exist_ok=True)
    logging.info(
        "domain adaptation: %d steps of LM training on %s's texts (%d windows of %d)",
        total,
        run.task.name,
        len(train_windows),
        cfg.model.n_ctx,
    )

    def evaluate(params):
        return loop.evaluate(
            p_eval, params, loop.lm_eval_batches(eval_windows, phase_cfg), run.mesh
        )

    data_iter = train_iterator(
        train_windows,
        phase_cfg.batch_size,
        cfg.train.seed,
        jax.process_index(),
        jax.process_count(),
    )
    holder = [state]
    del state
    _, eval_metrics = loop.run_phase(
        holder.pop(),
        shardings,
        p_train,
        evaluate,
        data_iter,
        run.mesh,
        phase_cfg,
        total,
        phase_cfg.batch_size * cfg.model.n_ctx,
        workdir,
        checkpoint.manager(
            workdir, phase_cfg.keep_checkpoints, schedule=(phase_cfg.ckpt_every, total)
        ),
        resume,
        record_config=functools.partial(write_run_config, workdir, phase_config),
    )
    scores = " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
    logging.info(
        "domain adaptation done (%s on %s's evaluation texts; curves in %s): fine-tuning "
        "starts from it",
        scores or "no evaluation",
        run.task.name,
        workdir,
    )
    return workdir
