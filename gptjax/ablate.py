"""The paper's Table 5 direction for one task: fine-tune with and without pretraining (and
optionally without the auxiliary LM loss) and print the scores side by side.

    python -m gptjax.ablate --config=configs/demo_finetune.py --workdir=runs/demo-bbc

Each variant is an ordinary fine-tuning run in WORKDIR/VARIANT (resumable, evaluable with
`gptjax.main --mode=eval`); `scratch` keeps the pretrained run's tokenizer and model shape
so that only the initial weights differ. The table goes to WORKDIR/ablation.md.
"""

import copy
import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from gptjax.atomic import replacing
from gptjax.errors import UserError, config_value, fail, local_path, parse_flags, reported

VARIANTS = ("pretrained", "scratch", "no_aux_lm")
TABLES = ("ablation.md", "ablation.json")  # in --workdir: the variants side by side


def define_flags():
    """The command line's flags: defined only when run as a program, so that importing
    this module beside `gptjax.main` (which defines --config too) is harmless."""
    global _CONFIG, _WORKDIR, _VARIANTS
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config (PATH[:ARG]).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per variant goes here.")
    _VARIANTS = flags.DEFINE_list(
        "variants", ["pretrained", "scratch"], "Any of pretrained, scratch, no_aux_lm."
    )
    flags.mark_flags_as_required(["config", "workdir"])


def variant_config(config, variant: str):
    """The config of one variant, from a resolved pretrained fine-tuning config."""
    config = copy.deepcopy(config)
    if variant == "scratch":
        config.finetune.tokenizer = config.init_from
        config.finetune.n_transfer = None
        config.init_from = ""
    elif variant == "no_aux_lm":
        config.finetune.lm_coef = 0.0
    return config


def table(reports: dict[str, dict]) -> str:
    """Markdown: one row per split and metric, one column per variant."""
    names = list(reports)
    lines = ["| split | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    first = reports[names[0]]
    for row in first["results"]:
        for metric in row:
            if metric == "split":
                continue
            values = []
            for name in names:
                match = [r for r in reports[name]["results"] if r["split"] == row["split"]]
                values.append(f"{match[0][metric]:.1f}" if match else "")
            lines.append(f"| {row['split']} | {metric} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from gptjax import config as config_lib
    from gptjax import finetune, preemption, workdirs

    config = config_value(_CONFIG)
    with reported():
        config_lib.local_paths(config)
        workdir = local_path(_WORKDIR.value, "--workdir")
        if not workdir:
            raise UserError("--workdir is empty: give the directory the variants go in")
        unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
        if unknown or not _VARIANTS.value:
            raise UserError(
                f"unknown variants {unknown}; use {', '.join(VARIANTS)}"
                if unknown
                else f"no variant to run: give --variants=NAME,... of {', '.join(VARIANTS)}"
            )
        if "task" not in config or not config.init_from:
            raise UserError("give a fine-tuning config with --config.init_from=PRETRAINED_RUN")
        for name in TABLES:  # before any training, which they would come after
            if os.path.isdir(path := os.path.join(workdir, name)):
                raise UserError(f"{path} is a directory, where the ablation writes; move it away")
        finetune.resolve_model(config)
        reports = {}
        # As `gptjax.main` trains: a signal is one line and status 75 (each variant
        # resumes), and a second command on a variant's workdir is refused.
        with preemption.stop_outside_the_loop():
            for variant in dict.fromkeys(_VARIANTS.value):  # each once, in the order given
                cfg = variant_config(config, variant)
                config_lib.validate(cfg)
                logging.info("variant %s", variant)
                variant_dir = os.path.join(workdir, variant)
                with workdirs.workdir_lock(variant_dir):
                    reports[variant] = finetune.train_and_evaluate(cfg, variant_dir)
        text = table(reports)
        with replacing(os.path.join(workdir, TABLES[0])) as f:
            f.write(text)
        with replacing(os.path.join(workdir, TABLES[1])) as f:
            json.dump(reports, f, indent=2)
    print(text)


if __name__ == "__main__":
    from gptjax import host_memory

    host_memory.at_start()
    define_flags()
    app.run(main, flags_parser=parse_flags)
