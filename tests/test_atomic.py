"""Temporary names of files written whole: one per host and process."""

import os

import pytest

from gptjax import atomic


def test_hosts_with_the_same_process_id_never_share_a_temporary_file(monkeypatch):
    names = set()
    for host in ("worker-0", "worker-1"):
        monkeypatch.setattr(atomic.socket, "gethostname", lambda host=host: host)
        names.add(atomic.temporary_name("/shared/run/data/train.npy"))
    assert len(names) == 2
    assert all(n.startswith("/shared/run/data/train.npy.") and n.endswith(".tmp") for n in names)
    assert all(f"-{os.getpid()}." in n for n in names)


def test_a_replaced_file_is_the_old_one_or_the_whole_new_one(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with atomic.replacing(str(path)) as f:
        f.write("new, ")
        assert path.read_text() == "old"  # nothing of the new one yet
        f.write("whole")
    assert path.read_text() == "new, whole"
    # A block that fails (here mid-write) leaves the file as it was, and no temporary file.
    with pytest.raises(RuntimeError, match="disk full"), atomic.replacing(str(path)) as f:
        f.write("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "new, whole"
    assert os.listdir(tmp_path) == ["results.json"]
