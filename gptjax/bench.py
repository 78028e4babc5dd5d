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
`--json`, written under the keys of `bench_report.KEYS` (documented in docs/benchmarks.md).

Timings are medians of individually timed calls after warm-up, each ended by
`block_until_ready`. Model FLOPs per token are `model.flops_per_token`: 6N (N all
parameters, embeddings included) + 12 * n_layer * d_model * n_ctx for attention.
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import statistics
import sys

import jax
import ml_collections

from gptjax import host_memory, profiling, train
from gptjax.attention import attention_kernel
from gptjax.bench_parts import PipelineText, bench_checkpoint, bench_generate, bench_pipeline
from gptjax.bench_report import KEYS, VERSUS_KEYS, report
from gptjax.bench_step import TINY_SETTINGS, Settings, TrainStep, load_config
from gptjax.bench_torch import TorchReference, check_comparable
from gptjax.errors import UserError, argument_parser, fail, local_path
from gptjax.estimate import compile_step, memory
from gptjax.measure import (
    matmul_flops_per_s,
    peak_flops,
    peak_rss_bytes,
    round_ratios,
    take_turns,
    threads,
)
from gptjax.model import (
    count_params,
    flops_per_token,
)

# Kinds of operation --profile keeps in the JSON (the most time first) and prints.
PROFILE_OPS, PROFILE_PRINTED = 40, 15


def run(
    config_name: str,
    settings: Settings | None = None,
    overrides: tuple[str, ...] = (),
    vs_torch: bool = False,
    torch_compile: bool = False,
    peak_tflops: float | None = None,
    versus: tuple[tuple[str, ...], ...] = (),
    profile_dir: pathlib.Path | None = None,
) -> dict:
    """Every measurement of one configuration: a dict with exactly the keys of KEYS.
    `versus`: variants, each overrides applied after `overrides`. `profile_dir`: trace
    the baseline's step there after timing it (see `gptjax.profiling`); `settings`:
    `Settings()` unless given."""
    settings = settings or Settings()
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
    try:
        args.json = args.json and local_path(args.json, "--json")
        args.profile = args.profile and pathlib.Path(local_path(args.profile, "--profile"))
    except UserError as e:
        fail(str(e))
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
