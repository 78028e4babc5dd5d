"""Orbax checkpoints of a run: parameters, optimiser state and the data position.

A checkpoint step directory holds three items, so later phases can take only what they
need: `params` (the model), `opt_state` (step, dropout key, Adam moments) and `data`
(the grain iterator's position, JSON). Saves are asynchronous; Orbax writes each step
to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that `latest_step` would pick up.
"""

import contextlib
import gc
import logging
import os
import re
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from gptjax.errors import UserError, WriteFailed, out_of_memory, silence_abandoned_work

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"  # beside CHECKPOINT_DIR: unreadable ones moved aside


ITEMS = ("params", "opt_state", "data")  # a checkpoint step's items, each a directory


class _OrbaxNotices(logging.Filter):
    """Drops Orbax's warnings that tell a user nothing: that a read-only manager (every
    look at a workdir's checkpoints, a fine-tune's `init_from`) is read-only, and that
    an item of a step (`params`) has no metadata file of its own (the step has it; the
    item's tree is read all the same). A fine-tuning ablation printed 28 of them. A
    step's own missing metadata file is still said."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Given directory is read only"):
            return False
        if message.startswith("Metadata file does not exist") and record.args:
            item = os.path.basename(os.path.dirname(str(record.args[0])))
            return item not in ITEMS
        return True


logging.getLogger("absl").addFilter(_OrbaxNotices())  # Orbax logs through absl


class KeepScheduled(preservation_policy.PreservationPolicy):
    """Keeps the latest `n` checkpoints of the schedule (every `every` steps, and the
    run's last, `total`), and the latest checkpoint whatever its step: one a stop signal
    wrote off the schedule is kept while a resume needs it, then dropped, so stops never
    push a scheduled checkpoint (a fine-tune's best) out of the `n` kept."""

    def __init__(self, n: int, every: int, total: int):
        self.n, self.every, self.total = n, every, total

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        steps = [c.step for c in checkpoints]
        scheduled = sorted(
            s for s in steps if (self.every and s % self.every == 0) or s == self.total
        )
        latest = {max(steps)} if steps else set()
        return [s in latest or s in scheduled[-self.n :] for s in steps]


def manager(
    workdir: str,
    keep: int = 1,
    async_save: bool = True,
    read_only: bool = False,
    schedule: tuple[int, int] | None = None,
) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager; `read_only` creates and deletes nothing. It keeps
    the latest `keep` checkpoints, or with `schedule` (`train.ckpt_every`, the run's total
    steps) the latest `keep` of that schedule and the latest (`KeepScheduled`)."""
    if read_only:  # keeps and saves nothing (set so, Orbax does not warn)
        keeping = {"max_to_keep": None}
    elif schedule:
        keeping = {"preservation_policy": KeepScheduled(keep, *schedule)}
    else:
        keeping = {"max_to_keep": keep}
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(
            **keeping,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            # Leftovers of a save that a kill interrupted are removed, never read.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        ),
    )


def latest_step(workdir: str) -> int | None:
    """The step of the workdir's latest complete checkpoint, without writing anything."""
    with manager(workdir, read_only=True) as mngr:
        return mngr.latest_step()


def all_steps(workdir: str) -> list[int]:
    """The steps of the workdir's complete checkpoints, ascending."""
    with manager(workdir, read_only=True) as mngr:
        return sorted(mngr.all_steps())


def _train_state_items(state) -> tuple[dict, dict]:
    return state.params, {"step": state.step, "rng": state.rng, "opt_state": state.opt_state}


def save(
    mngr: ocp.CheckpointManager, state, data_state: dict, force: bool = False, wait: bool = False
):
    """Saves `state` at its step: in the background, or completely before returning when
    `wait` (before exiting on a signal). A failed write (a full disk) is a UserError; the
    failed step never becomes a checkpoint (see `_write_errors`)."""
    params, rest = _train_state_items(state)
    step = int(jax.device_get(state.step))
    with _write_errors(mngr):
        saving = mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(rest),
                data=ocp.args.JsonSave(data_state),
            ),
            force=force,
        )
        if saving:  # (the previous one is complete: Orbax waits for it first)
            how = "" if wait else " in the background"
            logging.info("checkpoint %d: writing it to %s%s", step, mngr.directory, how)
        if wait:
            mngr.wait_until_finished()


def finish(mngr: ocp.CheckpointManager, failed: bool = False):
    """Waits for the background save, if any, and closes the manager. A failed write is a
    UserError; after another error (`failed`) it only closes, and raises nothing new."""
    if failed:
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            mngr.close()
        return
    with _write_errors(mngr):
        mngr.wait_until_finished()
    mngr.close()


@contextlib.contextmanager
def _write_errors(mngr: ocp.CheckpointManager):
    """An asynchronous save that fails (disk full, quota, I/O error) surfaces here, at the
    next save or the final wait. Orbax writes each step under a temporary name and only a
    complete one is renamed into place, so the previous checkpoints are intact; the
    leftover is removed on the next start."""
    try:
        yield
    except Exception as e:  # Orbax and TensorStore wrap the OS error in their own types
        kept = latest_step(os.path.dirname(str(mngr.directory)))
        raise WriteFailed(
            f"could not write a checkpoint in {mngr.directory} ({_os_reason(e)}); "
            f"{'nothing was saved' if kept is None else f'checkpoint {kept} is intact'}; "
            "free some space and run the same command to resume"
        ) from None


def _os_reason(error: BaseException) -> str:
    """The operating system's words for the failure ('No space left on device'), found
    in the chain of wrapped exceptions, else the first words of the error."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        code = re.search(r"os_error_code='?(\d+)", str(cause))
        if code:
            return os.strerror(int(code.group(1)))
        cause = cause.__cause__ or cause.__context__
    return " ".join(str(error).split())[:150]


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the whole train state (onto the shardings in `abstract_state`, a tree of
    `jax.ShapeDtypeStruct`) and the data position from `step` (default: the latest)."""
    step = mngr.latest_step() if step is None else step
    params, rest = _train_state_items(abstract_state)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params),
            opt_state=ocp.args.StandardRestore(rest),
            data=ocp.args.JsonRestore(),
        ),
    )
    rest = restored["opt_state"]
    state = abstract_state.replace(
        params=restored["params"],
        step=rest["step"],
        rng=rest["rng"],
        opt_state=rest["opt_state"],
    )
    return state, restored["data"]


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def shape_mismatch(step_dir: str, abstract_params) -> str | None:
    """Where a checkpoint's parameters differ from `abstract_params` in name or shape,
    read from its metadata; None when they agree or the metadata does not read back (a
    damaged checkpoint, for the restore to report)."""
    try:
        stored = _shapes(
            ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "params")).item_metadata.tree
        )
    except Exception:  # what damaged metadata raises depends on the damage
        return None
    wanted = _shapes(abstract_params)
    if stored.keys() != wanted.keys():
        names = sorted(stored.keys() ^ wanted.keys())
        return f"parameters only in one of checkpoint and config: {', '.join(names[:3])}"
    for name, shape in wanted.items():
        if stored[name] != shape:
            return f"{name}: {stored[name]} in the checkpoint, {shape} in the config"
    return None


def restore_latest_good(mngr: ocp.CheckpointManager, abstract_state):
    """Restores the newest checkpoint that reads back; unreadable newer ones (a truncated
    or corrupted directory) are moved to `corrupt_checkpoints/` beside `checkpoints/`,
    with a warning, so they are neither picked again nor overwritten. A checkpoint is
    tried twice before it is moved, and one that fails for want of memory or of read
    permission is left in place, the failure passed up.

    Returns (state, data_state, step). When no checkpoint reads back, raises UserError
    rather than start again from scratch.
    """
    with quiet_abandoned_reads():
        return _restore_latest_good(mngr, abstract_state)


def _restore_latest_good(mngr: ocp.CheckpointManager, abstract_state):
    message = "none found"
    for step in sorted(mngr.all_steps(), reverse=True):
        other = shape_mismatch(os.path.join(str(mngr.directory), str(step)), abstract_state.params)
        if other:  # a config that does not fit the checkpoint, not a damaged checkpoint
            raise UserError(
                f"checkpoint {step} in {mngr.directory} holds parameters of another shape "
                f"({other}); resume with the config it was written with, or use a new --workdir"
            )
        try:
            state, data_state = _restore_retrying(mngr, abstract_state, step)
            return state, data_state, step
        except UserError:  # not damage: nothing to move
            raise
        except Exception as e:  # what a damaged directory raises depends on the damage
            _raise_unless_damage(e, step, mngr.directory)
            message = _brief(e)
            _settle_abandoned_reads()
        aside = os.path.join(os.path.dirname(str(mngr.directory)), CORRUPT_DIR)
        if jax.process_index() == 0:  # one mover on a shared filesystem
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(os.path.join(str(mngr.directory), str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
        mngr.reload()
        logging.warning(
            "checkpoint %d is unreadable (%s): moved to %s; falling back to the previous "
            "complete checkpoint",
            step,
            message,
            aside,
        )
    raise UserError(
        f"no checkpoint in {mngr.directory} could be restored (the last error: {message}); "
        f"the unreadable ones are in {CORRUPT_DIR}/; restore one from a copy, or use a new "
        "--workdir"
    )


def _restore_retrying(mngr: ocp.CheckpointManager, abstract_state, step: int):
    """`restore`, tried a second time before its failure is taken for damage (and the
    checkpoint moved aside): a read can fail once on a busy network filesystem."""
    try:
        return restore(mngr, abstract_state, step)
    except Exception as e:
        _raise_unless_damage(e, step, mngr.directory)
        _settle_abandoned_reads()
        logging.warning("restoring checkpoint %d failed (%s); trying again", step, _brief(e))
    return restore(mngr, abstract_state, step)


def _raise_unless_damage(error: Exception, step: int, directory):
    """Passes up, moving nothing, the failures that say nothing about the checkpoint:
    out of memory (reported by `errors.reported`) and a permission refused."""
    if isinstance(error, MemoryError) or out_of_memory(error):
        raise error
    if any(_permission_refused(e) for e in _causes(error)):
        raise UserError(
            f"checkpoint {step} in {directory} cannot be read ({_brief(error)}); nothing was "
            "moved: give this user read access, or use a new --workdir"
        ) from None


@contextlib.contextmanager
def quiet_abandoned_reads():
    """A failed restore leaves the storage library's pending reads (and their event
    loop) behind, each of which prints a traceback when collected or when it finishes,
    after the failure was reported in one line or one warning: while in this context
    they are waited for and collected quietly (`errors.silence_abandoned_work`)."""
    hooks = sys.unraisablehook, sys.excepthook
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_disabled = asyncio_logger.disabled
    silence_abandoned_work()
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook, sys.excepthook = hooks
        asyncio_logger.disabled = asyncio_disabled


def _settle_abandoned_reads():
    """After a failed restore, in `quiet_abandoned_reads`: the reads it abandoned finish
    within milliseconds on a local disk, and are collected before the context ends."""
    time.sleep(0.2)
    gc.collect()


def _causes(error: BaseException) -> list[BaseException]:
    """The error and its causes (`raise ... from`), outermost first: TensorStore raises
    a generic Exception from the failure that names its reason (PERMISSION_DENIED ...)."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__
    return chain


def _permission_refused(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, PermissionError) or (
        "PERMISSION_DENIED" in text or "os_error_code='13'" in text
    )


def _brief(error: Exception) -> str:
    """The failure's reason in a line: the error's own message, or where TensorStore
    wrapped the failure (its message is the read's index and its own repr) the
    innermost cause's, which names the reason."""
    named = [e for e in _causes(error) if str(e).strip()] or [error]
    text = str(named[-1] if "TensorStore details" in str(named[0]) else named[0])
    return " ".join(text.split())[:300]


@contextlib.contextmanager
def unreadable(step: int, where, alternative: str):
    """A damaged checkpoint's error, whatever the damage made the library raise, as a
    UserError naming the checkpoint, with nothing printed after it by the reads the
    failure abandoned."""
    with quiet_abandoned_reads():
        try:
            yield
        except Exception as e:
            _settle_abandoned_reads()
            raise UserError(
                f"checkpoint {step} in {where} is unreadable ({_brief(e)}); restore it from "
                f"a copy, {alternative}"
            ) from None


def restore_params(
    workdir: str, abstract_params, step: int | None = None, alternative: str = "or use another run"
):
    """Only the model parameters of a checkpoint (another run's, for a later phase, or
    one to evaluate); `alternative` ends the error of an unreadable one."""
    with manager(workdir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {mngr.directory}: pretrain there first")
        other = shape_mismatch(os.path.join(str(mngr.directory), str(step)), abstract_params)
        if other:  # e.g. a fine-tuned run's (a GPT under "transformer", and a head)
            raise UserError(
                f"checkpoint {step} in {mngr.directory} holds another model's parameters "
                f"({other}); point at a pretraining (or converted) run of these sizes"
            )
        with unreadable(step, mngr.directory, alternative):
            restored = mngr.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
            )
    return restored["params"]


def read_params(workdir: str, step: int | None = None) -> dict:
    """The parameters of a workdir's checkpoint (default: the latest), whatever model
    and mesh wrote them (the tree is read from the checkpoint's own metadata), as
    arrays on this host's first device. For tools: conversion, generation, scoring."""
    steps = all_steps(workdir)
    if not steps or (step is not None and step not in steps):
        which = "" if step is None else f" at step {step}"
        raise UserError(f"{workdir} has no checkpoint{which} (steps: {steps or 'none'})")
    step = steps[-1] if step is None else step
    path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), "params")
    with unreadable(step, workdir, "or pick another step"):
        tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return restore_params(workdir, abstract, step)


def agreed_resume_step(workdir: str) -> int | None:
    """The latest checkpoint step as process 0 sees it, the same on every process (a
    process that decided alone could resume from another state than its peers)."""
    step = latest_step(workdir)
    if jax.process_count() > 1:
        step = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
        step = None if step < 0 else step
    return step
