import json

from gptjax.metrics import MetricsWriter, read_metrics


def test_rows_tensorboard_and_resume_truncation(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    writer.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # A run killed mid-write leaves a torn line; resuming from step 2 drops it and the
    # rows after the checkpoint, which the resumed run writes again.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    writer = MetricsWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 30.0})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
