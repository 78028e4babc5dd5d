"""Joining a multi-process run: JAX's own runtime, no home-made cluster code.

With `--num_processes=N --process_id=I --coordinator_address=HOST:PORT` the processes
meet explicitly (any machines, including several processes on one CPU host). Under SLURM
with several tasks, or with GPTJAX_DISTRIBUTED=auto (what `launch/tpu.sh` sets on Cloud
TPU VMs), `jax.distributed.initialize()` finds the other workers by itself. A single
process on a single host does nothing here.
"""

import contextlib
import logging
import os
import socket
import threading
import time

import jax

from gptjax.errors import UserError, fail, seconds_from_env

# How long a process waits for the others before it gives up with one line: a process
# other than 0 for process 0's coordinator to answer, then every process for all of them
# to join (JAX's own wait ends in an abort with a C++ stack trace).
JOIN_TIMEOUT_ENV = "GPTJAX_JOIN_TIMEOUT_S"
JOIN_TIMEOUT_S = 300.0
# JAX's own deadline is this much later than ours, so that ours is the one that ends it.
_JAX_GRACE_S = 60


def _cluster_trigger() -> str | None:
    """What makes this a multi-worker environment that jax.distributed configures on
    its own, said as the user set it; None when nothing does."""
    if os.environ.get("GPTJAX_DISTRIBUTED") == "auto":
        return "GPTJAX_DISTRIBUTED=auto"
    tasks = os.environ.get("SLURM_NTASKS", "1")
    if tasks.isdigit() and int(tasks) > 1:
        return f"SLURM_NTASKS={tasks}"
    return None


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0):
    """Starts JAX's distributed runtime when this is one of several processes."""
    if num_processes < 1:
        raise UserError(f"--num_processes={num_processes} must be 1 or more")
    if not 0 <= process_id < num_processes:
        raise UserError(
            f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
        )
    if num_processes > 1 and not coordinator_address:
        raise UserError(
            "--num_processes > 1 needs --coordinator_address=HOST:PORT (process 0's address)"
        )
    if coordinator_address and num_processes == 1:
        # Forgotten on every host, it would start that many separate one-process runs.
        raise UserError(
            f"--coordinator_address={coordinator_address} is given without "
            "--num_processes: set --num_processes=N (the processes in the run) and "
            "--process_id=I on each, or leave the address out for a single process"
        )
    if coordinator_address:
        host, port = _host_port(coordinator_address)
        if process_id != 0:
            _wait_for_coordinator(host, port, coordinator_address)
    try:
        _initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        trigger = None if num_processes > 1 else _cluster_trigger()
        check = (
            f"the environment asked for it ({trigger}): run under srun or on the TPU VMs "
            "it is meant for, or unset it"
            if trigger
            else "check --coordinator_address, --num_processes and --process_id, or the "
            "cluster setup"
        )
        raise UserError(f"could not join the distributed run ({reason}); {check}") from None


def _host_port(address: str) -> tuple[str, int]:
    """HOST and PORT of `--coordinator_address` (an IPv6 host in brackets: [::1]:1234)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--coordinator_address={address} must be HOST:PORT, process 0's host and a "
            "free port on it (e.g. 10.0.0.1:12355)"
        )
    return host.strip("[]"), int(port)


def _wait_for_coordinator(host: str, port: int, address: str):
    """Returns once process 0's coordinator accepts a connection; a UserError after
    `GPTJAX_JOIN_TIMEOUT_S` (300 s) without one."""
    timeout_s = seconds_from_env(JOIN_TIMEOUT_ENV, JOIN_TIMEOUT_S)
    deadline, said = time.monotonic() + timeout_s, False
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"process 0 did not answer at --coordinator_address={address} within "
                    f"{timeout_s:.0f} s ({e.strerror or e}); start process 0 with the same "
                    f"address, check that this host can reach it, or wait longer with "
                    f"{JOIN_TIMEOUT_ENV}"
                ) from None
            if not said:
                logging.info("waiting for process 0 at %s (up to %.0f s)", address, timeout_s)
                said = True
            time.sleep(1.0)


@contextlib.contextmanager
def _join_deadline(timeout_s: float, address: str, num_processes: int):
    """Ends the process with one line (exit status 2) if the block, JAX's join, has not
    returned after `timeout_s`. JAX waits there until every process has registered and
    cannot be interrupted; when its own deadline passes it aborts the process with a C++
    stack trace, so a timer says it first."""

    def give_up():
        fail(
            f"not all {num_processes} processes joined at --coordinator_address={address} "
            f"within {timeout_s:.0f} s; start each of them with --num_processes="
            f"{num_processes} and its own --process_id, or wait longer with "
            f"{JOIN_TIMEOUT_ENV}",
            at_once=True,  # (the main thread is inside JAX's wait)
        )

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _initialize(coordinator_address: str, num_processes: int, process_id: int):
    if num_processes > 1:
        # CPU devices of different processes talk through gloo (no effect on GPU/TPU).
        # Set before anything touches a backend, which must come after initialize.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        timeout_s = seconds_from_env(JOIN_TIMEOUT_ENV, JOIN_TIMEOUT_S)
        with _join_deadline(timeout_s, coordinator_address, num_processes):
            jax.distributed.initialize(
                coordinator_address=coordinator_address,
                num_processes=num_processes,
                process_id=process_id,
                initialization_timeout=int(timeout_s) + _JAX_GRACE_S,
            )
    elif _cluster_trigger():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "process %d of %d; %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
