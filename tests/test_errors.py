import subprocess
import sys

import pytest

from gptjax import errors

from conftest import straggler


def test_the_straggler_prints_a_traceback_unless_silenced(capfd):
    """The check below can fail: unsilenced, the straggler's traceback reaches stderr."""
    straggler(0).join()
    assert "Event loop is closed" in capfd.readouterr().err


def test_fail_is_one_line_even_when_abandoned_reads_finish_after_it(capfd):
    with pytest.raises(SystemExit) as exit_:
        errors.fail("checkpoint 4 in w is unreadable")
    straggler(0).join()
    assert exit_.value.code == 2
    assert capfd.readouterr().err == "error: checkpoint 4 in w is unreadable\n"


def test_a_second_ctrl_c_is_one_line_and_status_130():
    """The first Ctrl-C asks for a stop after a step (and a save); the second, Python's
    KeyboardInterrupt, ends the command at once, in one line, not a traceback."""
    code = "from gptjax import errors\nwith errors.reported():\n    raise KeyboardInterrupt"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == errors.EXIT_INTERRUPTED == 130
    assert result.stderr.startswith("interrupted at once by Ctrl-C, perhaps during a save")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_waiting_time_from_the_environment_is_a_number_or_one_line(monkeypatch):
    """GPTJAX_SHARED_WAIT_S and GPTJAX_JOIN_TIMEOUT_S: read where they are used, so that
    a bad value is an error naming it, not a ValueError when a module is imported."""
    monkeypatch.delenv("GPTJAX_SHARED_WAIT_S", raising=False)
    assert errors.seconds_from_env("GPTJAX_SHARED_WAIT_S", 60.0) == 60.0
    monkeypatch.setenv("GPTJAX_SHARED_WAIT_S", "2.5")
    assert errors.seconds_from_env("GPTJAX_SHARED_WAIT_S", 60.0) == 2.5
    # JAX's join takes whole int32 seconds: inf was an OverflowError, 1e12 a TypeError,
    # and -1 a timer that fired at once.
    for bad in ("abc", "inf", "nan", "1e12", "-1", "0"):
        monkeypatch.setenv("GPTJAX_SHARED_WAIT_S", bad)
        with pytest.raises(errors.UserError, match=f"GPTJAX_SHARED_WAIT_S={bad} must be a pos"):
            errors.seconds_from_env("GPTJAX_SHARED_WAIT_S", 60.0)
