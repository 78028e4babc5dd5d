"""Sharding: the same numbers on any mesh, arrays laid out as the rules say, and the
memory levers (gradient accumulation, rematerialisation) changing no value."""

import json
import os
import re
import runpy
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from gptjax import checkpoint, losses, optim, sharding, train
from gptjax.errors import UserError
from gptjax.model import GPT, ModelConfig, stack_layers, unstack_layers

from conftest import ROOT, tiny_config, write_books

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]


def config_for_mesh(shape, dropout=0.1):
    config = tiny_config()
    # Eight heads and a vocabulary divisible by 8, so that tensor=8 splits them evenly.
    config.model.update(n_head=8, d_model=32, d_mlp=64, vocab_size=96, dropout=dropout)
    config.train.update(batch_size=8)
    config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
    return config


def batches(config, count=3):
    rng = np.random.default_rng(0)
    shape = (config.train.batch_size, config.model.n_ctx + 1)
    return [
        {
            "tokens": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
            "weights": np.ones((shape[0], shape[1] - 1), np.float32),
        }
        for _ in range(count)
    ]


def run_steps(config, devices=None, remat="none", microbatches=1, scan_layers=False, scan_unroll=0):
    mesh = sharding.make_mesh(config.mesh, devices)
    model = GPT(
        ModelConfig.from_config(config.model),
        remat=remat,
        scan_layers=scan_layers,
        scan_unroll=scan_unroll,
    )
    train_cfg = config.train.copy_and_resolve_references()
    train_cfg.microbatches = microbatches
    built = train.build(model, losses.lm_objective(model), train_cfg, 100, mesh)
    state, p_train = built.state, built.p_train
    history = []
    for batch in batches(config):
        state, metrics = p_train(state, sharding.global_batch(mesh, batch))
        history.append({k: float(v) for k, v in metrics.items() if k != "nonfinite"})
    return state, history


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


RESTORES = [((8, 1, 1), (1, 1, 1)), ((1, 1, 1), (8, 1, 1)), ((8, 1, 1), (2, 2, 2))]


def worker(out_dir):
    """Runs in a subprocess with 8 CPU devices: trains 3 steps on each mesh and saves a
    checkpoint, then restores checkpoints saved on one mesh onto another."""
    for shape in MESHES:
        n = int(np.prod(shape))
        state, history = run_steps(config_for_mesh(shape), jax.devices()[:n])
        with checkpoint.manager(os.path.join(out_dir, f"ckpt_{shape}")) as mngr:
            checkpoint.save(mngr, state, {"next_index": 3}, wait=True)
        np.savez(
            os.path.join(out_dir, f"saved_{shape}.npz"),
            **flat({"params": state.params, "opt_state": state.opt_state}),
        )
        params = flat(state.params)
        np.savez(os.path.join(out_dir, f"params_{n}_{shape}.npz"), **params)
        kernel = state.params["h_0"]["attn"]["c_attn"]["kernel"]
        mu = next(
            x
            for path, x in jax.tree.leaves_with_path(state.opt_state)
            if ".mu" in jax.tree_util.keystr(path)
            and jax.tree_util.keystr(path).endswith("['h_0']['mlp']['c_fc']['kernel']")
        )
        report = {
            "history": history,
            # The shape of one device's piece of each array.
            "c_attn_shard": kernel.addressable_shards[0].data.shape,
            "c_fc_mu_shard": mu.addressable_shards[0].data.shape,
            "embedding_shard": (
                state.params["tokens_embed"]["embedding"].addressable_shards[0].data.shape
            ),
            "bytes_per_device": max(
                sum(
                    s.data.nbytes
                    for leaf in jax.tree.leaves(state)
                    if hasattr(leaf, "addressable_shards")
                    for s in leaf.addressable_shards
                    if s.device == d
                )
                for d in jax.devices()[:n]
            ),
        }
        with open(os.path.join(out_dir, f"report_{shape}.json"), "w") as f:
            json.dump(report, f)
    # The default layout (stacked, unrolled) on a mesh with all three axes, against the
    # per-layer model on one device; dropout off (the two draw their masks differently).
    _, per_layer = run_steps(config_for_mesh((1, 1, 1), dropout=0.0), jax.devices()[:1])
    stacked, history = run_steps(config_for_mesh((2, 2, 2), dropout=0.0), scan_layers=True)
    kernel = stacked.params["h"]["attn"]["c_attn"]["kernel"]
    with open(os.path.join(out_dir, "stacked.json"), "w") as f:
        json.dump(
            {
                "per_layer": per_layer,
                "stacked": history,
                "c_attn_shard": kernel.addressable_shards[0].data.shape,
            },
            f,
        )
    # A vocabulary that tensor=8 does not divide (GPT-1's is odd with fine-tuning's
    # specials) stays whole on each device; the heads and the MLP are still split.
    odd = {}
    for shape in [(1, 1, 1), (1, 1, 8)]:
        config = config_for_mesh(shape)
        config.model.vocab_size = 95
        state, history = run_steps(config, jax.devices()[: int(np.prod(shape))])
        embedding = state.params["tokens_embed"]["embedding"]
        kernel = state.params["h_0"]["mlp"]["c_fc"]["kernel"]
        odd[str(shape)] = {
            "history": history,
            "embedding_shard": embedding.addressable_shards[0].data.shape,
            "c_fc_shard": kernel.addressable_shards[0].data.shape,
            "embedding": np.asarray(embedding).tolist(),
        }
    with open(os.path.join(out_dir, "odd_vocab.json"), "w") as f:
        json.dump(odd, f)
    for source, target in RESTORES:
        config = config_for_mesh(target)
        mesh = sharding.make_mesh(config.mesh, jax.devices()[: int(np.prod(target))])
        model = GPT(ModelConfig.from_config(config.model))
        tx = optim.make_optimizer(config.train, 100)
        fresh, shardings = train.create_state(model, tx, 1, config.model.n_ctx, mesh)
        with checkpoint.manager(os.path.join(out_dir, f"ckpt_{source}")) as mngr:
            restored, _ = checkpoint.restore(mngr, train.abstract_state(fresh, shardings))
        kernel = restored.params["h_0"]["mlp"]["c_fc"]["kernel"]
        assert kernel.sharding == shardings.params["h_0"]["mlp"]["c_fc"]["kernel"]
        np.savez(
            os.path.join(out_dir, f"restored_{source}_{target}.npz"),
            **flat({"params": restored.params, "opt_state": restored.opt_state}),
        )


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes")
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    code = (
        f"import sys; sys.path.insert(0, 'tests'); import test_sharding; "
        f"test_sharding.worker({str(out)!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = {"dir": out}
    for shape in MESHES:
        with open(out / f"report_{shape}.json") as f:
            reports[shape] = json.load(f)
        n = int(np.prod(shape))
        reports[shape]["params"] = dict(np.load(out / f"params_{n}_{shape}.npz"))
    return reports


@pytest.mark.parametrize("shape", MESHES[1:])
def test_losses_gradients_and_params_equal_one_device(mesh_runs, shape):
    one, many = mesh_runs[(1, 1, 1)], mesh_runs[shape]
    for a, b in zip(one["history"], many["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for name, value in one["params"].items():
        np.testing.assert_allclose(many["params"][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("source, target", RESTORES)
def test_checkpoint_restores_onto_another_topology(mesh_runs, source, target):
    saved = np.load(mesh_runs["dir"] / f"saved_{source}.npz")
    restored = np.load(mesh_runs["dir"] / f"restored_{source}_{target}.npz")
    assert set(saved) == set(restored) and len(saved) > 50
    for name in saved:
        np.testing.assert_array_equal(restored[name], saved[name])


def test_arrays_are_sharded_as_the_rules_say(mesh_runs):
    # c_attn kernel (embed, qkv, heads, kv) = (32, 3, 8, 4): embed over fsdp, heads over
    # tensor; replicated under pure data parallelism.
    assert mesh_runs[(8, 1, 1)]["c_attn_shard"] == [32, 3, 8, 4]
    assert mesh_runs[(1, 8, 1)]["c_attn_shard"] == [4, 3, 8, 4]
    assert mesh_runs[(2, 2, 2)]["c_attn_shard"] == [16, 3, 4, 4]
    # Adam's moments follow their parameters: c_fc (embed, mlp) = (32, 64).
    assert mesh_runs[(8, 1, 1)]["c_fc_mu_shard"] == [32, 64]
    assert mesh_runs[(1, 8, 1)]["c_fc_mu_shard"] == [4, 64]
    assert mesh_runs[(2, 2, 2)]["c_fc_mu_shard"] == [16, 32]
    # The token embedding (vocab, embed) = (96, 32): vocab over tensor, embed over fsdp.
    assert mesh_runs[(2, 2, 2)]["embedding_shard"] == [48, 16]


def test_a_vocabulary_the_tensor_axis_does_not_divide_stays_whole(mesh_runs):
    with open(mesh_runs["dir"] / "odd_vocab.json") as f:
        runs = json.load(f)
    one, split = runs["(1, 1, 1)"], runs["(1, 1, 8)"]
    assert split["embedding_shard"] == [95, 32]  # whole: 95 rows do not split 8 ways
    assert split["c_fc_shard"] == [32, 8]  # the MLP still split over tensor=8
    for a, b in zip(one["history"], split["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    np.testing.assert_allclose(split["embedding"], one["embedding"], rtol=1e-4, atol=1e-6)


def test_stacked_layers_on_a_mesh_equal_per_layer_on_one_device(mesh_runs):
    with open(mesh_runs["dir"] / "stacked.json") as f:
        report = json.load(f)
    for a, b in zip(report["per_layer"], report["stacked"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # The stacked c_attn kernel (layers, embed, qkv, heads, kv): layers unsplit, the rest
    # as per layer.
    assert report["c_attn_shard"] == [2, 16, 3, 4, 4]


def test_fsdp_shrinks_per_device_memory(mesh_runs):
    replicated = mesh_runs[(8, 1, 1)]["bytes_per_device"]
    assert mesh_runs[(1, 8, 1)]["bytes_per_device"] < replicated / 6
    assert mesh_runs[(2, 2, 2)]["bytes_per_device"] < replicated / 3


def test_gradient_accumulation_equals_the_full_batch():
    config = config_for_mesh((1, 1, 1), dropout=0.0)  # each slice draws its own dropout
    state_full, full = run_steps(config)
    state_acc, acc = run_steps(config, microbatches=4)
    for a, b in zip(full, acc, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for a, b in zip(
        jax.tree.leaves(state_full.params), jax.tree.leaves(state_acc.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def plain_run():
    return run_steps(config_for_mesh((1, 1, 1)))


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_rematerialisation_changes_no_value(plain_run, remat):
    state_plain, plain = plain_run
    state_remat, remat_hist = run_steps(config_for_mesh((1, 1, 1)), remat=remat)
    for a, b in zip(plain, remat_hist, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for a, b in zip(
        jax.tree.leaves(state_plain.params), jax.tree.leaves(state_remat.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat, scan_unroll", [("none", 0), ("full", 0), ("none", 1)])
def test_scan_over_layers_changes_no_value(remat, scan_unroll):
    # Dropout off: the scanned stack draws its per-layer dropout keys differently.
    config = config_for_mesh((1, 1, 1), dropout=0.0)
    state_plain, plain = run_steps(config)
    state_scan, scanned = run_steps(config, remat=remat, scan_layers=True, scan_unroll=scan_unroll)
    for a, b in zip(plain, scanned, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # Same initial values too: stacking the unrolled parameters gives the scanned ones.
    unstacked = unstack_layers(jax.device_get(state_scan.params))
    assert jax.tree.structure(unstacked) == jax.tree.structure(state_plain.params)
    for a, b in zip(jax.tree.leaves(state_plain.params), jax.tree.leaves(unstacked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_layer_layouts_convert_both_ways():
    cfg = ModelConfig.from_config(config_for_mesh((1, 1, 1), dropout=0.0).model)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.n_ctx))
    params = nn.unbox(GPT(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    stacked = stack_layers(params, cfg.n_layer)
    assert stacked["h"]["mlp"]["c_fc"]["kernel"].shape == (cfg.n_layer, 32, 64)
    np.testing.assert_allclose(
        GPT(cfg, scan_layers=True).apply({"params": stacked}, tokens),
        GPT(cfg).apply({"params": params}, tokens),
        rtol=1e-5,
        atol=1e-5,
    )
    back = unstack_layers(stacked)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mesh_sizes_are_checked():
    config = tiny_config()
    config.mesh.update(data=3, fsdp=1, tensor=1)
    with pytest.raises(UserError, match="needs 3 devices"):
        sharding.make_mesh(config.mesh)
    config.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(UserError, match="at most one -1"):
        sharding.make_mesh(config.mesh)


class FakeMesh:
    """Only the axis sizes are read."""

    def __init__(self, shape):
        self.shape = shape


def test_a_minus_one_axis_takes_the_devices_the_others_leave():
    from ml_collections import ConfigDict

    assert sharding.mesh_shape(ConfigDict(dict(data=-1, fsdp=2, tensor=2)), 8) == (2, 2, 2)
    assert sharding.mesh_shape(ConfigDict(dict(data=1, fsdp=-1, tensor=4)), 8) == (1, 2, 4)
    assert sharding.mesh_shape(ConfigDict(dict(data=-1, fsdp=1, tensor=1)), 8) == (8, 1, 1)


def test_a_batch_that_does_not_split_into_its_microbatches_is_refused():
    """6 rows over 2 data-parallel devices split, but not into 2 microbatches each."""
    config = tiny_config()
    config.train.update(batch_size=6, microbatches=2)
    mesh = FakeMesh({"data": 2, "fsdp": 1, "tensor": 1})
    with pytest.raises(UserError, match="into 2 microbatches over 2 data-parallel"):
        sharding.check_batch(config, mesh)
    config.train.batch_size = 8
    sharding.check_batch(config, mesh)


@pytest.mark.parametrize(
    "mesh, words",
    [
        ({"data": 1, "fsdp": 1, "tensor": 8}, "model.n_head=12 does not split into mesh.tensor=8"),
        ({"data": 1, "fsdp": 5, "tensor": 1}, "model.d_model=768 does not split into mesh.fsdp=5"),
    ],
)
def test_sizes_the_mesh_does_not_divide_are_named(mesh, words):
    model = runpy.run_path(str(ROOT / "configs" / "gpt1.py"))["get_config"]().model
    with pytest.raises(UserError, match=re.escape(words)):
        sharding.check_model_splits(model, FakeMesh(mesh))
    sharding.check_model_splits(model, FakeMesh({**mesh, "fsdp": 1, "tensor": 1}))
    sharding.check_model_splits(model, FakeMesh({"data": 1, "fsdp": 2, "tensor": 2}))


def test_a_vocabulary_the_mesh_does_not_divide_is_said_not_refused(caplog):
    model = runpy.run_path(str(ROOT / "configs" / "gpt1.py"))["get_config"]().model
    with caplog.at_level("INFO"):
        sharding.check_model_splits(model, FakeMesh({"data": 1, "fsdp": 1, "tensor": 4}), 3)
    assert "model.vocab_size=40478 + 3 fine-tuning specials does not split into mesh.tensor=4" in (
        caplog.text
    )
    assert "kept whole" in caplog.text


def test_a_model_the_mesh_does_not_divide_is_refused_before_any_work(tmp_path):
    """Before the corpus is read and the tokenizer trained, not at the first compile."""
    from cli import assert_one_line_error, run_main

    books = write_books(tmp_path / "books")
    flags = ["--config.mesh.data=1", "--config.mesh.tensor=2", "--config.model.d_mlp=63"]
    result = run_main(tmp_path / "run", *flags, books=books, cache=tmp_path / "c", devices=2)
    assert_one_line_error(result, "model.d_mlp=63", "mesh.tensor=2", workdir=tmp_path / "run")
