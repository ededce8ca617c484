"""The thread policy: the user's word first, then the idle cores."""

import pytest

from squeezer.cli import main
from squeezer.errors import SqueezerError
from squeezer.threads import choose_threads, idle_cores, parse_threads


def test_idle_cores_subtracts_load_and_keeps_one():
    assert idle_cores(load=0.0, cores=4) == 4
    assert idle_cores(load=1.4, cores=4) == 3  # 2.6 rounds up
    assert idle_cores(load=3.6, cores=4) == 1
    assert idle_cores(load=40.0, cores=4) == 1
    assert idle_cores(load=0.0, cores=1) == 1


def test_order_flag_then_env_then_omp_then_load(monkeypatch):
    monkeypatch.setenv("SQUEEZER_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose_threads(2) == (2, "flag")
    assert choose_threads("auto") == (3, "SQUEEZER_THREADS")
    monkeypatch.delenv("SQUEEZER_THREADS")
    assert choose_threads(None) == (5, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, why = choose_threads(None)
    assert why == "idle cores" and n >= 1


@pytest.mark.parametrize("bad", ["0", "-2", "two", 0])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(SqueezerError, match="positive integer or 'auto'"):
        parse_threads(bad)


def test_cli_bad_threads_exit_2(capsys):
    assert main(["zoo", "--threads", "zero"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threads" in err[0]
