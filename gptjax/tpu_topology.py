"""Cloud TPU slices this machine does not have, as devices to compile for ahead of time
(`--mode=estimate` with `estimate.topology`): libtpu's compiler runs on any Linux x86
machine; only the chips are missing.

A slice is named as Cloud TPU's accelerator types name it ("v5litepod-8", "v4-32") or
as libtpu's topologies do ("v5e:2x4", "v4:2x2x4").
"""

import contextlib
import importlib.util
import math
import os
from unittest import mock

import jax
from jax.experimental import topologies

from gptjax import machine
from gptjax.errors import UserError

# The shapes Cloud TPU gives its slices, by chips: v4 and v5p chips in 3-D tori, v5e and
# v6e in 2-D grids.
_SHAPES = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
}  # fmt: skip
# Accelerator type prefix -> (libtpu's chip name, dimensions, what the type counts per
# chip): v4's and v5p's types count TensorCores, two a chip; v5e's and v6e's count chips.
_TYPES = {"v4": ("v4", 3, 2), "v5p": ("v5p", 3, 2), "v5litepod": ("v5e", 2, 1),
          "v5e": ("v5e", 2, 1), "v6e": ("v6e", 2, 1)}  # fmt: skip
# The slices one host holds whole (v5litepod-1 and -8, v6e-1 and -8); the others are
# made of hosts of 2 x 2 chips.
_ONE_HOST = {"1x1": (1, 1, 1), "2x4": (2, 4, 1)}

EXAMPLES = "v5litepod-8, v6e-16, v4-32, v5p-8, or a topology such as v5e:2x4"


def topology_name(name: str) -> str:
    """A Cloud TPU accelerator type ("v5litepod-8", "v4-32") as the topology libtpu
    names ("v5e:2x4", "v4:2x2x4"); a topology name as it is (lower-cased)."""
    name = name.strip().lower()
    prefix, _, count = name.rpartition("-")
    if prefix not in _TYPES or not count.isdigit():
        return name
    chip, dims, per_chip = _TYPES[prefix]
    shape = _SHAPES[dims].get(int(count) // per_chip)
    if shape is None or int(count) % per_chip:
        sizes = ", ".join(f"{prefix}-{n * per_chip}" for n in _SHAPES[dims])
        raise UserError(
            f"estimate.topology={name!r} is not a slice size this knows ({sizes}); "
            f"name its topology instead, e.g. {chip}:{next(iter(_SHAPES[dims].values()))}"
        )
    return f"{chip}:{shape}"


def _accelerator_type(topology: str) -> str | None:
    """The accelerator type of a topology ("v5e:2x4" -> "v5litepod-8"), where known."""
    chip, _, shape = topology.partition(":")
    dims = shape.split("_")[0].split("x")  # ("_twisted" tori)
    if not all(d.isdigit() for d in dims):
        return None
    chips = math.prod(int(d) for d in dims)
    for prefix, (name, _, per_chip) in _TYPES.items():
        if name == chip and prefix != "v5e":  # v5e's types are v5litepod-N
            return f"{prefix}-{chips * per_chip}"
    return None


@contextlib.contextmanager
def _libtpu_without_tpus(topology: str):
    """libtpu's environment for a machine without TPUs, for the duration of the call
    (on a TPU VM it is left alone). Started there, libtpu prints five lines about the
    TPU VM it cannot find (its type and its workers' names) unless the environment
    names them; and it takes a lockfile that keeps a second process from starting it
    (two estimates at once), which guards no chips here."""
    if machine.has_tpu():
        yield
        return
    names = {"TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    if accelerator_type := _accelerator_type(topology):
        names["TPU_ACCELERATOR_TYPE"] = accelerator_type
    with mock.patch.dict(os.environ, names):  # (restored as it was afterwards)
        yield


def devices(name: str) -> list:
    """The devices of a TPU slice (an accelerator type or a topology), to compile for.
    A v4 chip's two TensorCores are one device (megacore), as on its VMs; a v5p's are
    by default."""
    topology = topology_name(name)
    chip, colon, shape = topology.partition(":")
    chips = sorted({c for c, _, _ in _TYPES.values()})
    # Refused here: libtpu would print a line about the type before its own error.
    if not (colon and shape):
        raise UserError(f"estimate.topology={name!r} names no slice; use one of {EXAMPLES}")
    if chip not in chips:
        raise UserError(
            f"estimate.topology={name!r} is a slice of TPU {chip} chips, whose peak and "
            f"memory this does not know; use {', '.join(chips)}: {EXAMPLES}"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            "estimate.topology compiles with libtpu, which is not installed: "
            'pip install -e ".[tpu]" (or "jax[tpu]"; Linux x86 only), then run again'
        )
    shape = topology.partition(":")[2].split("_")[0]
    try:
        with _libtpu_without_tpus(topology):
            return topologies.get_topology_desc(
                platform="tpu",
                topology_name=topology,
                chip_config_name="megacore" if topology.startswith("v4") else "default",
                chips_per_host_bounds=_ONE_HOST.get(shape, (2, 2, 1)),
            ).devices
    except jax.errors.JaxRuntimeError as e:
        reason = str(e).splitlines()[0]
        raise UserError(
            f"estimate.topology={name!r}: libtpu refused it ({reason}); use an accelerator "
            f"type or topology: {EXAMPLES}"
        ) from None
