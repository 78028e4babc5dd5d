"""Files written whole or not at all: written under a temporary name, then renamed.

The temporary name holds the host and the process, so several hosts writing the same file
into a shared directory (every process of a multi-host run prepares the same caches, and
containers often give each host the same process id) never write into one temporary file;
each rename then puts a complete file in place.
"""

import os
import socket


def temporary_name(path: str) -> str:
    return f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"
