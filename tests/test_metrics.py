import importlib.util
import json
import struct
import subprocess
import sys

import pytest

from gptjax.errors import UserError
from gptjax.metrics import MetricsWriter, read_metrics


def _events(tensorboard_dir) -> list:
    """Every Event proto in the directory's event files, read as TensorBoard reads them:
    records of a length, its checksum, an Event proto, a checksum."""
    from tensorboardX.proto import event_pb2

    found = []
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            found.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return found


def _scalars(tensorboard_dir) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the directory's event files."""
    return [
        (e.step, v.tag, v.simple_value) for e in _events(tensorboard_dir) for v in e.summary.value
    ]


def _purges(tensorboard_dir) -> list[int]:
    """The steps of the SessionLog.START events, from which TensorBoard drops the points
    earlier event files hold (a killed run's steps after its last checkpoint)."""
    from tensorboardX.proto import event_pb2

    start = event_pb2.SessionLog.START
    return [
        e.step
        for e in _events(tensorboard_dir)
        if e.HasField("session_log") and e.session_log.status == start
    ]


def test_rows_tensorboard_and_resume_truncation(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    writer.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    assert _scalars(tmp_path / "tensorboard") == [
        (1, "loss", 1.0),
        (2, "loss", 2.0),
        (3, "loss", 3.0),
    ]

    # A run killed mid-write leaves a torn line; resuming from step 2 drops it and the
    # rows after the checkpoint, which the resumed run writes again.
    with open(tmp_path / "metrics.jsonl", "ab") as f:  # hand edits too, bytes not UTF-8
        f.write(b'5\n["step", 4]\n{"step": "4"}\n\xff\xfe\n{"step": 4, "lo')
    writer = MetricsWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 30.0})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
    # TensorBoard's curves too: the old step 3 is purged from the resumed run's first step
    # (each writer starts a session, the first at step 1). The first run's file is kept,
    # though the resumed writer opened within the same second.
    assert _purges(tmp_path / "tensorboard") == [1, 3]
    assert _scalars(tmp_path / "tensorboard") == [
        (1, "loss", 1.0),
        (2, "loss", 2.0),
        (3, "loss", 3.0),
        (3, "loss", 30.0),
    ]


@pytest.mark.parametrize("blocked", ["metrics.jsonl", "tensorboard"])
def test_a_path_in_the_way_is_a_user_error(tmp_path, blocked):
    """metrics.jsonl a directory, or tensorboard a file: one line naming the path."""
    if blocked == "tensorboard":
        (tmp_path / blocked).write_text("not a directory")
    else:
        (tmp_path / blocked).mkdir()
    with pytest.raises(UserError, match=f"cannot write metrics to .*{blocked}"):
        MetricsWriter(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_writing_metrics_and_importing_the_trainers_load_neither_torch_nor_scipy(tmp_path):
    # tensorboardX imports torch if it can (2-3 s) and scipy.stats takes 1-2 s: neither is
    # needed to train, and every run's start would pay for them.
    code = (
        "import sys, gptjax.pretrain, gptjax.finetune, gptjax.metrics as m\n"
        f"w = m.MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 1.0}}); w.close()\n"
        "print(sorted({'torch', 'scipy', 'sklearn'} & {n.split('.')[0] for n in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
