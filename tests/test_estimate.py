"""`--mode=estimate` for a TPU slice this machine does not have: libtpu compiles the step
ahead of time for the slice's devices (`estimate.topology`, `gptjax.tpu_topology`). The
estimate's other figures are tested with the benchmark's, in tests/test_bench.py."""

import importlib.util
import os
import subprocess
import sys

import pytest

from gptjax import estimate, matmul, sharding, tpu_topology, train
from gptjax.errors import UserError

from conftest import tiny_config

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='needs libtpu (pip install -e ".[tpu]"; CI installs it)',
)


@pytest.mark.parametrize(
    "name, topology",
    [
        ("v5litepod-8", "v5e:2x4"),
        ("v5e-16", "v5e:4x4"),
        ("v6e-256", "v6e:16x16"),
        ("v4-8", "v4:2x2x1"),  # v4 and v5p types count TensorCores, two a chip
        ("v4-32", "v4:2x2x4"),
        ("v5p-128", "v5p:4x4x4"),
        (" V5LITEPOD-4 ", "v5e:2x2"),
        ("v5e:2x2", "v5e:2x2"),  # a topology as it is
        ("v4:2x2x2_twisted", "v4:2x2x2_twisted"),
    ],
)
def test_accelerator_types_are_named_as_topologies(name, topology):
    assert tpu_topology.topology_name(name) == topology


@pytest.mark.parametrize("name", ["v4-7", "v4-12", "v5litepod-2048"])
def test_a_slice_size_without_a_known_shape_is_refused(name):
    with pytest.raises(UserError, match=r"not a slice size .*name its topology instead"):
        tpu_topology.topology_name(name)


def test_without_libtpu_the_fix_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    config = tiny_config()
    config.estimate.topology = "v5litepod-4"
    with pytest.raises(UserError, match=r'pip install -e "\.\[tpu\]"'):
        estimate.estimate(config)


def test_compiling_for_another_platform_is_what_the_model_sees():
    here = sharding.platform()
    with sharding.compiling_for("tpu"):
        assert sharding.platform() == "tpu"
        with sharding.compiling_for("gpu"):
            assert sharding.platform() == "gpu"
        assert sharding.platform() == "tpu"
    assert sharding.platform() == here


@pytest.mark.parametrize("name", ["  ", "v3-8", "foo", "v5e", "v9:2x2", "v3:2x2"])
def test_a_slice_this_does_not_know_is_refused_before_libtpu_starts(name, monkeypatch):
    monkeypatch.setattr(tpu_topology.topologies, "get_topology_desc", None)  # never reached
    with pytest.raises(UserError, match="names no slice|does not know"):
        tpu_topology.devices(name)


@needs_libtpu
@pytest.mark.parametrize(
    "name, count, kind",
    [
        ("v4-8", 4, "TPU v4"),  # megacore: a chip's two TensorCores are one device
        ("v5p-8", 4, "TPU v5"),
        ("v5litepod-1", 1, "TPU v5 lite"),  # one host holds it
        ("v6e-8", 8, "TPU v6 lite"),
    ],
)
def test_a_slices_devices_are_its_chips(name, count, kind):
    devices = tpu_topology.devices(name)
    assert len(devices) == count and {d.device_kind for d in devices} == {kind}


@needs_libtpu
def test_compiling_for_a_slice_prints_nothing_and_another_process_may_too():
    """libtpu, started on a machine without TPUs, would print five lines about the TPU
    VM it cannot find, and refuse to start in a second process while this one holds
    it."""
    before = dict(os.environ)
    assert len(tpu_topology.devices("v5litepod-4")) == 4  # libtpu started here
    assert dict(os.environ) == before  # its environment was for the call only
    code = "from gptjax import tpu_topology; print(len(tpu_topology.devices('v5litepod-4')))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "4\n", "")


@needs_libtpu
def test_a_chip_without_a_known_peak_is_refused():
    config = tiny_config()
    config.estimate.topology = "v3:2x2"
    with pytest.raises(UserError, match=r"a slice of TPU v3 chips.*use v4, v5e, v5p, v6e"):
        estimate.estimate(config)


@needs_libtpu
def test_a_name_libtpu_refuses_is_one_line():
    config = tiny_config()
    config.estimate.topology = "v5e:3x3"  # not whole hosts of 2 x 2 chips
    with pytest.raises(UserError, match=r"estimate.topology='v5e:3x3': libtpu refused it") as e:
        estimate.estimate(config)
    assert "\n" not in str(e.value)


def small_config(data: int, fsdp: int):
    """Wide enough that the parameters, not TPU's tile padding, make the state's bytes."""
    config = tiny_config()
    config.model.update(vocab_size=1024, n_ctx=64, n_head=4, d_model=256, d_mlp=1024)
    config.train.batch_size = 8
    config.mesh.update(data=data, fsdp=fsdp)
    config.estimate.topology = "v5litepod-4"
    return config


@needs_libtpu
def test_a_tpu_slice_names_the_accelerator_devices_and_memory(monkeypatch):
    seen = []  # the choices made per platform while building and tracing the step
    options, as_matmuls = train.compiler_options, matmul._as_matmuls
    monkeypatch.setattr(train, "compiler_options", lambda c: seen.append(options(c)))
    monkeypatch.setattr(matmul, "_as_matmuls", lambda: seen.append(as_matmuls()) or False)
    replicated = estimate.estimate(small_config(data=4, fsdp=1))
    # As a TPU would: no CPU compiler options, the products not rewritten as 2-D matmuls.
    assert seen and set(seen) == {None, False}
    r = replicated
    assert (r["accelerator"], r["devices"], r["compiled_on"]) == ("v5e", 4, "TPU v5 lite")
    assert (r["topology"], r["mesh"]) == ("v5e:2x2", {"data": 4, "fsdp": 1, "tensor": 1})
    assert r["fits_in_memory"] is True
    state_bytes = 3 * 4 * r["num_params"]  # float32 parameters and Adam's two moments
    assert r["memory_per_device"]["argument_bytes"] >= state_bytes
    # XLA's own count of the compiled step's FLOPs, summed over the 4 devices, is the
    # formula's plus the element-wise work it leaves out.
    assert 1.0 <= r["xla_flops_per_token"] / r["flops_per_token"] < 1.25
    assert "topology v5e:2x2, ahead of time by libtpu" in estimate.table(r)

    sharded = estimate.estimate(small_config(data=1, fsdp=4))
    # fsdp splits the parameters and moments over the 4 chips (a quarter each, but a
    # sharded width of 64 is padded to TPU's 128-lane tiles: 0.33 of the state here).
    assert sharded["memory_per_device"]["argument_bytes"] < 0.5 * state_bytes
    assert sharded["xla_flops_per_token"] == pytest.approx(r["xla_flops_per_token"], rel=0.05)


@needs_libtpu
def test_a_vocabulary_the_tensor_axis_does_not_divide_is_held_whole_and_said():
    """Over tensor=4, 1,024 rows are split four ways; 1,022 are kept whole on each chip:
    the table and Adam's two moments, all but a quarter more of them per chip."""
    results = {}
    for vocab in (1024, 1022):
        config = small_config(data=1, fsdp=1)
        config.model.vocab_size = vocab
        config.mesh.tensor = 4
        results[vocab] = estimate.estimate(config)
    split, whole = results[1024], results[1022]
    assert split["vocab_split"] is True and whole["vocab_split"] is False
    assert "vocabulary kept whole" in estimate.table(whole)
    assert "vocabulary kept whole" not in estimate.table(split)
    grown = (
        whole["memory_per_device"]["argument_bytes"] - split["memory_per_device"]["argument_bytes"]
    )
    assert grown >= 0.7 * 3 * 4 * 1022 * 256


def test_a_bad_slice_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    from cli import main_in_process

    status, last = main_in_process(
        tmp_path / "est", "--mode=estimate", "--config.estimate.topology=v4-12", capsys=capsys
    )
    assert status == 2 and "estimate.topology='v4-12' is not a slice size" in last, last
    assert not (tmp_path / "est" / "estimate.json").exists()
