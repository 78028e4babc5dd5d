"""The command line: `python -m gptjax.main --config=configs/gpt1.py --workdir=DIR`.

Modes: `train` (default; resumes from the workdir's latest checkpoint) and `eval`
(restores the latest checkpoint and reports held-out perplexity). Any config value can be
overridden with `--config.section.name=value`; unknown names and wrongly typed values are
errors.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from gptjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (PATH[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, tokenizer.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger().setLevel(logging.INFO)
    # Imported here so that `--help` and flag errors answer without loading JAX.
    from gptjax import config as config_lib
    from gptjax import pretrain

    try:
        config_lib.validate(_CONFIG.value)
        if _MODE.value == "train":
            pretrain.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        else:
            pretrain.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
