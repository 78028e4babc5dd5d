"""The one exception type for bad user input, and how a command reports it."""

import contextlib
import errno
import logging
import math
import os
import re
import sys


class UserError(Exception):
    """A problem with the user's input (config, data, workdir), reported as one line.

    The CLI prints `error: <message>` and exits with a non-zero status; nothing
    on disk is changed. Messages name the problem and the fix.
    """


class WriteFailed(UserError):
    """A checkpoint could not be written (a full disk): reported like any UserError, but
    the process then ends at once (see `fail`), since the storage library's background
    writers it abandons would print tracebacks while the interpreter shuts down."""


# The errors of writing a file that the machine, not the program, is the cause of.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
    }
)

# sysexits' EX_TEMPFAIL, "a temporary failure; the user is invited to retry": the exit
# status after a stop on a signal, with a checkpoint written.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # the shell's status for a SIGINT


class Preempted(BaseException):
    """Training stopped early on a signal, after a synchronous checkpoint at `step`, or
    (`step` None) outside the training loop, with nothing unsaved to lose.

    A BaseException, like KeyboardInterrupt: raised from a signal handler anywhere, it
    must pass through the `except Exception` that read a failure as a damaged checkpoint
    or a full disk (a good checkpoint moved aside on a Ctrl-C during its restore)."""

    def __init__(self, step: int | None, reason: str):
        where = (
            f"at step {step}; checkpoint saved"
            if step is not None
            else "outside the training loop; nothing unsaved is lost"
        )
        super().__init__(f"stopped by {reason} {where}")
        self.step, self.reason = step, reason


def fail(message: str, at_once: bool = False):
    """The one way bad input ends a command: one line on stderr and exit status 2
    (`at_once`: without the interpreter's shutdown, after flushing the logs)."""

    print(f"error: {message}", file=sys.stderr)
    if at_once:
        exit_at_once(2)
    silence_abandoned_work()
    sys.exit(2)


def exit_at_once(status: int):
    """Ends the process with `status` after flushing the logs, without the interpreter's
    shutdown (which would wait for background threads: a save's, an abandoned read's)."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def silence_abandoned_work():
    """Keeps the storage library's abandoned reads (a damaged checkpoint) from printing
    tracebacks after a failure was reported in one line: collected, each prints
    "Exception ignored ... Traceback" (sys.unraisablehook); finishing after their event
    loop closed, TensorStore's threads print "Event loop is closed" and its traceback
    (PyErr_Print, through sys.excepthook); asyncio's logger reports "Task exception was
    never retrieved". For the rest of the process: only at its end, or undone by the
    caller (`checkpoint.quiet_abandoned_reads`)."""
    sys.unraisablehook = lambda unraisable: None
    sys.excepthook = lambda *exc_info: None
    logging.getLogger("asyncio").disabled = True


@contextlib.contextmanager
def reported():
    """How a command's run ends when it does not finish: bad input, and a config too big
    for the memory there is, as one line and exit status 2 (`fail`); a stop on a signal,
    its checkpoint saved, with EXIT_PREEMPTED."""
    try:
        yield
    except UserError as e:
        fail(str(e), at_once=isinstance(e, WriteFailed))
    except Preempted as e:
        logging.warning("%s; run the same command to resume", e)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:  # a second Ctrl-C (the first asks for a stop, and a save),
        # or one where JAX's preemption service has the signals (several hosts)
        print(
            "interrupted at once by Ctrl-C, perhaps during a save: the same command "
            "resumes a run from its latest complete checkpoint",
            file=sys.stderr,
        )
        exit_at_once(EXIT_INTERRUPTED)  # a save cut short leaves only temporary files
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        # Something in the way of a file the command writes (a directory where a results
        # file goes), a full disk, no permission: the environment, not a bug.
        path = e.filename2 or e.filename
        where = f"{path}: " if path else ""
        fail(
            f"{where}{e.strerror}; move what is in the way, free some space or grant access, "
            "and run the command again"
        )
    except Exception as e:
        if not out_of_memory(e):
            raise
        fail(
            f"out of memory ({one_line(e)[:300]}); lower train.batch_size, raise "
            "train.microbatches, set train.remat=full, use more devices or a smaller model"
        )


def out_of_memory(error: Exception) -> bool:
    """Whether `error` is XLA's failure to allocate (host or device memory)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def config_value(flag):
    """A config flag's value. A config file that does not load raises only when the
    config is first used, so it is used here, and its error is one line."""
    config = None
    try:
        config = flag.value
        config.model  # noqa: B018
    except OSError as e:
        fail(f"could not load the config: {one_line(e)}")
    except (AttributeError, KeyError):  # get_config() returned a dict, or no model section
        what = (
            "a ConfigDict without a model section"
            if hasattr(config, "to_dict")
            else f"a {type(config).__name__}, not an ml_collections ConfigDict"
        )
        fail(
            f"the config is not a gptjax config: its get_config() returned {what}; build it "
            "as configs/gpt1.py does"
        )
    return config


def seconds_from_env(name: str, default: float) -> float:
    """A waiting time in seconds set by the environment variable `name` (`default` when
    unset); UserError when it is not a positive, finite number."""
    given = os.environ.get(name, "")
    if not given:
        return default
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < 1e9:  # (NaN too) JAX takes its own timeouts in whole int32 seconds
        raise UserError(f"{name}={given} must be a positive number of seconds, below 1e9")
    return seconds


# A URL's scheme: gs://, s3://, https://, file://.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(path: str, what: str) -> str:
    """`path` with a leading ~ expanded (the shell leaves --flag=~/x alone). A URL is
    refused: gptjax reads and writes through the local filesystem, where `gs://b/run`
    would be a directory named `gs:` in the current one."""
    if _URL.match(path):
        raise UserError(
            f"{what}={path} is a URL; gptjax reads and writes local paths only (a bucket "
            "is not supported yet): give a local path, or for several hosts one on a "
            "filesystem they all mount (docs/scaling.md)"
        )
    return os.path.expanduser(path)


def one_line(error: Exception) -> str:
    """The message without embedded tracebacks or line breaks."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = [lines[0].split("Traceback")[0], lines[-1]]
    return " ".join(" ".join(lines).split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with every bad flag or config override reported as one line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl's --help, --helpshort, --helpfull: printed, exit 1
        asked = {a.split("=")[0] for a in argv[1:]} & {"-h", "--help", "--helpshort", "--helpfull"}
        if e.code == 1 and asked:
            sys.exit(0)  # what was asked for was done
        raise
    except (AttributeError, KeyError) as e:  # ml_collections: a key that does not exist
        if "attribute 'get_config'" in str(e):
            fail("could not load the config: the file defines no get_config(); see configs/")
        # Its message (in an AttributeError, the KeyError it wraps) is the key, quoted,
        # perhaps with a line 'Did you mean "train" instead of "trian"?'.
        while e.args and isinstance(e.args[0], Exception):
            e = e.args[0]
        name, _, hint = str(e.args[0] if e.args else e).partition("\n")
        name = name.strip("\"' ")
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a]
        hint = f" ({hint.strip()})" if hint.strip() else ""
        fail(f"{(bad or ['--config'])[0]}: no such config key {name!r}{hint}; see the config file")
    except flags.Error as e:
        fail(f"{one_line(e).rstrip('.')}; see --helpfull")
    except (OSError, TypeError, ValueError) as e:
        fail(f"could not load the config: {one_line(e)}")
    except Exception as e:  # the config file's own code failed: a syntax error, a raise
        fail(f"could not load the config: {type(e).__name__}: {one_line(e)}")


def argument_parser(**kwargs):
    """An argparse parser whose usage errors end like every gptjax error: one line on
    stderr and exit status 2 (for the commands that take sub-commands or plain flags)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            fail(f"{message}; see {self.prog} --help")

    return Parser(**kwargs)
