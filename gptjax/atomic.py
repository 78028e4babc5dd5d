"""Files written whole or not at all: written under a temporary name, then renamed.

The temporary name holds the host and the process, so several hosts writing the same file
into a shared directory (every process of a multi-host run prepares the same caches, and
containers often give each host the same process id) never write into one temporary file;
each rename then puts a complete file in place.
"""

import contextlib
import os
import socket


def temporary_name(path: str) -> str:
    return f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"


@contextlib.contextmanager
def replacing(path: str, mode: str = "w", **open_args):
    """An open file that becomes `path` when the block ends: written under
    `temporary_name(path)` and renamed over it, so readers see the old file or the whole
    new one. If the block or the write fails, the temporary file is removed and `path`
    is left as it was; the error propagates."""
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
