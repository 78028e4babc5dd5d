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

# Where a TPU VM's chips appear, and an NVIDIA GPU's.
TPU_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_FILES = ("/dev/nvidia[0-9]*",)


def has_tpu() -> bool:
    return any(glob.glob(pattern) for pattern in TPU_FILES)


def has_accelerator() -> bool:
    return has_tpu() or any(glob.glob(pattern) for pattern in GPU_FILES)


def skip_absent_tpu():
    """$JAX_PLATFORMS=cpu where libtpu is installed but the machine has no accelerator
    and JAX_PLATFORMS is not set already. Call it before JAX is imported."""
    if importlib.util.find_spec("libtpu") is not None and not has_accelerator():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
