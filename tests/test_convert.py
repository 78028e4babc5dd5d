"""gptjax.convert: logit parity with HuggingFace's openai-gpt in both directions, the
original release's format, and one-line errors that write nothing."""

import hashlib
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from gptjax import checkpoint, convert, finetune, hf_source, machine, run_config
from gptjax.model import GPT, ModelConfig, TaskModel, unstack_layers

from conftest import ROOT

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

# A large init range, so attention is far from uniform and a misplaced head shows.
HF_SIZES = dict(
    n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64, initializer_range=0.3
)
OURS = dict(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=32, d_mlp=128, dropout=0.0)
TOL = 1e-5
TINY_VOCAB = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "a</w>": 4, "b</w>": 5, "c</w>": 6}
TINY_VOCAB |= {"ab</w>": 7, "ab": 8, "\n</w>": 9}


def hf_model(cls, seed=0, **overrides):
    """A randomly initialised HF model in eval mode, its biases and LN params not trivial."""
    torch.manual_seed(seed)
    model = cls(transformers.OpenAIGPTConfig(**{**HF_SIZES, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(*shape, vocab=64):
    return np.random.default_rng(1).integers(0, vocab, shape).astype(np.int32)


def restore(workdir, model, inputs):
    """Parameters restored the way fine-tuning does: onto the model's own abstract tree."""
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes["params"]
    )
    return checkpoint.restore_params(str(workdir), abstract)


def forward(model, params, *inputs):
    """One compiled forward pass (op-by-op dispatch compiles every op: slower here)."""
    return jax.jit(model.apply)({"params": params}, *inputs)


def digest(directory):
    return {
        os.path.relpath(os.path.join(d, f), directory): hashlib.sha256(
            open(os.path.join(d, f), "rb").read()
        ).hexdigest()
        for d, _, files in os.walk(directory)
        for f in files
    }


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """An HF LM saved with save_pretrained, and its conversion by the CLI."""
    root = tmp_path_factory.mktemp("convert")
    model = hf_model(transformers.OpenAIGPTLMHeadModel)
    model.save_pretrained(root / "hf")
    with open(root / "hf" / "vocab.json", "w") as f:
        json.dump({"<unk>": 0, "a</w>": 1, "\n</w>": 2}, f)
    (root / "hf" / "merges.txt").write_text("#version: 0.2\na b\n")
    # The command as a user starts it: JAX_PLATFORMS unset (the command sets it where
    # libtpu is installed without an accelerator: test_the_command_starts_quietly).
    result = subprocess.run(
        [sys.executable, "-m", "gptjax.convert", "from-hf", root / "hf", root / "ours"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"converted {root / 'hf'} -> {root / 'ours'}" in result.stderr  # it says so
    (root / "stderr.txt").write_text(result.stderr)
    return model, root


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or machine.has_accelerator(),
    reason="needs libtpu installed (the tpu extra) on a machine without accelerators",
)
def test_the_command_starts_quietly(lm):
    """As gptjax.main: with the tpu extra on a machine without a TPU, no libtpu lines."""
    stderr = (lm[1] / "stderr.txt").read_text()
    assert "TPU" not in stderr and "libtpu" not in stderr, stderr[-2000:]


def test_the_command_loads_no_jax_until_it_converts():
    """`--help` and argument errors come before JAX, Orbax or TFDS load (hf_format
    copies LN_EPSILON rather than import the model for it; run_config is imported where a
    checkpoint is read or written)."""
    code = (
        "import sys, gptjax.convert; "
        "print(sorted(m for m in ('jax', 'orbax.checkpoint', 'tensorflow_datasets') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_from_hf_matches_transformers(lm):
    model, root = lm
    workdir = root / "ours"
    assert checkpoint.latest_step(str(workdir)) == 0
    # The workdir is one fine-tuning's init_from accepts: resolve_model reads its sizes.
    ft = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]()
    ft.init_from = str(workdir)
    finetune.resolve_model(ft)
    sizes = {k: ft.model[k] for k in run_config.MODEL_SIZES}
    assert sizes == {k: v for k, v in OURS.items() if k != "dropout"}
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["converted_from"]["format"] == "huggingface"
    assert saved["model"]["dropout"] == pytest.approx(0.1)
    assert (workdir / "merges.txt").read_text() == "#version: 0.2\na b\n"

    ids_BxL = tokens(3, 16)
    assert saved["train"]["scan_layers"]  # the default layout: stacked under `h`
    ours = GPT(ModelConfig(**OURS), scan_layers=True)
    params = restore(workdir, ours, (jnp.zeros((1, 16), jnp.int32),))
    logits = np.asarray(forward(ours, params, ids_BxL))
    with torch.no_grad():
        expected = model(torch.tensor(ids_BxL, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)

    # A pytorch_model.bin (read through PyTorch) holds the same numbers.
    torch.save(model.state_dict(), root / "hf_bin.bin")
    (root / "hf_bin").mkdir()
    os.replace(root / "hf_bin.bin", root / "hf_bin" / "pytorch_model.bin")
    from_bin = hf_source.read_hf_tensors(str(root / "hf_bin"))
    from_safetensors = hf_source.read_hf_tensors(str(root / "hf"))
    for name, x in from_safetensors.items():
        np.testing.assert_array_equal(from_bin[name], x)


def test_to_hf_round_trip(lm, tmp_path):
    model, root = lm
    assert convert.to_hf(str(root / "ours"), str(tmp_path / "back")) == "OpenAIGPTLMHeadModel"
    assert (tmp_path / "back" / "vocab.json").exists()
    back = transformers.OpenAIGPTLMHeadModel.from_pretrained(tmp_path / "back").eval()
    ids_BxL = torch.tensor(tokens(3, 16), dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_allclose(
            back(ids_BxL).logits.numpy(), model(ids_BxL).logits.numpy(), atol=TOL, rtol=0
        )
    assert back.config.afn == "gelu" and back.config.resid_pdrop == pytest.approx(0.1)
    # A run with per-layer parameters (train.scan_layers=False) exports the same tensors.
    _, params = convert.read_workdir(str(root / "ours"))
    scanned = convert.params_to_hf(params)
    unrolled = convert.params_to_hf(jax.tree.map(np.asarray, unstack_layers(params)))
    assert unrolled.keys() == scanned.keys()
    for name, x in unrolled.items():
        np.testing.assert_array_equal(scanned[name], x)


def test_multiple_choice_head(tmp_path):
    """OpenAIGPTDoubleHeadsModel <-> TaskModel(kind="multiple_choice"): HF's mc_logits at
    mc_token_ids are our choice scores at the _classify_ positions, both ways."""
    vocab = OURS["vocab_size"] + 3  # the three fine-tuning specials appended
    model = hf_model(transformers.OpenAIGPTDoubleHeadsModel, seed=2, vocab_size=vocab)
    model.save_pretrained(tmp_path / "hf")
    # transformers 5 saves a tokenizer as tokenizer.json only: vocab and merges come from it.
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text(json.dumps(TINY_VOCAB))
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\na b</w>\na b\n")
    tokenizer = transformers.OpenAIGPTTokenizer.from_pretrained(tmp_path / "tok")
    tokenizer.save_pretrained(tmp_path / "hf")
    convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    (tmp_path / "tok2").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tok2" / name).write_bytes((tmp_path / "ours" / name).read_bytes())
    rebuilt = transformers.OpenAIGPTTokenizer.from_pretrained(tmp_path / "tok2")
    assert rebuilt("ab abc ca").input_ids == tokenizer("ab abc ca").input_ids == [7, 8, 6, 3, 4]
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["task"]["kind"] == "multiple_choice" and saved["model"]["vocab_size"] == 64

    ids_BxSxL = tokens(2, 3, 12, vocab=vocab)
    clf_BxS = np.array([[11, 7, 9], [4, 11, 0]], np.int32)
    cfg = ModelConfig(**{**OURS, "vocab_size": vocab})
    ours = TaskModel(cfg, "multiple_choice", 1, scan_layers=True)
    params = restore(tmp_path / "ours", ours, (ids_BxSxL[:1], clf_BxS[:1]))
    scores_BxS, lm_NxLxV = forward(ours, params, ids_BxSxL, clf_BxS)

    def hf_outputs(m):
        with torch.no_grad():
            out = m(torch.tensor(ids_BxSxL).long(), mc_token_ids=torch.tensor(clf_BxS).long())
        return out.mc_logits.numpy(), out.logits.numpy().reshape(lm_NxLxV.shape)

    mc_logits, logits = hf_outputs(model)
    np.testing.assert_allclose(np.asarray(scores_BxS), mc_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(lm_NxLxV), logits, atol=TOL, rtol=0)

    assert convert.to_hf(str(tmp_path / "ours"), str(tmp_path / "back")) == (
        "OpenAIGPTDoubleHeadsModel"
    )
    back = transformers.OpenAIGPTDoubleHeadsModel.from_pretrained(tmp_path / "back").eval()
    for got, want in zip(hf_outputs(back), (mc_logits, logits), strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_other_heads_export_as_lm_plus_head_file(lm, tmp_path):
    """Other fine-tuned kinds: the LM (specials' rows included) plus task_head.safetensors."""
    from safetensors.numpy import load_file

    _, gpt = convert.read_workdir(str(lm[1] / "ours"))
    gpt = jax.tree.map(np.asarray, unstack_layers(gpt))  # write_workdir takes per-layer ones
    rng = np.random.default_rng(6)
    embedding = gpt["tokens_embed"]["embedding"]
    gpt["tokens_embed"]["embedding"] = np.concatenate([embedding, embedding[:3]])
    head = {"kernel": rng.standard_normal((32, 3), np.float32), "bias": np.ones(3, np.float32)}
    config = json.loads(convert.run_config({**OURS, "vocab_size": 64}, 0.1, {}, clf_dropout=0.1))
    config["task"]["kind"] = "classification"
    params = {"transformer": gpt, "head": head}
    # A BPE of 64 pieces: the model's rows 64-66 are the specials.
    vocab = {"<unk>": 0, **{f"t{i}</w>": i for i in range(1, 63)}, "\n</w>": 63}
    files = {"vocab.json": json.dumps(vocab).encode(), "merges.txt": b"#version: 0.2\n"}
    convert.write_workdir(str(tmp_path / "ft"), params, json.dumps(config), files)
    assert convert.to_hf(str(tmp_path / "ft"), str(tmp_path / "hf")) == "OpenAIGPTLMHeadModel"
    saved = load_file(tmp_path / "hf" / "task_head.safetensors")
    np.testing.assert_array_equal(saved["kernel"], head["kernel"])
    np.testing.assert_array_equal(saved["bias"], head["bias"])
    with safetensors.safe_open(tmp_path / "hf" / "task_head.safetensors", "np") as f:
        assert f.metadata()["classify_token_id"] == "66"
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["vocab_size"] == 67 and hf["afn"] == "gelu"
    assert "id2label" not in hf  # a custom task's classes are in its files, not here
    # HF's tokenizer knows the specials, at the rows the model has for them.
    tokenizer = transformers.OpenAIGPTTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_tokens_to_ids(["_start_", "_delimiter_", "_classify_"]) == [64, 65, 66]
    assert tokenizer("_start_ _classify_")["input_ids"] == [64, 66]
    # The export is the checkpoint results.json reports (a fine-tune's best), while kept;
    # else the latest. Step 5 here: the same model with another head.
    other = {"transformer": gpt, "head": {**head, "bias": np.full(3, 2.0, np.float32)}}
    convert.write_workdir(str(tmp_path / "ft5"), other, json.dumps(config), files)
    shutil.copytree(tmp_path / "ft5" / "checkpoints" / "0", tmp_path / "ft" / "checkpoints" / "5")
    for scored, bias in ((0, 1.0), (5, 2.0), (3, 2.0), (None, 2.0)):
        report = {} if scored is None else {"checkpoint_step": scored}
        (tmp_path / "ft" / "results.json").write_text(json.dumps(report))
        shutil.rmtree(tmp_path / "hf")
        convert.to_hf(str(tmp_path / "ft"), str(tmp_path / "hf"))
        saved = load_file(tmp_path / "hf" / "task_head.safetensors")
        np.testing.assert_array_equal(saved["bias"], np.full(3, bias, np.float32))
    (tmp_path / "ft" / "results.json").write_text(json.dumps({"checkpoint_step": 0}))
    shutil.rmtree(tmp_path / "hf")
    convert.to_hf(str(tmp_path / "ft"), str(tmp_path / "hf"), step=5)  # --step: that one
    saved = load_file(tmp_path / "hf" / "task_head.safetensors")
    np.testing.assert_array_equal(saved["bias"], np.full(3, 2.0, np.float32))
    # A named task's classes become HF's id2label.
    config["task"] = {**config["task"], "name": "sst2"}
    convert.write_workdir(str(tmp_path / "sst2"), params, json.dumps(config), files)
    convert.to_hf(str(tmp_path / "sst2"), str(tmp_path / "sst2_hf"))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "sst2_hf")
    assert hf_config.id2label == {0: "negative", 1: "positive"}


def openai_release(directory, rng):
    """A scaled-down original release: the real tensor order and shapes, random numbers
    split over params_0..9.npy, and tokenizer files. Returns the list of tensors."""
    d, f, n_ctx, vocab = 32, 128, 16, 64
    block = [[1, d, 3 * d], [3 * d], [1, d, d], [d], [d], [d], [1, d, f], [f], [1, f, d]]
    block += [[d], [d], [d]]
    shapes = [[n_ctx, d], [vocab, d]] + 2 * block
    arrays = [(0.1 * rng.standard_normal(s) + (len(s) == 1)).astype(np.float32) for s in shapes]
    directory.mkdir()
    (directory / "params_shapes.json").write_text(json.dumps(shapes))
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    for n, part in enumerate(np.array_split(flat, 10)):
        np.save(directory / f"params_{n}.npy", part)
    (directory / "encoder_bpe_40000.json").write_text(
        json.dumps({"a</w>": 0, "b</w>": 1, "\n</w>": 2})
    )
    (directory / "vocab_40000.bpe").write_text("#version: 0.2\na b\n")
    return arrays


def test_from_openai_matches_transformers(tmp_path):
    arrays = openai_release(tmp_path / "release", np.random.default_rng(4))
    convert.from_openai(str(tmp_path / "release"), str(tmp_path / "ours"), n_head=2)
    assert (tmp_path / "ours" / "vocab.json").read_text() == (
        tmp_path / "release" / "encoder_bpe_40000.json"
    ).read_text()

    # The same numbers into HF's model, by the HF names in the release's order.
    model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**HF_SIZES)).eval()
    block = [f"{m}.{p}" for m in ("attn.c_attn", "attn.c_proj") for p in ("weight", "bias")]
    block += ["ln_1.weight", "ln_1.bias"]
    block += [f"mlp.{m}.{p}" for m in ("c_fc", "c_proj") for p in ("weight", "bias")]
    block += ["ln_2.weight", "ln_2.bias"]
    names = ["positions_embed.weight", "tokens_embed.weight"]
    names += [f"h.{i}.{name}" for i in range(2) for name in block]
    state = {
        n: torch.tensor(a.reshape(a.shape[1:] if a.ndim == 3 else a.shape))
        for n, a in zip(names, arrays, strict=True)
    }
    missing, unexpected = model.transformer.load_state_dict(state, strict=False)
    assert not unexpected and all(".attn.bias" in m for m in missing), (missing, unexpected)

    ids_BxL = tokens(2, 16)
    ours = GPT(ModelConfig(**OURS), scan_layers=True)
    params = restore(tmp_path / "ours", ours, (jnp.zeros((1, 16), jnp.int32),))
    with torch.no_grad():
        expected = model(torch.tensor(ids_BxL).long()).logits.numpy()
    np.testing.assert_allclose(
        np.asarray(forward(ours, params, ids_BxL)), expected, atol=TOL, rtol=0
    )


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        convert.main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines and lines[-1].startswith("error: "), lines
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


def test_bad_inputs_fail_in_one_line_and_write_nothing(lm, tmp_path, capsys, monkeypatch):
    _, root = lm
    openai_release(tmp_path / "release", np.random.default_rng(5))
    os.remove(tmp_path / "release" / "params_3.npy")
    assert "params_3.npy" in run(capsys, "from-openai", tmp_path / "release", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    monkeypatch.chdir(tmp_path)
    assert "DST=gs://b/run is a URL" in run(capsys, "from-hf", root / "hf", "gs://b/run")
    assert not (tmp_path / "gs:").exists()

    before = digest(root / "ours")
    assert "holds a checkpoint" in run(capsys, "from-hf", root / "hf", root / "ours")
    assert digest(root / "ours") == before

    hf = tmp_path / "relu"
    hf.mkdir()
    os.symlink(root / "hf" / "model.safetensors", hf / "model.safetensors")
    config = json.loads((root / "hf" / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "afn": "relu"}))
    assert "afn='relu'" in run(capsys, "from-hf", hf, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    for wrong, words in (
        ({**config, "n_head": 0}, "n_head=0 is not a whole number of at least 1"),
        ({**config, "n_embd": "32"}, "n_embd='32' is not a whole number"),
        ({**config, "n_head": 5}, "is not a multiple of n_head=5"),
        ([1, 2], "is not a JSON object"),
    ):
        (hf / "config.json").write_text(json.dumps(wrong))
        assert words in run(capsys, "from-hf", hf, tmp_path / "b")
        assert not (tmp_path / "b").exists()
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(root / "hf" / name, tok / name)
    for vocab, merges, words in (
        ("{not json", "", "vocab.json is not JSON"),
        ('["a</w>"]', "", "is not a JSON object of piece -> integer id"),
        ('{"a</w>": 0, "\\n</w>": 2}', "", "ids are not 0..N-1"),
        ('{"a</w>": 0}', "", 'no "\\n</w>" piece'),
        ('{"a</w>": 0, "\\n</w>": 1}', "a b c\n", "merge 1 is not two pieces"),
        (json.dumps({f"p{i}": i for i in range(64)} | {"\n</w>": 64}), "", "65 pieces"),
    ):
        (tok / "vocab.json").write_text(vocab)
        (tok / "merges.txt").write_text(merges)
        assert words in run(capsys, "from-hf", tok, tmp_path / "t")
        assert not (tmp_path / "t").exists()
    (tok / "vocab.json").write_bytes(b"\xff\xfe")
    assert "not UTF-8" in run(capsys, "from-hf", tok, tmp_path / "t")
    os.remove(tok / "vocab.json")
    (tok / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}')
    assert "is not a tokenizers BPE tokenizer" in run(capsys, "from-hf", tok, tmp_path / "t")
    assert not (tmp_path / "t").exists()

    openai_release(tmp_path / "release2", np.random.default_rng(5))
    release = tmp_path / "release2"  # a damaged file is named, whichever it is
    good = (release / "params_3.npy").read_bytes()
    for junk in (b"junk", good[:100]):  # not an array; truncated
        (release / "params_3.npy").write_bytes(junk)
        error = run(capsys, "from-openai", release, tmp_path / "e")
        assert "params_3.npy is not a NumPy array file" in error
    (release / "params_3.npy").write_bytes(good)
    vocab = (release / "encoder_bpe_40000.json").read_text()
    (release / "encoder_bpe_40000.json").write_text("{x")
    error = run(capsys, "from-openai", release, tmp_path / "e", "--n_head=4")
    assert "encoder_bpe_40000.json is not JSON" in error
    assert not (tmp_path / "e").exists()
    (release / "encoder_bpe_40000.json").write_text(vocab)
    shapes_file = tmp_path / "release2" / "params_shapes.json"
    shapes = json.loads(shapes_file.read_text())
    for wrong, words in (
        ({"a": [2, 2]}, "is not a list of shapes"),
        ([shapes[0], [shapes[1][0] * shapes[1][1]], *shapes[2:]], "must be matrices"),
    ):
        shapes_file.write_text(json.dumps(wrong))
        assert words in run(capsys, "from-openai", tmp_path / "release2", tmp_path / "e")
        assert not (tmp_path / "e").exists()
    shapes_file.write_text(json.dumps(shapes))
    for heads, words in (("0", "--n_head=0 must be at least 1"), ("5", "does not divide")):
        assert words in run(
            capsys, "from-openai", tmp_path / "release2", tmp_path / "e", f"--n_head={heads}"
        )
        assert not (tmp_path / "e").exists()

    assert "config.json is missing" in run(capsys, "to-hf", tmp_path, tmp_path / "c")
    damaged = tmp_path / "damaged"  # a damaged BPE is not exported as it is
    shutil.copytree(root / "ours", damaged)
    (damaged / "vocab.json").write_text("{x")
    assert "vocab.json is not JSON" in run(capsys, "to-hf", damaged, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.glob("*.tmp*")) and not list(root.glob("*.tmp*"))

    nowhere = tmp_path / "nowhere" / "d"  # no parent is made on the way
    assert "is not a directory; create it first" in run(capsys, "to-hf", root / "ours", nowhere)
    assert "create it first" in run(capsys, "from-hf", root / "hf", nowhere)
    assert not (tmp_path / "nowhere").exists()


def test_a_converted_model_generates_and_fine_tunes_with_its_bpe(tmp_path):
    """The whole path a user of the released model takes, at toy size: HF directory ->
    workdir with GPT-1's BPE -> generation and a fine-tune through the command line."""
    from cli import main_in_process
    from test_bpe import learn_bpe

    from gptjax import generate
    from gptjax.bpe import BPETokenizer

    text = "the king sees the queen. the knight follows the old dog by the river.\n"
    vocab, merges = learn_bpe(text * 3, 25)
    hf = tmp_path / "hf"
    hf_model(transformers.OpenAIGPTLMHeadModel, vocab_size=len(vocab)).save_pretrained(hf)
    (hf / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (hf / "merges.txt").write_text(
        "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n", encoding="utf-8"
    )
    convert.from_hf(str(hf), str(tmp_path / "ours"))

    generator, tokenizer = generate.load(str(tmp_path / "ours"))
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.vocab_size == len(vocab)
    greedy = generate.Sampling(max_new_tokens=5, temperature=0.0)
    [ids] = generator.generate([tokenizer.encode_text("the king")], greedy)
    assert len(ids) == 5 and max(ids) < len(vocab)

    rows = [{"text": "the king sees the river", "label": i % 2} for i in range(8)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    flags = [f"--config.init_from={tmp_path / 'ours'}", "--config.train.batch_size=4"]
    flags += [f"--config.task.train_path={data}", f"--config.task.eval_path={data}"]
    flags += ["--config.train.num_steps=2"]
    ft = tmp_path / "ft"
    status, _ = main_in_process(ft, *flags, cache=tmp_path / "cache", config="configs/finetune.py")
    assert status == 0
    assert json.loads((ft / "results.json").read_text())["results"][0]["accuracy"] >= 0
    assert (ft / "vocab.json").read_bytes() == (hf / "vocab.json").read_bytes()
