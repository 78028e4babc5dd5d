"""What the benchmark measures about the machine and how it times things: timed calls
taken in turns, the cores, the process's peak memory, a fresh persistent compilation
cache, a large matmul's FLOP/s (a CPU's peak for the MFU), the memory bandwidth (the
bound of generating one token at a time) and the published accelerator peaks."""

import contextlib
import logging
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from gptjax.estimate import find_accelerator


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def take_turns(runners: dict[str, Callable], rounds: int, calls: int, lead: bool = True):
    """{name: seconds of each timed call}: each runner `calls` times per round, the
    runners in turn; with `lead`, each turn begins with an untimed call (the previous
    runner's threads may still hold the cores)."""
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            if lead:
                fn()
            times[name] += [timed(fn) for _ in range(calls)]
    return times


def round_ratios(ours: list[float], theirs: list[float], rounds: int) -> list[float]:
    """Per round: their median time / ours (above 1: gptjax is faster)."""
    a, b = np.array_split(ours, rounds), np.array_split(theirs, rounds)
    return [float(np.median(y) / np.median(x)) for x, y in zip(a, b, strict=True)]


def threads() -> int:
    """The cores this process may run on: XLA's CPU thread pool uses that many."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux counts KiB


def minor_page_faults() -> int:
    """The process's minor page faults so far (all threads): each is a page the kernel
    mapped in, zeroed if fresh, on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@contextlib.contextmanager
def fresh_compilation_cache():
    """JAX's persistent compilation cache in an empty temporary directory, storing every
    executable; the previous settings are back afterwards."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
        "jax_enable_compilation_cache",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    with tempfile.TemporaryDirectory() as directory:
        compilation_cache.reset_cache()  # the cache binds to its directory once
        for name, value in zip(names, (directory, 0.0, 0, True), strict=True):
            jax.config.update(name, value)
        try:
            yield directory
        finally:
            for name, value in saved.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()


def matmul_flops_per_s(n: int, repeats: int = 5, libraries: tuple[dict, ...] = ({},)) -> float:
    """The best of `repeats` n x n by n x n float32 matmuls, in FLOP/s (2 n^3 each),
    compiled with each of `libraries` (XLA compiler options; {}: XLA's defaults): the
    fastest of them, so that a step through any of these libraries is measured against
    the faster matmul. A library this XLA cannot compile (oneDNN off x86) is left out,
    with a warning."""
    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.float32)

    def best_time(options: dict) -> float:
        with warnings.catch_warnings():  # a oneDNN executable cannot be cached: no news
            warnings.filterwarnings("ignore", "Error writing persistent compilation cache")
            try:
                matmul = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=options or None)
            except Exception as e:  # XLA without that library (oneDNN off x86)
                logging.warning("matmul peak: %s not measured (%s)", options, e)
                return math.inf
        jax.block_until_ready(matmul(a, b))
        return min(timed(lambda: jax.block_until_ready(matmul(a, b))) for _ in range(repeats))

    best = min(best_time(options) for options in libraries)
    if best == math.inf:
        raise RuntimeError(f"no matmul compiled with any of {libraries}")
    return 2 * n**3 / best


def read_bytes_per_s(num_bytes: int, repeats: int = 5, passes: int = 10) -> float:
    """The memory bandwidth that bounds decoding (which reads every parameter once per
    token), in bytes read per second: the best of `repeats` timings of `passes` sums of
    a `num_bytes` float32 array. The passes are dispatched back to back and waited for
    once, so on an accelerator, where one pass takes ~0.1 ms, the launch and the wait are
    not timed as reading; each sums rows of 1,024 (XLA's fast row reduction) rather than
    the whole array into one number. Make the array far larger than the caches (the
    default 512 MiB is)."""
    x = jnp.ones((num_bytes // 4 // 1024, 1024), jnp.float32)
    row_sums = jax.jit(lambda x: jnp.sum(x, axis=1))
    jax.block_until_ready(row_sums(x))

    def read():
        jax.block_until_ready([row_sums(x) for _ in range(passes)])

    return passes * x.nbytes / min(timed(read) for _ in range(repeats))


def peak_flops(device_kind: str, matmul: float, given_tflops: float | None):
    """(peak FLOP/s for the MFU, its source): `given_tflops` (one device's; on a CPU,
    the host's) or else the published bf16 dense peak of estimate.ACCELERATORS, times
    the device count; else (a CPU) the measured matmul, which already uses every core.
    A CPU's devices (--xla_force_host_platform_device_count) share the host's cores, so
    there the device count multiplies nothing."""
    cpu = jax.default_backend() == "cpu"
    devices = 1 if cpu else jax.device_count()
    per = "" if devices == 1 else f" x {devices} devices"
    if given_tflops:
        return given_tflops * 1e12 * devices, f"--peak-tflops{per}"
    if cpu:
        return matmul, "measured float32 matmul"
    acc = find_accelerator(device_kind)
    if acc is None:
        return None, f"unknown device {device_kind!r}: give --peak-tflops"
    return acc.peak_flops * devices, f"published bf16 dense peak of {acc.name}{per}"
