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
