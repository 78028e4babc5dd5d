"""Shared fixtures: tiny configs that exercise every code path quickly on a CPU."""

import ctypes
import logging
import os
import pathlib
import random
import runpy
import sys
import threading
import time

import pytest

from gptjax import machine  # (imports no JAX)

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tests check values, not speed: XLA's cheapest compilation, here and in every
# command they start (which inherit this environment). Compiling dominates the time of
# these tiny models; the benchmark (`python -m gptjax.bench`) measures speed instead.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# With libtpu installed (the tpu extra, for tests/test_estimate.py's compilation for TPU
# slices) on a machine without accelerators, JAX is told to use the CPU, as the commands
# do (`gptjax.machine`); the commands the tests start inherit it.
machine.skip_absent_tpu()


@pytest.fixture(autouse=True)
def _error_hooks():
    """Puts back what a command run in this process changes for the rest of the process,
    so that no later test sees it: the hooks `errors.fail` silences (tracebacks from
    threads and collected objects), and the root logger's handlers and level (a CLI's
    `logging.basicConfig(force=True)` would leave a handler on this test's captured,
    then closed, stderr: every later log line a "Logging error")."""
    hooks = sys.excepthook, sys.unraisablehook
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    sys.excepthook, sys.unraisablehook = hooks
    logging.getLogger("asyncio").disabled = False
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


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


WORDS = (
    ("the", "a", "one", "every", "old")
    + ("young", "king", "queen", "knight", "horse", "dog", "cat", "river", "hill", "town")
    + ("house", "sees", "finds", "loves", "leaves", "keeps", "takes", "follows")
    + ("remembers", "near", "under", "over", "beside", "with", "quickly", "slowly")
    + ("quietly", "bravely", "and", "but", "then", "so", "because", "while")
)


def write_books(directory: pathlib.Path, num_books: int = 5, words_per_book: int = 1500):
    """Made-up books of short sentences over a small vocabulary (learnable structure)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for b in range(num_books):
        lines = []
        for _ in range(words_per_book // 10):
            sentence = [rng.choice(WORDS[:5]), rng.choice(WORDS[5:16]), rng.choice(WORDS[16:24])]
            sentence += [rng.choice(WORDS[:5]), rng.choice(WORDS[5:16]), rng.choice(WORDS[24:])]
            lines.append(" ".join(sentence).capitalize() + ".")
        (directory / f"book_{b:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture
def books(tmp_path):
    return write_books(tmp_path / "books")


def tiny_books_config(books_dir, cache_dir):
    config = tiny_config()
    config.data.update(
        corpus="books", books=str(books_dir), cache_dir=str(cache_dir), validation_fraction=0.2
    )
    return config


def tree_bytes(directory: pathlib.Path) -> dict:
    """Every file under `directory` with its bytes: to show that a command left it as it was."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A tiny pretraining run through the CLI, shared by every test that starts from one:
    `pretrained / "run"` is the workdir (2 blocks, vocab 96, n_ctx 16), `pretrained /
    "cache"` its data cache. Tests never change the run; fine-tuning tests add their
    encoded task splits to the cache (each under a key of its inputs)."""
    from cli import run_main

    root = tmp_path_factory.mktemp("pre")
    books = write_books(root / "books")
    result = run_main(root / "run", books=books, cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def straggler(delay: float) -> threading.Thread:
    """What TensorStore's thread does when a read abandoned by a failed restore finishes
    after its event loop closed: PyErr_Print, from a thread Python did not start."""

    def finish():
        time.sleep(delay)
        ctypes.pythonapi.PyRun_SimpleString(b"raise RuntimeError('Event loop is closed')")

    thread = threading.Thread(target=finish)
    thread.start()
    return thread
