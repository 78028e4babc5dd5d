"""The profile of a train step: what the trace's events add up to."""

import gzip
import json
import re

import pytest

from gptjax import bench_step, measure, profiling


def write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def op_event(op, dur_us, module="jit_train_step"):
    args = {"hlo_op": op} | ({"hlo_module": module} if module else {})
    return {"ph": "X", "pid": 1, "tid": 2, "ts": 0.0, "dur": dur_us, "name": op, "args": args}


def test_op_times_sum_each_kind_per_step(tmp_path):
    """Copies of an operation are one kind; events of other modules, events without an
    operation and non-duration events are not counted; microseconds become seconds."""
    trace = tmp_path / "t.trace.json.gz"
    write_trace(
        trace,
        [
            op_event("loop_add_fusion.3", 100.0),
            op_event("loop_add_fusion.17", 300.0),
            op_event("loop_add_fusion", 200.0, module=None),  # untagged module: counted
            op_event("dot.1", 1000.0),
            op_event("dot.1", 1000.0, module="jit_generate"),  # another program
            {"ph": "X", "pid": 1, "tid": 2, "ts": 0, "dur": 5e6, "name": "python", "args": {}},
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            op_event("copy.9", 50.0) | {"ph": "i"},
        ],
    )
    ops = profiling.op_times(trace, "jit_train_step", steps=2)
    assert ops == [
        profiling.OpTime("dot", 0.5, pytest.approx(500e-6)),
        profiling.OpTime("loop_add_fusion", 1.5, pytest.approx(300e-6)),
    ]
    assert "dot" in profiling.table(ops, 1) and "loop_add_fusion" not in profiling.table(ops, 1)


def test_custom_calls_are_told_apart_by_the_kernel_they_run(tmp_path):
    """On a GPU the events of custom calls are named by their kernels: the flash-attention
    kernels (all `pallas_call`s) and cuBLAS's are separate kinds, a fusion is not."""
    trace = tmp_path / "t.trace.json.gz"
    write_trace(
        trace,
        [
            op_event("pallas_call.140", 800.0) | {"name": "gptjax_flash_forward"},
            op_event("pallas_call.7", 200.0) | {"name": "gptjax_flash_forward"},
            op_event("pallas_call.189", 400.0) | {"name": "gptjax_flash_dkdv"},
            op_event("custom-call.98", 300.0) | {"name": "nvjet_sm90_tst_192x192" + "_x" * 40},
            op_event("custom-call.11", 100.0),  # the event named as its operation (CPUs)
            op_event("loop_add_fusion.3", 50.0) | {"name": "loop_add_fusion_3"},
        ],
    )
    ops = {o.op: o.s_per_step for o in profiling.op_times(trace, "jit_train_step", steps=1)}
    assert ops == {
        "pallas_call: gptjax_flash_forward": pytest.approx(1e-3),
        "pallas_call: gptjax_flash_dkdv": pytest.approx(400e-6),
        "custom-call: " + ("nvjet_sm90_tst_192x192" + "_x" * 40)[:60]: pytest.approx(300e-6),
        "custom-call": pytest.approx(100e-6),
        "loop_add_fusion": pytest.approx(50e-6),
    }


def test_module_name_is_read_from_the_hlo_text():
    assert profiling.module_name("HloModule jit_train_step, is_scheduled=true\n") == (
        "jit_train_step"
    )
    with pytest.raises(ValueError):
        profiling.module_name("ENTRY main")


def test_a_real_step_profile_names_the_compiled_steps_operations(tmp_path):
    """Tracing the tiny benchmark's step: every kind found is an operation of the compiled
    module, and their time fits in the traced wall time on this machine's cores."""
    step = bench_step.TrainStep(bench_step.load_config("tiny"))
    step.compile()
    step()
    trace, wall = profiling.trace(step, tmp_path / "profile", steps=3)
    assert trace.is_file() and trace.is_relative_to(tmp_path / "profile")
    hlo = step.compiled.as_text()
    ops = profiling.op_times(trace, profiling.module_name(hlo), steps=3)
    names = {re.sub(r"\.\d+$", "", n) for n in re.findall(r"([\w.-]+) = ", hlo)}
    assert ops and {o.op for o in ops} <= names
    assert [o.s_per_step for o in ops] == sorted((o.s_per_step for o in ops), reverse=True)
    assert all(o.calls_per_step > 0 for o in ops)
    assert 0 < sum(o.s_per_step for o in ops) <= wall * measure.threads()
