"""Running `python -m gptjax.main` from tests, on a tiny config."""

import os
import subprocess
import sys

from conftest import ROOT

TINY = [
    "--config.model.vocab_size=96",
    "--config.model.n_ctx=16",
    "--config.model.n_layer=2",
    "--config.model.n_head=2",
    "--config.model.d_model=32",
    "--config.model.d_mlp=64",
    "--config.train.batch_size=8",
    "--config.train.num_steps=4",
    "--config.train.warmup_steps=2",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.train.ckpt_every=2",
    "--config.data.validation_fraction=0.2",
    "--config.data.tokenizer_sample_lines=10000",
]


def command(workdir, *flags, books=None, cache=None, devices=1, config="configs/gpt1.py"):
    """argv and environment for `python -m gptjax.main` on the tiny config (on `config`
    as it is, for any other config)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    if cache is not None:
        # Restarts reuse compiled steps, as a user's would with the persistent cache.
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache / "jax")
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    args = [sys.executable, "-m", "gptjax.main", f"--config={config}", f"--workdir={workdir}"]
    args += TINY if config == "configs/gpt1.py" else []
    if books is not None:
        args.append(f"--config.data.books={books}")
    if cache is not None:
        args.append(f"--config.data.cache_dir={cache}")
    return args + list(flags), env


def run_main(
    workdir, *flags, books=None, cache=None, devices=1, config="configs/gpt1.py", wrapper=()
):
    """Runs the CLI to completion and returns the CompletedProcess; `wrapper` is a
    command line prefix it runs under (e.g. one that sets resource limits)."""
    args, env = command(workdir, *flags, books=books, cache=cache, devices=devices, config=config)
    return subprocess.run(
        [*wrapper, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def start_main(workdir, *flags, books=None, cache=None, devices=1, config="configs/gpt1.py"):
    """Starts the CLI and returns the Popen (stdout and stderr piped)."""
    args, env = command(workdir, *flags, books=books, cache=cache, devices=devices, config=config)
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_one_line_error(result, *words, workdir=None):
    """Exit status 2, the last line `error: ...` naming `words`, no traceback, and (for a
    fresh `workdir`) nothing written."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for word in words:
        assert word in last, last
    if workdir is not None:
        assert not workdir.exists() or not list(workdir.iterdir())
    return last


def main_in_process(workdir, *flags, books=None, cache=None, config="configs/gpt1.py", capsys=None):
    """The same command line, parsed and run by `gptjax.main` in this process (no new
    interpreter, and compiled steps are shared with the other in-process tests).
    Returns (exit status, the last line of stderr when `capsys` is given)."""
    import jax
    from absl import flags as absl_flags

    from gptjax import main as main_lib

    args, _ = command(workdir, *flags, books=books, cache=cache, config=config)
    argv = ["gptjax.main", *args[3:]]
    cache_dir, sys_argv = jax.config.jax_compilation_cache_dir, sys.argv
    absl_flags.FLAGS.unparse_flags()
    try:
        sys.argv = argv  # ml_collections reads the config overrides from sys.argv
        main_lib.main(main_lib.parse_flags(argv))
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = sys_argv  # (conftest puts back the hooks errors.fail silences)
        absl_flags.FLAGS.unparse_flags()
        for name in [n for n in absl_flags.FLAGS if n.startswith("config.")]:
            delattr(absl_flags.FLAGS, name)  # the overrides this parse defined
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    if capsys is None:
        return status, None
    lines = capsys.readouterr().err.strip().splitlines()
    return status, lines[-1] if lines else ""


def error_in_process(capsys, workdir, *flags, words=(), fresh=True, **kwargs):
    """`main_in_process` that must end with exit status 2 and one line `error: ...`
    naming `words`, leaving a `fresh` workdir empty. Returns that line."""
    status, last = main_in_process(workdir, *flags, capsys=capsys, **kwargs)
    assert status == 2, last
    assert last.startswith("error: "), last
    for word in words:
        assert word in last, last
    if fresh:
        assert not workdir.exists() or not list(workdir.iterdir())
    return last
