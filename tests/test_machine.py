import importlib.util
import os
import subprocess
import sys

import pytest

from gptjax import machine

from conftest import ROOT


def test_libtpu_without_an_accelerator_runs_on_the_cpu(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    # As before JAX is imported: the test process's JAX keeps the platforms it has.
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # installed
    monkeypatch.setattr(machine, "has_accelerator", lambda: True)
    machine.skip_absent_tpu()
    assert "JAX_PLATFORMS" not in os.environ  # a TPU VM or a GPU host: JAX chooses
    monkeypatch.setattr(machine, "has_accelerator", lambda: False)
    machine.skip_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    machine.skip_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "tpu"  # the user's choice stands


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or machine.has_accelerator(),
    reason="needs libtpu installed (the tpu extra) on a machine without accelerators",
)
@pytest.mark.parametrize("jax_first", [False, True])
def test_a_command_start_with_the_tpu_extra_is_quiet_and_keeps_host_memory(jax_first):
    """As the README's install gives it: JAX on the CPU, without libtpu's lines about the
    TPU it cannot find, and malloc told to keep freed blocks (as without libtpu). Also
    for a command whose module imports JAX before its `__main__` starts (the benchmark)."""
    code = ("import jax\n" if jax_first else "") + (
        "from gptjax import host_memory\n"
        "host_memory.at_start()\n"
        "import jax\n"
        "jax.numpy.ones(3).block_until_ready()\n"
        "print(jax.default_backend(), host_memory.kept())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["cpu", "True"]
    assert "TPU" not in out.stderr and "tpu" not in out.stderr, out.stderr[-2000:]
