"""Temporary names of files written whole: one per host and process."""

import os

from gptjax import atomic


def test_hosts_with_the_same_process_id_never_share_a_temporary_file(monkeypatch):
    names = set()
    for host in ("worker-0", "worker-1"):
        monkeypatch.setattr(atomic.socket, "gethostname", lambda host=host: host)
        names.add(atomic.temporary_name("/shared/run/data/train.npy"))
    assert len(names) == 2
    assert all(n.startswith("/shared/run/data/train.npy.") and n.endswith(".tmp") for n in names)
    assert all(f"-{os.getpid()}." in n for n in names)
