"""A GPT-1-architecture model sized for benchmarking on a CPU.

    python -m gptjax.bench --config=bench-cpu [--vs-torch] [--json=PATH]

A full config; it also trains, on a corpus you name:
`python -m gptjax.main --config=configs/bench_cpu.py --workdir=DIR --config.data.books=PATH`
(or `--config.data.corpus=demo`).
Everything not set here is the paper's (configs/gpt1.py), dropout 0.1 included; the
sizes are a 6-layer, 384-wide model whose step takes one to a few seconds on two
cores, the attention is computed in two blocks of queries and the matmuls run through
oneDNN (speed levers; the values are the same).
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
    # The matmuls through oneDNN: attention's batched products run 1.1-3x faster there
    # than in XLA's own (YNNPACK, Eigen), so the step is 1.02-1.07x faster on an AVX-512
    # Xeon (docs/benchmarks.md); the price is that XLA cannot cache such an executable,
    # so every start compiles the step afresh (about 8 s against 1.5 s from the cache).
    config.train.cpu_matmuls = "onednn"

    # --mode=estimate: what this run would cost on one accelerator (the rest: gpt1's).
    config.estimate.devices = 1
    return config
