"""Joining a multi-process run: JAX's own runtime, no home-made cluster code.

With `--num_processes=N --process_id=I --coordinator_address=HOST:PORT` the processes
meet explicitly (any machines, including several processes on one CPU host). Under SLURM
with several tasks, or with GPTJAX_DISTRIBUTED=auto (what `launch/tpu.sh` sets on Cloud
TPU VMs), `jax.distributed.initialize()` finds the other workers by itself. A single
process on a single host does nothing here.
"""

import logging
import os

import jax

from gptjax.errors import UserError


def _cluster_detected() -> bool:
    """A multi-worker environment that jax.distributed can configure on its own."""
    if os.environ.get("GPTJAX_DISTRIBUTED") == "auto":
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0):
    """Starts JAX's distributed runtime when this is one of several processes."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(
            f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
        )
    if num_processes > 1 and not coordinator_address:
        raise UserError(
            "--num_processes > 1 needs --coordinator_address=HOST:PORT (process 0's address)"
        )
    try:
        _initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"could not join the distributed run ({' '.join(str(e).split())[:200]}); check "
            "--coordinator_address, --num_processes and --process_id, or the cluster setup"
        ) from None


def _initialize(coordinator_address: str, num_processes: int, process_id: int):
    if num_processes > 1:
        # CPU devices of different processes talk through gloo (no effect on GPU/TPU).
        # Set before anything touches a backend, which must come after initialize.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif _cluster_detected():
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
