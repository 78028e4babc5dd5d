"""A run's working directory (`--workdir`): the lock that keeps one training command on
it, the checks that it is shared by the processes and can be written, what the run keeps
in it, and, before a run starts or resumes, the check of its saved config
(`run_config`).

Every command that trains or reads a workdir goes through here: pretraining, domain
adaptation, fine-tuning, evaluation, generation and zero-shot scoring. The saved config
is `run_config`'s: conversion and generation read it through that module too.
"""

import contextlib
import fcntl
import logging
import os
import secrets
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from gptjax import checkpoint, metrics
from gptjax.atomic import replacing
from gptjax.data import lm_data
from gptjax.errors import UserError, seconds_from_env
from gptjax.results import RESULTS_JSON, RESULTS_MD
from gptjax.run_config import CONFIG_FILE, check_resumable, read_config


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds the workdir for one training command: a second one started on it while the
    first runs is refused (two would delete each other's checkpoint saves and interleave
    their metrics). An advisory lock on the directory itself, so nothing is written into
    it; the operating system releases it when the process ends, however it ends. Process
    0 locks for all and tells the others, which would otherwise wait for it in their
    first collective; where the filesystem has no locks, a warning says it is unlocked.
    A command that fails after taking the lock leaves no empty directory it made (a bad
    mesh, say, is found after the lock is taken)."""
    fd, taken, made, held = None, False, None, False
    # A file, or a directory that cannot be made or read: check_workdir says why.
    if jax.process_index() == 0 and not (os.path.exists(workdir) and not os.path.isdir(workdir)):
        made = _first_missing(workdir)
        with contextlib.suppress(OSError):
            os.makedirs(workdir, exist_ok=True)
            fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                taken = True
            except OSError as e:
                logging.warning("cannot lock %s (%s): two runs there would collide", workdir, e)
        if jax.process_count() > 1:
            taken = bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))
        if taken:
            raise UserError(
                f"another gptjax command is training in {workdir}; wait for it to end (or "
                "stop it: it resumes from its last checkpoint), or use another --workdir"
            )
        check_shared(workdir)
        yield
    except BaseException:
        if held and made is not None:
            _remove_empty(workdir, made)
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet; None if it exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _remove_empty(workdir: str, made: str):
    """Removes the (held) `workdir` and its parents up to `made` while they are empty; a
    parent another command holds as its workdir stays."""
    path = os.path.abspath(workdir)
    try:
        os.rmdir(path)  # only an empty directory
        while path != made:
            path = os.path.dirname(path)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by another: raises
                os.rmdir(path)
            finally:
                os.close(fd)
    except OSError:
        return


# How long a process looks for process 0's file before it calls the workdir not shared:
# a network filesystem's client may cache a directory's listing (NFS: up to a minute).
SHARED_WAIT_ENV, SHARED_WAIT_S = "GPTJAX_SHARED_WAIT_S", 60.0


def check_shared(workdir: str):
    """UserError, in every process, unless all processes see the same workdir. Each
    process writes its own part of every checkpoint there, and all resume from what
    process 0 finds there: a workdir on each host's own disk trains, but leaves
    checkpoints the run cannot resume from. Process 0 writes a file of a random number, and
    the others look for it. Nothing to check for a single process, or where process 0
    cannot write in the workdir (the command then says why itself)."""
    if jax.process_count() == 1:
        return
    token, probe = -1, None
    if jax.process_index() == 0:
        token = secrets.randbits(31)  # (JAX carries it as int32 unless x64 is on)
        probe = _shared_probe(workdir, token)
        try:
            with replacing(probe) as f:
                f.write(str(token))
        except OSError:
            token = -1
    token = int(multihost_utils.broadcast_one_to_all(np.int32(token)))
    if token < 0:
        return
    try:
        seen = probe is not None or _sees(_shared_probe(workdir, token), str(token))
        seen = multihost_utils.process_allgather(np.int32(seen))
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.remove(probe)
    blind = [i for i, s in enumerate(np.asarray(seen).reshape(-1)) if not s]
    if blind:
        raise UserError(
            f"workdir {workdir} is not shared: process(es) {', '.join(map(str, blind))} "
            "do not see what process 0 writes there; give every process the same directory "
            "(a shared filesystem, e.g. NFS or Filestore, mounted at the same path)"
        )


def _shared_probe(workdir: str, token: int) -> str:
    return os.path.join(workdir, f".shared_check.{token}")


def _sees(path: str, content: str) -> bool:
    """Whether `path` holds `content`, looked for until `GPTJAX_SHARED_WAIT_S` (60 s)
    has passed."""
    wait_s = seconds_from_env(SHARED_WAIT_ENV, SHARED_WAIT_S)
    start, told = time.monotonic(), False
    while True:
        with contextlib.suppress(OSError), open(path) as f:
            if f.read() == content:
                return True
        waited = time.monotonic() - start
        if waited > wait_s:
            return False
        if waited > 5 and not told:
            logging.info("waiting for process 0's file %s: is the workdir shared?", path)
            told = True
        time.sleep(0.5)


def check_writable(workdir: str):
    """UserError unless a file can be written in the (existing) workdir: said before a
    command's work, not after it when the results are written."""
    try:
        probe = os.path.join(workdir, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable ({e.strerror}); pick another") from None


def check_output_dir(workdir: str, create: bool = True):
    """UserError unless the workdir is (or, `create`, becomes; else could become) a
    writable directory. An empty `workdir` (estimate's "write nothing") passes."""
    if not workdir:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} is a file, not a directory; pick another --workdir")
    if not os.path.isdir(workdir):
        parent = os.path.dirname(os.path.abspath(workdir))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UserError(f"workdir {workdir} is under {parent}, a file; pick another --workdir")
        if not os.access(parent, os.W_OK):
            raise UserError(f"workdir {workdir} cannot be made: {parent} is not writable")
    if create:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"workdir {workdir} is not writable ({e.strerror}); pick another"
            ) from None
    if os.path.isdir(workdir):
        check_writable(workdir)
        for name, is_dir in RUN_ENTRIES.items():
            path = os.path.join(workdir, name)
            if os.path.exists(path) and os.path.isdir(path) != is_dir:
                what = "a directory" if os.path.isdir(path) else "a file"
                raise UserError(
                    f"{path} is {what}, where the run keeps its {name}; move it out of the "
                    "workdir, or pick another --workdir"
                )


# Written by --mode=estimate and --mode=zeroshot.
ESTIMATE_FILE = "estimate.json"
ZEROSHOT_FILE, ZEROSHOT_PLOT = "zeroshot.json", "zeroshot.png"
# What a run writes in its workdir, and whether each is a directory: something else in
# the way is said before the work (it failed at the first save, or after training).
RUN_ENTRIES = {
    checkpoint.CHECKPOINT_DIR: True,
    metrics.TENSORBOARD_DIR: True,
    lm_data.STREAMS_DIR: True,
    CONFIG_FILE: False,
    metrics.METRICS_FILE: False,
    RESULTS_JSON: False,
    RESULTS_MD: False,
    lm_data.STREAMS_FILE: False,
    ESTIMATE_FILE: False,
    ZEROSHOT_FILE: False,
    ZEROSHOT_PLOT: False,
}


def check_workdir(
    workdir: str, config: ml_collections.ConfigDict, resuming: bool, evaluating: bool = False
):
    """Creates the workdir and checks it is writable. Resuming a run of another model
    shape is an error rather than a silent restart; so is `evaluating` its checkpoint as
    another model (see `check_resumable`)."""
    check_output_dir(workdir)
    aside = os.path.join(workdir, checkpoint.CORRUPT_DIR)
    if not resuming and os.path.isdir(aside) and os.listdir(aside):
        raise UserError(
            f"no checkpoint of {workdir} read back (they are in {aside}); copy one back to "
            f"{checkpoint.CHECKPOINT_DIR}/ to resume from it, or delete {checkpoint.CORRUPT_DIR}/ "
            "to start this run again from scratch"
        )
    path = os.path.join(workdir, CONFIG_FILE)
    if resuming and os.path.exists(path):
        saved = read_config(path, "restore it, or delete it to resume without checking the config")
        check_resumable(workdir, saved, config, evaluating)
    elif resuming and not evaluating:
        logging.warning(
            "%s is missing, so this config cannot be checked against the one the checkpoints "
            "were trained with (another model is still refused when its checkpoint is read; "
            "another batch size or seed would move the saved data position); resuming, and "
            "recording this config",
            path,
        )
