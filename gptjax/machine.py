"""What accelerators this machine has, read from its device files, without starting JAX.

Installing the `tpu` extra (libtpu, which `--mode=estimate` uses to compile for TPU
slices) on a machine without a TPU makes JAX try to start a TPU runtime at its first
computation: libtpu then prints its failure (no TPU worker, no device) in every command,
and JAX looks as if it might run on an accelerator (`host_memory` then leaves malloc
alone). `skip_absent_tpu` tells JAX to use the CPU there, as it would anyway.
"""

import glob
import importlib.util
import os
import sys

# Where a TPU VM's chips appear, and an NVIDIA GPU's.
TPU_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_FILES = ("/dev/nvidia[0-9]*",)


def has_tpu() -> bool:
    return any(glob.glob(pattern) for pattern in TPU_FILES)


def has_accelerator() -> bool:
    return has_tpu() or any(glob.glob(pattern) for pattern in GPU_FILES)


def skip_absent_tpu():
    """$JAX_PLATFORMS=cpu where libtpu is installed but the machine has no accelerator
    and JAX_PLATFORMS is not set already. JAX reads the variable when it is imported, so
    a command that has imported JAX already (its module's imports run before its
    `__main__`) is told through `jax.config` too; either way, before its first
    computation."""
    if importlib.util.find_spec("libtpu") is None or has_accelerator():
        return
    if "JAX_PLATFORMS" in os.environ:
        return  # the user's choice
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")
