"""What `gptjax.bench` measures: how much (`Settings`), of which configuration
(`load_config`: a named one or a file, with overrides), and the compiled train step
on synthetic tokens (`TrainStep`)."""

import ast
import dataclasses
import pathlib
import runpy
import time

import jax
import ml_collections
import numpy as np

from gptjax import config as config_lib
from gptjax import losses, sharding, train
from gptjax.errors import UserError, one_line
from gptjax.estimate import compile_step
from gptjax.measure import fresh_compilation_cache, minor_page_faults, timed
from gptjax.model import language_model

NAMED_CONFIGS = {"bench-cpu": "bench_cpu.py", "gpt1": "gpt1.py"}
# The learning-rate schedule's length for a config that counts epochs (its value does
# not change the step's cost).
SCHEDULE_STEPS = 10_000


def _setting(default: int, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to measure; each is a flag (--warmup, --steps, ...)."""

    warmup: int = _setting(3, "untimed train steps after compiling")
    steps: int = _setting(10, "timed train steps per round")
    rounds: int = _setting(3, "rounds of --steps (with --vs-torch, gptjax and torch take turns)")
    matmul_size: int = _setting(2048, "n of the n x n x n float32 matmul giving a CPU's peak")
    text_chars: int = _setting(2_000_000, "characters of synthetic text for the input pipeline")
    tokenizer_vocab: int = _setting(4096, "pieces of the input pipeline's tokenizer")
    prompt_tokens: int = _setting(32, "generation: the prompt")
    new_tokens: int = _setting(128, "generation: tokens to generate")
    generate_repeats: int = _setting(3, "generation: timed calls")
    bandwidth_mb: int = _setting(512, "MiB of float32 summed to measure the memory bandwidth")
    checkpoint_saves: int = _setting(3, "checkpoint saves timed")
    profile_steps: int = _setting(3, "train steps traced with --profile")


# `--config=tiny` (tests): a 1-layer model with XLA's own matmuls (whose executables the
# persistent compilation cache stores, unlike bench-cpu's oneDNN ones), and as little
# measuring as gives every key.
TINY_SETTINGS = Settings(
    warmup=1,
    steps=2,
    rounds=1,
    matmul_size=64,
    text_chars=60_000,
    tokenizer_vocab=128,
    prompt_tokens=8,
    new_tokens=8,
    generate_repeats=1,
    bandwidth_mb=4,
    checkpoint_saves=1,
    profile_steps=2,
)


def load_config(
    name: str, overrides: tuple[str, ...] = (), variant: tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
    """`tiny`, `bench-cpu`, `gpt1` (batch 1 on a CPU, the paper's 64 elsewhere) or the
    path of a config file; then `overrides` (--set), then a --versus `variant`, each
    "section.key=value"."""
    named = name == "tiny" or name in NAMED_CONFIGS
    path = pathlib.Path(
        config_lib.shipped_config(NAMED_CONFIGS.get(name, "bench_cpu.py")) if named else name
    )
    if not path.is_file():
        raise UserError(f"--config={name}: use tiny, {', '.join(NAMED_CONFIGS)} or a config file")
    try:
        config = runpy.run_path(str(path))["get_config"]()
    except Exception as e:  # whatever a file that is not a config raises on running
        raise UserError(
            f"--config={name}: not a config file ({type(e).__name__}: {one_line(e)[:200]}); "
            "give a file defining get_config(), as in configs/"
        ) from None
    if "task" in config or config.get("init_from"):
        raise UserError(
            f"--config={name} fine-tunes; the benchmark times pretraining's step: give tiny, "
            f"{', '.join(NAMED_CONFIGS)} or a pretraining config file (as configs/gpt1.py)"
        )
    if name == "tiny":
        config.model.update(vocab_size=64, n_ctx=32, n_layer=1, n_head=2, d_model=16, d_mlp=64)
        config.train.update(batch_size=4, num_steps=10, warmup_steps=2, cpu_matmuls="xla")
    if name == "gpt1" and jax.default_backend() == "cpu":
        config.train.batch_size = 1
    _override(config, overrides, "--set")
    _override(config, variant, "--versus")
    config_lib.validate(config)
    sharding.check_batch(config, sharding.make_mesh(config.mesh))  # before anything compiles
    return config


def _override(config: ml_collections.ConfigDict, items: tuple[str, ...], flag: str):
    for item in items:
        key, equals, text = item.partition("=")
        section, _, field = key.partition(".")
        if not equals:
            raise UserError(f"{flag} {item}: give SECTION.KEY=VALUE, e.g. train.batch_size=8")
        if section not in config or field not in config[section]:
            raise UserError(f"{flag} {item}: no such config key {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            # nan and inf, as --config.KEY= takes them (and validation refuses them); else
            # a bare word: bfloat16, fused, ...
            value = float(text) if text.strip().lower() in ("nan", "inf", "-inf") else text
        try:
            config[section][field] = value
        except TypeError as e:
            raise UserError(f"{flag} {item}: {e}") from None


class TrainStep:
    """A run's train step on one fixed random batch, built as `pretrain.Run` builds it;
    each call is one optimiser update, waited for."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch(config, self.mesh)
        model = language_model(config)
        self.model_cfg = model.cfg
        steps = config.train.num_steps or SCHEDULE_STEPS
        built = train.build(model, losses.lm_objective(model), config.train, steps, self.mesh)
        self.state, self.p_train = built.state, built.p_train
        rng = np.random.default_rng(0)
        shape = (config.train.batch_size, config.model.n_ctx)
        self.tokens = rng.integers(0, config.model.vocab_size, (shape[0], shape[1] + 1), np.int32)
        self.batch = sharding.global_batch(
            self.mesh, {"tokens": self.tokens, "weights": np.ones(shape, np.float32)}
        )
        self.compiled = None
        self.page_faults = []  # the process's minor page faults during each call

    def compile(self) -> tuple[float, float]:
        """(cold, cached) compile seconds: a fresh persistent cache filled by a first
        compilation, then in-memory caches cleared and compiled again."""
        jax.clear_caches()  # nothing compiled earlier in this process is reused
        with fresh_compilation_cache():
            cold = timed(lambda: compile_step(self.p_train, self.mesh, self.state, self.batch))
            jax.clear_caches()
            start = time.perf_counter()
            self.compiled = compile_step(self.p_train, self.mesh, self.state, self.batch)
            return cold, time.perf_counter() - start

    def __call__(self):
        before = minor_page_faults()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.page_faults.append(minor_page_faults() - before)
