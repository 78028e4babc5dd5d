"""Orbax checkpoints of a run: parameters, optimiser state and the data position.

A checkpoint step directory holds three items, so later phases can take only what they
need: `params` (the model), `opt_state` (step, dropout key, Adam moments) and `data`
(the grain iterator's position, JSON). Saves are asynchronous; Orbax writes each step
to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that `latest_step` would pick up.
"""

import os

import jax
import orbax.checkpoint as ocp

from gptjax.errors import UserError

CHECKPOINT_DIR = "checkpoints"


def manager(
    workdir: str, keep: int = 1, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager; `read_only` creates and deletes nothing."""
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        item_names=("params", "opt_state", "data"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        ),
    )


def latest_step(workdir: str) -> int | None:
    """The step of the workdir's latest complete checkpoint, without writing anything."""
    with manager(workdir, read_only=True) as mngr:
        return mngr.latest_step()


def _train_state_items(state) -> tuple[dict, dict]:
    return state.params, {"step": state.step, "rng": state.rng, "opt_state": state.opt_state}


def save(mngr: ocp.CheckpointManager, state, data_state: dict, force: bool = False) -> bool:
    """Starts saving `state` at its step (returns before the write completes)."""
    params, rest = _train_state_items(state)
    return mngr.save(
        int(jax.device_get(state.step)),
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(rest),
            data=ocp.args.JsonSave(data_state),
        ),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the whole train state (onto the shardings in `abstract_state`, a tree of
    `jax.ShapeDtypeStruct`) and the data position from `step` (default: the latest)."""
    step = mngr.latest_step() if step is None else step
    params, rest = _train_state_items(abstract_state)
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params),
                opt_state=ocp.args.StandardRestore(rest),
                data=ocp.args.JsonRestore(),
            ),
        )
    except (ValueError, KeyError) as e:
        raise UserError(
            f"checkpoint step {step} in {mngr.directory} does not fit this config's model "
            f"({str(e).splitlines()[0][:200]}); use the config it was trained with or a "
            "new --workdir"
        ) from None
    rest = restored["opt_state"]
    state = abstract_state.replace(
        params=restored["params"],
        step=rest["step"],
        rng=rest["rng"],
        opt_state=rest["opt_state"],
    )
    return state, restored["data"]


def restore_params(workdir: str, abstract_params, step: int | None = None):
    """Only the model parameters of another run's checkpoint (for a later phase)."""
    with manager(workdir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {mngr.directory}: pretrain there first")
        restored = mngr.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
    return restored["params"]
