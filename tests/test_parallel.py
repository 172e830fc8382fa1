"""The one process pool (pipeline.parallel): order, bounded submission, initializer, errors."""

from __future__ import annotations

import os
import time

import pytest

from pipeline.parallel import OrderedPool, map_ordered

_STATE: dict[str, int] = {}


def _set_offset(offset: int) -> None:
    _STATE["offset"] = offset


def _slow_first(item: int) -> tuple[int, int]:
    time.sleep(0.2 if item == 0 else 0.0)  # the first result is the last to be ready
    if item == 7:
        raise ValueError("bad item 7")
    return item + _STATE["offset"], os.getpid()


@pytest.mark.parametrize("processes", [0, 2])
def test_ordered_pool_keeps_submission_order_and_runs_the_initializer(processes):
    with OrderedPool(_slow_first, processes, initializer=_set_offset, initargs=(100,), in_flight=2) as pool:
        results = [r for item in range(6) for r in pool.submit(item)]
        assert len(results) == 6 if processes == 0 else len(results) < 6, "in-process results are due at once"
        results += pool.drain()
    assert [value for value, _ in results] == [100 + i for i in range(6)]
    workers = {pid for _, pid in results}
    assert workers == {os.getpid()} if processes == 0 else os.getpid() not in workers


def test_ordered_pool_reraises_an_item_error_when_its_result_is_due():
    with pytest.raises(ValueError, match="^bad item 7$"), OrderedPool(_slow_first, 2, _set_offset, (0,)) as pool:
        for item in range(10):
            pool.submit(item)
        pool.drain()


@pytest.mark.parametrize("workers", [1, 3])
def test_map_ordered_is_map(workers):
    _set_offset(0)
    assert [v for v, _ in map_ordered(_slow_first, range(7), workers, _set_offset, (5,))] == list(range(5, 12))
