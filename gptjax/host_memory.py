"""Host memory kept by the process between steps, instead of handed back to the kernel.

XLA's CPU runtime allocates the temporaries of every execution of a compiled step
(0.78 GB at `bench-cpu`, 1.4 GB at `gpt1` batch 1) and frees them when it returns.
glibc's malloc serves blocks that large with `mmap` and returns them with `munmap`, so
each step the kernel maps, zeroes and faults in ~200,000 fresh pages again (one minor
page fault each: `getrusage`'s `ru_minflt` counts them). Telling malloc to keep what is
freed (no `mmap` for large blocks, no trimming of the heap's top, and one arena, since
glibc's per-thread arenas `mmap` any block larger than their 64 MB heaps whatever the
settings) makes a step reuse the previous step's pages: no faults in a typical steady
step (now and then a step's blocks do not fit the heap's free space and it grows once
more), and the `bench-cpu` train step 1.12-1.28x faster on 2 cores (docs/benchmarks.md).

The price: the process keeps its heap at its peak, all threads share one malloc arena,
and a cold XLA compile took 10-20% longer in those measurements. The settings only hold
for threads that have not allocated yet (a thread keeps its arena), so the commands
apply them first (`at_start`), before JAX starts its runtime. `GPTJAX_HOST_MEMORY`
chooses: `auto` (the default: on when JAX can only run on the CPU, where the step's
temporaries are host memory), `keep` or `release` (glibc's defaults). Elsewhere than
glibc it does nothing.
"""

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import sys

from gptjax import machine
from gptjax.errors import UserError, fail

ENV = "GPTJAX_HOST_MEMORY"
CHOICES = ("auto", "keep", "release")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_kept = False


def kept() -> bool:
    """Whether this process keeps freed memory (`configure` applied `keep`)."""
    return _kept


def configure(choice: str | None = None) -> bool:
    """Apply `choice`, by default $GPTJAX_HOST_MEMORY (unset: `auto`); True when freed
    memory is now kept in the process. Call it before JAX starts its runtime."""
    global _kept
    if choice is None:
        choice = os.environ.get(ENV, "").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UserError(f"{ENV}={choice!r}: use auto, keep or release")
    if choice == "keep" or (choice == "auto" and cpu_only()):
        _kept = _keep_freed_memory()
        if not _kept and choice == "keep":
            logging.warning("%s=keep: needs Linux with glibc; malloc left as it is", ENV)
    return _kept


def at_start():
    """`configure()` as a command's first act (its `__main__`, not its `main()`, which
    tests also call in their own process): a bad $GPTJAX_HOST_MEMORY ends the command
    with one line and exit status 2. First, JAX is told to use the CPU where libtpu is
    installed without a TPU to run (`machine.skip_absent_tpu`)."""
    machine.skip_absent_tpu()
    try:
        configure()
    except UserError as e:
        fail(str(e))


def describe() -> str:
    """One line for a command's log."""
    if _kept:
        return f"host memory: freed blocks kept for reuse ({ENV}=release to undo)"
    return f"host memory: malloc's defaults ({ENV}=keep to keep freed blocks)"


def _keep_freed_memory() -> bool:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    # -1 as the trim threshold: never trim (mallopt(3)); 0 mmaps: big blocks from the heap.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def cpu_only(platforms: str | None = None) -> bool:
    """Whether JAX can only run on the CPU here, decided without starting it: the
    `platforms` (by default `jax_platforms`, i.e. $JAX_PLATFORMS) name only `cpu`, or,
    none named, no accelerator plugin (a PJRT plugin, libtpu) is installed."""
    if platforms is None:
        import jax

        platforms = jax.config.jax_platforms
    if platforms:
        return {p.strip() for p in platforms.split(",")} <= {"cpu"}
    return not _accelerator_plugins()


def _accelerator_plugins() -> bool:
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins  # the namespace package JAX discovers PJRT plugins in
    except ImportError:
        return False
    return any(pkgutil.iter_modules(jax_plugins.__path__))
