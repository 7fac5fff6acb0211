"""The thread budget: as many threads as the cores other programs leave free (or a fixed number)."""

import numba
import pytest

import tinyinfer
from tinyinfer import threads
from tinyinfer.threads import ThreadBudget


def fake_machine(monkeypatch, others_busy: float, own_busy: float = 0.5):
    """/proc/stat as if other programs kept `others_busy` cores busy and this process
    `own_busy`, one second per sample."""
    clock = {"t": 0.0}

    def sample():
        clock["t"] += 1.0
        t = clock["t"]
        return t, (others_busy + own_busy) * t, own_busy * t

    monkeypatch.setattr(threads, "_machine_sample", sample)
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["t"] + 10.0)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)


@pytest.mark.parametrize("others_busy, expected", [(0.0, 2), (0.3, 2), (0.9, 1), (1.0, 1), (2.0, 1), (3.0, 1)])
def test_auto_uses_the_cores_other_programs_leave_free(monkeypatch, others_busy, expected):
    fake_machine(monkeypatch, others_busy)
    budget = ThreadBudget("auto", numba=True)
    budget.begin_pass()
    assert budget.current == expected
    assert numba.get_num_threads() == min(expected, numba.config.NUMBA_NUM_THREADS)


def test_a_fixed_count_ignores_the_load(monkeypatch):
    fake_machine(monkeypatch, others_busy=2.0)
    budget = ThreadBudget(2, numba=True)
    budget.begin_pass()
    assert budget.current == 2


def test_blas_follows_the_budget(monkeypatch):
    from threadpoolctl import threadpool_info

    fake_machine(monkeypatch, others_busy=1.0)
    budget = ThreadBudget("auto")
    budget.begin_pass()
    assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    ThreadBudget(2).begin_pass()


@pytest.mark.parametrize("bad", [0, -1, 99, 1.5, "two", True])
def test_impossible_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads must be 'auto' or a whole number from 1 to"):
        tinyinfer.load(threads=bad)


def test_every_forward_pass_sizes_the_team(monkeypatch):
    llm = tinyinfer.load(backend="numba", threads=1)
    calls = []
    monkeypatch.setattr(llm.ops.threads, "begin_pass", lambda: calls.append(1))
    llm.logits([1, 2, 3])
    assert calls == [1]
