import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest

from gptjax import config as config_lib
from gptjax.errors import UserError

from conftest import ROOT, gpt1_config


def test_finetune_config_is_the_paper():
    """Section 4.1's fine-tuning details: the rest of the optimiser is pretraining's."""
    c = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("sst2")
    t = c.train
    assert (t.lr, t.batch_size, t.epochs, t.num_steps) == (6.25e-5, 32, 3, None)
    assert (t.schedule, t.warmup_fraction) == ("linear", 0.002)
    assert (t.weight_decay, t.grad_clip, t.b1, t.b2, t.eps) == (0.01, 1.0, 0.9, 0.999, 1e-8)
    assert (c.finetune.lm_coef, c.finetune.clf_dropout, c.model.dropout) == (0.5, 0.1, 0.1)


def test_gpt1_config_is_the_paper():
    c = gpt1_config()
    assert c.model.to_dict() == {
        "vocab_size": 40478,
        "n_ctx": 512,
        "n_layer": 12,
        "n_head": 12,
        "d_model": 768,
        "d_mlp": 3072,
        "dropout": 0.1,
    }
    t = c.train
    assert (t.batch_size, t.epochs, t.num_steps) == (64, 100, None)
    assert (t.lr, t.warmup_steps, t.weight_decay, t.grad_clip) == (2.5e-4, 2000, 0.01, 1.0)
    assert (t.b1, t.b2, t.eps) == (0.9, 0.999, 1e-8)
    assert c.data.corpus == "books"
    config_lib.validate(c)


def test_demo_config_is_gpt1_architecture_on_shakespeare():
    demo = runpy.run_path(str(ROOT / "configs" / "demo.py"))["get_config"]()
    assert demo.data.corpus == "demo"
    assert demo.model.d_model % demo.model.n_head == 0
    # Everything but the sizes and schedule length is inherited from the paper's config.
    assert demo.train.weight_decay == 0.01 and demo.train.b2 == 0.999
    config_lib.validate(demo)


def flat_keys(config, prefix=""):
    return {
        key
        for name, value in config.items()
        for key in (
            flat_keys(value, f"{prefix}{name}.") if hasattr(value, "items") else {prefix + name}
        )
    }


@pytest.mark.parametrize("name", ["demo.py", "bench_cpu.py"])
def test_pretraining_configs_take_every_setting_of_the_paper(name):
    """Configs built on configs/gpt1.py change values, never drop a setting: every
    --config.KEY=... the README offers for pretraining works with each."""
    config = runpy.run_path(str(ROOT / "configs" / name))["get_config"]()
    assert flat_keys(gpt1_config()) <= flat_keys(config)


def test_readme_config_table_names_every_setting():
    # A row names its keys in backticks: `train.lr` / `warmup_steps` is train.lr and
    # train.warmup_steps. The generation, zero-shot and estimate sections have their
    # own README sections.
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Configs") : readme.index("### The workdir")]
    documented = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            section = None
            for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
                if "." in name:
                    section, _, name = name.partition(".")
                documented.add(f"{section}.{name}")
    c = gpt1_config()
    settings = {f"{s}.{k}" for s in ("model", "train", "data", "mesh") for k in c[s]}
    assert settings - documented == set()


@pytest.mark.parametrize(
    "section, key, value, word",
    [
        ("model", "n_layer", 0, "model.n_layer"),
        ("model", "dropout", 1.0, "model.dropout"),
        ("train", "num_steps", -1, "train.num_steps"),
        ("data", "validation_fraction", 0.0, "data.validation_fraction"),
        ("train", "attention", "fused", "model.dropout=0.0"),
        ("train", "attention", "flash", "use 'auto', 'xla', 'fused' or 'pallas'"),
        ("train", "flash_block", 96, "train.flash_block=96"),  # checked for "auto" too
        ("train", "compute_dtype", "float16", "train.compute_dtype"),
        ("train", "attention_blocks", 0, "train.attention_blocks"),
        ("train", "attention_blocks", 513, "model.n_ctx=512"),
        ("train", "microbatches", 3, "train.microbatches"),
        ("train", "remat", "some", "train.remat"),
        ("train", "scan_unroll", 13, "train.scan_unroll"),
        ("train", "scan_unroll", -1, "train.scan_unroll"),
        ("train", "cpu_matmuls", "mkl", "train.cpu_matmuls"),
        ("train", "cpu_vector_width", 384, "train.cpu_vector_width"),
        ("train", "nonfinite", "ignore", "train.nonfinite"),
        ("train", "nonfinite_limit", 0, "train.nonfinite_limit"),
        # NaN passes no `value <= 0` test: a NaN or infinite rate made every parameter NaN
        # and the run saved them over its good checkpoints.
        ("train", "lr", float("nan"), "train.lr=nan must be a finite number, positive"),
        ("train", "lr", float("inf"), "train.lr=inf must be a finite number"),
        ("train", "grad_clip", float("nan"), "train.grad_clip=nan"),
        ("train", "weight_decay", -0.1, "train.weight_decay=-0.1 .* non-negative"),
        ("train", "b1", 1.5, r"train.b1=1.5 .* in \[0, 1\)"),
        ("train", "b2", float("nan"), "train.b2=nan"),
        ("train", "eps", -1.0, "train.eps=-1.0"),
        # Fine in float64, not in float32, where the step computes: each made every
        # parameter NaN at the first update, saved and reported with exit status 0.
        ("train", "b1", 0.99999999999, r"train.b1=0.99999999999 is 1.0 in float32"),
        ("train", "eps", 1e-50, r"train.eps=1e-50 is 0.0 in float32"),
        ("train", "eps", 1e-40, r"train.eps=1e-40 is .* not below 1.2e-38 when positive"),
        ("train", "lr", 1e39, r"train.lr=1e\+39 is inf in float32"),
        ("train", "weight_decay", 1e39, r"train.weight_decay=1e\+39 is inf in float32"),
        ("train", "warmup_steps", -1, "train.warmup_steps"),
        ("train", "seed", -1, r"train.seed is -1; it must be in \[0, 2\*\*32\)"),
        ("train", "seed", 2**32, "train.seed"),
        ("data", "tokenizer_sample_lines", 0, "data.tokenizer_sample_lines is 0"),
    ],
)
def test_validate_names_the_bad_setting(section, key, value, word):
    c = gpt1_config()
    c[section][key] = value
    with pytest.raises(UserError, match=word):
        config_lib.validate(c)


@pytest.mark.parametrize(
    "key, value, word",
    [
        ("finetune.lm_coef", float("nan"), "finetune.lm_coef=nan must be a finite number"),
        ("finetune.lm_coef", -1.0, "finetune.lm_coef=-1.0"),
        ("adapt.lr", float("inf"), "adapt.lr=inf must be a finite number, positive, or unset"),
        ("model.n_ctx", 4, "model.n_ctx=4 leaves no room for the texts"),
    ],
)
def test_validate_names_the_bad_finetuning_setting(key, value, word):
    from gptjax import finetune

    c = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("sst2")
    finetune.resolve_model(c)  # no init_from: the paper's sizes
    config_lib.validate(c)
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(UserError, match=word):
        config_lib.validate(c)


def test_the_demo_corpus_with_books_set_is_refused_not_ignored():
    demo = runpy.run_path(str(ROOT / "configs" / "demo.py"))["get_config"]()
    config_lib.validate(demo)
    demo.data.books = "/data/mine"
    with pytest.raises(UserError, match="add --config.data.corpus=books"):
        config_lib.validate(demo)
    demo.data.corpus = "books"
    config_lib.validate(demo)


@pytest.mark.parametrize(
    "key, value, accepted",
    [("validation_fraction", 0.05, 0.01), ("encoding", "latin-1", "UTF8")],
)
def test_demo_settings_it_does_not_use_are_refused_not_ignored(key, value, accepted):
    """The demo decodes its plays as UTF-8 and holds 4 out, whatever these say."""
    demo = runpy.run_path(str(ROOT / "configs" / "demo.py"))["get_config"]()
    demo.data[key] = accepted  # the same setting, however written
    config_lib.validate(demo)
    demo.data[key] = value
    with pytest.raises(UserError, match=rf"data.{key}=.* has no effect with data.corpus='demo'"):
        config_lib.validate(demo)
    demo.data.update(corpus="books", books="/data/mine")
    config_lib.validate(demo)


def test_attention_blocks_only_split_the_xla_attention():
    c = gpt1_config()
    c.model.dropout = 0.0
    c.train.update(attention="fused", attention_blocks=4)
    with pytest.raises(UserError, match="train.attention=fused set it to 1"):
        config_lib.validate(c)
    for splits in ("xla", "auto"):  # "auto" splits where it runs "xla"
        c.train.attention = splits
        config_lib.validate(c)


def test_pallas_attention_needs_powers_of_two():
    c = gpt1_config()
    c.train.attention = "pallas"
    config_lib.validate(c)  # GPT-1: context 512, heads of 64
    c.train.batch_size = 2048  # a [2048, 12, 512, 512] mask: 2**32 + 2**31 elements
    with pytest.raises(UserError, match="2048 x 12 x 512 x 512; raise --config.train.micro"):
        config_lib.validate(c)
    c.train.microbatches = 2
    config_lib.validate(c)
    c.model.update(n_ctx=500)
    with pytest.raises(UserError, match="model.n_ctx \\(500\\).*attention=xla"):
        config_lib.validate(c)
    c.model.update(n_ctx=512)
    c.train.flash_block = 48
    with pytest.raises(UserError, match="train.flash_block=48 must be a power of two of at least"):
        config_lib.validate(c)


def test_an_attention_dropout_mask_beyond_its_counter_is_refused():
    """Dropout hashes each group of four probabilities' number in 32 bits, so a step's
    mask must stay under 2**34 elements, whatever the attention."""
    c = gpt1_config()
    c.train.attention = "xla"
    c.train.batch_size = 8192  # [8192, 12, 512, 512]: 1.5 x 2**34
    with pytest.raises(UserError, match="8192 x 12 x 512 x 512, has 2\\*\\*34 .*microbatches"):
        config_lib.validate(c)
    c.train.microbatches = 2
    config_lib.validate(c)
    c.model.dropout = 0.0
    c.train.microbatches = 1
    config_lib.validate(c)  # no dropout, no mask


@pytest.mark.parametrize("value", [0, -128])
def test_lm_head_pad_to_is_a_positive_whole_number(value):
    c = gpt1_config()
    c.train.lm_head_pad_to = 128
    config_lib.validate(c)
    c.train.lm_head_pad_to = value
    with pytest.raises(UserError, match="train.lm_head_pad_to=.* must be a whole number"):
        config_lib.validate(c)


def test_local_paths_reaches_every_path_setting(monkeypatch):
    """A leading ~ is expanded in each, and a URL is refused in each (it would have been
    a local directory named `gs:`)."""
    monkeypatch.setenv("HOME", "/home/someone")
    finetune = runpy.run_path(str(ROOT / "configs" / "finetune.py"))["get_config"]("rte")

    def nodes(config):  # (parent ConfigDict, key) of each path setting the config has
        for name in config_lib.PATH_SETTINGS:
            *parents, key = name.split(".")
            node = config
            for parent in parents:
                node = node.get(parent) if node is not None else None
            if node is not None and key in node:
                yield name, node, key

    seen = set()
    for config in (gpt1_config(), finetune):
        for name, node, key in nodes(config):
            node[key] = "~/x"
            seen.add(name)
        config_lib.local_paths(config)
        for name, node, key in nodes(config):
            assert node[key] == "/home/someone/x", name
        for name, node, key in nodes(config):
            node[key] = "gs://bucket/x"
            with pytest.raises(UserError, match=f"--config.{name}=gs://bucket/x is a URL"):
                config_lib.local_paths(config)
            node[key] = "/x"
    # Every listed setting is in one of the configs: a renamed key is not left out.
    assert seen == set(config_lib.PATH_SETTINGS)


def test_a_regular_install_ships_the_configs_gptjax_reads(tmp_path):
    """`pip install .` (not editable) leaves no checkout beside the package: bench's named
    configs, convert and fine-tuning's architecture defaults read the copy installed in it."""
    pytest.importorskip("setuptools")
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build writes into it
    for name in ("gptjax", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    shipped = sorted(p.name for p in (target / "gptjax" / "configs").glob("*.py"))
    assert shipped == sorted(p.name for p in (ROOT / "configs").glob("*.py"))
    code = (
        "import runpy; from gptjax.config import shipped_config as s; print(s('gpt1.py')); "
        "print(runpy.run_path(s('bench_cpu.py'))['get_config']().model.d_model)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [str(target / "gptjax" / "configs" / "gpt1.py"), "384"]


def test_shipped_config_names_a_missing_file():
    with pytest.raises(UserError, match=r"configs/nope\.py .*pip install"):
        config_lib.shipped_config("nope.py")
