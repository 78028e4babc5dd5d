"""Benchmarks of one configuration on this machine.

    python -m gptjax.bench --config=bench-cpu [--vs-torch] [--versus=K=V,...] [--json=PATH]
                           [--profile=DIR]

Measures the train step (tokens/s, model FLOP/s, MFU, cold and cached compile time,
memory), the input pipeline (tokenize + pack + batch) against the step's consumption,
generation with the key/value cache, and how long an asynchronous checkpoint save blocks
the loop. `--vs-torch` runs the same architecture, batch and optimiser in HuggingFace
transformers on PyTorch, alternating with gptjax; `--versus` times variants of the
configuration's train step (other config values) in the same turns, so that a change is
measured against the baseline in one process; `--profile` traces the step and sums
its operations' time by kind (`gptjax.profiling`). Every figure is printed and, with
`--json`, written under the keys of `KEYS` (documented in docs/benchmarks.md).

Timings are medians of individually timed calls after warm-up, each ended by
`block_until_ready`. Model FLOPs per token are `model.flops_per_token`: 6N (N all
parameters, embeddings included) + 12 * n_layer * d_model * n_ctx for attention.
"""

import ast
import dataclasses
import json
import logging
import math
import os
import pathlib
import runpy
import statistics
import sys
import time

import jax
import ml_collections
import numpy as np

from gptjax import config as config_lib
from gptjax import host_memory, losses, optim, profiling, sharding, train
from gptjax.attention import attention_kernel
from gptjax.bench_parts import PipelineText, bench_checkpoint, bench_generate, bench_pipeline
from gptjax.bench_torch import TorchReference, check_comparable
from gptjax.errors import UserError, argument_parser, fail, one_line
from gptjax.estimate import compile_step, memory
from gptjax.measure import (
    fresh_compilation_cache,
    matmul_flops_per_s,
    minor_page_faults,
    peak_flops,
    peak_rss_bytes,
    round_ratios,
    take_turns,
    threads,
    timed,
)
from gptjax.model import (
    GPT,
    ModelConfig,
    count_params,
    flops_per_token,
    layer_options,
)

NAMED_CONFIGS = {"bench-cpu": "bench_cpu.py", "gpt1": "gpt1.py"}
# The learning-rate schedule's length for a config that counts epochs (its value does
# not change the step's cost).
SCHEDULE_STEPS = 10_000

# The keys of --vs-torch (null without it).
TORCH_KEYS = (
    *("torch_version", "transformers_version", "torch_threads", "torch_compile"),
    *("torch_step_time_s", "torch_step_times_s", "torch_train_tokens_per_s"),
    *("train_speedup_vs_torch", "train_speedup_by_round"),
    *("torch_gpt2_generate_tokens_per_s", "torch_openai_generate_tokens_per_s"),
    *("generate_speedup_vs_gpt2", "generate_speedup_vs_openai"),
)
# The JSON output: every key, always present (null where not measured).
KEYS = (
    # what ran, and where
    *("config", "backend", "device_kind", "num_devices", "threads", "jax_version"),
    *("num_params", "n_layer", "d_model", "n_ctx", "vocab_size", "batch_size"),
    *("compute_dtype", "attention", "attention_blocks", "flash_block", "lm_head_backward"),
    *("lm_head_pad_to", "cpu_matmuls"),
    *("cpu_vector_width", "dropout"),
    *("warmup_steps", "timed_steps"),
    # the train step
    *("step_time_s", "step_times_s", "train_tokens_per_s", "flops_per_token"),
    *("model_flops_per_s", "peak_flops_per_s", "peak_source", "mfu"),
    *("matmul_size", "matmul_flops_per_s", "compile_cold_s", "compile_cached_s"),
    *("peak_rss_bytes", "device_peak_bytes", "host_memory_kept", "page_faults_per_step"),
    *("xla_argument_bytes", "xla_output_bytes", "xla_alias_bytes", "xla_temp_bytes"),
    "xla_peak_bytes",
    # the input pipeline
    *("pipeline_tokens", "tokenize_tokens_per_s", "batch_tokens_per_s"),
    *("pipeline_tokens_per_s", "pipeline_ratio", "batch_ratio"),
    # generation
    *("generate_prompt_tokens", "generate_new_tokens", "generate_s"),
    *("generate_tokens_per_s", "generate_param_bytes_per_token", "generate_cache_positions"),
    *("generate_kv_bytes_per_token", "generate_bandwidth_bytes_per_s"),
    *("bandwidth_array_bytes", "memory_bandwidth_bytes_per_s", "generate_bandwidth_fraction"),
    # checkpoints
    *("checkpoint_bytes", "checkpoint_blocking_s", "checkpoint_total_s"),
    # --versus: one entry of VERSUS_KEYS per variant (null without it)
    "versus",
    # --profile (null without it)
    *("profile_dir", "profile_steps", "profile_wall_s_per_step", "profile_op_s_per_step"),
    "profile_ops",
    *TORCH_KEYS,
)
# Each --versus variant's entry (all but `overrides` and `error` null if it failed).
VERSUS_KEYS = (
    *("overrides", "error", "step_time_s", "step_times_s", "train_tokens_per_s", "mfu"),
    *("speedup", "speedup_by_round", "xla_peak_bytes"),
)


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
# Kinds of operation --profile keeps in the JSON (the most time first) and prints.
PROFILE_OPS, PROFILE_PRINTED = 40, 15


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
        self.model_cfg = ModelConfig.from_config(config.model, config.train)
        model = GPT(self.model_cfg, **layer_options(config.train))
        steps = config.train.num_steps or SCHEDULE_STEPS
        tx = optim.make_optimizer(config.train, steps)
        self.state, shardings = train.create_state(
            model, tx, config.train.seed, config.model.n_ctx, self.mesh
        )
        self.p_train = train.compile_train_step(
            losses.lm_objective(model),
            optim.lr_schedule(config.train, steps),
            self.mesh,
            shardings,
            config.train,
        )
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


def run(
    config_name: str,
    settings: Settings = Settings(),
    overrides: tuple[str, ...] = (),
    vs_torch: bool = False,
    torch_compile: bool = False,
    peak_tflops: float | None = None,
    versus: tuple[tuple[str, ...], ...] = (),
    profile_dir: pathlib.Path | None = None,
) -> dict:
    """Every measurement of one configuration: a dict with exactly the keys of KEYS.
    `versus`: variants, each overrides applied after `overrides`. `profile_dir`: trace
    the baseline's step there after timing it (see `gptjax.profiling`)."""
    config = load_config(config_name, overrides)
    if vs_torch:
        check_comparable(config)
    # Every variant's config, and the pipeline's flags, checked before anything compiles.
    variants = {spec: load_config(config_name, overrides, spec) for spec in versus}
    text = PipelineText.make(settings)
    step = TrainStep(config)
    cfg, device = step.model_cfg, jax.devices()[0]
    rows = config.train.batch_size // config.train.microbatches  # a step's attention batch
    queries = (rows, cfg.n_ctx, cfg.n_head, cfg.head_dim)
    r = dict.fromkeys(KEYS)
    r.update(
        config=config_name,
        backend=jax.default_backend(),
        device_kind=device.device_kind,
        num_devices=jax.device_count(),
        threads=threads(),
        jax_version=jax.__version__,
        num_params=count_params(step.state.params),
        **{k: getattr(cfg, k) for k in ("n_layer", "d_model", "n_ctx", "vocab_size", "dropout")},
        batch_size=config.train.batch_size,
        compute_dtype=cfg.dtype,
        attention=attention_kernel(cfg, queries, cfg.dropout > 0),  # as it runs
        attention_blocks=cfg.attention_blocks,
        flash_block=cfg.flash_block,
        lm_head_backward=cfg.lm_head_backward,
        lm_head_pad_to=cfg.lm_head_pad_to,
        cpu_matmuls=config.train.cpu_matmuls,
        cpu_vector_width=config.train.cpu_vector_width,
        warmup_steps=settings.warmup,
        timed_steps=settings.steps * settings.rounds,
    )
    logging.info("%s: %s parameters on %s; compiling", config_name, f"{r['num_params']:,}", device)
    r["compile_cold_s"], r["compile_cached_s"] = step.compile()
    r.update({f"xla_{k}": v for k, v in memory(step.compiled).items()})

    logging.info("timing %d train steps", r["timed_steps"])
    torch_ref = TorchReference(config, step.tokens, torch_compile, threads()) if vs_torch else None
    runners = {"gptjax": step} | ({"torch": torch_ref.train_step} if torch_ref else {})
    for fn in runners.values():
        for _ in range(settings.warmup):
            fn()
    errors = {}
    for spec, variant_config in variants.items():
        try:
            runners[spec] = variant_step(spec, variant_config, settings.warmup)
        except Exception as e:  # an experiment's failure is one of its results
            logging.exception("the variant %s failed; the run goes on without it", ",".join(spec))
            errors[spec] = f"{type(e).__name__}: {e}"
    r["matmul_size"] = settings.matmul_size
    # On a CPU the peak is the faster of XLA's own matmul and oneDNN's, whichever the
    # step uses (train.cpu_matmuls): on some CPUs oneDNN's is the faster, and a step
    # through it would otherwise be measured against a peak it beats.
    libraries = ({}, train.ONEDNN_CPU_OPTIONS) if r["backend"] == "cpu" else ({},)
    r["matmul_flops_per_s"] = matmul_flops_per_s(settings.matmul_size, libraries=libraries)
    step.page_faults.clear()
    times = take_turns(runners, settings.rounds, settings.steps)
    r["host_memory_kept"] = host_memory.kept()
    r["page_faults_per_step"] = statistics.median(step.page_faults)
    tokens_per_step = config.train.batch_size * cfg.n_ctx
    r["step_times_s"] = times["gptjax"]
    r["step_time_s"] = statistics.median(times["gptjax"])
    r["train_tokens_per_s"] = tokens_per_step / r["step_time_s"]
    r["flops_per_token"] = flops_per_token(cfg, r["num_params"])
    r["model_flops_per_s"] = r["flops_per_token"] * r["train_tokens_per_s"]
    r["peak_flops_per_s"], r["peak_source"] = peak_flops(
        device.device_kind, r["matmul_flops_per_s"], peak_tflops
    )
    if r["peak_flops_per_s"]:
        r["mfu"] = r["model_flops_per_s"] / r["peak_flops_per_s"]
    r["peak_rss_bytes"] = peak_rss_bytes()  # after the steps, before anything else grows
    r["device_peak_bytes"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
    if torch_ref:
        r.update(
            torch_version=torch_ref.torch.__version__,
            transformers_version=torch_ref.transformers.__version__,
            torch_threads=torch_ref.torch.get_num_threads(),
            torch_compile=torch_compile,
            torch_step_times_s=times["torch"],
            torch_step_time_s=statistics.median(times["torch"]),
            train_speedup_by_round=round_ratios(times["gptjax"], times["torch"], settings.rounds),
        )
        r["torch_train_tokens_per_s"] = tokens_per_step / r["torch_step_time_s"]
        r["train_speedup_vs_torch"] = r["torch_step_time_s"] / r["step_time_s"]
    if variants:
        r["versus"] = [
            versus_failure(spec, errors[spec])
            if spec in errors
            else versus_result(spec, runners[spec], times, r, settings.rounds)
            for spec in variants
        ]

    # The step's figures now, not only in the final table: the rest takes minutes at
    # gpt1's size, and its failure would otherwise leave none of them on the screen.
    logging.info("%s", report(r, train_only=True))
    if profile_dir:
        r.update(profile_step(step, profile_dir, settings.profile_steps))
    logging.info("input pipeline, generation, checkpoints")
    r.update(bench_pipeline(config, settings, text))
    r["pipeline_ratio"] = r["pipeline_tokens_per_s"] / r["train_tokens_per_s"]
    r["batch_ratio"] = r["batch_tokens_per_s"] / r["train_tokens_per_s"]
    r.update(bench_generate(step, settings, torch_ref))
    r.update(bench_checkpoint(step.state, settings.checkpoint_saves))
    return r


def profile_step(step: TrainStep, directory: pathlib.Path, steps: int) -> dict:
    """The --profile keys: `steps` of the step traced into `directory`, and its module's
    operations by kind (logged as a table)."""
    logging.info("tracing %d train steps into %s", steps, directory)
    trace_file, wall = profiling.trace(step, directory, steps)
    module = profiling.module_name(step.compiled.as_text())
    ops = profiling.op_times(trace_file, module, steps)
    if ops:
        logging.info(
            "the step's operations by time (%s):\n%s",
            trace_file,
            profiling.table(ops, PROFILE_PRINTED),
        )
    else:
        logging.warning(
            "no event of %s's operations in %s; open the trace itself", module, trace_file
        )
    return {
        "profile_dir": str(directory),
        "profile_steps": steps,
        "profile_wall_s_per_step": wall,
        "profile_op_s_per_step": sum(o.s_per_step for o in ops),
        "profile_ops": [dataclasses.asdict(o) for o in ops[:PROFILE_OPS]],
    }


def variant_step(spec: tuple[str, ...], config: ml_collections.ConfigDict, warmup: int):
    """A --versus variant's train step, compiled (from the persistent cache if there)
    and run `warmup` times. Whatever it raises (a kernel that does not compile, memory
    it cannot have) fails this variant alone: `run` reports it and measures the rest."""
    step = TrainStep(config)
    logging.info("compiling the variant %s", ",".join(spec))
    step.compiled = compile_step(step.p_train, step.mesh, step.state, step.batch)
    for _ in range(warmup):
        step()
    return step


def versus_failure(spec, error: str) -> dict:
    """A variant's entry when it could not compile or run."""
    return dict.fromkeys(VERSUS_KEYS) | {"overrides": list(spec), "error": error}


def versus_result(spec, step: TrainStep, times: dict, r: dict, rounds: int) -> dict:
    """A variant's figures, its speed as a ratio to the baseline's tokens/s (per round
    too: the rounds are the turns both took)."""
    tokens = step.tokens[:, 1:].size  # a variant may change the batch or context
    mfu = None
    if r["peak_flops_per_s"]:
        flops = flops_per_token(step.model_cfg, count_params(step.state.params))
        mfu = flops * tokens / statistics.median(times[spec]) / r["peak_flops_per_s"]
    base = r["batch_size"] * r["n_ctx"]
    by_round = round_ratios(
        [t / tokens for t in times[spec]], [t / base for t in times["gptjax"]], rounds
    )
    return {
        "overrides": list(spec),
        "error": None,
        "step_time_s": statistics.median(times[spec]),
        "step_times_s": times[spec],
        "train_tokens_per_s": tokens / statistics.median(times[spec]),
        "mfu": mfu,
        "speedup": tokens / statistics.median(times[spec]) / r["train_tokens_per_s"],
        "speedup_by_round": by_round,
        "xla_peak_bytes": memory(step.compiled)["peak_bytes"],
    }


_PREFIXES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def _si(x: float | None, unit: str = "") -> str:
    """3 significant digits and an SI prefix: 1.23 GFLOP/s."""
    if x is None:
        return "-"
    prefix, scale = next(((p, s) for p, s in _PREFIXES if abs(x) >= s), ("", 1.0))
    return f"{x / scale:.3g} {prefix}{unit}"


def report(r: dict, train_only: bool = False) -> str:
    """The result as an aligned table for a terminal; `train_only`: only the rows known
    once the train steps are timed (no input pipeline, generation or checkpoint)."""
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    uncached = r["cpu_matmuls"] == "onednn" and r["backend"] == "cpu"
    pallas = r["attention"] == "pallas"
    blocks = f"blocks of {r['flash_block']}" if pallas else f"{r['attention_blocks']} block(s)"
    head = r["lm_head_backward"]
    if r["lm_head_pad_to"] > 1:
        head += f" (vocabulary padded to a multiple of {r['lm_head_pad_to']})"
    rows = {
        "configuration": f"{r['config']}: {r['n_layer']} layer{'s' * (r['n_layer'] != 1)}, "
        f"width {r['d_model']}, "
        f"context {r['n_ctx']}, vocab {r['vocab_size']}, {r['num_params']:,} parameters; "
        f"batch {r['batch_size']}, {r['compute_dtype']}, dropout {r['dropout']}, "
        f"{r['attention']} attention in {blocks}, LM head backward in {head}, "
        f"{r['cpu_matmuls']} matmuls and {r['cpu_vector_width']}-bit vectors on CPUs",
        "machine": f"{r['num_devices']} x {r['device_kind']} ({r['backend']}), "
        f"{r['threads']} threads, jax {r['jax_version']}",
        "train step": f"{r['step_time_s'] * 1e3:.1f} ms (median of {r['timed_steps']} after "
        f"{r['warmup_steps']} warm-up) = {_si(r['train_tokens_per_s'], 'tokens/s')}",
        "model FLOPs": f"{_si(r['flops_per_token'], 'FLOP')}/token "
        f"(6N + 12 * n_layer * d_model * n_ctx) = {_si(r['model_flops_per_s'], 'FLOP/s')}",
        "MFU": f"{mfu} of {_si(r['peak_flops_per_s'], 'FLOP/s')} ({r['peak_source']}); "
        f"{r['matmul_size']}^3 float32 matmul: {_si(r['matmul_flops_per_s'], 'FLOP/s')}",
        "compile": f"cold {r['compile_cold_s']:.2f} s, "
        f"from the persistent cache {r['compile_cached_s']:.2f} s"
        + (" (oneDNN's executables are not cached)" if uncached else ""),
        "memory": f"peak RSS {_si(r['peak_rss_bytes'], 'B')}; XLA: arguments "
        f"{_si(r['xla_argument_bytes'], 'B')}, temporaries {_si(r['xla_temp_bytes'], 'B')}, "
        f"peak {_si(r['xla_peak_bytes'], 'B')}; device peak {_si(r['device_peak_bytes'], 'B')}",
        "host memory": f"{r['page_faults_per_step']:,.0f} page faults a step; freed blocks "
        f"{'kept for reuse' if r['host_memory_kept'] else 'returned (malloc defaults)'}",
    }
    if not train_only:
        rows |= {
            "input pipeline": f"tokenize {_si(r['tokenize_tokens_per_s'])}, pack + batch "
            f"{_si(r['batch_tokens_per_s'])}, both {_si(r['pipeline_tokens_per_s'], 'tokens/s')}: "
            f"{r['pipeline_ratio']:.3g}x the step's need (batching alone {r['batch_ratio']:.3g}x)",
            "generation": f"{r['generate_new_tokens']} tokens after {r['generate_prompt_tokens']} "
            f"in {r['generate_s']:.3f} s = {_si(r['generate_tokens_per_s'], 'tokens/s')}; "
            f"{_si(r['generate_param_bytes_per_token'], 'B')} parameters + "
            f"{_si(r['generate_kv_bytes_per_token'], 'B')} cache "
            f"({r['generate_cache_positions']:.0f} positions) per token: "
            f"{_si(r['generate_bandwidth_bytes_per_s'], 'B/s')}, "
            f"{r['generate_bandwidth_fraction']:.0%} of the "
            f"{_si(r['memory_bandwidth_bytes_per_s'], 'B/s')} measured (summing "
            f"{_si(r['bandwidth_array_bytes'], 'B')})",
            "checkpoint": f"{_si(r['checkpoint_bytes'], 'B')}: save() blocks "
            f"{r['checkpoint_blocking_s'] * 1e3:.1f} ms, "
            f"written in {r['checkpoint_total_s']:.2f} s",
        }
    if r["profile_dir"]:
        top = ", ".join(f"{o['op']} {o['s_per_step'] * 1e3:.3g} ms" for o in r["profile_ops"][:3])
        rows["profile"] = (
            f"{r['profile_op_s_per_step'] * 1e3:.1f} ms of operations a step "
            f"({r['profile_wall_s_per_step'] * 1e3:.1f} ms a step while traced); "
            f"most: {top or 'none found'}; trace in {r['profile_dir']}"
        )
    for i, v in enumerate(r["versus"] or (), 1):
        if v["error"]:
            first_line = v["error"].splitlines()[0]
            rows[f"versus ({i})"] = f"{','.join(v['overrides'])}: failed: {first_line}"
            continue
        by_round = ", ".join(f"{x:.2f}" for x in v["speedup_by_round"])
        mfu = "" if v["mfu"] is None else f", MFU {v['mfu']:.1%}"
        rows[f"versus ({i})"] = (
            f"{','.join(v['overrides'])}: {v['step_time_s'] * 1e3:.1f} ms = "
            f"{_si(v['train_tokens_per_s'], 'tokens/s')}{mfu}: "
            f"{v['speedup']:.3f}x the baseline (by round: {by_round}); XLA peak "
            f"{_si(v['xla_peak_bytes'], 'B')}"
        )
    if r["torch_version"]:
        by_round = ", ".join(f"{x:.2f}" for x in r["train_speedup_by_round"])
        rows["vs torch: train"] = (
            f"{_si(r['torch_train_tokens_per_s'], 'tokens/s')} (torch {r['torch_version']}, "
            f"{'torch.compile' if r['torch_compile'] else 'eager'}, {r['torch_threads']} "
            f"threads): gptjax {r['train_speedup_vs_torch']:.2f}x (by round: {by_round})"
        )
    if r["torch_version"] and not train_only:
        rows["vs torch: generation"] = (
            f"GPT2LMHeadModel {_si(r['torch_gpt2_generate_tokens_per_s'], 'tokens/s')}: gptjax "
            f"{r['generate_speedup_vs_gpt2']:.2f}x; OpenAIGPTLMHeadModel (no cache) "
            f"{_si(r['torch_openai_generate_tokens_per_s'], 'tokens/s')}: gptjax "
            f"{r['generate_speedup_vs_openai']:.2f}x"
        )
    width = max(map(len, rows))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())


def versus_overrides(text: str) -> tuple[str, ...]:
    """--versus's comma-separated overrides."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items or not all("=" in item for item in items):
        raise UserError(f"--versus={text!r}: give SECTION.KEY=VALUE overrides, comma-separated")
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(prog="python -m gptjax.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="tiny, bench-cpu, gpt1 or a config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. train.compute_dtype=bfloat16 (repeatable)",
    )
    parser.add_argument(
        "--versus",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE,...",
        help="also time a variant of the train step with these overrides (after --set), in "
        "turns with the baseline; e.g. model.dropout=0.0 (repeatable: one variant each)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--vs-torch", action="store_true", help="compare with transformers")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, help="the peak for the MFU")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=pathlib.Path,
        help="also trace --profile-steps train steps into DIR (TensorBoard, Perfetto) and "
        "print the step's operations that take the most time",
    )
    fields = dataclasses.fields(Settings)
    for f in fields:
        help_text = f"{f.metadata['help']} (default {f.default})"
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, help=help_text)
    args = parser.parse_args(argv)
    if args.torch_compile and not args.vs_torch:
        fail("--torch-compile needs --vs-torch")
    if args.profile:
        try:  # now, not after minutes of measuring
            args.profile.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(
                f"--profile={args.profile}: cannot make that directory ({e.strerror}); give "
                "a directory for the trace"
            )
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        fail(f"--json={args.json}: its directory does not exist; create it first")
    if args.json and os.path.isdir(args.json):
        fail(f"--json={args.json} is a directory; give a file name")
    if args.json and not writable(args.json):
        fail(f"--json={args.json}: cannot be written (permissions); give another path")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        fail(f"--peak-tflops={args.peak_tflops}: it must be a positive number")
    if args.vs_torch and jax.default_backend() != "cpu":
        # The peer runs transformers on the CPU: a ratio against an accelerator's step
        # would compare two machines, not two implementations.
        fail(
            f"--vs-torch times PyTorch on the CPU, against gptjax on {jax.default_backend()}; "
            "run it on a CPU (JAX_PLATFORMS=cpu)"
        )
    given = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
    for name, value in given.items():
        if value <= 0:
            fail(f"--{name.replace('_', '-')}={value}: it must be positive")
    settings = dataclasses.replace(TINY_SETTINGS if args.config == "tiny" else Settings(), **given)
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on every save
    logging.getLogger("jax").setLevel(logging.WARNING)  # backends not found, cache resets
    try:
        result = run(
            args.config,
            settings,
            overrides=tuple(args.set),
            vs_torch=args.vs_torch,
            torch_compile=args.torch_compile,
            peak_tflops=args.peak_tflops,
            versus=tuple(versus_overrides(v) for v in args.versus),
            profile_dir=args.profile,
        )
    except UserError as e:
        fail(str(e))
    print(report(result))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as e:  # e.g. the disk filled during the run
            fail(f"--json={args.json}: could not write it ({e.strerror}); the results are above")
        logging.info("wrote %s", args.json)
    return result


def writable(path: str) -> bool:
    """Whether `path` (a file, or a name in an existing directory) can be written."""
    if os.path.exists(path):
        return os.access(path, os.W_OK)
    return os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK | os.X_OK)


if __name__ == "__main__":
    host_memory.at_start()
    main(sys.argv[1:])
