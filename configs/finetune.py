"""GPT-1 fine-tuning exactly as in the paper (Section 4.1, "Fine-tuning details").

    python -m gptjax.main --config=configs/finetune.py:TASK --workdir=runs/TASK \
        --config.init_from=runs/gpt1

TASK is one of the paper's tasks (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, snli,
scitail, race (RACE-m and RACE-h are its splits of one level), story_cloze), bbc_news
(offline; the demo's task) or custom (your own JSONL/CSV/TSV files: set the task.* values
below). The model's sizes are taken from the `init_from` run; sizes set here must match
it (unset without `init_from`: the paper's). Every value is the paper's unless its
comment says otherwise.
"""

import pathlib
import runpy

from ml_collections import config_dict


def get_config(task: str = "custom") -> config_dict.ConfigDict:
    gpt1 = runpy.run_path(str(pathlib.Path(__file__).with_name("gpt1.py")))
    config = gpt1["get_config"]()

    # A pretraining workdir whose latest checkpoint is fine-tuned; "" = no pretraining.
    config.init_from = ""
    for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "d_model", "d_mlp"):
        config.model[name] = config_dict.placeholder(int)  # from init_from's run

    config.task = config_dict.ConfigDict()
    config.task.name = task
    # For task=custom (see the README): the transformation, the files and their fields.
    config.task.kind = "classification"  # entailment, similarity, multiple_choice
    config.task.train_path = ""
    config.task.eval_path = ""
    config.task.test_path = ""
    config.task.text_fields = "text"  # comma-separated, in order (e.g. premise,hypothesis)
    config.task.label_field = "label"
    config.task.choices_field = ""  # multiple choice: a list of answers per row
    config.task.regression = False  # similarity scored as a number (like STS-B)
    config.task.positive_label = ""  # two-class similarity: the class F1 scores (else 1/true)
    config.task.encoding = "utf-8"

    config.finetune = config_dict.ConfigDict()
    config.finetune.lm_coef = 0.5  # lambda: weight of the auxiliary LM loss; 0 turns it off
    config.finetune.clf_dropout = 0.1
    # Blocks transferred from init_from (embeddings always are); unset = all.
    config.finetune.n_transfer = config_dict.placeholder(int)
    # A run directory (or a tokenizer.model file) whose tokenizer to use instead of
    # init_from's (needed without init_from to share a pretrained run's ids; else one is
    # learned on the task's training texts).
    config.finetune.tokenizer = ""

    # Phase 1 (optional): continue LM training on the task's own texts (its training
    # split, every text and answer of an example joined as one document) before the
    # supervised phase, in WORKDIR/adapt with its own checkpoints.
    config.adapt = config_dict.ConfigDict()
    config.adapt.enabled = False
    config.adapt.epochs = 1
    config.adapt.num_steps = config_dict.placeholder(int)  # when set, wins over epochs
    config.adapt.lr = config_dict.placeholder(float)  # unset: train.lr

    config.train.lr = 6.25e-5
    config.train.batch_size = 32
    config.train.epochs = 3
    config.train.schedule = "linear"  # linear warmup, then linear decay to 0
    config.train.warmup_fraction = 0.002  # 0.2% of training
    config.train.log_every = 10
    # Unset: evaluate and checkpoint at the end of every epoch (not from the paper).
    config.train.eval_every = config_dict.placeholder(int)
    config.train.ckpt_every = config_dict.placeholder(int)
    config.train.keep_checkpoints = 10  # every epoch's, so the best can be chosen

    # --mode=eval: which checkpoint ("best" on the first validation metric, or "latest").
    config.eval = config_dict.ConfigDict()
    config.eval.checkpoint = "best"
    return config
