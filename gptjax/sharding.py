"""The device mesh and the one table that maps the model's logical axes onto it.

Parameters and activations are named with logical axes in `gptjax.model`; this module
alone decides where those names live on devices. The mesh has three axes:
`data` (batch split, parameters replicated), `fsdp` (batch split, parameters sharded)
and `tensor` (heads, MLP and vocabulary split). The default config uses pure data parallelism.
`check_model_splits` and `check_batch` say, before any work, when the model's sizes or
the batch do not split evenly over the mesh. The vocabulary is the exception: its size
is the tokenizer's (GPT-1's 40,478 + 3 fine-tuning specials is odd), so where
`mesh.tensor` does not divide it, the token embedding is kept whole along it
(`logical_sharding`).
"""

import contextlib
import functools
import logging
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (None: replicated). The one place sharding is declared.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("n_ctx", None),
    ("layers", None),  # the stacked layer axis of `train.scan_layers`
)


_VOCAB_AXIS = dict(LOGICAL_AXIS_RULES)["vocab"]

_compiling_for: str | None = None  # set by `compiling_for`


def platform() -> str:
    """The platform traced computations run on: the one named by `compiling_for` while
    compiling ahead of time for devices this process does not have; else that of
    `jax.default_device` where one is set (a CPU computation in a GPU process), else
    JAX's default backend. The choices made per platform (attention kernel, dropout's
    hash, matmul form, XLA's CPU options) follow it, so a GPU machine can still run a
    model on its CPU and a CPU machine can compile the step a TPU would run."""
    if _compiling_for is not None:
        return _compiling_for
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


@contextlib.contextmanager
def compiling_for(platform_name: str):
    """Traces and compiles as for `platform_name` ("tpu"): for a mesh over another
    platform's devices, such as a TPU slice's (`tpu_topology.devices`), which this
    process can compile for but not run on."""
    global _compiling_for
    before, _compiling_for = _compiling_for, platform_name
    try:
        yield
    finally:
        _compiling_for = before


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves the config's (data, fsdp, tensor) sizes; one of them may be -1."""
    sizes = [mesh_cfg[axis] for axis in MESH_AXES]
    named = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(
            f"mesh sizes {named} are invalid: use positive sizes "
            "and at most one -1 (meaning 'the remaining devices')"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise UserError(
                f"{num_devices} devices do not divide into mesh sizes {sizes}; "
                "change --config.mesh.*"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; change --config.mesh.*"
        )
    return tuple(sizes)


def check_model_splits(model_cfg: ml_collections.ConfigDict, mesh: Mesh, specials: int = 0):
    """Refuses, before any work, a model whose sharded sizes the mesh does not divide
    (XLA would fail at the first compile, after the data were prepared), and says when
    the vocabulary is not split (see `logical_sharding`). `specials`: token rows added
    after `vocab_size` (fine-tuning's three)."""
    splits = (
        ("n_head", model_cfg.n_head, "tensor"),
        ("d_mlp", model_cfg.d_mlp, "tensor"),
        ("d_model", model_cfg.d_model, "fsdp"),
    )
    for key, size, axis in splits:
        if size % mesh.shape[axis]:
            raise UserError(
                f"model.{key}={size} does not split into mesh.{axis}={mesh.shape[axis]} "
                f"equal parts; use a mesh.{axis} that divides {size}, or put those devices "
                "on mesh.data"
            )
    rows, tensor = model_cfg.vocab_size + specials, mesh.shape[_VOCAB_AXIS]
    if not splits_vocabulary(mesh, rows):
        note = f" + {specials} fine-tuning specials" if specials else ""
        logging.warning(
            "model.vocab_size=%d%s does not split into mesh.tensor=%d: the token embedding "
            "and its Adam moments (%.0f MB in float32) and the LM head's logits are kept "
            "whole on each tensor-parallel device; mesh.fsdp splits the embedding instead",
            model_cfg.vocab_size,
            note,
            tensor,
            3 * rows * model_cfg.d_model * 4 / 1e6,
        )


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A mesh over all devices (of all processes). Axes are `Auto` so that XLA's GSPMD
    propagates shardings from the jit boundaries and logical constraints; this JAX's
    `jax.make_mesh` would otherwise make them `Explicit`."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


@contextlib.contextmanager
def axis_rules(mesh: Mesh):
    """Makes the model's logical activation constraints bind to `mesh` while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def under_axis_rules(fn, mesh: Mesh):
    """`fn` (a jitted function) called, and so traced, with the mesh and the logical-axis
    rules in scope. Without the rules Flax's activation constraints are no-ops."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with axis_rules(mesh):
            return fn(*args, **kwargs)

    return wrapped


def splits_vocabulary(mesh: Mesh, rows: int) -> bool:
    """Whether the vocabulary's mesh axis splits `rows` token rows (else they are kept
    whole along it)."""
    return rows % mesh.shape[_VOCAB_AXIS] == 0


def logical_sharding(mesh: Mesh, logical_tree, shapes):
    """NamedShardings for a pytree of logical PartitionSpecs (from `nn.get_partition_spec`)
    of arrays of `shapes` (a matching pytree of arrays or `ShapeDtypeStruct`s). The
    vocabulary is split over its mesh axis only where that divides it; elsewhere it is
    kept whole along it (`check_model_splits` refuses every other size that does not
    divide)."""

    def axis(name, size):
        return None if name == "vocab" and not splits_vocabulary(mesh, size) else name

    def fit(spec: PartitionSpec, x) -> PartitionSpec:
        return PartitionSpec(*(axis(n, size) for n, size in zip(spec, x.shape, strict=False)))

    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    fitted = jax.tree.map(fit, logical_tree, shapes, is_leaf=is_spec)
    return nn.logical_to_mesh_sharding(fitted, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their leading axis over the data-parallel mesh axes."""
    spec = nn.logical_to_mesh_axes(("batch",), LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def describe(mesh: Mesh) -> str:
    """The run summary's line on where it runs."""
    return (
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} on "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}"
    )


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one globally sharded array."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def check_batch(config: ml_collections.ConfigDict, mesh, specials: int = 0):
    """The batch, and the model's sharded sizes, split evenly over the mesh (see
    `check_model_splits` for `specials`)."""
    check_model_splits(config.model, mesh, specials)
    size, k = config.train.batch_size, config.train.microbatches
    dp = data_parallel_size(mesh)
    if dp % jax.process_count():
        # Each process feeds its own rows; processes sharing rows would feed different ones.
        raise UserError(
            f"mesh {dict(mesh.shape)} has {dp} data-parallel shards for "
            f"{jax.process_count()} processes; use a multiple of the process count for "
            "mesh.data x mesh.fsdp"
        )
    if size % (dp * k) or size % jax.process_count():
        raise UserError(
            f"train.batch_size={size} does not split evenly into {k} microbatches over {dp} "
            f"data-parallel devices and {jax.process_count()} processes; use a multiple of "
            f"{dp * k}"
        )
