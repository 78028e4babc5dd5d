"""Checks on a config beyond what ml_collections' typed fields already enforce."""

import codecs
import contextlib
import math
import os

import ml_collections
import numpy as np

from gptjax import dropout as dropout_lib
from gptjax import flash
from gptjax.errors import UserError, local_path


def shipped_config(name: str) -> str:
    """The path of one of the project's configs, `configs/NAME`.

    A checkout (and an editable install) has them beside the package; a regular
    `pip install .` copies them into it as `gptjax/configs` (setup.py's package_dir), as
    site-packages has no checkout around it. Where the package has its own copy, only
    that is read, so another project's top-level `configs/` in site-packages is never
    taken."""
    package = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(package, "configs")
    if not os.path.isdir(folder):
        folder = os.path.join(os.path.dirname(package), "configs")
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    raise UserError(
        f"configs/{name} is neither beside the gptjax package nor installed in it; "
        "reinstall gptjax from its checkout (pip install .)"
    )


def validate(config: ml_collections.ConfigDict):
    """Raises UserError naming the first inconsistent setting and how to fix it."""
    m, t = config.model, config.train
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.n_ctx": m.n_ctx,
        "model.n_layer": m.n_layer,
        "model.n_head": m.n_head,
        "model.d_model": m.d_model,
        "model.d_mlp": m.d_mlp,
        "train.batch_size": t.batch_size,
        "train.epochs": t.epochs,
        "train.log_every": t.log_every,
        "train.eval_every": t.eval_every,
        "train.ckpt_every": t.ckpt_every,
        "train.keep_checkpoints": t.keep_checkpoints,
    }
    if "task" in config:
        validate_finetune(config)
    else:
        validate_data(config.data)
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"{name} is {value}; it must be positive (--config.{name}=N)")
    if t.num_steps is not None and t.num_steps <= 0:
        raise UserError(f"train.num_steps is {t.num_steps}; it must be positive or unset")
    if t.schedule not in ("cosine", "linear"):
        raise UserError(f"train.schedule is {t.schedule!r}; use 'cosine' or 'linear'")
    if t.warmup_fraction is not None and not 0.0 <= t.warmup_fraction <= 1.0:
        raise UserError(f"train.warmup_fraction={t.warmup_fraction} must be in [0, 1]")
    if m.d_model % m.n_head:
        raise UserError(
            f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}; "
            "choose sizes whose ratio is the head dimension"
        )
    if t.microbatches <= 0 or t.batch_size % t.microbatches:
        raise UserError(
            f"train.microbatches={t.microbatches} must be positive and divide "
            f"train.batch_size={t.batch_size}"
        )
    if t.remat not in ("none", "full", "save_dots"):
        raise UserError(f"train.remat is {t.remat!r}; use 'none', 'full' or 'save_dots'")
    if not 0 <= t.scan_unroll <= m.n_layer:
        raise UserError(
            f"train.scan_unroll={t.scan_unroll} must be between 0 (all {m.n_layer} layers, no "
            "loop) and model.n_layer (blocks per loop iteration with train.scan_layers)"
        )
    if t.compute_dtype not in ("float32", "bfloat16"):
        raise UserError(f"train.compute_dtype is {t.compute_dtype!r}; use float32 or bfloat16")
    if t.attention not in ("auto", "xla", "fused", "pallas"):
        raise UserError(
            f"train.attention is {t.attention!r}; use 'auto', 'xla', 'fused' or 'pallas'"
        )
    if t.attention == "pallas" and not flash.supports(m.n_ctx, m.d_model // m.n_head):
        raise UserError(
            f"train.attention=pallas needs model.n_ctx ({m.n_ctx}) and the head size "
            f"(model.d_model / model.n_head = {m.d_model // m.n_head}) to be powers of two "
            f"of at least {flash.MIN_BLOCK}; use --config.train.attention=xla"
        )
    if t.attention in ("pallas", "auto") and not flash.tileable(t.flash_block):
        raise UserError(
            f"train.flash_block={t.flash_block} must be a power of two of at least "
            f"{flash.MIN_BLOCK} (queries and keys per block of the pallas attention)"
        )
    rows = t.batch_size // t.microbatches
    mask = rows * m.n_head * m.n_ctx**2
    if t.attention == "pallas" and m.dropout > 0 and mask >= flash.MAX_MASK_ELEMENTS:
        raise UserError(
            f"train.attention=pallas draws its dropout mask for at most 2**32 probabilities "
            f"a step, not {rows} x {m.n_head} x {m.n_ctx} x {m.n_ctx}; raise "
            "--config.train.microbatches or use --config.train.attention=xla"
        )
    hashed = dropout_lib.MAX_GROUPS * dropout_lib.DECISIONS_PER_HASH
    if m.dropout > 0 and mask >= hashed:
        raise UserError(
            f"dropout's mask of the attention probabilities, {rows} x {m.n_head} x "
            f"{m.n_ctx} x {m.n_ctx}, has 2**34 elements or more, more than its 32-bit "
            "counter numbers; raise --config.train.microbatches"
        )
    if not isinstance(t.attention_blocks, int) or not 1 <= t.attention_blocks <= m.n_ctx:
        raise UserError(
            f"train.attention_blocks={t.attention_blocks} must be a whole number from 1 "
            f"(one L x L attention) to model.n_ctx={m.n_ctx}"
        )
    if t.attention_blocks > 1 and t.attention not in ("xla", "auto"):
        raise UserError(
            "train.attention_blocks splits the 'xla' attention (and 'auto' where it runs "
            f"'xla'); with train.attention={t.attention} set it to 1"
        )
    if t.attention == "fused" and m.dropout > 0:
        raise UserError(
            "train.attention=fused has no attention dropout; set --config.model.dropout=0.0 "
            "or use --config.train.attention=xla"
        )
    if not isinstance(t.lm_head_pad_to, int) or t.lm_head_pad_to < 1:
        raise UserError(
            f"train.lm_head_pad_to={t.lm_head_pad_to!r} must be a whole number of at least 1 "
            "(1: no padding; 128 aligns the LM head's matmuls for GPUs)"
        )
    if t.lm_head_backward not in ("float32", "compute"):
        raise UserError(
            f"train.lm_head_backward is {t.lm_head_backward!r}; use 'float32' or 'compute'"
        )
    if t.cpu_matmuls not in ("xla", "onednn"):
        raise UserError(f"train.cpu_matmuls is {t.cpu_matmuls!r}; use 'xla' or 'onednn'")
    if t.cpu_vector_width not in (128, 256, 512):
        raise UserError(f"train.cpu_vector_width is {t.cpu_vector_width!r}; use 128, 256 or 512")
    if t.nonfinite not in ("skip", "stop"):
        raise UserError(f"train.nonfinite is {t.nonfinite!r}; use 'skip' or 'stop'")
    if t.nonfinite_limit < 1:
        raise UserError(f"train.nonfinite_limit is {t.nonfinite_limit}; it must be at least 1")
    if t.eval_batches is not None and t.eval_batches <= 0:
        raise UserError(f"train.eval_batches is {t.eval_batches}; it must be positive or unset")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout={m.dropout} must be in [0, 1)")
    if t.warmup_steps < 0:
        raise UserError(f"train.warmup_steps is {t.warmup_steps}; it must be non-negative")
    check_reals(
        {
            "train.lr": (t.lr, POSITIVE),
            "train.grad_clip": (t.grad_clip, POSITIVE),
            "train.weight_decay": (t.weight_decay, NON_NEGATIVE),
            "train.eps": (t.eps, POSITIVE),
            "train.b1": (t.b1, FRACTION),
            "train.b2": (t.b2, FRACTION),
        }
    )
    if not 0 <= t.seed < 2**32:
        raise UserError(f"train.seed is {t.seed}; it must be in [0, 2**32)")
    if not 0.0 < config.data.validation_fraction < 1.0:
        raise UserError(
            f"data.validation_fraction={config.data.validation_fraction} must be in (0, 1)"
        )


POSITIVE = (lambda x: x > 0, "positive")
NON_NEGATIVE = (lambda x: x >= 0, "non-negative")
FRACTION = (lambda x: 0 <= x < 1, "in [0, 1)")


def check_reals(settings: dict):
    """`settings`: {name: (value, (test, what it must be))}; a value that is not a finite
    number passing its test is refused (NaN passes no comparison's negation: a NaN
    learning rate would train every parameter into NaN). None is unset, and passes.

    The test is of the value as the step computes with it, in float32: b1 = 0.99999999999
    is 1.0 there (Adam's bias correction divides by 0), eps = 1e-50 is 0 (a row with no
    gradient divides 0 by 0), a learning rate of 1e39 is infinite; each would turn the
    parameters into NaN at the first update, which the check of the gradients does not
    catch. A positive setting must be at least float32's smallest normal number (1.2e-38),
    below which accelerators flush numbers to 0."""
    for name, (value, (ok, what)) in settings.items():
        if value is None:
            continue
        with np.errstate(over="ignore"):
            value32 = np.float32(value)
        if not (math.isfinite(value) and ok(value)):
            raise UserError(f"{name}={value} must be a finite number, {what} (--config.{name}=X)")
        if not (np.isfinite(value32) and ok(value32)) or 0 < value32 < np.finfo(np.float32).tiny:
            raise UserError(
                f"{name}={value} is {value32} in float32, the precision the step uses: it "
                f"must be {what} there, and not below 1.2e-38 when positive "
                f"(--config.{name}=X)"
            )


def validate_data(data: ml_collections.ConfigDict):
    """A pretraining config's corpus settings."""
    sample = data.get("tokenizer_sample_lines")
    if sample is not None and sample <= 0:
        raise UserError(
            f"data.tokenizer_sample_lines is {sample}; it must be positive (the lines the "
            "tokenizer is learned from)"
        )
    if data.get("corpus") == "demo":
        _check_demo_settings(data)


def _check_demo_settings(data: ml_collections.ConfigDict):
    """The demo's plays are its corpus, decoded as UTF-8 with 4 of them held out,
    whatever `data.books`, `data.encoding` and `data.validation_fraction` say: other
    values are refused, not ignored."""
    if data.get("books"):
        raise UserError(
            f"data.books={data.books} is set, but data.corpus is 'demo' (Shakespeare, as in "
            "configs/demo.py): add --config.data.corpus=books to train on your books"
        )
    encoding = data.get("encoding") or "utf-8"
    with contextlib.suppress(LookupError, TypeError):
        encoding = codecs.lookup(encoding).name  # "UTF8", "utf_8": the same codec
    for key, given, fixed in (
        ("encoding", encoding, "utf-8"),
        ("validation_fraction", data.get("validation_fraction", 0.01), 0.01),
    ):
        if given != fixed:
            raise UserError(
                f"data.{key}={data.get(key)!r} has no effect with data.corpus='demo' "
                "(Shakespeare: decoded as UTF-8, 4 plays held out); leave it at "
                f"{fixed!r}, or add --config.data.corpus=books --config.data.books=DIR"
            )


def validate_finetune(config: ml_collections.ConfigDict):
    """The fine-tuning settings (`configs/finetune.py`), after the model sizes are known."""
    f = config.finetune
    n_ctx = config.model.n_ctx
    if n_ctx is not None and n_ctx < 5:
        # A pair (entailment, similarity, multiple choice) is _start_ a _delimiter_ b _classify_.
        raise UserError(
            f"model.n_ctx={n_ctx} leaves no room for the texts: fine-tuning's inputs need at "
            "least 5 positions (_start_, a text, _delimiter_, a text, _classify_)"
        )
    check_reals({"finetune.lm_coef": (f.lm_coef, (lambda x: x >= 0, "0 or more (0: no LM loss)"))})
    if not 0.0 <= f.clf_dropout < 1.0:
        raise UserError(f"finetune.clf_dropout={f.clf_dropout} must be in [0, 1)")
    n_layer = config.model.n_layer
    if f.n_transfer is not None and not 0 <= f.n_transfer <= n_layer:
        raise UserError(
            f"finetune.n_transfer={f.n_transfer} must be in [0, model.n_layer={n_layer}]"
        )
    if f.n_transfer is not None and not config.init_from:
        raise UserError("finetune.n_transfer needs --config.init_from (a pretrained run)")
    a = config.adapt
    if a.epochs <= 0 or (a.num_steps is not None and a.num_steps <= 0):
        raise UserError("adapt.epochs and adapt.num_steps must be positive")
    check_reals({"adapt.lr": (a.lr, (lambda x: x > 0, "positive, or unset"))})
    if config.eval.checkpoint not in ("best", "latest"):
        raise UserError(f"eval.checkpoint is {config.eval.checkpoint!r}; use 'best' or 'latest'")


# Settings that name a file or directory. The shell expands a leading ~ only where it
# starts a word, not in --config.init_from=~/runs/x; Python's file functions never do.
PATH_SETTINGS = (
    "init_from",
    "finetune.tokenizer",
    "task.train_path",
    "task.eval_path",
    "task.test_path",
    "generate.prompts_file",
    "data.books",
    "data.cache_dir",
    "zeroshot.sst2_path",
    "zeroshot.cola_path",
    "zeroshot.cola_train_path",
    "zeroshot.race_path",
    "zeroshot.dprd_path",
)


def local_paths(config: ml_collections.ConfigDict):
    """Expands a leading ~ in the path settings the config has, in place, and refuses a
    URL there (`errors.local_path`)."""
    for name in PATH_SETTINGS:
        *parents, key = name.split(".")
        node = config
        for parent in parents:
            node = node.get(parent)
            if node is None:
                break
        if node is not None and isinstance(node.get(key), str):
            node[key] = local_path(node[key], f"--config.{name}")
