"""Where a train step's time goes: a JAX profiler trace of a few steps, summed per operation.

`python -m gptjax.bench --profile=DIR` writes the trace to DIR (open it in TensorBoard's
profile plugin, or its `<host>.trace.json.gz` in ui.perfetto.dev) and prints the
operations of the step's compiled module that took the most time: XLA's fusions,
matmuls and custom calls, each kind summed over its copies (`loop_add_fusion.3` and
`loop_add_fusion.17` are one `loop_add_fusion`) and over the layers; custom calls by
the kernel they run too (`pallas_call: gptjax_flash_forward`).

The times are operation time, not wall time: a CPU runs independent operations on its
cores at once and a GPU overlaps streams, so the sum can exceed the step. On GPUs, XLA
runs a step's kernels as CUDA graphs by default, which the profiler sees as a few large
operations; set `XLA_FLAGS=--xla_gpu_enable_command_buffer=` for one event per kernel.
"""

import collections
import dataclasses
import gzip
import json
import pathlib
import re
import time
from collections.abc import Callable

import jax

_COPY_SUFFIX = re.compile(r"\.\d+$")  # XLA numbers the copies of an operation: fusion.12
_CALLS = ("custom-call", "pallas_call")  # operations that name the kernels they run
_KERNEL_CHARS = 60  # of a kernel's name in a kind (C++ templates run to hundreds)


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One kind of operation in a profiled step."""

    op: str  # its name without XLA's copy number
    calls_per_step: float
    s_per_step: float


def trace(
    run_step: Callable[[], None], directory: pathlib.Path, steps: int
) -> tuple[pathlib.Path, float]:
    """Run `steps` steps (each waited for) under the profiler, writing its trace into
    `directory`: (its `<host>.trace.json.gz`, which Perfetto also opens; the steps'
    wall seconds per step)."""
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.glob("**/*.trace.json.gz"))
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = (time.perf_counter() - start) / steps
    written = set(directory.glob("**/*.trace.json.gz")) - before
    if len(written) != 1:
        raise RuntimeError(f"the profiler wrote {len(written)} Perfetto traces under {directory}")
    return written.pop(), wall


def module_name(hlo_text: str) -> str:
    """The name of a compiled module, from the first line of its HLO text."""
    match = re.match(r"HloModule ([^\s,]+)", hlo_text)
    if not match:
        raise ValueError("not the text of an HLO module")
    return match.group(1)


def op_times(trace_file: pathlib.Path, module: str, steps: int) -> list[OpTime]:
    """The module's operations in a trace, by kind, the most time first. An event is one
    of its operations when the profiler tagged it with the operation (`hlo_op`) and, if
    it says, this module (`hlo_module`)."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    calls, seconds = collections.Counter(), collections.Counter()
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") != "X" or "hlo_op" not in args:
            continue
        if args.get("hlo_module", module) != module:
            continue
        op = _kind(args["hlo_op"], event.get("name", ""))
        calls[op] += 1
        seconds[op] += event["dur"] * 1e-6  # the trace counts microseconds
    return [
        OpTime(op, calls[op] / steps, s / steps)
        for op, s in sorted(seconds.items(), key=lambda item: -item[1])
    ]


def _kind(hlo_op: str, kernel: str) -> str:
    """An event's kind of operation: its operation without XLA's copy number, and for a
    custom call (cuBLAS, a Pallas kernel), which runs whatever kernels it names, the
    kernel too: the three flash-attention kernels are three `pallas_call`s, and a matmul
    and its split-K reduction two `custom-call`s."""
    op = _COPY_SUFFIX.sub("", hlo_op)
    if op in _CALLS and kernel and kernel != hlo_op:
        return f"{op}: {kernel[:_KERNEL_CHARS]}"
    return op


def table(ops: list[OpTime], rows: int) -> str:
    """The first `rows` kinds of operation as lines for a terminal."""
    total = sum(o.s_per_step for o in ops) or 1.0
    width = max((len(o.op) for o in ops[:rows]), default=0)
    return "\n".join(
        f"  {o.op:<{width}}  {o.s_per_step * 1e3:9.2f} ms  {o.s_per_step / total:6.1%}  "
        f"x {o.calls_per_step:g}"
        for o in ops[:rows]
    )
