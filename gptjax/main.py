"""The command line: `python -m gptjax.main --config=configs/gpt1.py --workdir=DIR`.

Pretraining with configs/gpt1.py or configs/demo.py, fine-tuning with
configs/finetune.py:TASK. Modes: `train` (default; resumes from the workdir's latest
checkpoint), `eval` (restores a checkpoint: pretraining reports held-out perplexity,
fine-tuning the task's metrics next to the paper's, in results.json and results.md) and
`generate` (continues the prompts of `config.generate` with the workdir's model, one JSON
line per prompt on stdout) and `zeroshot` (scores the workdir's LM with the paper's
zero-shot heuristics, `config.zeroshot`, into zeroshot.json and zeroshot.png) and
`estimate` (a pretraining or fine-tuning config's parameters, FLOPs, memory per device
from the compiled step, and time to train on `config.estimate`'s accelerator; nothing is
trained).
Exit status: 0 done, 2 bad input (one line `error: ...`), 75 stopped by SIGTERM/SIGINT or
a preemption notice after writing a checkpoint (run the same command to resume). Any
config value can be overridden with `--config.section.name=value`; unknown names and
wrongly typed values are errors.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from gptjax.errors import UserError, config_value, fail, local_path, parse_flags, reported

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (PATH[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, tokenizer.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "generate", "zeroshot", "estimate"],
    "train: train (or resume); eval: score a checkpoint; generate: sample text from one; "
    "zeroshot: the paper's zero-shot heuristics on the latest (or every) checkpoint; "
    "estimate: parameters, FLOPs, memory per device and training time, without training.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0, for an explicit multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def enable_compilation_cache(config):
    """JAX's persistent compilation cache, on by default (in the data cache directory,
    or $JAX_COMPILATION_CACHE_DIR): a resumed run skips recompiling its steps."""
    import jax

    from gptjax.data.corpus import cache_dir

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(config.data), "jax"))


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger().setLevel(logging.INFO)
    # Libraries (Orbax, TFDS) log through absl at INFO on every save; keep their warnings.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # Imported here so that `--help` and flag errors answer without loading JAX.
    from gptjax import config as config_lib
    from gptjax import distributed, host_memory, preemption, workdirs

    logging.info(host_memory.describe())

    config = config_value(_CONFIG)
    with reported():
        config_lib.local_paths(config)
        workdir = local_path(_WORKDIR.value, "--workdir")
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        enable_compilation_cache(config)
        if not workdir and _MODE.value != "estimate":  # (estimate's means "write nothing")
            raise UserError("--workdir is empty: give the run's directory (e.g. runs/NAME)")
        if _MODE.value in ("eval", "zeroshot", "estimate"):
            # Their results go there, at the end; the others read a run from it first.
            workdirs.check_output_dir(workdir, create=False)
        if _MODE.value in ("eval", "zeroshot", "generate"):
            workdirs.check_shared(workdir)  # (training checks it with the workdir's lock)
        # A SIGTERM or Ctrl-C in any mode is one line and status 75 (the training loop
        # turns one into a checkpoint first).
        with preemption.stop_outside_the_loop():
            _run_mode(config, workdir)


def _run_mode(config, workdir: str):
    """The work of --mode with the config (pretraining or fine-tuning) in `workdir`."""
    from gptjax import config as config_lib
    from gptjax import pretrain, workdirs

    if _MODE.value == "generate":  # from the workdir's own model and tokenizer
        from gptjax import generate

        generate.run(config, workdir)
    elif _MODE.value == "zeroshot":  # likewise
        from gptjax import zeroshot

        zeroshot.run(config, workdir)
    elif "task" in config:  # configs/finetune.py
        from gptjax import finetune, results

        if _MODE.value == "estimate":  # the task's step, from shapes alone
            from gptjax import estimate

            finetune.resolve_model(config)
            config_lib.validate(config)
            estimate.run(config, workdir)
        elif _MODE.value == "train":
            finetune.resolve_model(config)
            config_lib.validate(config)
            with workdirs.workdir_lock(workdir):
                finetune.train_and_evaluate(config, workdir)
        else:
            config = finetune.eval_config(config, workdir)
            config_lib.validate(config)
            run = finetune.FineTune(config, workdir, read_only=True)
            results.evaluate_checkpoint(run)
    else:
        if _MODE.value == "eval":  # the run's own model, whatever the config says
            config = pretrain.eval_config(config, workdir)
        config_lib.validate(config)
        if _MODE.value == "estimate":
            from gptjax import estimate

            estimate.run(config, workdir)
        elif _MODE.value == "train":
            with workdirs.workdir_lock(workdir):
                pretrain.train_and_evaluate(config, workdir)
        else:
            pretrain.evaluate_checkpoint(config, workdir)


if __name__ == "__main__":
    from gptjax import host_memory

    host_memory.at_start()
    app.run(main, flags_parser=parse_flags)
