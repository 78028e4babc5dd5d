"""`gptjax.bench`'s result: its keys (`KEYS`, documented in docs/benchmarks.md) and
the table printed for a terminal."""

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
