"""Shared fixtures: tiny configs that exercise every code path quickly on a CPU."""

import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def gpt1_config():
    return runpy.run_path(str(ROOT / "configs" / "gpt1.py"))["get_config"]()


def tiny_config():
    """The paper's config shrunk to a model that trains in seconds."""
    config = gpt1_config()
    config.model.update(vocab_size=96, n_ctx=16, n_layer=2, n_head=2, d_model=32, d_mlp=64)
    config.train.update(
        batch_size=4,
        num_steps=6,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        eval_every=3,
        ckpt_every=3,
    )
    config.data.update(tokenizer_sample_lines=10_000)
    return config


@pytest.fixture
def tiny():
    return tiny_config()
