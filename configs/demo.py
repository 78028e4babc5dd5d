"""The embedded demo: a small GPT-1-architecture model pretrained on Shakespeare on a CPU.

    python -m gptjax.main --config=configs/demo.py --workdir=runs/demo

Everything not set here is the paper's (configs/gpt1.py): post-LN blocks, tanh-GELU,
learned positions, tied head, Adam with warmup + cosine, decoupled weight decay, clipping.
Sized for a CPU: the README's "What the demo reaches" has the measured wall time of the
whole command on two cores (11 min 44 s from an empty cache; 5 min 4 s on an AVX-512 machine).
"""

import pathlib
import runpy

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    gpt1 = runpy.run_path(str(pathlib.Path(__file__).with_name("gpt1.py")))
    config = gpt1["get_config"]()

    config.model.vocab_size = 4096
    config.model.n_ctx = 128
    config.model.n_layer = 4
    config.model.n_head = 4
    config.model.d_model = 192
    config.model.d_mlp = 768
    # About 1.5 passes over the text leave nothing to regularise, and dropout costs
    # ~25% of a CPU step; the paper's 0.1 is for 100 epochs.
    config.model.dropout = 0.0

    config.train.batch_size = 32
    config.train.num_steps = 600
    config.train.lr = 5e-4  # post-LN at 1e-3 stalls at the unigram loss here
    config.train.warmup_steps = 100
    config.train.log_every = 25
    config.train.eval_every = 200
    config.train.ckpt_every = 200

    config.data.corpus = "demo"
    config.data.tokenizer_sample_lines = 1_000_000
    return config
