import gc
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import checkpoint, optim, sharding, train
from gptjax.errors import UserError
from gptjax.model import GPT, ModelConfig

from conftest import straggler, tiny_config


def make_state(config, seed=0):
    mesh = sharding.make_mesh(config.mesh)
    model = GPT(ModelConfig.from_config(config.model))
    tx = optim.make_optimizer(config.train, 10)
    state, shardings = train.create_state(model, tx, seed, config.model.n_ctx, mesh)
    return state, shardings


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_and_params_only(tmp_path):
    config = tiny_config()
    state, shardings = make_state(config)
    # An update, so that Adam's moments hold values (a fresh state's are all zeros, which
    # a restore that swapped or dropped them would reproduce).
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    grads = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    state = state.apply_gradients(grads=jax.tree.unflatten(tree, grads))
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(state.opt_state))
    state = state.replace(step=state.step + 6)
    with checkpoint.manager(str(tmp_path), keep=2) as mngr:
        checkpoint.save(mngr, state, {"next_index": 7})
        mngr.wait_until_finished()
    assert checkpoint.latest_step(str(tmp_path)) == 7

    fresh, fresh_shardings = make_state(config, seed=1)  # different values, same shapes
    with checkpoint.manager(str(tmp_path)) as mngr:
        target = train.abstract_state(fresh, fresh_shardings)
        restored, data_state = checkpoint.restore(mngr, target)
    assert data_state == {"next_index": 7}
    assert int(restored.step) == 7
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    assert_trees_equal(restored.rng, state.rng)
    assert (
        restored.params["h_0"]["mlp"]["c_fc"]["kernel"].sharding
        == (shardings.params["h_0"]["mlp"]["c_fc"]["kernel"])
    )

    abstract_params = target.params
    params = checkpoint.restore_params(str(tmp_path), abstract_params)
    assert_trees_equal(params, state.params)


def test_keeps_the_last_n(tmp_path):
    config = tiny_config()
    state, _ = make_state(config)
    with checkpoint.manager(str(tmp_path), keep=2) as mngr:
        for step in (1, 2, 3):
            checkpoint.save(mngr, state.replace(step=state.step + step), {})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]


def test_reading_params_takes_the_latest_checkpoint_unless_a_step_is_named(tmp_path):
    """What generation, conversion and zero-shot scoring read: by default the latest
    checkpoint (the one their log line names), not the oldest kept."""
    config = tiny_config()
    first, _ = make_state(config, seed=0)
    second, _ = make_state(config, seed=1)
    with checkpoint.manager(str(tmp_path), keep=2) as mngr:
        checkpoint.save(mngr, first.replace(step=first.step + 1), {})
        checkpoint.save(mngr, second.replace(step=second.step + 2), {})
        mngr.wait_until_finished()
    assert_trees_equal(checkpoint.read_params(str(tmp_path)), second.params)
    assert_trees_equal(checkpoint.read_params(str(tmp_path), 1), first.params)


def test_stop_checkpoints_do_not_push_scheduled_ones_out(tmp_path):
    """Every 4 steps, 13 in all, 2 kept: a stop's checkpoint (6, 10) is kept while it is
    the latest (the resume's), then dropped; the schedule's 2 stay, whatever the stops."""
    config = tiny_config()
    state, _ = make_state(config)
    kept = []
    for step in (4, 6, 8, 10, 12, 13):  # a new manager each time, as after a resume
        with checkpoint.manager(str(tmp_path), keep=2, schedule=(4, 13)) as mngr:
            checkpoint.save(mngr, state.replace(step=state.step + step), {}, force=True)
            mngr.wait_until_finished()
        kept.append(checkpoint.all_steps(str(tmp_path)))
    assert kept == [[4], [4, 6], [4, 8], [4, 8, 10], [8, 12], [12, 13]]


def test_params_only_restore_without_checkpoint_is_a_user_error(tmp_path):
    config = tiny_config()
    state, shardings = make_state(config)
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.restore_params(str(tmp_path), train.abstract_state(state, shardings).params)


def save_one(workdir, state, step=1):
    with checkpoint.manager(str(workdir)) as mngr:
        checkpoint.save(mngr, state.replace(step=state.step + step), {})
        mngr.wait_until_finished()


def test_a_config_of_other_shapes_is_refused_and_the_checkpoint_kept(tmp_path):
    """A checkpoint that does not fit the config is not a damaged one: it stays put."""
    state, _ = make_state(tiny_config())
    save_one(tmp_path, state)
    other = tiny_config()
    other.model.d_mlp = 128
    wider, shardings = make_state(other)
    bias = "['h_0']['mlp']['c_fc']['bias']"  # the first parameter that differs
    with (
        checkpoint.manager(str(tmp_path)) as mngr,
        pytest.raises(UserError, match="another shape") as error,
    ):
        checkpoint.restore_latest_good(mngr, train.abstract_state(wider, shardings))
    assert f"{bias}: (64,) in the checkpoint, (128,) in the config" in str(error.value)
    assert checkpoint.all_steps(str(tmp_path)) == [1]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_params_of_a_damaged_checkpoint_are_a_user_error(tmp_path):
    state, shardings = make_state(tiny_config())
    save_one(tmp_path, state)
    for path in (tmp_path / "checkpoints" / "1" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    abstract = train.abstract_state(state, shardings).params
    with pytest.raises(UserError, match="checkpoint 1 in .* is unreadable"):
        checkpoint.restore_params(str(tmp_path), abstract)
    with pytest.raises(UserError, match="checkpoint 1 in .* is unreadable"):
        checkpoint.read_params(str(tmp_path))


def test_reads_a_failed_restore_abandons_print_nothing_after_its_error(capfd):
    """A read that finishes after the failure (the race that left "Event loop is closed"
    and a traceback after the one-line error) is waited for, silenced, and the hooks put
    back afterwards."""
    hooks = sys.excepthook, sys.unraisablehook
    expected = "checkpoint 3 in w is unreadable .*another step"
    with (
        pytest.raises(UserError, match=expected),
        checkpoint.unreadable(3, "w", "or pick another step"),
    ):
        late = straggler(0.15)
        raise ValueError("truncated")
    late.join()
    assert "Traceback" not in capfd.readouterr().err
    assert (sys.excepthook, sys.unraisablehook) == hooks


def tensorstore_error(reason: str) -> Exception:
    """As TensorStore reports a failed read: a generic Exception, raised from the error
    that names the reason (seen with a checkpoint's files made unreadable)."""
    try:
        try:
            raise ValueError(reason)
        except ValueError as cause:
            raise Exception(
                "Encountered error while reading array index: (slice(0, 2, 1),). See full "
                "TensorStore details: <bound method pybind11_detail_function_record.spec>"
            ) from cause
    except Exception as error:
        return error


def test_a_restore_failure_is_told_by_its_reason():
    error = tensorstore_error("DATA_LOSS: Error reading local file: unexpected end of file")
    assert checkpoint._brief(error).startswith("DATA_LOSS: Error reading local file")
    try:  # another library's error says its reason itself
        try:
            raise KeyError("params")
        except KeyError as cause:
            raise ValueError("no item 'params' in the checkpoint") from cause
    except ValueError as other:
        assert checkpoint._brief(other) == "no item 'params' in the checkpoint"


@pytest.mark.parametrize(
    "error, outcome",
    [
        (OSError(5, "Input/output error"), "restored"),  # once: a network filesystem's hiccup
        (MemoryError(), MemoryError),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"), RuntimeError),
        (PermissionError(13, "Permission denied"), UserError),
        (tensorstore_error("PERMISSION_DENIED: Error reading ... [os_error_code='13']"), UserError),
    ],
)
def test_a_failure_that_is_not_damage_moves_nothing(tmp_path, monkeypatch, error, outcome):
    state, shardings = make_state(tiny_config())
    with checkpoint.manager(str(tmp_path), keep=2) as mngr:
        for step in (1, 2):
            checkpoint.save(mngr, state.replace(step=state.step + step), {"next_index": step})
        mngr.wait_until_finished()
    real, failures = checkpoint.restore, []

    def failing(*args):
        if not failures or outcome != "restored":
            failures.append(error)
            raise error
        return real(*args)

    monkeypatch.setattr(checkpoint, "restore", failing)
    with checkpoint.manager(str(tmp_path)) as mngr:
        target = train.abstract_state(state, shardings)
        if outcome == "restored":
            _, data_state, step = checkpoint.restore_latest_good(mngr, target)
            assert (step, data_state, len(failures)) == (2, {"next_index": 2}, 1)
        else:
            with pytest.raises(outcome):
                checkpoint.restore_latest_good(mngr, target)
    assert not (tmp_path / "corrupt_checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_a_damaged_checkpoint_is_moved_aside_quietly(tmp_path):
    """The previous one is restored, and the storage library's failed reads are not left
    to print "Exception ignored ... Traceback" when they are collected."""
    state, shardings = make_state(tiny_config())
    with checkpoint.manager(str(tmp_path), keep=2) as mngr:
        for step in (1, 2):
            checkpoint.save(mngr, state.replace(step=state.step + step), {"next_index": step})
        mngr.wait_until_finished()
    chunks = list((tmp_path / "checkpoints" / "2" / "params").glob("ocdbt.process_*/d/*"))
    assert chunks
    for chunk in chunks:  # the arrays' bytes cut short; the metadata intact
        os.truncate(chunk, 100)
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with checkpoint.manager(str(tmp_path)) as mngr:
            target = train.abstract_state(state, shardings)
            _, data_state, step = checkpoint.restore_latest_good(mngr, target)
            gc.collect()  # as the run goes on with its manager
    finally:
        sys.unraisablehook = hook
    assert (step, data_state) == (1, {"next_index": 1})
    assert not unraisable, unraisable[0].exc_value
    assert [p.name[:2] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["2-"]


def test_reading_a_workdirs_checkpoints_logs_no_orbax_notices(tmp_path, caplog):
    """Looking at checkpoints (latest step, a fine-tune's init_from, generation's
    parameters) warns of nothing: Orbax's read-only and item-metadata notices are not
    news to a user."""
    state, _ = make_state(tiny_config())
    save_one(tmp_path, state)
    caplog.set_level(logging.INFO)
    assert checkpoint.latest_step(str(tmp_path)) == 1
    params = checkpoint.read_params(str(tmp_path))
    assert_trees_equal(params, state.params)
    assert checkpoint.shape_mismatch(str(tmp_path / "checkpoints" / "1"), params) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


def test_a_steps_missing_metadata_is_still_said(caplog):
    """Only an item's missing metadata file (read all the same) is hushed, not a step's."""
    from absl import logging as absl_logging

    caplog.set_level(logging.INFO)
    for path in (
        "/w/checkpoints/7/params/_CHECKPOINT_METADATA",
        "/w/checkpoints/7/_CHECKPOINT_METADATA",
    ):
        absl_logging.warning("Metadata file does not exist: %s", path)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == ["Metadata file does not exist: /w/checkpoints/7/_CHECKPOINT_METADATA"]
