"""Where metrics go: `metrics.jsonl`, TensorBoard event files and the console.

Only process 0 writes (on several hosts the others are silent). TensorBoard files are
written with tensorboardX, so TensorFlow is not needed to record curves.
"""

import json
import logging
import os
import sys
import time

import jax

from gptjax.atomic import replacing
from gptjax.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without importing torch.

    tensorboardX's writer module tries `import torch` when it is imported, only to accept
    torch tensors (gptjax logs Python floats). Where torch is installed (the test and
    bench extras) that import costs 2-3 s in every process that writes metrics, so
    unless torch is already loaded it is hidden for the moment of the import: a `None`
    entry in `sys.modules` makes `import torch` raise ImportError, which tensorboardX
    handles."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.path = os.path.join(workdir, METRICS_FILE)
        writer = _summary_writer_class()
        try:
            _drop_rows_after(self.path, resume_step)
            # purge_step hides the events a killed run wrote past its last checkpoint. The
            # suffix: tensorboardX names a file by the second and the host only, so a
            # writer opened in the same second as the last one would overwrite its file
            # (a run's earlier curves); nanoseconds keep the names apart and in order.
            self.tb = writer(
                os.path.join(workdir, TENSORBOARD_DIR),
                purge_step=resume_step + 1,
                filename_suffix=f".{time.time_ns()}",
            )
        except OSError as e:  # e.g. metrics.jsonl a directory, tensorboard a file
            raise UserError(
                f"cannot write metrics to {e.filename} ({e.strerror}): move that path "
                f"out of the workdir, or choose another --workdir"
            ) from None

    def write(self, step: int, metrics: dict[str, float]):
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self):
        if self.active:
            self.tb.close()


def _drop_rows_after(path: str, step: int):
    """A resumed run repeats the steps after its checkpoint; their old rows go, so the
    file reads as one uninterrupted run."""
    if not os.path.exists(path):
        return
    rows = [row for row in _rows(path) if row["step"] <= step]
    with replacing(path) as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _rows(path: str) -> list[dict]:
    """The file's rows; a line that is not one (torn by a kill mid-write, or edited by
    hand into something else than an object with an integer step, or into bytes that
    are not UTF-8) is skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and type(row.get("step")) is int:
                rows.append(row)
    return rows


def read_metrics(workdir: str) -> list[dict]:
    return _rows(os.path.join(workdir, METRICS_FILE))


def evaluated_at(workdir: str, step: int) -> bool:
    """Whether the workdir's metrics hold an evaluation row (one without the training
    rows' "loss") at `step`. Read from the file on every process (a multi-host workdir
    is shared), so that all of them decide alike whether to evaluate."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return False
    return any(row["step"] == step and "loss" not in row for row in _rows(path))


class Progress:
    """A line for long work over items (batches, books), at most every `every_s`
    seconds: "WHAT: K of N batches in T, ETA E" (without N and the ETA when the total is
    not known)."""

    def __init__(self, what: str, total: int | None, every_s: float = 30.0, unit: str = "batches"):
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.started = self.last = time.time()

    def due(self) -> bool:
        return time.time() - self.last > self.every_s

    def log(self, done: int):
        self.last = time.time()
        elapsed = self.last - self.started
        of, eta = "", ""
        if self.total:
            of = f" of {self.total}"
            eta = ", ETA " + format_duration(elapsed / done * (self.total - done))
        logging.info(
            "%s: %d%s %s in %s%s", self.what, done, of, self.unit, format_duration(elapsed), eta
        )


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def log_progress(step: int, total: int, metrics: dict, eta_s: float):
    """The periodic training line; a fine-tune's loss is also shown in its parts (task
    loss and LM loss: the task's is the one to watch, the sum hides it)."""
    parts = "".join(
        f" {k} {v:.4f}" for k, v in metrics.items() if k.endswith("_loss") and k != "loss"
    )
    logging.info(
        "step %d/%d (%.0f%%) loss %.4f%s lr %.3g grad_norm %.3f %s tok/s ETA %s",
        step,
        total,
        100 * step / total,
        metrics["loss"],
        parts,
        metrics["lr"],
        metrics["grad_norm"],
        f"{metrics['tokens_per_sec']:,.0f}",
        format_duration(eta_s),
    )


class Throughput:
    """Tokens per second and time left, measured between log points."""

    def __init__(self, step: int, tokens_per_step: int):
        self.step, self.time, self.tokens_per_step = step, time.time(), tokens_per_step

    def update(self, step: int, total: int) -> tuple[float, float]:
        now = time.time()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate * self.tokens_per_step, (total - step) / max(rate, 1e-9)
