"""What a configured run will cost, without running it: parameters, FLOPs per token,
per-device memory of the compiled train step, and the time to train on a named accelerator.

    python -m gptjax.main --config=configs/gpt1.py --workdir=runs/gpt1 --mode=estimate

The train step is compiled for the configured mesh and batch from shapes alone
(`jax.eval_shape` for the state, `jax.ShapeDtypeStruct` for the batch), so nothing of the
model's size is allocated; XLA's memory analysis of that compiled step gives the memory.
The time is FLOPs / (MFU x published peak x devices), read from `config.estimate`
(defaults below when the config has no such section).

With `estimate.topology` the step is compiled for a TPU slice this machine does not have
(libtpu's compiler runs on any Linux x86 machine), so its memory is what the TPU
compiler plans, not the CPU compiler's upper bound:

    python -m gptjax.main --config=configs/gpt1.py --workdir=runs/gpt1 --mode=estimate \
        --config.estimate.topology=v5litepod-8
"""

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections

from gptjax import losses, sharding, tpu_topology, train
from gptjax.atomic import replacing
from gptjax.errors import UserError
from gptjax.model import count_params, flops_per_token, language_model
from gptjax.run_config import CONFIG_FILE, check_kind, read_config
from gptjax.tasks import transforms
from gptjax.tokenizer import SPECIAL_TOKENS
from gptjax.workdirs import ESTIMATE_FILE

PETAFLOP_S_DAY = 1e15 * 86400


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A chip's published dense bfloat16 peak and its memory."""

    name: str
    peak_flops: float  # per chip, dense bfloat16 (no sparsity)
    memory_bytes: float  # per chip
    kinds: tuple[str, ...]  # substrings of `jax.Device.device_kind` that name it


# Vendors' datasheets (NVIDIA's SXM parts unless named). Earlier entries win when several
# match a device_kind ("H100 PCIe" before "H100", "GH200" and "H200 NVL" before "H200",
# "A100-SXM4-40GB" before "A100", "TPU v5 lite" (a v5e) before "TPU v5" (a v5p)). A
# GH200's GPU has 96 or 144 GB: the smaller is taken.
ACCELERATORS = (
    Accelerator("GH200", 989e12, 96e9, ("GH200",)),
    Accelerator("H200 NVL", 835e12, 141e9, ("H200 NVL",)),
    Accelerator("H200", 989e12, 141e9, ("H200",)),
    Accelerator("H100 PCIe", 756e12, 80e9, ("H100 PCIe",)),
    Accelerator("H100 NVL", 835e12, 94e9, ("H100 NVL",)),
    Accelerator("H100", 989e12, 80e9, ("H100",)),
    Accelerator("A100 40GB", 312e12, 40e9, ("A100-SXM4-40GB", "A100-PCIE-40GB")),
    Accelerator("A100", 312e12, 80e9, ("A100",)),
    Accelerator("v4", 275e12, 32e9, ("TPU v4",)),
    Accelerator("v5e", 197e12, 16e9, ("TPU v5 lite", "TPU v5e")),
    Accelerator("v5p", 459e12, 95e9, ("TPU v5p", "TPU v5")),
    Accelerator("v6e", 918e12, 32e9, ("TPU v6 lite", "TPU v6e")),
)

# BookCorpus (the paper's data): ~985M words (Zhu et al., 2015); at ~1.3 BPE tokens per
# English word, ~1.28B tokens per epoch. 100 epochs of it at 0.76 GFLOP per token is
# ~1.1 petaflop/s-days, near the 0.96 petaflop/s-days OpenAI reported for the run.
BOOKCORPUS_TOKENS = 1_280_000_000

# `config.estimate`, when the config has none. See docs/benchmarks.md.
DEFAULTS = {
    "accelerator": "H100",  # a name or device_kind of ACCELERATORS
    "devices": 8,  # the paper trained on 8 GPUs
    "mfu": 0.4,  # model FLOP utilisation against the bfloat16 peak
    "tokens_per_epoch": BOOKCORPUS_TOKENS,  # for a run set by train.epochs
    # A TPU slice to compile the step for, ahead of time, instead of this machine's
    # devices ("v5litepod-8", "v4-32" or "v5e:2x4"; needs libtpu): it then names the
    # accelerator and the devices.
    "topology": "",
}


def find_accelerator(name: str) -> Accelerator | None:
    """The table's entry for a short name ("H100", "v5e") or a device_kind
    ("NVIDIA H100 80GB HBM3", "TPU v5 lite"); None if unknown."""
    lowered = name.lower().strip()
    for acc in ACCELERATORS:
        if lowered in (acc.name.lower(), f"tpu {acc.name.lower()}"):
            return acc
    for acc in ACCELERATORS:
        if any(kind.lower() in lowered for kind in acc.kinds):
            return acc
    return None


def settings(config: ml_collections.ConfigDict) -> dict:
    """`config.estimate` over DEFAULTS."""
    section = config.get("estimate")
    given = section.to_dict() if section is not None else {}
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise UserError(f"unknown config.estimate keys {sorted(unknown)}; use {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


def training_length(config: ml_collections.ConfigDict, tokens_per_epoch: int) -> tuple[int, int]:
    """(steps, tokens) of the configured run: `train.num_steps` if set, else
    `train.epochs` passes over `tokens_per_epoch` tokens. A step trains on
    batch_size x n_ctx tokens (each window predicts n_ctx targets)."""
    tokens_per_step = config.train.batch_size * config.model.n_ctx
    if config.train.num_steps is not None:
        steps = config.train.num_steps
    else:
        steps = max(1, config.train.epochs * tokens_per_epoch // tokens_per_step)
    return steps, steps * tokens_per_step


def abstract_batch(batch_size: int, n_ctx: int, mesh) -> dict:
    """A batch of `train_step` as shapes: windows of n_ctx + 1 ids and n_ctx weights."""
    batch_sharding = sharding.batch_sharding(mesh)
    return {
        "tokens": jax.ShapeDtypeStruct((batch_size, n_ctx + 1), jnp.int32, sharding=batch_sharding),
        "weights": jax.ShapeDtypeStruct((batch_size, n_ctx), jnp.float32, sharding=batch_sharding),
    }


def abstract_task_batch(
    batch_size: int, sequences: int, n_ctx: int, vocab_rows: int, regression: bool, mesh
):
    """A fine-tuning batch as shapes (`tasks.transforms.encode`'s arrays): `sequences`
    per example, each padded to n_ctx, the longest a task's split can have; the ids in
    16 bits where `vocab_rows` (the specials' included) fit, as encode stores them."""

    def shape(*dims, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(dims, dtype, sharding=sharding.batch_sharding(mesh))

    b, s = batch_size, sequences
    ids = transforms.id_dtype(vocab_rows)
    return {
        "tokens": shape(b, s, n_ctx, dtype=ids),
        "clf_pos": shape(b, s),
        "lengths": shape(b, s),
        "label": shape(b, dtype=jnp.float32 if regression else jnp.int32),
        "weight": shape(b, dtype=jnp.float32),
        "labelled": shape(b, dtype=jnp.bool_),
        "index": shape(b),
    }


def compile_step(p_train, mesh, state, batch, compiler_options: dict | None = None):
    """Ahead-of-time compilation of a `train.compile_train_step` step for these
    arguments (arrays or ShapeDtypeStructs), traced under the mesh's axis rules."""
    with sharding.axis_rules(mesh):
        lowered = p_train.__wrapped__.lower(state, batch)
    return lowered.compile(compiler_options)


def xla_flops(compiled, devices: int, train_cfg, n_layer: int) -> float | None:
    """The FLOPs XLA counts in a compiled step, over all devices (its cost analysis is
    per device); None where the backend reports none, or where the step has a loop,
    whose body XLA counts once (`train.microbatches` > 1, or layers scanned in a loop:
    `train.scan_layers` with a `scan_unroll` from 1 to n_layer - 1). With
    `train.remat` the count includes the forward pass recomputed."""
    looped = train_cfg.scan_layers and 0 < train_cfg.scan_unroll < n_layer
    if train_cfg.microbatches > 1 or looped:
        return None
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return None if flops is None or flops < 0 else flops * devices


# An executable compiled only for its memory analysis is never run: on a CPU, skip
# LLVM's optimisations (buffer assignment, and so the analysis, comes before them;
# the figures are identical and the compilation 2-4 times faster).
ANALYSIS_ONLY_CPU_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def memory(compiled) -> dict[str, int]:
    """XLA's per-device memory analysis of a compiled step. The peak is arguments +
    outputs - aliased (donated) buffers + temporaries."""
    stats = compiled.memory_analysis()
    out = {
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def estimate(config: ml_collections.ConfigDict) -> dict:
    """The numbers of `run`, as a dict (see docs/benchmarks.md for the keys)."""
    est = settings(config)
    devices = None  # this process's
    if est["topology"]:
        devices = tpu_topology.devices(est["topology"])
        kind = devices[0].device_kind
        if find_accelerator(kind) is None:
            known = ", ".join(a.name for a in ACCELERATORS if a.kinds[0].startswith("TPU"))
            raise UserError(
                f"estimate.topology={est['topology']!r} is a slice of {kind} chips, whose "
                f"peak and memory this does not know; use {known}"
            )
        est.update(accelerator=kind, devices=len(devices))
    acc = find_accelerator(est["accelerator"])
    if acc is None:
        names = ", ".join(a.name for a in ACCELERATORS)
        raise UserError(
            f"estimate.accelerator={est['accelerator']!r} is unknown; use one of {names}"
        )
    if not 0.0 < est["mfu"] <= 1.0 or est["devices"] <= 0:
        raise UserError(
            f"estimate.mfu={est['mfu']} and estimate.devices={est['devices']}: the MFU must "
            "be in (0, 1] and the devices positive"
        )
    fine_tune = "task" in config
    tokens_per_epoch = est["tokens_per_epoch"]  # (a fine-tune's epochs are its examples)
    if not fine_tune and (not isinstance(tokens_per_epoch, int) or tokens_per_epoch <= 0):
        raise UserError(
            f"estimate.tokens_per_epoch={tokens_per_epoch!r}: give the corpus's tokens, a "
            "positive whole number (it sets the length of a run set by train.epochs)"
        )
    specials = len(SPECIAL_TOKENS) if fine_tune else 0  # the fine-tuning tokens' rows
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(config, mesh, specials)
    target = "tpu" if devices is not None else sharding.platform()
    with sharding.compiling_for(target):
        compiled, num_params, model_cfg, steps, tokens, sequences = _compile(config, est, mesh)
    mem = memory(compiled)
    per_token = flops_per_token(model_cfg, num_params)
    if fine_tune and config.finetune.lm_coef == 0:
        # No LM loss: the tied head's product, which 6N counts through the embedding's
        # parameters, is not computed (the paper's "without aux LM" ablation).
        per_token -= 6 * model_cfg.vocab_size * model_cfg.d_model
    counted = xla_flops(compiled, mesh.size, config.train, config.model.n_layer)
    total_flops = tokens and per_token * tokens
    seconds = total_flops and total_flops / (est["mfu"] * acc.peak_flops * est["devices"])
    if config.train.num_steps is not None:
        tokens_from = "train.num_steps"
    else:
        tokens_from = None if fine_tune else "train.epochs"
    positions = config.train.batch_size * sequences * config.model.n_ctx  # a step's
    return {
        "task": config.task.name if fine_tune else None,
        "sequences_per_example": sequences,
        "num_params": num_params,
        "flops_per_token": per_token,
        "batch_size": config.train.batch_size,
        "n_ctx": config.model.n_ctx,
        "steps": steps,
        "tokens": tokens,
        "tokens_from": tokens_from,
        "tokens_per_epoch": None if fine_tune else est["tokens_per_epoch"],
        "total_flops": total_flops,
        "petaflop_s_days": total_flops and total_flops / PETAFLOP_S_DAY,
        "mesh": dict(mesh.shape),
        # Whether `mesh.tensor` splits the token embedding (else each of its devices
        # holds it whole: `sharding.logical_sharding`).
        "vocab_split": sharding.splits_vocabulary(mesh, model_cfg.vocab_size),
        "compiled_on": mesh.devices.flat[0].device_kind,
        "topology": tpu_topology.topology_name(est["topology"]) if devices else None,
        "xla_flops_per_token": counted and counted / positions,
        "memory_per_device": mem,
        "accelerator": acc.name,
        "accelerator_peak_flops": acc.peak_flops,
        "accelerator_memory_bytes": acc.memory_bytes,
        # Unknown (None) when the step was compiled for another number of devices.
        "fits_in_memory": (
            mem["peak_bytes"] <= acc.memory_bytes if mesh.size == est["devices"] else None
        ),
        "devices": est["devices"],
        "mfu": est["mfu"],
        "train_seconds": seconds,
        "train_days": seconds and seconds / 86400,
    }


def _compile(config: ml_collections.ConfigDict, est: dict, mesh):
    """The configured train step compiled for `mesh` from shapes alone, with the
    parameter count, model config, steps and tokens it was built from (both None for a
    fine-tune without `train.num_steps`: its length is its task's examples), and the
    sequences an example is (1 for pretraining)."""
    if "task" in config:  # a fine-tuning config: the task's model, objective and batch
        from gptjax import finetune
        from gptjax.tasks import registry

        task = registry.get_task(config.task)
        model = finetune.task_model(config, task)
        objective = losses.task_objective(model, config.finetune.lm_coef, task.regression)
        sequences, n_ctx = finetune.sequences_per_example(task), config.model.n_ctx
        init_inputs = finetune.init_inputs(task)
        rows = model.cfg.vocab_size
        batch = abstract_task_batch(
            config.train.batch_size, sequences, n_ctx, rows, task.regression, mesh
        )
        steps = config.train.num_steps
        tokens = steps and steps * config.train.batch_size * sequences * n_ctx
    else:
        model, init_inputs, sequences = language_model(config), None, 1
        objective = losses.lm_objective(model)
        batch = abstract_batch(config.train.batch_size, config.model.n_ctx, mesh)
        steps, tokens = training_length(config, est["tokens_per_epoch"])
    built = train.build(
        model, objective, config.train, steps or 1, mesh, False, init_inputs=init_inputs
    )
    state, p_train = built.state, built.p_train
    options = ANALYSIS_ONLY_CPU_OPTIONS if sharding.platform() == "cpu" else None
    logging.info(
        "compiling the train step for %d x %s, for its memory analysis%s",
        len(mesh.devices.flat),
        mesh.devices.flat[0].device_kind,
        " (libtpu takes minutes at gpt1's size)" if sharding.platform() == "tpu" else "",
    )
    compiled = compile_step(p_train, mesh, state, batch, options)
    return compiled, count_params(state.params), model.cfg, steps, tokens, sequences


def duration(seconds: float) -> str:
    """A time to train in the unit a reader wants: days from one day up, else hours,
    minutes or seconds (a demo's 0.013 s is not "0.00 days")."""
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if round(seconds / size, 2) >= 1:  # 86,399 s is "1.00 days", not "24.00 hours"
            return f"{seconds / size:.2f} {unit}"
    return f"{seconds:.3g} seconds" if seconds >= 1e-3 else "under a millisecond"


def table(result: dict) -> str:
    """`estimate`'s result as aligned lines for a terminal."""
    r, mem = result, result["memory_per_device"]
    gib = 2.0**30
    window = f"{r['batch_size']} x {r['n_ctx']}"
    if r["task"]:  # each example is `sequences_per_example` sequences of up to n_ctx
        window = f"{r['batch_size']} x {r['sequences_per_example']} x {r['n_ctx']}"
    if r["tokens_from"] == "train.num_steps":
        source = f"{r['steps']:,} steps (train.num_steps)"
    elif r["tokens_from"] == "train.epochs":
        epochs = r["tokens"] / r["tokens_per_epoch"]
        source = f"{epochs:g} epochs x {r['tokens_per_epoch']:,} tokens = {r['steps']:,} steps"
    mesh_devices = math.prod(r["mesh"].values())
    mesh = f"{r['mesh']}, compiled for {mesh_devices} {r['compiled_on']} device(s)"
    if r["topology"]:
        mesh += f" (topology {r['topology']}, ahead of time by libtpu)"
    if not r["vocab_split"]:
        mesh += "; the vocabulary kept whole on each tensor-parallel device"
    if mesh_devices != r["devices"]:
        mesh += (
            f"; for {r['devices']}, run with JAX_PLATFORMS=cpu "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={r['devices']}"
        )
    fits = {True: "fits", False: "does NOT fit"}.get(
        r["fits_in_memory"], f"fit unknown: compiled for {mesh_devices} device(s)"
    )
    peak_tflops = r["accelerator_peak_flops"] / 1e12
    per_token = f"{r['flops_per_token'] / 1e9:.3g} G (6N + 12 * n_layer * d_model * n_ctx)"
    if r["xla_flops_per_token"]:
        per_token += f"; XLA counts {r['xla_flops_per_token'] / 1e9:.3g} G in the compiled step"
    rows = {}
    if r["task"]:
        rows["task"] = f"{r['task']}, {r['sequences_per_example']} sequence(s) an example"
    rows |= {"parameters": f"{r['num_params']:,}", "FLOPs per token": per_token}
    if r["tokens"] is None:  # a fine-tune's length is its task's examples x epochs
        rows["tokens"] = f"set train.num_steps for the time to train ({window} a step)"
    else:
        rows["tokens"] = f"{r['tokens']:,} ({source} of {window})"
        rows["total compute"] = (
            f"{r['total_flops']:.3g} FLOP = {r['petaflop_s_days']:.3g} petaflop/s-days"
        )
    rows |= {
        "mesh": mesh,
        "memory per device": f"state + batch {mem['argument_bytes'] / gib:.2f} GiB, temporaries "
        f"{mem['temp_bytes'] / gib:.2f} GiB, peak {mem['peak_bytes'] / gib:.2f} GiB",
        "accelerator": f"{r['devices']} x {r['accelerator']} ({peak_tflops:.0f} TFLOP/s bf16, "
        f"{r['accelerator_memory_bytes'] / 1e9:.0f} GB: {fits})",
    }
    if r["train_seconds"] is not None:
        rows["time to train"] = f"{duration(r['train_seconds'])} at {r['mfu']:.0%} MFU"
    width = max(map(len, rows))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`--mode=estimate`: prints the estimate's table and writes `estimate.json` to the
    workdir (when given), which may hold a run of the config's kind only. Returns the
    estimate."""
    saved = os.path.join(workdir, CONFIG_FILE) if workdir else ""
    if saved and os.path.exists(saved):
        check_kind(workdir, read_config(saved, "restore it, or use another --workdir"), config)
    result = estimate(config)
    print(table(result))
    if workdir and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, ESTIMATE_FILE)
        with replacing(path) as f:  # whole or not at all
            json.dump(result, f, indent=2)
        logging.info("wrote %s", path)
    return result
