"""Graceful stops: SIGTERM, SIGINT and the multi-host preemption notice.

A signal only sets a flag; the training loop asks `should_stop(step)` after each step,
then saves a checkpoint synchronously and the CLI exits with status 75, so the same
command resumes. A second SIGINT (Ctrl-C pressed twice) interrupts at once.
"""

import contextlib
import logging
import os
import signal
import sys

import jax
from jax.experimental import multihost_utils

from gptjax.errors import Preempted


@contextlib.contextmanager
def stop_outside_the_loop():
    """SIGTERM or Ctrl-C while a training command prepares its data, compiles or
    evaluates (outside `PreemptionGuard`, which the loop holds) ends it at once with the
    same status and message as a stop in the loop, 75, so that a scheduler requeues it:
    every file it writes is written whole or not at all, and the rerun starts from what
    is there. On several hosts JAX's preemption service owns SIGTERM, and this does
    nothing (Ctrl-C stays Python's KeyboardInterrupt there)."""
    if jax.process_count() > 1:
        yield
        return

    def stop(signum, frame):
        _pending.append(signal.Signals(signum).name)
        raise Preempted(None, _pending[-1])

    # Python runs the handler wherever the main thread is, also in a garbage-collection
    # callback or a __del__, where an exception is printed as "ignored" and the work goes
    # on. So the signal is also kept: the training loop's guard stops at its first step
    # (`PreemptionGuard`), and work that ends normally ends with the stop here.
    def unraisable(hook_args):
        if not isinstance(hook_args.exc_value, Preempted):
            previous_hook(hook_args)

    _pending.clear()
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
        if _pending:
            raise Preempted(None, _pending[-1])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
        _pending.clear()


_pending: list[str] = []  # the signals `stop_outside_the_loop` received


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGINT into a stop at the next step boundary."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self._interrupt_at: int | None = None  # the step an `interruptible` block is at

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        if self._interrupt_at is None:
            logging.warning("%s received: stopping after this step", self.signal_name)
        else:
            logging.warning("%s received: stopping the evaluation", self.signal_name)
        if jax.process_count() > 1:
            # Hand it to JAX's preemption service, which stops every process together.
            os.kill(os.getpid(), signal.SIGTERM)
        # A second Ctrl-C is an impatient user: let it interrupt immediately.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._interrupt_at is not None:
            raise Preempted(self._interrupt_at, self.signal_name)

    @contextlib.contextmanager
    def interruptible(self, step: int):
        """A block that a stop signal ends at once with `Preempted(step)`, and that one
        received before it does not start: an evaluation, which can take minutes (a
        spot VM's notice is 30 s), after step `step`, whose checkpoint the caller has
        saved or saves on the way out. On several processes a block runs whole: JAX's
        preemption service stops them together, at a step."""
        if jax.process_count() > 1:
            yield
            return
        if self.signal_name is not None:
            raise Preempted(step, self.signal_name)
        self._interrupt_at = step
        try:
            yield
        finally:
            self._interrupt_at = None
        if self.signal_name is not None:  # its exception was swallowed (a gc callback)
            raise Preempted(step, self.signal_name)

    def __enter__(self):
        if _pending:  # a stop before the loop that did not end the work (see above)
            self.signal_name = _pending[-1]
        # With several processes JAX's preemption service owns SIGTERM and tells every
        # process (see should_stop); a local handler would only stop this one.
        signals = [signal.SIGINT] if jax.process_count() > 1 else [signal.SIGTERM, signal.SIGINT]
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        """True when this process was signalled or, on several hosts, when JAX's
        preemption service says every process has reached the same sync point."""
        if jax.process_count() > 1:
            # Only the shared decision is safe: a process that stopped alone would leave
            # the others waiting in a collective.
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "preemption notice"
                return True
            return False
        return self.signal_name is not None
