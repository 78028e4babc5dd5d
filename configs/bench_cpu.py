"""A GPT-1-architecture model sized for benchmarking on a CPU.

    python -m gptjax.bench --config=bench-cpu [--vs-torch] [--json=PATH]

A full config (it also trains: `python -m gptjax.main --config=configs/bench_cpu.py`).
Everything not set here is the paper's (configs/gpt1.py), dropout 0.1 included; the
sizes are a 6-layer, 384-wide model whose step takes a few seconds on two cores, and
the attention is computed in two blocks of queries (a speed lever; the values are the
same).
"""

import pathlib
import runpy

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    gpt1 = runpy.run_path(str(pathlib.Path(__file__).with_name("gpt1.py")))
    config = gpt1["get_config"]()

    config.model.vocab_size = 8192
    config.model.n_ctx = 256
    config.model.n_layer = 6
    config.model.n_head = 6
    config.model.d_model = 384
    config.model.d_mlp = 1536  # 4 x d_model, as in the paper

    config.train.batch_size = 8
    config.train.num_steps = 1000
    config.train.warmup_steps = 100
    config.train.compute_dtype = "float32"
    # Causal attention in 2 blocks of queries: the same values, 3/4 of the score work;
    # 1.05-1.08x this config's CPU step for ~1 s more compile (docs/benchmarks.md).
    config.train.attention_blocks = 2
    # train.cpu_matmuls stays gpt1's "xla": oneDNN's ("onednn") was 1.16x this step on
    # an AVX-512 Xeon until the products became 2-D matmuls (gptjax/matmul.py); since
    # then XLA's are as fast (1.005x, 1.009x oneDNN's) and compile from the cache.

    # --mode=estimate: what this run would cost on one accelerator.
    config.estimate = config_dict.ConfigDict()
    config.estimate.accelerator = "H100"
    config.estimate.devices = 1
    config.estimate.mfu = 0.4
    return config
